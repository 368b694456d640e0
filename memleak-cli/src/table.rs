//! Reads and prunes the kernel's allocation table (`ALLOC_TABLE`, see
//! `memleak_common::Bucket`) in place: the map is mmap'd a window at a time,
//! so a report copies nothing through system calls, and holds no more of
//! the table in its memory than one window per thread. Slots are read and
//! given back with the same atomics the kernel side uses.

use std::{
    collections::HashSet,
    io,
    mem::size_of,
    ops::Range,
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::{self, NonNull},
    sync::atomic::{AtomicU64, Ordering, fence},
};

use memleak_common::{AllocInfo, AllocKey, BUCKET_SLOTS, Bucket};

/// Buckets per window: whole pages (32 buckets are 3 pages), 768 KiB.
const WINDOW: u32 = 32 * 64;

/// Buckets a range handed to one thread starts on a multiple of.
pub const ALIGN: u32 = 32;

/// Calls `f` on every block held in buckets `range` of the table behind
/// `fd` (`range.start` a multiple of [`ALIGN`]). A slot that changes while
/// it is read (its block freed just then) is skipped.
pub fn for_each(fd: BorrowedFd<'_>, range: Range<u32>, mut f: impl FnMut(AllocKey, AllocInfo)) -> io::Result<()> {
    for_each_window(fd, range, |bucket| {
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
    for_each_window(fd, 0..buckets, |bucket| {
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

/// The ranges of buckets `parts` threads read, in [`ALIGN`] steps.
pub fn split(buckets: u32, parts: u32) -> Vec<Range<u32>> {
    let steps = buckets.div_ceil(ALIGN);
    (0..parts)
        .map(|i| {
            let at = |i: u32| ((steps as u64 * i as u64 / parts as u64) as u32 * ALIGN).min(buckets);
            at(i)..at(i + 1)
        })
        .filter(|r| !r.is_empty())
        .collect()
}

/// # Safety
/// `p` must be an aligned u64 in a live mapping.
unsafe fn atomic<'a>(p: *mut u64) -> &'a AtomicU64 {
    unsafe { AtomicU64::from_ptr(p) }
}

fn for_each_window(fd: BorrowedFd<'_>, range: Range<u32>, mut f: impl FnMut(*mut Bucket)) -> io::Result<()> {
    assert_eq!(range.start % ALIGN, 0, "a window starts on whole pages");
    let mut first = range.start;
    while first < range.end {
        let n = WINDOW.min(range.end - first);
        let window = Window::map(fd, first, n)?;
        for j in 0..n as usize {
            // SAFETY: j < n, the buckets the window maps.
            f(unsafe { window.base.as_ptr().add(j) });
        }
        first += n;
    }
    Ok(())
}

/// Buckets `[first, first + n)` of the table, mapped shared.
struct Window {
    base: NonNull<Bucket>,
    len: usize,
}

impl Window {
    fn map(fd: BorrowedFd<'_>, first: u32, n: u32) -> io::Result<Self> {
        let len = n as usize * size_of::<Bucket>();
        let offset = first as usize * size_of::<Bucket>();
        // SAFETY: a new shared mapping of the map's fd; the kernel checks
        // that it lies within the array.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Self { base: NonNull::new(p.cast()).expect("mmap returned NULL"), len })
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_table_in_whole_pages() {
        assert_eq!(split(4096, 2), [0..2048, 2048..4096]);
        assert_eq!(split(4096, 3), [0..1344, 1344..2720, 2720..4096]);
        for r in split(8192, 3) {
            assert_eq!(r.start % ALIGN, 0);
        }
        // More threads than steps: no empty ranges.
        assert_eq!(split(32, 4), [0..32]);
    }
}
