//! Array maps read in place: mmap'd (`BPF_F_MMAPABLE`) a window at a time,
//! so a report copies nothing through system calls and holds no more of a
//! map in its memory than one window per thread. Entries are read and given
//! back with the same atomics the kernel side uses.

use std::{
    io,
    marker::PhantomData,
    mem::size_of,
    ops::Range,
    os::fd::{AsRawFd as _, BorrowedFd},
    ptr::{self, NonNull},
    sync::atomic::AtomicU64,
};

/// The shape of a mappable array of `T`: windows of `window` entries, and
/// ranges that start on a multiple of `align` entries (whole pages).
pub struct Layout<T> {
    pub window: u32,
    pub align: u32,
    entry: PhantomData<T>,
}

impl<T> Layout<T> {
    /// `align` entries must be whole pages (4 KiB), and `window` a multiple
    /// of `align`.
    pub const fn new(window: u32, align: u32) -> Self {
        assert!((align as usize * size_of::<T>()) % 4096 == 0 && window % align == 0);
        Self { window, align, entry: PhantomData }
    }

    /// Calls `f` on every entry in `range` (`range.start` a multiple of
    /// `align`) of the array behind `fd`.
    pub fn for_each(&self, fd: BorrowedFd<'_>, range: Range<u32>, mut f: impl FnMut(*mut T)) -> io::Result<()> {
        assert_eq!(range.start % self.align, 0, "a window starts on whole pages");
        let mut first = range.start;
        while first < range.end {
            let n = self.window.min(range.end - first);
            let window = Window::<T>::map(fd, first, n)?;
            for j in 0..n as usize {
                // SAFETY: j < n, the entries the window maps.
                f(unsafe { window.base.as_ptr().add(j) });
            }
            first += n;
        }
        Ok(())
    }

    /// The ranges of `entries` that `parts` threads read, in `align` steps.
    pub fn split(&self, entries: u32, parts: u32) -> Vec<Range<u32>> {
        let steps = entries.div_ceil(self.align);
        (0..parts)
            .map(|i| {
                let at = |i: u32| ((steps as u64 * i as u64 / parts as u64) as u32 * self.align).min(entries);
                at(i)..at(i + 1)
            })
            .filter(|r| !r.is_empty())
            .collect()
    }
}

/// # Safety
/// `p` must be an aligned u64 in a live mapping.
pub unsafe fn atomic<'a>(p: *mut u64) -> &'a AtomicU64 {
    unsafe { AtomicU64::from_ptr(p) }
}

/// Entries `[first, first + n)` of an array, mapped shared.
struct Window<T> {
    base: NonNull<T>,
    len: usize,
}

impl<T> Window<T> {
    fn map(fd: BorrowedFd<'_>, first: u32, n: u32) -> io::Result<Self> {
        let len = n as usize * size_of::<T>();
        let offset = first as usize * size_of::<T>();
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

impl<T> Drop for Window<T> {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, not used after this.
        unsafe { libc::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_cover_the_array_in_whole_pages() {
        let layout = Layout::<[u64; 48]>::new(2048, 32);
        assert_eq!(layout.split(4096, 2), [0..2048, 2048..4096]);
        assert_eq!(layout.split(4096, 3), [0..1344, 1344..2720, 2720..4096]);
        for r in layout.split(8192, 3) {
            assert_eq!(r.start % 32, 0);
        }
        // More threads than steps: no empty ranges.
        assert_eq!(layout.split(32, 4), [0..32]);
    }
}
