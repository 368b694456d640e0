//! Blocks: each outstanding one in ALLOC_TABLE (or ALLOCS) by (process,
//! address), and counted in its TOTALS entry.

use aya_ebpf::{
    EbpfContext,
    bindings::{BPF_ANY, BPF_NOEXIST},
};
use aya_log_ebpf::info;
use memleak_common::{AllocInfo, AllocKey, Bucket, Stat};

use crate::{atomic, config, maps::ALLOCS, stats::count, table, totals};

const EEXIST: i32 = -17;

/// Where a block tracked comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Just allocated: one more allocation of its stack since attach.
    New,
    /// Tracked again, not allocated: a failed realloc's old block, a piece
    /// a munmap left of one (one free less).
    Back,
}

/// Where `track` puts a block.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Its bucket of ALLOC_TABLE, or ALLOCS if that is full.
    Table,
    /// ALLOCS only (see `track`).
    Spilled,
}

/// What happens to a block, as its totals count it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    Tracked(Origin),
    /// Freed, or replaced at its address (its free missed).
    Gone,
}

/// A new block, with the caller's stack (its TOTALS entry, `slot`) and
/// thread.
#[inline(always)]
pub fn new_block<C: EbpfContext>(ctx: &C, pid_tgid: u64, addr: u64, size: u64, timestamp_ns: u64, slot: u32) -> AllocInfo {
    let tgid = (pid_tgid >> 32) as u32;
    let info = AllocInfo { size, timestamp_ns, slot, tid: pid_tgid as u32 };
    let slot = info.slot;
    if config::trace() {
        info!(ctx, "alloc tgid={} addr={:x} size={} totals={}", tgid, addr, size, slot);
    }
    info
}

/// Puts a block into the table (or ALLOCS) and its totals; a block of
/// [`Origin::New`] is counted in `allocs`. [`Place::Spilled`] puts it
/// straight into ALLOCS: a block REGIONS
/// follows, which munmap's scan of REGIONS looks up there (in that loop of
/// 32, a hash lookup is far less for the verifier to walk than a bucket's
/// slots: 150 ms), and the pieces munmap leaves. Their addresses are a
/// direct mmap's, or inside one just cut: no stale block is looked for in
/// the table there, which keeps munmap's copies of this short for the
/// verifier. False if there was no room.
#[inline(always)]
pub fn track(tgid: u32, addr: u64, info: AllocInfo, origin: Origin, place: Place) -> bool {
    let mut bucket = table::bucket(tgid, addr);
    // A block tracked at this address already: its free was missed. It is
    // in one place at most; one call of `replaced` serves them all (the
    // verifier walks each copy).
    let mut stale = AllocInfo::default();
    let mut has_stale = false;
    let mut placed = false;
    if place == Place::Table && let Some(b) = bucket.as_deref_mut() {
        if table::spilled(b)
            && let Some(old) = unspill(tgid, addr, Some(b))
        {
            stale = old;
            has_stale = true;
        }
        let put = table::put(b, tgid, addr, &info, &mut stale);
        has_stale |= put.stale;
        placed = put.placed;
    }
    if !placed {
        if let Some(b) = bucket.as_deref_mut() {
            // Counted first: a free of this block must look in ALLOCS.
            table::count_spilled(b, 1);
        }
        match spill(tgid, addr, &info, &mut stale) {
            Ok(found) => {
                has_stale |= found;
                placed = true;
            }
            Err(()) => {
                if let Some(b) = bucket {
                    table::count_spilled(b, u64::MAX);
                }
            }
        }
    }
    if has_stale {
        replaced(tgid, stale);
    }
    if !placed {
        count(Stat::AllocMapFull);
        return false;
    }
    combine(tgid, info, Change::Tracked(origin));
    true
}

/// A tracked address allocated again: its free was missed (made before
/// attach, or by a path we do not hook), and the stale block leaves the
/// totals (bcc's --wa-missing-free, always on). Only --combined-only keeps
/// sizes in the totals.
#[inline(always)]
fn replaced(tgid: u32, stale: AllocInfo) {
    if config::combined_only() {
        combine(tgid, stale, Change::Gone);
    }
}

