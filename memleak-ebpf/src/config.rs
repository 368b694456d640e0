//! Read-only globals, set by the loader before load (see
//! `memleak_common::globals`); the verifier sees them as constants, so a
//! disabled filter costs nothing.

#[unsafe(no_mangle)]
static MIN_SIZE: u64 = 0;
#[unsafe(no_mangle)]
static MAX_SIZE: u64 = u64::MAX;
#[unsafe(no_mangle)]
static SAMPLE_EVERY: u64 = 1;
#[unsafe(no_mangle)]
static SELF_TGID: u32 = 0;
#[unsafe(no_mangle)]
static TRACE: u32 = 0;

// Volatile reads keep the compiler from folding the defaults in.
#[inline(always)]
pub fn min_size() -> u64 {
    unsafe { core::ptr::read_volatile(&MIN_SIZE) }
}
#[inline(always)]
pub fn max_size() -> u64 {
    unsafe { core::ptr::read_volatile(&MAX_SIZE) }
}
#[inline(always)]
pub fn sample_every() -> u64 {
    unsafe { core::ptr::read_volatile(&SAMPLE_EVERY) }
}
#[inline(always)]
pub fn self_tgid() -> u32 {
    unsafe { core::ptr::read_volatile(&SELF_TGID) }
}
#[inline(always)]
pub fn trace() -> bool {
    unsafe { core::ptr::read_volatile(&TRACE) != 0 }
}
