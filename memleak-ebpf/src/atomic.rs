//! The atomic and volatile accesses to map values that other CPUs change
//! while a program reads them (ALLOC_TABLE's slots, TOTALS' entries), in one
//! place with their safety argument; callers hold plain references.
//!
//! Rust's BPF target declares no compare-and-swap (the kernel has it since
//! 5.12), so core's atomic types lack it and fetch_add here: the intrinsics
//! compile to BPF's `cmpxchg` and `lock xadd` on the word.

use core::{
    intrinsics::{AtomicOrdering, atomic_cxchg, atomic_xadd},
    ptr::{read_volatile, write_volatile},
};

// SAFETY (all below): each place is a reference, so valid, aligned and
// live (map values live as long as their map, which outlives the
// program); u64 places are 8-byte aligned fields of `#[repr(C)]` values,
// and BPF's atomics work on any such word of map memory.

/// Compare-and-swap of `old` by `new`, relaxed; whether it took place.
#[inline(always)]
pub fn cas(place: &mut u64, old: u64, new: u64) -> bool {
    // SAFETY: see above.
    unsafe { atomic_cxchg::<u64, { AtomicOrdering::Relaxed }, { AtomicOrdering::Relaxed }>(place, old, new) }.1
}

/// Compare-and-swap, ordered after every write before it (sequentially
/// consistent): publishes what was written first.
#[inline(always)]
pub fn cas_publish(place: &mut u64, old: u64, new: u64) -> bool {
    // SAFETY: see above.
    unsafe { atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(place, old, new) }.1
}

/// Adds `n` (wrapping: u64::MAX is -1), atomically: CPUs sharing a word
/// (and a program preempted on one) must not lose updates.
#[inline(always)]
pub fn add(place: &mut u64, n: u64) {
    // SAFETY: see above.
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(place, n) };
}

/// Reads a place another CPU may change meanwhile: the compiler neither
/// caches nor drops the read.
#[inline(always)]
pub fn load<T: Copy>(place: &T) -> T {
    // SAFETY: see above.
    unsafe { read_volatile(place) }
}

/// Writes a place others read, as it stands in the program.
#[inline(always)]
pub fn store<T: Copy>(place: &mut T, value: T) {
    // SAFETY: see above.
    unsafe { write_volatile(place, value) }
}
