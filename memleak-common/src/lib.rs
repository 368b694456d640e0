//! Types shared by the kernel programs (`memleak-ebpf`) and the loader
//! (`memleak-cli`). Every map key and value is `#[repr(C)]`, padded explicitly,
//! so both sides agree on the layout byte for byte.
#![no_std]

/// Key of `ALLOCS` (the blocks `ALLOC_TABLE` has no room for, and those
/// of direct mappings, which munmap looks up there): an address
/// is only unique within one process, and system-wide tracing sees many
/// processes.
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
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) at return; jiffies with
    /// --combined-only.
    pub timestamp_ns: u64,
    /// Index into `TOTALS` of the entry its (process, stack, part) counts
    /// in, which names its stack; [`NO_SLOT`] when `TOTALS` had none free.
    /// A free subtracts from that entry without looking it up. (`TOTALS`
    /// has at most 2^22 entries.)
    pub slot: u32,
    /// The thread that allocated it (the kernel's pid, user space's tid;
    /// for kernel allocations, the task they were made in). In the 4
    /// bytes `slot` left: a block's record stays 24 bytes, and a bucket
    /// of the table 384.
    pub tid: u32,
}

/// Slots per bucket of `ALLOC_TABLE`.
pub const BUCKET_SLOTS: usize = 8;

/// The hash whose top bits (`hash >> TABLE_SHIFT`) are the bucket of
/// (tgid, addr) in `ALLOC_TABLE`: multiplicative, so the top bits depend
/// on every bit of the key. The kernel puts a block there; user space
/// looks one up there (a report re-checking a block it read).
pub const fn bucket_hash(tgid: u32, addr: u64) -> u64 {
    (addr ^ ((tgid as u64) << 44)).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// A bucket of `ALLOC_TABLE`, the outstanding blocks by (process,
/// address): each block in one of the slots of the bucket its key hashes
/// to. A slot is free while `addrs[i]` is 0, claimed by a compare-and-swap
/// of 0 to the block's address, and valid once `owners[i]` (the tgid,
/// written last) is non-zero; it is given back by a compare-and-swap of
/// the owner to 0, then `addrs[i]` set to 0. Addresses and owners are
/// apart from the rest, so a lookup reads two cache lines. 384 bytes: a
/// whole number of cache lines, and of buckets per 3 pages (for `mmap`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Bucket {
    pub addrs: [u64; BUCKET_SLOTS],
    /// tgid of each slot's block (u64: BPF has compare-and-swap on 64 bits
    /// on every CPU version).
    pub owners: [u64; BUCKET_SLOTS],
    pub infos: [AllocInfo; BUCKET_SLOTS],
    /// Blocks whose key hashes here but which found the bucket full and went
    /// to `ALLOCS`: a key not in the bucket is looked for there only when
    /// this is not 0. Never too low; too high only costs lookups.
    pub spilled: u64,
    pub _pad: [u64; 7],
}

/// `stack_id` of an allocation whose user stack could not be recorded.
pub const NO_STACK: u64 = 0;

/// Deepest user stack recorded (the kernel's default perf_event_max_stack).
pub const MAX_STACK_DEPTH: usize = 127;

/// A user stack, innermost frame first: value of `STACKS`, keyed by a
/// 64-bit hash of its frames. (A kernel stack-trace map keyed by a bucket
/// index loses stacks whose buckets collide; with a full hash, none.)
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct Stack {
    pub len: u64,
    pub ips: [u64; MAX_STACK_DEPTH],
}

/// What a [`Totals`] entry totals: one process's blocks from one stack,
/// counted in parts by CPU (`shard`, the CPU number modulo the loader's
/// shard count, up to [`MAX_SHARDS`]): threads allocating from one stack
/// on several CPUs update separate entries instead of moving one cache line
/// between them. A report adds the parts up.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CombinedKey {
    pub tgid: u32,
    pub shard: u16,
    /// The hooked function that made its blocks ([`Kind`], as a number).
    pub kind: u8,
    pub _pad: u8,
    pub stack_id: u64,
}

