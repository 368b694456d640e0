//! Reads and prunes the kernel's per-stack totals (`TOTALS`, see
//! `memleak_common::Totals`) in place (see `mapped`).

use std::{
    collections::HashSet,
    io,
    os::fd::BorrowedFd,
    ptr,
    sync::atomic::{Ordering, fence},
};

use memleak_common::{CombinedKey, Totals, totals_key};

use crate::{
    fasthash::FastMap,
    maps::mapped::{Layout, atomic},
};

/// Windows of 1.5 MiB; ranges on whole pages (512 entries are 6 pages).
const LAYOUT: Layout<Totals> = Layout::new(512 * 64, 512);

/// What an entry (or all of a stack's) counts, as a report reads it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CombinedAlloc {
    /// Outstanding bytes (with --combined-only).
    pub total_size: u64,
    /// Outstanding blocks (with --combined-only).
    pub count: u64,
    /// Blocks recorded on the stack since attach; `allocs - count` of them
    /// were freed (or replaced, their free missed).
    pub allocs: u64,
    /// Bytes of those blocks.
    pub allocated: u64,
}

/// One entry in use: its index (what blocks name it by), key and sums.
pub type Entry = (u32, CombinedKey, CombinedAlloc);

/// Every entry in use of the `entries` behind `fd`. One being claimed or
/// given back while it is read is left out.
pub fn read(fd: BorrowedFd<'_>, entries: u32) -> io::Result<Vec<Entry>> {
    let mut found = Vec::new();
    let mut slot = 0;
    LAYOUT.for_each(fd, 0..entries, |t| {
        // SAFETY: `t` points into a live shared mapping of the array; its
        // u64 fields are 8-byte aligned.
        unsafe {
            let owner = atomic(&raw mut (*t).owner).load(Ordering::Acquire);
            if owner != 0 {
                let stack_id = ptr::read_volatile(&raw const (*t).stack_id);
                let sums = ptr::read_volatile(&raw const (*t).sums);
                fence(Ordering::Acquire);
                if atomic(&raw mut (*t).owner).load(Ordering::Relaxed) == owner
                    && let Some(key) = totals_key(owner, stack_id)
                {
                    let count = sums.allocs.wrapping_sub(sums.frees);
                    found.push((slot, key, CombinedAlloc { total_size: sums.total_size, count, allocs: sums.allocs, allocated: sums.allocated }));
                }
            }
        }
        slot += 1;
    })?;
    Ok(found)
}

/// Swaps the owners of the entries in `swaps` (slot -> (from, to)), each
/// with a compare-and-swap: an entry whose owner is no longer `from` is
/// left as it is. Returns the slots swapped.
pub fn swap(fd: BorrowedFd<'_>, entries: u32, swaps: &FastMap<u32, (u64, u64)>) -> io::Result<Vec<u32>> {
    let mut swapped = Vec::new();
    if swaps.is_empty() {
        return Ok(swapped);
    }
    let mut slot = 0;
    LAYOUT.for_each(fd, 0..entries, |t| {
        if let Some(&(from, to)) = swaps.get(&slot) {
            // SAFETY: as in `read`.
            let owner = unsafe { atomic(&raw mut (*t).owner) };
            if owner.compare_exchange(from, to, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                swapped.push(slot);
            }
        }
        slot += 1;
    })?;
    Ok(swapped)
}

/// Gives back these processes' entries (they exited, and their blocks
/// were forgotten first: none names them any more).
pub fn forget(fd: BorrowedFd<'_>, entries: u32, tgids: &HashSet<u32>) -> io::Result<()> {
    give_back(fd, entries, |_, tgid| tgids.contains(&tgid))
}

/// Gives back entries `slots` (indexes), if they are still of a process
/// in `tgids`: the entries of an image a process replaced by exec, which
/// no block names any more.
pub fn forget_slots(fd: BorrowedFd<'_>, entries: u32, slots: &HashSet<u32>, tgids: &HashSet<u32>) -> io::Result<()> {
    give_back(fd, entries, |slot, tgid| slots.contains(&slot) && tgids.contains(&tgid))
}

/// Gives back each entry in use for which `gone(index, tgid)` holds.
fn give_back(fd: BorrowedFd<'_>, entries: u32, gone: impl Fn(u32, u32) -> bool) -> io::Result<()> {
    let mut slot = 0u32;
    LAYOUT.for_each(fd, 0..entries, |t| {
        // SAFETY: as in `read`.
        unsafe {
            let owner = atomic(&raw mut (*t).owner);
            let o = owner.load(Ordering::Relaxed);
            if let Some(key) = totals_key(o, 0)
                && gone(slot, key.tgid)
            {
                let _ = owner.compare_exchange(o, 0, Ordering::AcqRel, Ordering::Relaxed);
            }
        }
        slot += 1;
    })
}
