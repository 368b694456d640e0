//! memleak's own heap: not the C library's malloc. memleak probes that
//! malloc, and a probe on a file traps in every process that maps it,
//! memleak too, before any program can tell memleak's calls apart: traced
//! system-wide during a build, 12.6% of memleak's CPU time was uprobe
//! traps on its own mallocs and frees. Here small blocks come from
//! dlmalloc (a Rust port; its memory from mmap) and larger ones have a
//! mapping each, so what a report frees goes back to the kernel (one at
//! 1,000,000 live blocks from 10,000 stacks allocates a few MiB for a
//! moment, which glibc's defaults kept; see `MAPPED`, `give_back`).
//! Counted with uprobes on libc's malloc, free, calloc and realloc for
//! memleak's pid while it traced the `hold` fixture (1,000,000 blocks, 5
//! reports): 225,701 calls before, 1,871 after (libc's own, for threads).

use std::alloc::{GlobalAlloc, Layout};
use std::cell::UnsafeCell;
use std::ptr;

/// Blocks of this size and more are mapped on their own, so freeing one
/// gives it back at once. dlmalloc gives back only the free space at its
/// top and segments wholly free: with 128 KiB here, memleak idle after
/// attaching held 2.9 MiB anonymous (blocks left between the attach's
/// freed ones), with 32 KiB 2.6, with 16 KiB 1.5, with 8 KiB 1.4 (glibc
/// with `malloc_trim`: 1.3). Reports were not measurably slower.
const MAPPED: usize = 16 << 10;
const PAGE: usize = 4096;

/// The allocator of the memleak binary (and of its unit tests).
pub struct Heap {
    lock: UnsafeCell<libc::pthread_mutex_t>,
    small: UnsafeCell<dlmalloc::Dlmalloc>,
}

// SAFETY: `small` is only touched with `lock` held.
unsafe impl Sync for Heap {}

impl Heap {
    pub const fn new() -> Self {
        Self { lock: UnsafeCell::new(libc::PTHREAD_MUTEX_INITIALIZER), small: UnsafeCell::new(dlmalloc::Dlmalloc::new()) }
    }

    /// Runs `f` on dlmalloc with the lock held.
    fn with<R>(&self, f: impl FnOnce(&mut dlmalloc::Dlmalloc) -> R) -> R {
        // SAFETY: a static mutex; every user of `small` holds it.
        unsafe {
            libc::pthread_mutex_lock(self.lock.get());
            let r = f(&mut *self.small.get());
            libc::pthread_mutex_unlock(self.lock.get());
            r
        }
    }

    fn mapped(layout: &Layout) -> bool {
        layout.size() >= MAPPED && layout.align() <= PAGE
    }
}

unsafe impl GlobalAlloc for Heap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if Self::mapped(&layout) {
            return map(layout.size());
        }
        // SAFETY: a size and alignment from a valid layout.
        self.with(|d| unsafe { d.malloc(layout.size(), layout.align()) })
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if Self::mapped(&layout) {
            // Anonymous mappings are zeroed.
            return map(layout.size());
        }
        // SAFETY: as in `alloc`.
        self.with(|d| unsafe { d.calloc(layout.size(), layout.align()) })
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if Self::mapped(&layout) {
            // SAFETY: `ptr` is a mapping of this size (`alloc`).
            unsafe { libc::munmap(ptr.cast(), layout.size()) };
            return;
        }
        // SAFETY: `ptr` came from dlmalloc with this layout.
        self.with(|d| unsafe { d.free(ptr, layout.size(), layout.align()) })
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's layout with a size it vouches for.
        let new = unsafe { Layout::from_size_align_unchecked(new_size, layout.align()) };
        match (Self::mapped(&layout), Self::mapped(&new)) {
            (false, false) => {
                // SAFETY: `ptr` came from dlmalloc with `layout`.
                self.with(|d| unsafe { d.realloc(ptr, layout.size(), layout.align(), new_size) })
            }
            (true, true) => {
                // SAFETY: `ptr` is a mapping of the old size; the kernel
                // moves its pages rather than copying them.
                let moved = unsafe { libc::mremap(ptr.cast(), layout.size(), new_size, libc::MREMAP_MAYMOVE) };
                if moved == libc::MAP_FAILED { ptr::null_mut() } else { moved.cast() }
            }
            _ => {
                // Across the threshold: a copy, as any allocator does.
                // SAFETY: `new` is a valid layout (same alignment, size
                // checked by the caller); the copy stays within both blocks.
                unsafe {
                    let to = self.alloc(new);
                    if !to.is_null() {
                        ptr::copy_nonoverlapping(ptr, to, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    to
                }
            }
        }
    }
}

