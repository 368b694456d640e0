//! The per-(process, stack) totals, in an array with open addressing (the
//! protocol is on `memleak_common::Totals`). A block keeps its entry's
//! index, so a free updates it without a lookup, and an allocation finds
//! it through this CPU's hint (`KNOWN_SLOTS`): a hash map lookup at each
//! end (a jhash and a bucket walk) was a third of what the totals cost.

use memleak_common::{NO_SLOT, Sums, TOTALS_BUSY, TOTALS_PROBES, Totals};

use crate::{
    atomic::{cas, cas_publish, load, store},
    config,
    maps::{KNOWN_SLOT_BITS, KNOWN_SLOTS, TOTALS},
};

/// The entry `slot` if it still belongs to `tgid` (given back when a
/// process exits, and claimed again).
#[inline(always)]
pub fn entry(slot: u32, tgid: u32) -> Option<&'static mut Totals> {
    if slot == NO_SLOT {
        return None;
    }
    // SAFETY: an array map's value, alive as long as the map.
    let t = unsafe { &mut *TOTALS.get_ptr_mut(slot)? };
    let owner = load(&t.owner);
    // Not one being claimed: its low half is u32::MAX, KERNEL_SLAB's tgid.
    (owner as u32 == tgid && owner != TOTALS_BUSY).then_some(t)
}

/// This CPU's hint for (owner, stack_id): the index of the entry it used
/// for them last, or of another.
#[inline(always)]
pub fn hint(owner: u64, stack_id: u64) -> Option<&'static mut u32> {
    let hash = key_hash(owner, stack_id);
    // SAFETY: a per-CPU array's value, this CPU's.
    KNOWN_SLOTS.get_ptr_mut((hash >> (64 - KNOWN_SLOT_BITS)) as u32).map(|h| unsafe { &mut *h })
}

/// Whether entry `slot` is (owner, stack_id)'s.
#[inline(always)]
pub fn holds(slot: u32, owner: u64, stack_id: u64) -> bool {
    let Some(t) = TOTALS.get_ptr(slot) else {
        return false;
    };
    // SAFETY: as in `entry`.
    let t = unsafe { &*t };
    // Volatile: other CPUs change it.
    load(&t.owner) == owner && load(&t.stack_id) == stack_id
}

#[inline(always)]
fn key_hash(owner: u64, stack_id: u64) -> u64 {
    (stack_id ^ owner.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0xff51_afd7_ed55_8ccd)
}

/// Linear probing from the hash's top bits: the first entry that holds
/// the key, else the first free one, claimed; its index goes to `hint`.
/// False if none is free. A key may get two entries (one given back in
/// front of it): the report adds them up.
#[inline(always)]
pub fn probe(owner: u64, stack_id: u64, hint: &mut u32) -> bool {
    let bits = config::totals_bits();
    if bits == 0 {
        return false;
    }
    let first = (key_hash(owner, stack_id) >> (64 - (bits & 63))) as u32;
    let mask = (1u32 << (bits & 31)) - 1;
    // A second look if another CPU claimed the free entry first.
    for _ in 0..2 {
        let Some(found) = scan(first, mask, owner, stack_id) else {
            return false;
        };
        // Through memory, so that to the verifier it is an unknown number,
        // the same after every exit from the scan: it walks the rest of
        // the program once, not once per entry scanned (9,000 instructions).
        store(hint, found);
        let found = load(hint);
        let slot = found & !FOUND;
        store(hint, slot);
        if found & FOUND != 0 || claim(slot, owner, stack_id) {
            return true;
        }
    }
    false
}

/// Marks a `scan` result that holds the key (an index is below 2^31).
const FOUND: u32 = 1 << 31;

/// The entry from `first` on that holds the key (with [`FOUND`]), or the
/// first free one.
#[inline(always)]
fn scan(first: u32, mask: u32, owner: u64, stack_id: u64) -> Option<u32> {
    for i in 0..TOTALS_PROBES {
        let slot = first.wrapping_add(i) & mask;
        let t = TOTALS.get_ptr(slot)?;
        // SAFETY: as in `entry`.
        let t = unsafe { &*t };
        let o = load(&t.owner);
        if o == 0 {
            return Some(slot);
        }
        if o == owner && load(&t.stack_id) == stack_id {
            return Some(slot | FOUND);
        }
    }
    None
}

/// Takes a free entry for the key; false if another CPU took it first.
#[inline(always)]
fn claim(slot: u32, owner: u64, stack_id: u64) -> bool {
    let Some(t) = TOTALS.get_ptr_mut(slot) else {
        return false;
    };
    // SAFETY: as in `entry`.
    let t = unsafe { &mut *t };
    if !cas(&mut t.owner, 0, TOTALS_BUSY) {
        return false;
    }
    store(&mut t.stack_id, stack_id);
    store(&mut t.sums, Sums::default());
    // The owner last, with an atomic (ordered after the writes above):
    // the entry matches only once it is whole.
    cas_publish(&mut t.owner, TOTALS_BUSY, owner);
    true
}