/// The hooked function that made a block. Part of the key of its totals
/// entry (with its process and stack), so a block names it through
/// `AllocInfo::slot` at no cost per block. A stack reached through two
/// functions (a call through a pointer that is malloc or calloc) is two
/// entries, each exact: a mask per stack would merge heap and mapping
/// bytes, which the report keeps apart.
#[repr(u8)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Not known: the block's totals entry is gone or was never had.
    #[default]
    Unknown = 0,
    Malloc = 1,
    Calloc = 2,
    Realloc = 3,
    Reallocarray = 4,
    AlignedAlloc = 5,
    Memalign = 6,
    PosixMemalign = 7,
    Valloc = 8,
    Pvalloc = 9,
    /// A direct mmap: a mapping, not a heap block.
    Mmap = 10,
    /// C++ operator new.
    New = 11,
    /// C++ operator new[].
    NewArray = 12,
    Kmalloc = 13,
    KmemCacheAlloc = 14,
    Pages = 15,
    Percpu = 16,
}

impl Kind {
    pub const ALL: [Kind; 17] = [
        Kind::Unknown,
        Kind::Malloc,
        Kind::Calloc,
        Kind::Realloc,
        Kind::Reallocarray,
        Kind::AlignedAlloc,
        Kind::Memalign,
        Kind::PosixMemalign,
        Kind::Valloc,
        Kind::Pvalloc,
        Kind::Mmap,
        Kind::New,
        Kind::NewArray,
        Kind::Kmalloc,
        Kind::KmemCacheAlloc,
        Kind::Pages,
        Kind::Percpu,
    ];

    /// The kind numbered `n`; [`Kind::Unknown`] for a number that is none.
    pub const fn from_u8(n: u8) -> Kind {
        if (n as usize) < Self::ALL.len() { Self::ALL[n as usize] } else { Kind::Unknown }
    }

    /// The function's name, as reports show it.
    pub const fn name(self) -> &'static str {
        match self {
            Kind::Unknown => "unknown",
            Kind::Malloc => "malloc",
            Kind::Calloc => "calloc",
            Kind::Realloc => "realloc",
            Kind::Reallocarray => "reallocarray",
            Kind::AlignedAlloc => "aligned_alloc",
            Kind::Memalign => "memalign",
            Kind::PosixMemalign => "posix_memalign",
            Kind::Valloc => "valloc",
            Kind::Pvalloc => "pvalloc",
            Kind::Mmap => "mmap",
            Kind::New => "new",
            Kind::NewArray => "new[]",
            Kind::Kmalloc => "kmalloc",
            Kind::KmemCacheAlloc => "kmem_cache_alloc",
            Kind::Pages => "alloc_pages",
            Kind::Percpu => "percpu",
        }
    }

    /// A mapping (direct mmap), not a heap block.
    pub const fn is_mapping(self) -> bool {
        matches!(self, Kind::Mmap)
    }
}

/// Most parts a stack's totals are kept in (see [`CombinedKey`]).
pub const MAX_SHARDS: u32 = 8;

/// The running sums of a [`Totals`] entry, updated with atomic adds.
/// Outstanding blocks are `allocs - frees`; `total_size` and `frees` are
/// kept with --combined-only only (without it a free just forgets its
/// block). A part may be below zero (wrapped): blocks freed on a CPU other
/// than the one they were allocated on.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sums {
    /// Outstanding bytes.
    pub total_size: u64,
    /// Blocks recorded on this stack since attach, freed or not.
    pub allocs: u64,
    /// Blocks freed (or replaced, their free missed) since attach, less
    /// the pieces a munmap leaves of a block beyond the first.
    pub frees: u64,
    /// Bytes of the blocks recorded on this stack since attach, freed or
    /// not: the `alloc_space` of a pprof heap profile.
    pub allocated: u64,
}

/// An entry of `TOTALS`, the per-(process, stack, part) totals: an array
/// with open addressing (a key's entry is within [`TOTALS_PROBES`] of the
/// top bits of its hash), so that a block can name its entry by index
/// (`AllocInfo::slot`) and a free finds it without a lookup. An entry is
/// free while `owner` is 0; it is claimed by a compare-and-swap of 0 to
/// [`TOTALS_BUSY`], its stack and sums written, then its owner
/// ([`totals_owner`]); user space gives an exited process's entries back
/// with a compare-and-swap of the owner to 0.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub owner: u64,
    pub stack_id: u64,
    pub sums: Sums,
}

/// `Totals::owner` while the entry is being claimed.
pub const TOTALS_BUSY: u64 = u64::MAX;

/// How many entries from its hash's a key's entry may be.
pub const TOTALS_PROBES: u32 = 32;

/// `AllocInfo::slot` of a block whose totals had no entry.
pub const NO_SLOT: u32 = u32::MAX;

