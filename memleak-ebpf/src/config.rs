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
#[unsafe(no_mangle)]
static SHARD_MASK: u32 = 0;
#[unsafe(no_mangle)]
static TABLE_SHIFT: u32 = 0;
#[unsafe(no_mangle)]
static COMBINED_ONLY: u32 = 0;
#[unsafe(no_mangle)]
static TOTALS_BITS: u32 = 0;
#[unsafe(no_mangle)]
static FIELD_OFFSETS: [u32; FIELD_COUNT] = [0; FIELD_COUNT];
#[unsafe(no_mangle)]
static PAGE_SIZE: u64 = 4096;
#[unsafe(no_mangle)]
static WATCHED_TGID: u32 = 0;
#[unsafe(no_mangle)]
static UNWIND: u32 = 0;
#[unsafe(no_mangle)]
static SKIP_CALLER: [u64; 2] = [0; 2];

use memleak_common::{FIELD_COUNT, Field};

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
#[inline(always)]
pub fn combined_only() -> bool {
    unsafe { core::ptr::read_volatile(&COMBINED_ONLY) != 0 }
}
#[inline(always)]
pub fn table_shift() -> u32 {
    unsafe { core::ptr::read_volatile(&TABLE_SHIFT) }
}
#[inline(always)]
pub fn totals_bits() -> u32 {
    unsafe { core::ptr::read_volatile(&TOTALS_BITS) }
}
#[inline(always)]
pub fn shard_mask() -> u32 {
    unsafe { core::ptr::read_volatile(&SHARD_MASK) }
}
#[inline(always)]
pub fn field_offset(field: Field) -> usize {
    unsafe { core::ptr::read_volatile(&FIELD_OFFSETS[field as usize]) as usize }
}
#[inline(always)]
pub fn watched_tgid() -> u32 {
    unsafe { core::ptr::read_volatile(&WATCHED_TGID) }
}
#[inline(always)]
pub fn unwind_tables() -> bool {
    unsafe { core::ptr::read_volatile(&UNWIND) & memleak_common::UNWIND_TABLES != 0 }
}
#[inline(always)]
pub fn unwind_hold_first() -> bool {
    unsafe { core::ptr::read_volatile(&UNWIND) & memleak_common::UNWIND_HOLD_FIRST != 0 }
}
#[inline(always)]
pub fn page_size() -> u64 {
    unsafe { core::ptr::read_volatile(&PAGE_SIZE) }
}
/// Whether a kernel allocation comes from the BPF map allocator (our own
/// maps growing): tracing those would feed on itself.
#[inline(always)]
pub fn skipped_caller(call_site: u64) -> bool {
    let (start, end) = unsafe { (core::ptr::read_volatile(&SKIP_CALLER[0]), core::ptr::read_volatile(&SKIP_CALLER[1])) };
    start <= call_site && call_site < end
}
