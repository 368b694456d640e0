//! Reads and prunes the kernel's allocation table (`ALLOC_TABLE`, see
//! `memleak_common::Bucket`) in place (see `mapped`).

use std::{
    collections::HashSet,
    io,
    ops::Range,
    os::fd::BorrowedFd,
    ptr,
    sync::atomic::{Ordering, fence},
};

use memleak_common::{AllocInfo, AllocKey, BUCKET_SLOTS, Bucket, NO_SLOT};

use crate::maps::mapped::{Layout, atomic};

/// Windows of 768 KiB; ranges on whole pages (32 buckets are 3 pages).
pub const LAYOUT: Layout<Bucket> = Layout::new(32 * 64, 32);

/// Calls `f` on every block held in buckets `range` of the table behind
/// `fd` (`range.start` a multiple of `LAYOUT.align`). A slot that changes while
/// it is read (its block freed just then) is skipped.
pub fn for_each(fd: BorrowedFd<'_>, range: Range<u32>, mut f: impl FnMut(AllocKey, AllocInfo)) -> io::Result<()> {
    LAYOUT.for_each(fd, range, |bucket| {
        for i in 0..BUCKET_SLOTS {
            // SAFETY: `bucket` points into a live shared mapping of the
            // table; its u64 fields are 8-byte aligned.
            unsafe {
                let owner = atomic(&raw mut (*bucket).owners[i]).load(Ordering::Acquire);
                if owner == 0 {
                    continue;
                }
                let addr = atomic(&raw mut (*bucket).addrs[i]).load(Ordering::Acquire);
                let info = ptr::read_volatile(&raw const (*bucket).infos[i]);
                fence(Ordering::Acquire);
                if atomic(&raw mut (*bucket).owners[i]).load(Ordering::Relaxed) != owner
                    || atomic(&raw mut (*bucket).addrs[i]).load(Ordering::Relaxed) != addr
                {
                    continue;
                }
                f(AllocKey { addr, tgid: owner as u32, _pad: 0 }, info);
            }
        }
    })
}

/// Gives back the slots of these processes' blocks (they exited).
pub fn forget(fd: BorrowedFd<'_>, buckets: u32, tgids: &HashSet<u32>) -> io::Result<()> {
    LAYOUT.for_each(fd, 0..buckets, |bucket| {
        for i in 0..BUCKET_SLOTS {
            // SAFETY: as in `for_each`.
            unsafe {
                let owner = atomic(&raw mut (*bucket).owners[i]);
                let tgid = owner.load(Ordering::Relaxed);
                if tgid != 0
                    && tgids.contains(&(tgid as u32))
                    && owner.compare_exchange(tgid, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok()
                {
                    atomic(&raw mut (*bucket).addrs[i]).store(0, Ordering::Release);
                }
            }
        }
    })
}

/// Gives back the slots of blocks that processes' old images left (see
/// `Recorded::forget_images`): those `old` says are (it says None of a
/// block whose process did not exec). Adds the totals entries the blocks
/// named to `gone`, and those its other blocks name to `kept`.
pub fn forget_old(
    fd: BorrowedFd<'_>,
    buckets: u32,
    old: &impl Fn(AllocKey, &AllocInfo) -> Option<bool>,
    gone: &mut HashSet<u32>,
    kept: &mut HashSet<u32>,
) -> io::Result<()> {
    LAYOUT.for_each(fd, 0..buckets, |bucket| {
        for i in 0..BUCKET_SLOTS {
            // SAFETY: as in `for_each`.
            unsafe {
                let owner = atomic(&raw mut (*bucket).owners[i]);
                let tgid = owner.load(Ordering::Acquire);
                if tgid == 0 {
                    continue;
                }
                let addr = atomic(&raw mut (*bucket).addrs[i]).load(Ordering::Acquire);
                let info = ptr::read_volatile(&raw const (*bucket).infos[i]);
                fence(Ordering::Acquire);
                // The old image's blocks are never freed (its address space
                // is gone): only a later block's slot changes under us.
                if owner.load(Ordering::Relaxed) != tgid {
                    continue;
                }
                let Some(is_old) = old(AllocKey { addr, tgid: tgid as u32, _pad: 0 }, &info) else { continue };
                let named = if info.slot == NO_SLOT { None } else { Some(info.slot) };
                if !is_old {
                    kept.extend(named);
                } else if owner.compare_exchange(tgid, 0, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                    atomic(&raw mut (*bucket).addrs[i]).store(0, Ordering::Release);
                    gone.extend(named);
                }
            }
        }
    })
}