/// `Totals::owner` of (process, part, kind): the tgid in bits 0-31, the
/// part in 32-39, the [`Kind`] in 40-47, bit 63 set: never 0 or
/// [`TOTALS_BUSY`].
pub const fn totals_owner(tgid: u32, shard: u32, kind: u8) -> u64 {
    1 << 63 | (kind as u64) << 40 | ((shard & 0xff) as u64) << 32 | tgid as u64
}

/// The key of an entry; None while it is free or being claimed.
pub const fn totals_key(owner: u64, stack_id: u64) -> Option<CombinedKey> {
    if owner == 0 || owner == TOTALS_BUSY {
        return None;
    }
    Some(CombinedKey { tgid: owner as u32, shard: (owner >> 32) as u16 & 0xff, kind: (owner >> 40) as u8, _pad: 0, stack_id })
}

/// A return address no frame has: the walk stopped at the depth limit
/// with frames left, and this ends the stack (shown as `[truncated]`).
pub const TRUNCATED_IP: u64 = u64::MAX;

/// Unwind tables (see `memleak-cli/src/unwind`): rows of 8 bytes, the
/// address (as the object's ELF addresses it, 32 bits) in the top half,
/// so a table sorts as integers, and the rule from that address on in the
/// bottom half: `UNWIND_*` in bits 0-1, [`UNWIND_RBP_SAVED`], the slot
/// rbp is saved in (at CFA - 8 * slot) in bits 3-10, the CFA's offset
/// from its register in bits 11-31.
pub const UNWIND_CFA_RSP: u32 = 0;
/// CFA = rbp + offset.
pub const UNWIND_CFA_RBP: u32 = 1;
/// The outermost frame (`_start`, `clone3`: the return address is undefined).
pub const UNWIND_END: u32 = 2;
/// No rule the walk can follow (no FDE here, a DWARF expression, a
/// signal frame): it takes a frame-pointer step instead.
pub const UNWIND_NONE: u32 = 3;
/// rbp of the caller is saved at CFA - 8 * slot; else it is unchanged.
pub const UNWIND_RBP_SAVED: u32 = 4;
/// With `UNWIND_NONE` (the kernel's, never in a table): the mapping has
/// no rows because its table did not fit (`UnwindMapping::rows` 0), so
/// the frame-pointer step it takes is counted (`Stat::UnwindLeftOut`).
pub const UNWIND_LEFT_OUT: u32 = 4;
pub const UNWIND_SLOT_SHIFT: u32 = 3;
pub const UNWIND_OFFSET_SHIFT: u32 = 11;

/// `globals::UNWIND`: walk by unwind tables.
pub const UNWIND_TABLES: u32 = 1;
/// `globals::UNWIND`: the process named in `UNWIND_HOLD` is stopped
/// (SIGSTOP) at the entry of an allocation, for memleak to write its
/// tables' entry before the allocation returns, then let it go on.
pub const UNWIND_HOLD_FIRST: u32 = 2;

/// Executable mappings with a table, per process.
pub const UNWIND_MAPPINGS: usize = 256;

/// One executable mapping of a process that has an unwind table.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UnwindMapping {
    pub start: u64,
    pub end: u64,
    /// Address in memory less the object's ELF address.
    pub bias: u64,
    /// The table: rows `[first, first + rows)` of `UNWIND_ROWS`.
    pub first: u32,
    pub rows: u32,
}

/// A process's mappings with tables, sorted by start: value of
/// `UNWIND_PROCS` by tgid.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnwindProcess {
    pub count: u32,
    /// Different in every entry memleak writes (never 0): the kernel's
    /// cache of rules (`UnwindCache`) knows a rule by it and the pc, so a
    /// rewritten entry (an exec, a library loaded at a freed address)
    /// never finds the rules of the one before.
    pub generation: u32,
    pub mappings: [UnwindMapping; UNWIND_MAPPINGS],
}

/// Rules in the kernel's cache, per CPU (a power of two).
pub const UNWIND_CACHE_SLOTS: usize = 1024;

/// One rule found by a binary search (see `UnwindCache`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UnwindCached {
    /// The address looked up (a return address less one).
    pub pc: u64,
    /// `UnwindProcess::generation` of the entry it was found in.
    pub generation: u32,
    pub rule: u32,
}

/// The rules found last, per CPU, by pc and process entry, direct-mapped:
/// most allocations come from a few call paths, whose return addresses
/// it holds, so a frame costs one lookup instead of two binary searches.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct UnwindCache {
    pub slots: [UnwindCached; UNWIND_CACHE_SLOTS],
}

