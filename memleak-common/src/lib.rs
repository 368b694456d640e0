//! Types shared by the kernel programs (`memleak-ebpf`) and the loader
//! (`memleak-cli`). Every map key and value is `#[repr(C)]`, padded explicitly,
//! so both sides agree on the layout byte for byte.
#![no_std]

/// Key of `ALLOCS`: an address is only unique within one process, and
/// system-wide tracing sees many processes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocKey {
    pub addr: u64,
    pub tgid: u32,
    pub _pad: u32,
}

/// One outstanding allocation, recorded when the allocator returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllocInfo {
    pub size: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at return.
    pub timestamp_ns: u64,
    /// Index into `STACKS`, or [`NO_STACK`] when no stack id could be taken.
    pub stack_id: u32,
    pub _pad: u32,
}

/// `stack_id` of an allocation whose user stack could not be recorded.
pub const NO_STACK: u32 = u32::MAX;

/// Key of `COMBINED`: outstanding totals per process and stack.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CombinedKey {
    pub tgid: u32,
    pub stack_id: u32,
}

/// Value of `COMBINED`, updated with atomic adds from every CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CombinedAlloc {
    /// Outstanding bytes.
    pub total_size: u64,
    /// Outstanding blocks.
    pub count: u64,
    /// Blocks recorded on this stack since attach, freed or not; so
    /// `allocs - count` of them were freed (or replaced, their free missed).
    pub allocs: u64,
}

/// What an allocator entry probe leaves for its return probe, per thread.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Pending {
    /// Requested size (nmemb * size for calloc and reallocarray).
    pub size: u64,
    /// posix_memalign's out-pointer; the result is read through it on return.
    pub memptr: u64,
    /// realloc's old block, untracked at entry and restored if realloc fails.
    pub old_addr: u64,
    pub old: AllocInfo,
    /// Entry time, to recognise an entry whose return never came.
    pub entered_ns: u64,
    /// Allocator calls nested inside this one (memalign calling malloc):
    /// the outermost call owns the allocation and the caller's stack.
    pub depth: u32,
    /// [`PENDING_RECORD`] and [`PENDING_HAS_OLD`].
    pub flags: u32,
}

/// The request passed the size filters and sampling: record its block.
pub const PENDING_RECORD: u32 = 1;
/// `Pending::old` holds realloc's old block, taken out of the maps at entry.
pub const PENDING_HAS_OLD: u32 = 2;

/// Indexes of the per-CPU `STATS` counters of events that could not be recorded.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// `ALLOCS` was full: the allocation is not tracked.
    AllocMapFull = 0,
    /// No user stack id: stack map full or hash bucket taken.
    StackLost = 1,
    /// `COMBINED` was full: `--combined-only` totals miss the allocation.
    CombinedMapFull = 2,
    /// `PENDING` (or `MMAP_PENDING`) was full: the call was not seen returning.
    PendingMapFull = 3,
}

pub const STAT_COUNT: u32 = 4;

/// Names of the read-only globals the loader sets before load.
pub mod globals {
    /// u64: smallest traced request, in bytes.
    pub const MIN_SIZE: &str = "MIN_SIZE";
    /// u64: largest traced request, in bytes.
    pub const MAX_SIZE: &str = "MAX_SIZE";
    /// u64: record one allocation in N (bcc's `-s`).
    pub const SAMPLE_EVERY: &str = "SAMPLE_EVERY";
    /// u32: the tracer's own tgid, never traced.
    pub const SELF_TGID: &str = "SELF_TGID";
    /// u32: non-zero to log every call (`-t`).
    pub const TRACE: &str = "TRACE";
}

/// Map names, written once here so both sides agree.
pub mod maps {
    pub const ALLOCS: &str = "ALLOCS";
    pub const COMBINED: &str = "COMBINED";
    pub const STACKS: &str = "STACKS";
    pub const STATS: &str = "STATS";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with explicit padding: every bit
    // pattern is valid.
    unsafe impl aya::Pod for AllocKey {}
    unsafe impl aya::Pod for AllocInfo {}
    unsafe impl aya::Pod for CombinedKey {}
    unsafe impl aya::Pod for CombinedAlloc {}
}
