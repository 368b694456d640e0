//! The maps. Sizes here are defaults; the loader sets them from
//! `--max-allocs` and `--max-stacks` before load.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::{btf_map, map},
    maps::{Array, HashMap, PerCpuArray, ProgramArray},
};
use crate::task_storage::TaskStorage;
use memleak_common::{
    AllocInfo, AllocKey, Bucket, MAX_REGIONS, Pending, Region, RegionKey, STAT_COUNT, Stack, Totals, UnwindCache,
    UnwindProcess, UnwindState,
};

/// Outstanding allocations, by the hash of (process, address): see
/// `table`. Mappable, so the report reads it in place.
#[map]
pub static ALLOC_TABLE: Array<Bucket> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Outstanding allocations that found their bucket of ALLOC_TABLE full (or
/// all of them with no table), and blocks of direct mappings (see
/// `blocks::track`). Not preallocated: memory follows what is live.
#[map]
pub static ALLOCS: HashMap<AllocKey, AllocInfo> =
    HashMap::with_max_entries(1 << 20, BPF_F_NO_PREALLOC);

/// Totals per (tgid, stack), in a part per CPU (see `totals` and
/// `memleak_common::Totals`): outstanding bytes and blocks with
/// `--combined-only`, and allocations since attach. An array, so a block
/// names its entry by index; mappable, so the report reads it in place.
#[map]
pub static TOTALS: Array<Totals> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// User stacks, by the hash of their frames.
#[map]
pub static STACKS: HashMap<u64, Stack> = HashMap::with_max_entries(1 << 14, BPF_F_NO_PREALLOC);

/// The TOTALS entries of (process, stack) this CPU used lately, by the top
/// bits of their hash: a hint, checked against the entry.
#[map]
pub static KNOWN_SLOTS: PerCpuArray<u32> = PerCpuArray::with_max_entries(1 << KNOWN_SLOT_BITS, 0);
pub const KNOWN_SLOT_BITS: u32 = 8;

/// Where bpf_get_stack writes, per CPU (a stack is too big for the BPF stack).
#[map]
pub static STACK_SCRATCH: PerCpuArray<Stack> = PerCpuArray::with_max_entries(1, 0);

/// The last free entered on this CPU (see `calls::note_free`).
#[map]
pub static LAST_FREE: PerCpuArray<LastFree> = PerCpuArray::with_max_entries(1, 0);

/// A free call: who made it, and where its return address is.
#[repr(C)]
pub struct LastFree {
    pub pid_tgid: u64,
    /// The stack pointer at its entry, where its return address is.
    pub sp: u64,
    /// Where its entry probe is: the function's start, or a few bytes past.
    pub ip: u64,
    pub jiffies: u64,
}

/// The allocator call under way, per thread (see `task_storage`).
#[btf_map]
pub static PENDING: TaskStorage<Pending> = TaskStorage::new();

/// Blocks from direct mmap calls, up to MAX_REGIONS per process: read by
/// munmap only, so malloc and free never touch it.
#[map]
pub static REGIONS: HashMap<RegionKey, Region> =
    HashMap::with_max_entries(MAX_REGIONS << 11, BPF_F_NO_PREALLOC);

/// munmap_enter itself, which tail-calls itself once per followed block a
/// munmap cuts.
#[map]
pub static UNMAP_AGAIN: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// Events that could not be recorded, by `memleak_common::Stat`.
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_COUNT, 0);

/// Unwind tables, each a sorted run of rows (see `memleak_common::UNWIND_CFA_RSP`),
/// shared by every process that maps the object. Mappable: the loader
/// writes a table in place (one `bpf()` call per row took 30 ms for libc).
/// Sized by `--unwind-memory`.
#[map]
pub static UNWIND_ROWS: Array<u64> = Array::with_max_entries(1, BPF_F_MMAPABLE);

/// Each traced process's executable mappings with a table, by tgid. A
/// process without an entry is walked by frame pointers.
#[map]
pub static UNWIND_PROCS: HashMap<u32, UnwindProcess> = HashMap::with_max_entries(4096, BPF_F_NO_PREALLOC);

/// A walk by tables between two runs of `unwind_step`, per CPU.
#[map]
pub static UNWIND_STATE: PerCpuArray<UnwindState> = PerCpuArray::with_max_entries(1, 0);

/// The rules the walk by tables found last, per CPU (see `UnwindCache`).
#[map]
pub static UNWIND_CACHE: PerCpuArray<UnwindCache> = PerCpuArray::with_max_entries(1, 0);

/// `unwind_step`, which tail-calls itself every few frames: the verifier
/// walks a loop of binary searches per frame, and 4 frames per program
/// keep that small; the kernel's 33 tail calls then reach 132 frames,
/// more than `MAX_STACK_DEPTH`.
#[map]
pub static UNWIND_STEP: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// `-c`: the command's PID until its tables' entry is written, then 0;
/// the command's again as it execs (see `unwind::hold`).
#[map]
pub static UNWIND_HOLD: Array<u32> = Array::with_max_entries(1, 0);