/// Where a walk by tables is, per CPU, between the runs of `unwind_step`
/// (a tail call each few frames), and the block to record at its end.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct UnwindState {
    pub pc: u64,
    pub sp: u64,
    pub bp: u64,
    pub addr: u64,
    pub size: u64,
    pub timestamp_ns: u64,
    pub tgid: u32,
    /// The allocating thread (`AllocInfo::tid`).
    pub tid: u32,
    /// Non-zero: the block is a direct mapping's (see `REGIONS`).
    pub mmap: u32,
    /// Its [`Kind`].
    pub kind: u32,
    /// `UnwindProcess::generation` of the process's entry when the walk
    /// started: the rules cached for it are found without the entry.
    pub generation: u32,
    pub _pad: u32,
    /// Where the caller's rbp was saved, not read yet (0: `bp` holds it):
    /// most frames of code without frame pointers save rbp as any other
    /// register, and only a rule by rbp needs its value.
    pub bp_at: u64,
    /// The kernel's scratch (see `opaque` in memleak-ebpf/src/unwind.rs).
    pub scratch: u64,
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
    /// Entry time: the block's timestamp, and how an entry whose return
    /// never came is recognised.
    pub entered_ns: u64,
    /// The stack pointer at entry: a call inside this one has a lower one.
    pub sp: u64,
    /// Allocator calls nested inside this one (memalign calling malloc):
    /// the outermost call owns the allocation and the caller's stack.
    pub depth: u32,
    /// [`PENDING_ACTIVE`], [`PENDING_RECORD`], [`PENDING_HAS_OLD`],
    /// [`PENDING_MMAP`], [`PENDING_COARSE`]; the call's [`Kind`] from bit
    /// [`PENDING_KIND_SHIFT`] on.
    pub flags: u32,
}

/// Key of `REGIONS`: slot `slot` (< [`MAX_REGIONS`]) of process `tgid`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RegionKey {
    pub tgid: u32,
    pub slot: u32,
}

/// A block recorded from a direct mmap (not one inside an allocator call),
/// so that munmap of its tail or middle can find it: its start, and the
/// timestamp of its `ALLOCS` entry, which tells a live block from a stale
/// slot (the block was replaced or forgotten since).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Region {
    pub start: u64,
    pub timestamp_ns: u64,
}

/// Direct mappings followed per process for munmap of a tail or middle.
/// The munmap probe reruns itself (a tail call) once per block it cuts:
/// 32 and the last run that finds none stay within the kernel's 33 tail calls.
pub const MAX_REGIONS: u32 = 32;

/// The request passed the size filters and sampling: record its block.
pub const PENDING_RECORD: u32 = 1;
/// An entry waits for its return (the per-thread value outlives the call).
pub const PENDING_ACTIVE: u32 = 4;
/// The call is mmap: its block is followed for munmap (see `REGIONS`).
pub const PENDING_MMAP: u32 = 8;
/// `Pending::old` holds realloc's old block, taken out of the maps at entry.
pub const PENDING_HAS_OLD: u32 = 2;
/// `Pending::entered_ns` holds jiffies, not CLOCK_MONOTONIC ns.
pub const PENDING_COARSE: u32 = 16;
/// Where `Pending::flags` keeps the call's [`Kind`] (8 bits).
pub const PENDING_KIND_SHIFT: u32 = 8;

/// `AllocKey::tgid` of kernel allocations: kmalloc and slab objects (by
/// address), whole pages (by page frame number), per-CPU chunks (by address).
pub const KERNEL_SLAB: u32 = u32::MAX;
pub const KERNEL_PAGES: u32 = u32::MAX - 1;
pub const KERNEL_PERCPU: u32 = u32::MAX - 2;

/// Whether a `tgid` is one of the kernel pseudo-processes above.
pub const fn is_kernel(tgid: u32) -> bool {
    tgid >= KERNEL_PERCPU
}

/// Indexes into the `FIELD_OFFSETS` global: where the kmem tracepoints keep
/// the fields memleak reads, as the running kernel's tracefs format files
/// say (no kernel headers needed).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    KmallocPtr = 0,
    KmallocBytes = 1,
    KfreePtr = 2,
    CacheAllocPtr = 3,
    CacheAllocBytes = 4,
    CacheFreePtr = 5,
    PageAllocPfn = 6,
    PageAllocOrder = 7,
    PageFreePfn = 8,
    PercpuAllocPtr = 9,
    PercpuAllocBytes = 10,
    PercpuFreePtr = 11,
    KmallocCallSite = 12,
    CacheAllocCallSite = 13,
}