/// A block of `size` bytes with a mapping of its own (page aligned).
fn map(size: usize) -> *mut u8 {
    // SAFETY: a new private anonymous mapping.
    let p = unsafe {
        libc::mmap(ptr::null_mut(), size, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if p == libc::MAP_FAILED { ptr::null_mut() } else { p.cast() }
}

#[global_allocator]
static HEAP: Heap = Heap::new();

/// A fork while another thread holds the lock would leave it held in the
/// child forever: memleak forks its probe-detaching child (whose threads
/// allocate) and `-c`'s command. The fork takes the lock first and both
/// sides release it, as glibc does for its own malloc. Registered by the
/// ELF constructor below, before `main` and before any test harness runs.
extern "C" fn register_fork_handlers() {
    extern "C" fn lock() {
        // SAFETY: the static mutex, released by `unlock` on both sides.
        unsafe { libc::pthread_mutex_lock(HEAP.lock.get()) };
    }
    extern "C" fn unlock() {
        // SAFETY: held since `lock`, by this very thread (in the child,
        // the only one).
        unsafe { libc::pthread_mutex_unlock(HEAP.lock.get()) };
    }
    // SAFETY: plain function pointers, registered once.
    unsafe { libc::pthread_atfork(Some(lock), Some(unlock), Some(unlock)) };
}

#[used]
#[unsafe(link_section = ".init_array")]
static REGISTER_FORK_HANDLERS: extern "C" fn() = register_fork_handlers;

/// After a report: the free space at the top of dlmalloc's memory and the
/// segments left wholly free go back to the kernel (the mapped blocks went
/// when they were freed).
pub fn give_back() {
    // SAFETY: trimming with the lock held.
    HEAP.with(|d| unsafe { d.trim(0) });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Blocks on both sides of `MAPPED`, grown and shrunk across it: the
    /// bytes stay, and each is freed the way it was allocated.
    #[test]
    fn blocks_keep_their_bytes_across_the_threshold() {
        let heap = Heap::new();
        for align in [8, 64, PAGE, 2 * PAGE] {
            let mut layout = Layout::from_size_align(100, align).unwrap();
            // SAFETY: layouts of non-zero size; every block is freed once.
            unsafe {
                let mut p = heap.alloc_zeroed(layout);
                assert!(!p.is_null() && p as usize % align == 0);
                assert!(std::slice::from_raw_parts(p, 100).iter().all(|&b| b == 0));
                std::ptr::write_bytes(p, 0xa5, 100);
                for size in [MAPPED - 1, MAPPED, 4 * MAPPED + 3, MAPPED + 1, 200] {
                    p = heap.realloc(p, layout, size);
                    assert!(!p.is_null() && p as usize % align == 0, "{size} bytes aligned to {align}");
                    assert!(std::slice::from_raw_parts(p, 100).iter().all(|&b| b == 0xa5), "{size} bytes aligned to {align}");
                    layout = Layout::from_size_align(size, align).unwrap();
                    std::ptr::write_bytes(p, 0xa5, size);
                }
                heap.dealloc(p, layout);
                let big = Layout::from_size_align(3 * MAPPED, align).unwrap();
                let z = heap.alloc_zeroed(big);
                assert!(std::slice::from_raw_parts(z, big.size()).iter().all(|&b| b == 0));
                heap.dealloc(z, big);
            }
        }
        give_back();
    }
}