/// Puts a block into ALLOCS; true if it replaced one there (into `stale`,
/// which only --combined-only needs, so only it looks the old one up).
#[inline(always)]
fn spill(tgid: u32, addr: u64, info: &AllocInfo, stale: &mut AllocInfo) -> Result<bool, ()> {
    let key = AllocKey { addr, tgid, _pad: 0 };
    match ALLOCS.insert(&key, info, BPF_NOEXIST as u64) {
        Ok(()) => Ok(false),
        Err(EEXIST) => {
            let mut found = false;
            if config::combined_only()
                && let Some(old) = ALLOCS.get_ptr(&key)
            {
                // SAFETY: a hash map's value, alive until this program ends
                // (values are freed after an RCU grace period).
                *stale = unsafe { *old };
                found = true;
            }
            ALLOCS.insert(&key, info, BPF_ANY as u64).map(|()| found).map_err(|_| ())
        }
        Err(_) => Err(()),
    }
}

/// Takes a block out of ALLOCS, and out of its bucket's count.
#[inline(always)]
fn unspill(tgid: u32, addr: u64, bucket: Option<&mut Bucket>) -> Option<AllocInfo> {
    let key = AllocKey { addr, tgid, _pad: 0 };
    // SAFETY: as in `spill`.
    let info = unsafe { *ALLOCS.get_ptr(&key)? };
    // Only the thread whose delete succeeds takes it, so a double free
    // racing on two threads subtracts once.
    ALLOCS.remove(&key).ok()?;
    if let Some(b) = bucket {
        table::count_spilled(b, u64::MAX);
    }
    Some(info)
}

/// Removes a block from the table (or ALLOCS) and its totals; returns what
/// it was.
#[inline(always)]
pub fn take(tgid: u32, addr: u64) -> Option<AllocInfo> {
    let mut bucket = table::bucket(tgid, addr);
    let info = match bucket.as_deref_mut() {
        Some(b) => match table::take(b, tgid, addr) {
            Some(info) => info,
            None if table::spilled(b) => unspill(tgid, addr, Some(b))?,
            None => return None,
        },
        None => unspill(tgid, addr, None)?,
    };
    combine(tgid, info, Change::Gone);
    Some(info)
}

/// Removes a block that is in ALLOCS (one REGIONS follows: see `track`)
/// from there and its totals; returns what it was.
#[inline(always)]
pub fn take_spilled(tgid: u32, addr: u64) -> Option<AllocInfo> {
    let info = unspill(tgid, addr, table::bucket(tgid, addr))?;
    combine(tgid, info, Change::Gone);
    Some(info)
}

/// What ALLOCS holds for a block (a followed one is always there: see
/// `track`).
#[inline(always)]
pub fn get_spilled(tgid: u32, addr: u64) -> Option<AllocInfo> {
    let key = AllocKey { addr, tgid, _pad: 0 };
    // SAFETY: as in `spill`.
    ALLOCS.get_ptr(&key).map(|info| unsafe { *info })
}

/// Adds (or removes) one block to its totals (the entry it names: see
/// `totals`). A new one counts in the stack's allocations since attach,
/// which is all the totals keep without --combined-only; one back (a
/// piece a munmap left) is one free less.
#[inline(always)]
fn combine(tgid: u32, info: AllocInfo, change: Change) {
    let sizes = config::combined_only();
    let new = change == Change::Tracked(Origin::New);
    let add = change != Change::Gone;
    if !sizes && !new {
        return;
    }
    // None: counted as lost when the block was recorded.
    let Some(t) = totals::entry(info.slot, tgid) else {
        return;
    };
    if new {
        atomic::add(&mut t.sums.allocs, 1);
        atomic::add(&mut t.sums.allocated, info.size);
    }
    if sizes {
        atomic::add(&mut t.sums.total_size, if add { info.size } else { info.size.wrapping_neg() });
        if !new {
            atomic::add(&mut t.sums.frees, if add { u64::MAX } else { 1 });
        }
    }
}