pub const FIELD_COUNT: usize = Field::ALL.len();

impl Field {
    /// Every field, each at its index.
    pub const ALL: [Field; 14] = [
        Field::KmallocPtr,
        Field::KmallocBytes,
        Field::KfreePtr,
        Field::CacheAllocPtr,
        Field::CacheAllocBytes,
        Field::CacheFreePtr,
        Field::PageAllocPfn,
        Field::PageAllocOrder,
        Field::PageFreePfn,
        Field::PercpuAllocPtr,
        Field::PercpuAllocBytes,
        Field::PercpuFreePtr,
        Field::KmallocCallSite,
        Field::CacheAllocCallSite,
    ];
}

/// Indexes of the per-CPU `STATS` counters of events that could not be recorded.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// No room: its bucket of `ALLOC_TABLE` and `ALLOCS` were full. The
    /// allocation is not tracked.
    AllocMapFull = 0,
    /// No user stack: the stack map is full, or the walk failed.
    StackLost = 1,
    /// `TOTALS` had no free entry near the key's: the per-stack totals
    /// (allocation counts, and with `--combined-only` sizes) miss the
    /// allocation, and its block is tracked without its stack.
    CombinedMapFull = 2,
    /// No room to note a call for its return: the kernel could not allocate
    /// a thread's `PENDING` value.
    PendingMapFull = 3,
    /// A process had [`MAX_REGIONS`] direct mappings followed already: a
    /// munmap of this one's tail or middle is not seen (its head is).
    RegionsFull = 4,
    /// A frame walked by frame pointers because its object's unwind table
    /// did not fit `--unwind-memory` (`UNWIND_LEFT_OUT`).
    UnwindLeftOut = 5,
}

pub const STAT_COUNT: u32 = Stat::ALL.len() as u32;

impl Stat {
    /// Every counter, each at its index.
    pub const ALL: [Stat; 6] = [
        Stat::AllocMapFull,
        Stat::StackLost,
        Stat::CombinedMapFull,
        Stat::PendingMapFull,
        Stat::RegionsFull,
        Stat::UnwindLeftOut,
    ];
}

/// What the kernel tells user space as it happens (the `EVENTS` ring).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// [`EVENT_EXEC`], [`EVENT_DLOPEN`].
    pub kind: u32,
    pub tgid: u32,
    /// When, in the clock of `AllocInfo::timestamp_ns`.
    pub time: u64,
}

/// Process `tgid` exec'd at `time`: its blocks recorded before then are
/// the old image's.
pub const EVENT_EXEC: u32 = 1;
/// Process `tgid` (the traced one) returned from dlopen at `time`
/// (CLOCK_MONOTONIC): it maps a library it did not before, maybe.
pub const EVENT_DLOPEN: u32 = 2;

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
    /// u32: non-zero with --combined-only: the per-stack totals keep
    /// outstanding bytes and blocks (a free updates them). Otherwise the
    /// report adds the blocks up itself, and the totals count allocations
    /// only: a free just forgets its block.
    pub const COMBINED_ONLY: &str = "COMBINED_ONLY";
    /// u32: 64 less the log2 of `ALLOC_TABLE`'s buckets (a bucket is the
    /// top bits of a key's hash); 0 when there is no table and every block
    /// goes to `ALLOCS`.
    pub const TABLE_SHIFT: &str = "TABLE_SHIFT";
    /// u32: the number of parts of each stack's totals, a power of two, less
    /// one (a CPU's part is its number masked with it).
    pub const SHARD_MASK: &str = "SHARD_MASK";
    /// u32: log2 of `TOTALS`' entries (a key's first entry is the top
    /// bits of its hash).
    pub const TOTALS_BITS: &str = "TOTALS_BITS";
    /// [u32; FIELD_COUNT]: tracepoint field offsets, by `Field`.
    pub const FIELD_OFFSETS: &str = "FIELD_OFFSETS";
    /// u64: the page size, for mm_page_alloc's order.
    pub const PAGE_SIZE: &str = "PAGE_SIZE";
    /// [u64; 2]: kernel text range [start, end) whose slab allocations are
    /// not traced: the BPF map allocator's refill (memleak's own maps).
    pub const SKIP_CALLER: &str = "SKIP_CALLER";
    /// u32: the one process whose events (`EVENTS`) are sent, 0 for all.
    pub const WATCHED_TGID: &str = "WATCHED_TGID";
    /// u32: [`UNWIND_TABLES`](super::UNWIND_TABLES) to walk user stacks
    /// by unwind tables where a process has them (`--unwind auto|dwarf`),
    /// with [`UNWIND_HOLD_FIRST`](super::UNWIND_HOLD_FIRST) for `-c`.
    pub const UNWIND: &str = "UNWIND";
}

