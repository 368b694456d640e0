//! Read-only globals, set by the loader before load (see
//! `memleak_common::globals`); the verifier sees them as constants, so a
//! disabled filter costs nothing.

use memleak_common::{FIELD_COUNT, Field, UNWIND_HOLD_FIRST, UNWIND_TABLES};

/// Each global (named as `memleak_common::globals` names it), its default,
/// and the function that reads it (an array's: one element, by index).
macro_rules! globals {
    ($($name:ident: $ty:ty = $default:expr => $vis:vis $getter:ident;)*) => {
        $(
            #[unsafe(no_mangle)]
            static $name: $ty = $default;

            #[inline(always)]
            $vis fn $getter() -> $ty {
                // SAFETY: a static of plain integers, never written by this
                // program (the loader sets it before load). Volatile: the
                // compiler must not fold the default in.
                unsafe { core::ptr::read_volatile(&$name) }
            }
        )*
    };
    ($($name:ident: [$ty:ty; $n:expr] = $default:expr => $vis:vis $getter:ident[];)*) => {
        $(
            #[unsafe(no_mangle)]
            static $name: [$ty; $n] = $default;

            #[inline(always)]
            $vis fn $getter(i: usize) -> $ty {
                // SAFETY: as above; the index is checked.
                unsafe { core::ptr::read_volatile(&$name[i]) }
            }
        )*
    };
}

globals! {
    MIN_SIZE: u64 = 0 => pub min_size;
    MAX_SIZE: u64 = u64::MAX => pub max_size;
    SAMPLE_EVERY: u64 = 1 => pub sample_every;
    SELF_TGID: u32 = 0 => pub self_tgid;
    TRACE: u32 = 0 => trace_flag;
    SHARD_MASK: u32 = 0 => pub shard_mask;
    TABLE_SHIFT: u32 = 0 => pub table_shift;
    COMBINED_ONLY: u32 = 0 => combined_only_flag;
    TOTALS_BITS: u32 = 0 => pub totals_bits;
    PAGE_SIZE: u64 = 4096 => pub page_size;
    WATCHED_TGID: u32 = 0 => pub watched_tgid;
    UNWIND: u32 = 0 => unwind;
}

globals! {
    FIELD_OFFSETS: [u32; FIELD_COUNT] = [0; FIELD_COUNT] => field_offsets[];
    SKIP_CALLER: [u64; 2] = [0; 2] => skip_caller[];
}

#[inline(always)]
pub fn trace() -> bool {
    trace_flag() != 0
}

#[inline(always)]
pub fn combined_only() -> bool {
    combined_only_flag() != 0
}

#[inline(always)]
pub fn field_offset(field: Field) -> usize {
    field_offsets(field as usize) as usize
}

#[inline(always)]
pub fn unwind_tables() -> bool {
    unwind() & UNWIND_TABLES != 0
}

#[inline(always)]
pub fn unwind_hold_first() -> bool {
    unwind() & UNWIND_HOLD_FIRST != 0
}

/// Whether a kernel allocation comes from the BPF map allocator (our own
/// maps growing): tracing those would feed on itself.
#[inline(always)]
pub fn skipped_caller(call_site: u64) -> bool {
    let (start, end) = (skip_caller(0), skip_caller(1));
    start <= call_site && call_site < end
}