/// Map names, written once here so both sides agree.
pub mod maps {
    pub const ALLOCS: &str = "ALLOCS";
    pub const ALLOC_TABLE: &str = "ALLOC_TABLE";
    pub const TOTALS: &str = "TOTALS";
    pub const STACKS: &str = "STACKS";
    pub const STATS: &str = "STATS";
    pub const REGIONS: &str = "REGIONS";
    pub const UNMAP_AGAIN: &str = "UNMAP_AGAIN";
    pub const EVENTS: &str = "EVENTS";
    pub const UNWIND_ROWS: &str = "UNWIND_ROWS";
    pub const UNWIND_PROCS: &str = "UNWIND_PROCS";
    pub const UNWIND_STEP: &str = "UNWIND_STEP";
    pub const UNWIND_HOLD: &str = "UNWIND_HOLD";
}

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: plain `#[repr(C)]` integers with explicit padding: every bit
    // pattern is valid.
    unsafe impl aya::Pod for AllocKey {}
    unsafe impl aya::Pod for AllocInfo {}
    unsafe impl aya::Pod for Bucket {}
    unsafe impl aya::Pod for CombinedKey {}
    unsafe impl aya::Pod for Totals {}
    unsafe impl aya::Pod for Stack {}
    unsafe impl aya::Pod for RegionKey {}
    unsafe impl aya::Pod for Region {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for UnwindProcess {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_record_stays_24_bytes() {
        assert_eq!(size_of::<AllocInfo>(), 24);
    }

    #[test]
    fn a_bucket_is_whole_cache_lines_and_tiles_pages() {
        assert_eq!(size_of::<Bucket>() % 64, 0);
        assert_eq!((3 * 4096) % size_of::<Bucket>(), 0);
    }

    #[test]
    fn a_totals_owner_is_never_free_or_busy_and_gives_its_key_back() {
        for (tgid, shard, kind) in [(0, 0, Kind::Unknown), (1, 7, Kind::Mmap), (u32::MAX, MAX_SHARDS - 1, Kind::Percpu)] {
            let owner = totals_owner(tgid, shard, kind as u8);
            assert!(owner != 0 && owner != TOTALS_BUSY);
            let key = CombinedKey { tgid, shard: shard as u16, kind: kind as u8, _pad: 0, stack_id: 9 };
            assert_eq!(totals_key(owner, 9), Some(key));
        }
        // Every kind has its number back.
        for (i, kind) in Kind::ALL.iter().enumerate() {
            assert_eq!(Kind::from_u8(i as u8), *kind);
        }
        assert_eq!(Kind::from_u8(200), Kind::Unknown);
        assert_eq!(totals_key(0, 9), None);
        assert_eq!(totals_key(TOTALS_BUSY, 9), None);
    }

    #[test]
    fn every_stat_and_field_is_listed_at_its_index() {
        // A variant added to the enum but not to ALL fails here: the
        // match has no `_` arm, so it must name the new one.
        let stat_index = |s: Stat| match s {
            Stat::AllocMapFull
            | Stat::StackLost
            | Stat::CombinedMapFull
            | Stat::PendingMapFull
            | Stat::RegionsFull
            | Stat::UnwindLeftOut => s as usize,
        };
        assert!(Stat::ALL.iter().enumerate().all(|(i, &s)| stat_index(s) == i));
        let field_index = |f: Field| match f {
            Field::KmallocPtr
            | Field::KmallocBytes
            | Field::KfreePtr
            | Field::CacheAllocPtr
            | Field::CacheAllocBytes
            | Field::CacheFreePtr
            | Field::PageAllocPfn
            | Field::PageAllocOrder
            | Field::PageFreePfn
            | Field::PercpuAllocPtr
            | Field::PercpuAllocBytes
            | Field::PercpuFreePtr
            | Field::KmallocCallSite
            | Field::CacheAllocCallSite => f as usize,
        };
        assert!(Field::ALL.iter().enumerate().all(|(i, &f)| field_index(f) == i));
    }
}
