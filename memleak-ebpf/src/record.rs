//! What the probes do, shared by every allocator hook.

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::{bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user},
    EbpfContext,
    helpers::generated::{bpf_get_attach_cookie, bpf_get_smp_processor_id, bpf_get_stack, bpf_jiffies64},
    programs::{ProbeContext, RetProbeContext},
};
use aya_log_ebpf::info;
use memleak_common::{
    AllocInfo, AllocKey, Bucket, Kind, MAX_STACK_DEPTH, NO_SLOT, NO_STACK, PENDING_ACTIVE, PENDING_COARSE,
    PENDING_HAS_OLD, PENDING_KIND_SHIFT, PENDING_MMAP, PENDING_RECORD, Pending, Region, Stack, Stat, UnwindState,
    totals_owner,
};

use crate::{
    config, regions,
    table, totals,
    unwind::{self, stack_pointer, user_stack},
    maps::{ALLOCS, LAST_FREE, PENDING, STACK_SCRATCH, STACKS, STATS, UNWIND_STATE, UNWIND_STEP},
};


const EEXIST: i32 = -17;
const MAP_FAILED: u64 = u64::MAX;

#[inline(always)]
pub fn thread_id() -> u64 {
    bpf_get_current_pid_tgid()
}

/// The time of a call: CLOCK_MONOTONIC in ns. With --combined-only,
/// whose reports show no ages, jiffies instead: reading them is a load,
/// where a clock read costs about 40 ns (kvm-clock), and those times are
/// only compared with each other (a call gone stale, a followed mapping's
/// block). Tracing programs may not read the coarse clock.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: helpers without arguments.
    if config::combined_only() { unsafe { bpf_jiffies64() } } else { unsafe { bpf_ktime_get_ns() } }
}

#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(n) = STATS.get_ptr_mut(stat as u32) {
        // Per-CPU slot: no other CPU writes it.
        unsafe { *n += 1 };
    }
}

#[inline(always)]
fn is_self(pid_tgid: u64) -> bool {
    (pid_tgid >> 32) as u32 == config::self_tgid()
}

/// Entry of an allocator call (or of mmap, `kind` [`PENDING_MMAP`]): note
/// the request for the return probe. Every call is noted, recorded or not:
/// a call made inside it (malloc -> mmap of a new arena) belongs to it, and
/// its return must not be taken for the outer call's. Which function was
/// called ([`Kind`]) is the probe's cookie: programs are shared by the
/// functions of one shape (malloc's serves valloc and operator new).
#[inline(always)]
pub fn enter(ctx: &ProbeContext, size: u64, memptr: u64, old_addr: u64, kind: u32) {
    let pid_tgid = thread_id();
    if is_self(pid_tgid) {
        return;
    }
    unwind::hold((pid_tgid >> 32) as u32);
    let mut traced = size >= config::min_size() && size <= config::max_size() && sampled();
    // SAFETY: a uprobe's context is the task's pt_regs.
    let sp = stack_pointer(unsafe { &*ctx.regs });
    let Some(pending) = PENDING.current_or_new() else {
        count(Stat::PendingMapFull);
        return;
    };
    if inside(pending, sp) {
        // Inside another hooked call (memalign -> malloc, malloc -> mmap),
        // whose frame is above this one's: the outer call records the
        // block, with the caller's stack.
        pending.depth += 1;
        return;
    }
    // A hooked function that jumps to another (operator new[] to operator
    // new, a tail call) is one call, in one frame: its kind is the first
    // function's.
    let function = if pending.flags & PENDING_ACTIVE != 0 && pending.sp == sp && fresh(pending) {
        pending.flags & (0xff << PENDING_KIND_SHIFT)
    } else {
        // SAFETY: the helper reads the probe's cookie from the context.
        (unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32 & 0xff) << PENDING_KIND_SHIFT
    };
    if traced && kind & PENDING_MMAP != 0 && in_free(pid_tgid, sp) {
        // free's (see `note_free`): noted as the outer call of what it
        // calls, not recorded.
        traced = false;
    }
    // A call not recorded needs no exact time, only one that tells a stale
    // entry: jiffies, a load, where a clock read costs about 40 ns.
    let (entered, coarse) = if traced {
        (now(), if config::combined_only() { PENDING_COARSE } else { 0 })
    } else {
        // SAFETY: a helper without arguments.
        (unsafe { bpf_jiffies64() }, PENDING_COARSE)
    };
    pending.size = size;
    // Volatile: LLVM merges two zero stores into a call to a byte-by-byte
    // memset subprogram, a fifth of this probe's time.
    unsafe {
        ptr::write_volatile(&mut pending.memptr, memptr);
        ptr::write_volatile(&mut pending.old_addr, old_addr);
    }
    pending.entered_ns = entered;
    pending.sp = sp;
    pending.depth = 0;
    pending.flags = PENDING_ACTIVE | kind | coarse | function | if traced { PENDING_RECORD } else { 0 };
    if old_addr == 0 {
        return;
    }
    // realloc gives up its old block now, before another thread can get the
    // same address back from the allocator; a failed realloc restores it.
    // Neither a block to record nor one to restore leaves the call noted,
    // as the outer call of what it calls.
    if let Some(old) = take((pid_tgid >> 32) as u32, old_addr) {
        pending.old = old;
        pending.flags |= PENDING_HAS_OLD;
    }
}

/// Whether a call entered with stack pointer `sp` is inside the noted one:
/// that call is waiting for its return, and its frame is above. A noted
/// entry whose return did not come within `STALE_NS` (the return probe
/// went in after the entry probe, or a longjmp left the call) is not waited
/// for: the new call replaces it.
#[inline(always)]
fn inside(outer: &Pending, sp: u64) -> bool {
    outer.flags & PENDING_ACTIVE != 0 && sp < outer.sp && fresh(outer)
}

/// Whether a noted call's return is still waited for (see `inside`).
#[inline(always)]
fn fresh(outer: &Pending) -> bool {
    if outer.flags & PENDING_COARSE != 0 {
        // SAFETY: a helper without arguments.
        unsafe { bpf_jiffies64() }.wrapping_sub(outer.entered_ns) < STALE_JIFFIES
    } else {
        // SAFETY: a helper without arguments.
        unsafe { bpf_ktime_get_ns() }.wrapping_sub(outer.entered_ns) < STALE_NS
    }
}

/// An entry whose return did not come within this long is stale, even if
/// the new call's frame is below it (a longjmp left it, and a deeper frame
/// called again): a new call replaces it. A second, or 1000 jiffies (1 to
/// 10 s by the kernel's HZ).
const STALE_NS: u64 = 1_000_000_000;
const STALE_JIFFIES: u64 = 1000;

/// Entry of free (and delete, and every call that takes a block first).
/// It has no return probe (a second trap per free), and no per-thread
/// entry (a task storage look-up cost 50 ns per free, two thirds of what
/// the probe cost before), but what it calls must still be its own: glibc
/// sets up a thread's cache inside the thread's first allocator call, and
/// when that is a free of another thread's block, a new arena's heap is
/// mmap'd inside free (alloc_new_heap, 64 MiB). So each free leaves on its
/// CPU where its return address is, and an mmap that finds that free still
/// running (see `in_free`) is taken as its. Registers only: reading the
/// return address here would cost 110 ns per free.
#[inline(always)]
pub fn note_free(ctx: &ProbeContext, pid_tgid: u64) {
    let Some(last) = LAST_FREE.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: this CPU's slot; no other CPU writes it. A uprobe's context
    // is the task's pt_regs.
    let (last, regs) = unsafe { (&mut *last, &*ctx.regs) };
    let sp = stack_pointer(regs);
    // SAFETY: a helper without arguments (the verifier inlines it: a load).
    let jiffies = unsafe { bpf_jiffies64() };
    // delete -> free is a jump, with the same return address: the call
    // made is the first one's.
    if !(last.pid_tgid == pid_tgid && last.sp == sp && jiffies.wrapping_sub(last.jiffies) <= 1) {
        last.ip = regs.rip;
    }
    last.pid_tgid = pid_tgid;
    last.sp = sp;
    last.jiffies = jiffies;
}

/// Whether an mmap entered with stack pointer `sp` is inside the last free
/// this CPU ran: the same thread's, its frame above, within a jiffy (the
/// set-up in glibc's free took 22 us here, a jiffy is 1 to 10 ms), and its
/// return address still in its slot: the value there returns from a call of
/// that free (see `calls`), where once free returned the caller's next
/// call puts its own. A thread moved to another CPU in between is missed,
/// and its mmap recorded as before.
#[inline(always)]
fn in_free(pid_tgid: u64, sp: u64) -> bool {
    let Some(last) = LAST_FREE.get_ptr(0) else {
        return false;
    };
    // SAFETY: this CPU's slot.
    let last = unsafe { &*last };
    if last.pid_tgid != pid_tgid || sp >= last.sp || unsafe { bpf_jiffies64() }.wrapping_sub(last.jiffies) > 1 {
        return false;
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    match unsafe { bpf_probe_read_user(last.sp as *const u64) } {
        Ok(ret) => calls(ret, last.ip),
        Err(_) => false,
    }
}

/// Whether the instruction before return address `ret` calls the function
/// whose entry probe is at `ip`: `call rel32` to it, or to a PLT stub that
/// jumps through a GOT entry holding it, or `call *disp32(%rip)` through
/// such an entry (-fno-plt). x86-64 code.
#[inline(always)]
fn calls(ret: u64, ip: u64) -> bool {
    // SAFETY: bpf_probe_read_user checks the user address.
    let Ok(before) = (unsafe { bpf_probe_read_user(ret.wrapping_sub(8) as *const [u8; 8]) }) else {
        return false;
    };
    let disp = |b: &[u8]| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as i64 as u64;
    let got = if before[2] == 0xff && before[3] == 0x15 {
        ret.wrapping_add(disp(&before[4..]))
    } else if before[3] == 0xe8 {
        let target = ret.wrapping_add(disp(&before[4..]));
        if starts(target, ip) {
            return true;
        }
        // SAFETY: as above.
        let Ok(stub) = (unsafe { bpf_probe_read_user(target as *const [u8; 16]) }) else {
            return false;
        };
        // jmp *disp32(%rip), after endbr64 and a bnd prefix if any.
        let at = if stub[0] == 0xff && stub[1] == 0x25 {
            0
        } else if stub[4] == 0xff && stub[5] == 0x25 {
            4
        } else if stub[5] == 0xff && stub[6] == 0x25 {
            5
        } else {
            return false;
        };
        target.wrapping_add(at + 6).wrapping_add(disp(&stub[at as usize + 2..at as usize + 6]))
    } else {
        return false;
    };
    // SAFETY: as above.
    unsafe { bpf_probe_read_user(got as *const u64) }.is_ok_and(|f| starts(f, ip))
}

/// Whether a function starting at `start` has its entry probe at `ip`: at
/// the start, or past `endbr64; test %rdi,%rdi; je` (see placement).
#[inline(always)]
fn starts(start: u64, ip: u64) -> bool {
    ip.wrapping_sub(start) <= 16
}

/// One call in `-s N`, at random.
#[inline(always)]
fn sampled() -> bool {
    let every = config::sample_every();
    // SAFETY: a helper without arguments.
    every <= 1 || u64::from(unsafe { bpf_get_prandom_u32() }) % every == 0
}

/// Return of an allocator call or mmap: record the block it yields. One
/// program for all of them: the verifier walks the stack walk once.
#[inline(always)]
pub fn exit(ctx: &RetProbeContext) {
    let Some(pending) = PENDING.current() else {
        return;
    };
    if pending.flags & PENDING_ACTIVE == 0 {
        return;
    }
    if pending.depth > 0 {
        pending.depth -= 1;
        return;
    }
    // The noted call returns with its return address popped; any other
    // return is of a call whose entry was not seen (attached in between).
    // SAFETY: a uprobe's context is the task's pt_regs.
    if stack_pointer(unsafe { &*ctx.regs }) != pending.sp.wrapping_add(8) {
        return;
    }
    pending.flags &= !PENDING_ACTIVE;
    if pending.flags & (PENDING_RECORD | PENDING_HAS_OLD) == 0 {
        // Noted only as the outer call of what it calls.
        return;
    }
    let pid_tgid = thread_id();
    let tgid = (pid_tgid >> 32) as u32;
    let ret = ctx.ret::<u64>();
    let addr = if pending.flags & PENDING_MMAP != 0 {
        if ret == MAP_FAILED { 0 } else { ret }
    } else if pending.memptr != 0 {
        // posix_memalign returns 0 on success, with the block in *memptr.
        // SAFETY: bpf_probe_read_user checks the user address.
        if ret as i32 != 0 { 0 } else { unsafe { bpf_probe_read_user(pending.memptr as *const u64) }.unwrap_or(0) }
    } else {
        ret
    };
    // One call of `track` below: the verifier walks each copy.
    let (addr, info, new) = if addr != 0 {
        if pending.flags & PENDING_RECORD == 0 {
            return;
        }
        // By unwind tables where the process has them: `unwind_step`
        // records the block at the walk's end (and this returns only if
        // it does not).
        let state = UnwindState {
            addr,
            size: pending.size,
            timestamp_ns: pending.entered_ns,
            tgid,
            tid: pid_tgid as u32,
            mmap: pending.flags & PENDING_MMAP,
            kind: pending.flags >> PENDING_KIND_SHIFT & 0xff,
            ..Default::default()
        };
        // SAFETY: a uprobe's context is the task's pt_regs.
        unwind::by_tables(ctx, unsafe { &*ctx.regs }, state);
        // The entry's time: one clock read per call.
        let kind = (pending.flags >> PENDING_KIND_SHIFT) as u8;
        (addr, new_block(ctx, pid_tgid, addr, pending.size, pending.entered_ns, user_stack_slot(ctx, tgid, kind)), true)
    } else if pending.flags & PENDING_HAS_OLD != 0 && pending.size != 0 {
        // A failed realloc with a non-zero size leaves the old block
        // allocated (realloc(ptr, 0) freed it).
        (pending.old_addr, pending.old, false)
    } else {
        // Failed.
        return;
    };
    let mmap = new && pending.flags & PENDING_MMAP != 0;
    if track(tgid, addr, info, new, mmap) && mmap {
        regions::follow(tgid, Region { start: addr, timestamp_ns: info.timestamp_ns });
    }
}

/// The TOTALS entry of (tgid, the stack `fill` writes into a per-CPU
/// scratch buffer, returning its depth, the hooked function `kind`); the
/// stack is stored in STACKS under a hash of its frames. Without room
/// there, the entry of (tgid, no stack, kind): the block still tells its
/// process and function. [`NO_SLOT`] if TOTALS has no room.
#[inline(always)]
fn stack_slot(tgid: u32, kind: u8, fill: impl FnOnce(&mut Stack) -> usize) -> u32 {
    let Some(stack) = STACK_SCRATCH.get_ptr_mut(0) else {
        return NO_SLOT;
    };
    let stack = unsafe { &mut *stack };
    stack.len = fill(stack) as u64;
    // Read back from the map: to the verifier an unknown depth, the same on
    // every path out of the walk. Known exactly on each, it would check the
    // hash loop below once per possible depth (160 ms per program).
    let depth = (unsafe { core::ptr::read_volatile(&stack.len) } as usize).min(MAX_STACK_DEPTH);
    let mut id = NO_STACK;
    if depth == 0 {
        count(Stat::StackLost);
    } else {
        // 64-bit multiplicative hash of the frames: no collisions in
        // practice, unlike a stack-trace map's bucket index.
        let mut hash = 0x9e37_79b9_7f4a_7c15u64 ^ depth as u64;
        for &ip in stack.ips.iter().take(depth) {
            hash = (hash.rotate_left(23) ^ ip).wrapping_mul(0xff51_afd7_ed55_8ccd);
        }
        id = if hash == NO_STACK { 1 } else { hash };
    }
    // SAFETY: a helper without arguments.
    let owner = totals_owner(tgid, unsafe { bpf_get_smp_processor_id() } & config::shard_mask(), kind);
    let Some(hint) = totals::hint(owner, id) else {
        return NO_SLOT;
    };
    if totals::holds(*hint, owner, id) {
        // An entry's stack is in STACKS: nothing removes one.
        return *hint;
    }
    if id != NO_STACK && STACKS.get_ptr(&id).is_none() {
        match STACKS.insert(&id, stack, BPF_NOEXIST as u64) {
            Ok(()) | Err(EEXIST) => {}
            Err(_) => {
                count(Stat::StackLost);
                id = NO_STACK;
            }
        }
    }
    if !totals::probe(owner, id, hint) {
        count(Stat::CombinedMapFull);
        return NO_SLOT;
    }
    *hint
}

/// The user stack at an allocator's return (see `unwind`).
#[inline(always)]
fn user_stack_slot(ctx: &RetProbeContext, tgid: u32, kind: u8) -> u32 {
    // SAFETY: a uprobe's context is the task's pt_regs.
    let regs = unsafe { &*ctx.regs };
    stack_slot(tgid, kind, |stack| user_stack(regs, &mut stack.ips))
}

/// A run of `unwind_step`: a few frames more of a walk by tables, then, at
/// its end, the block `alloc_exit` left to record.
#[inline(always)]
pub fn unwind_step(ctx: &ProbeContext) {
    let Some(done) = unwind::walk_some() else { return };
    if !done {
        // SAFETY: the same program, with the same context.
        let _ = unsafe { UNWIND_STEP.tail_call(ctx, 0) };
        // Only if the kernel's limit of tail calls is reached.
        unwind::truncate();
    }
    let Some(state) = UNWIND_STATE.get_ptr(0) else { return };
    // SAFETY: per-CPU value, this program's alone until it ends.
    let state = unsafe { *state };
    let slot = stack_slot(state.tgid, state.kind as u8, |stack| stack.len as usize);
    let pid_tgid = u64::from(state.tgid) << 32 | u64::from(state.tid);
    let info = new_block(ctx, pid_tgid, state.addr, state.size, state.timestamp_ns, slot);
    let mmap = state.mmap != 0;
    if track(state.tgid, state.addr, info, true, mmap) && mmap {
        regions::follow(state.tgid, Region { start: state.addr, timestamp_ns: info.timestamp_ns });
    }
}

/// The kernel stack of a tracepoint.
#[inline(always)]
fn kernel_stack_slot<C: EbpfContext>(ctx: &C, space: u32, kind: Kind) -> u32 {
    stack_slot(space, kind as u8, |stack| {
        let bytes = unsafe {
            bpf_get_stack(ctx.as_ptr(), stack.ips.as_mut_ptr().cast(), (MAX_STACK_DEPTH * 8) as u32, 0)
        };
        if bytes <= 0 { 0 } else { bytes as usize / 8 }
    })
}

/// A new block, with the caller's stack (its TOTALS entry, `slot`) and
/// thread.
#[inline(always)]
fn new_block<C: EbpfContext>(ctx: &C, pid_tgid: u64, addr: u64, size: u64, timestamp_ns: u64, slot: u32) -> AllocInfo {
    let tgid = (pid_tgid >> 32) as u32;
    let info = AllocInfo { size, timestamp_ns, slot, tid: pid_tgid as u32 };
    let slot = info.slot;
    if config::trace() {
        info!(ctx, "alloc tgid={} addr={:x} size={} totals={}", tgid, addr, size, slot);
    }
    info
}

/// A kernel allocation (tracepoints): recorded with the kernel stack.
#[inline(always)]
pub fn record_kernel<C: EbpfContext>(ctx: &C, space: u32, kind: Kind, addr: u64, size: u64) {
    if addr == 0 {
        return;
    }
    let info = AllocInfo {
        size,
        timestamp_ns: now(),
        slot: kernel_stack_slot(ctx, space, kind),
        tid: thread_id() as u32,
    };
    track(space, addr, info, true, false);
}

/// A kernel free.
#[inline(always)]
pub fn forget_kernel(space: u32, addr: u64) {
    if addr != 0 {
        let _ = take(space, addr);
    }
}

/// Puts a block into the table (or ALLOCS) and its totals; `new` for a block
/// just allocated (not one given back, as after a failed realloc), counted
/// in `allocs`. `spilled` puts it straight into ALLOCS: a block REGIONS
/// follows, which munmap's scan of REGIONS looks up there (in that loop of
/// 32, a hash lookup is far less for the verifier to walk than a bucket's
/// slots: 150 ms), and the pieces munmap leaves. Their addresses are a
/// direct mmap's, or inside one just cut: no stale block is looked for in
/// the table there, which keeps munmap's copies of this short for the
/// verifier. False if there was no room.
#[inline(always)]
pub fn track(tgid: u32, addr: u64, info: AllocInfo, new: bool, spilled: bool) -> bool {
    let mut bucket = table::bucket(tgid, addr);
    // A block tracked at this address already: its free was missed. It is
    // in one place at most; one call of `replaced` serves them all (the
    // verifier walks each copy).
    let mut stale = AllocInfo::default();
    let mut has_stale = false;
    let mut placed = false;
    if !spilled && let Some(b) = bucket.as_deref_mut() {
        if table::spilled(b)
            && let Some(old) = unspill(tgid, addr, Some(b))
        {
            stale = old;
            has_stale = true;
        }
        let put = table::put(b, tgid, addr, &info, &mut stale);
        has_stale |= put.stale;
        placed = put.placed;
    }
    if !placed {
        if let Some(b) = bucket.as_deref_mut() {
            // Counted first: a free of this block must look in ALLOCS.
            table::count_spilled(b, 1);
        }
        match spill(tgid, addr, &info, &mut stale) {
            Ok(found) => {
                has_stale |= found;
                placed = true;
            }
            Err(()) => {
                if let Some(b) = bucket {
                    table::count_spilled(b, u64::MAX);
                }
            }
        }
    }
    if has_stale {
        replaced(tgid, stale);
    }
    if !placed {
        count(Stat::AllocMapFull);
        return false;
    }
    combine(tgid, info, true, new);
    true
}

/// A tracked address allocated again: its free was missed (made before
/// attach, or by a path we do not hook), and the stale block leaves the
/// totals (bcc's --wa-missing-free, always on). Only --combined-only keeps
/// sizes in the totals.
#[inline(always)]
fn replaced(tgid: u32, stale: AllocInfo) {
    if config::combined_only() {
        combine(tgid, stale, false, false);
    }
}

/// Puts a block into ALLOCS; true if it replaced one there (into `stale`,
/// which only --combined-only needs, so only it looks the old one up).
#[inline(always)]
fn spill(tgid: u32, addr: u64, info: &AllocInfo, stale: &mut AllocInfo) -> Result<bool, ()> {
    let key = AllocKey { addr, tgid, _pad: 0 };
    match ALLOCS.insert(&key, info, BPF_NOEXIST as u64) {
        Ok(()) => Ok(false),
        Err(EEXIST) => {
            let mut found = false;
            if config::combined_only()
                && let Some(old) = ALLOCS.get_ptr(&key)
            {
                *stale = unsafe { *old };
                found = true;
            }
            ALLOCS.insert(&key, info, BPF_ANY as u64).map(|()| found).map_err(|_| ())
        }
        Err(_) => Err(()),
    }
}

/// Takes a block out of ALLOCS, and out of its bucket's count.
#[inline(always)]
fn unspill(tgid: u32, addr: u64, bucket: Option<&mut Bucket>) -> Option<AllocInfo> {
    let key = AllocKey { addr, tgid, _pad: 0 };
    let info = unsafe { *ALLOCS.get_ptr(&key)? };
    // Only the thread whose delete succeeds takes it, so a double free
    // racing on two threads subtracts once.
    ALLOCS.remove(&key).ok()?;
    if let Some(b) = bucket {
        table::count_spilled(b, u64::MAX);
    }
    Some(info)
}

/// Removes a block from the table (or ALLOCS) and its totals; returns what
/// it was.
#[inline(always)]
pub fn take(tgid: u32, addr: u64) -> Option<AllocInfo> {
    let mut bucket = table::bucket(tgid, addr);
    let info = match bucket.as_deref_mut() {
        Some(b) => match table::take(b, tgid, addr) {
            Some(info) => info,
            None if table::spilled(b) => unspill(tgid, addr, Some(b))?,
            None => return None,
        },
        None => unspill(tgid, addr, None)?,
    };
    combine(tgid, info, false, false);
    Some(info)
}

/// Removes a block that is in ALLOCS (one REGIONS follows: see `track`)
/// from there and its totals; returns what it was.
#[inline(always)]
pub fn take_spilled(tgid: u32, addr: u64) -> Option<AllocInfo> {
    let info = unspill(tgid, addr, table::bucket(tgid, addr))?;
    combine(tgid, info, false, false);
    Some(info)
}

/// What ALLOCS holds for a block (a followed one is always there: see
/// `track`).
#[inline(always)]
pub fn get_spilled(tgid: u32, addr: u64) -> Option<AllocInfo> {
    let key = AllocKey { addr, tgid, _pad: 0 };
    ALLOCS.get_ptr(&key).map(|info| unsafe { *info })
}

/// free.
#[inline(always)]
pub fn forget(tgid: u64, addr: u64) {
    let tgid = tgid as u32;
    if tgid == config::self_tgid() {
        return;
    }
    let _ = take(tgid, addr);
}

/// munmap(addr, len). Blocks from direct mmap calls are cut exactly, one
/// per run (see regions): true if one was, and the probe must run again.
/// Then any other block starting at addr (its mapping not followed) keeps
/// the part past addr + len.
#[inline(always)]
pub fn unmap(tgid: u64, addr: u64, len: u64) -> bool {
    let tgid = tgid as u32;
    if tgid == config::self_tgid() || len == 0 {
        return false;
    }
    if regions::unmap(tgid, addr, len) {
        return true;
    }
    if let Some(mut info) = take(tgid, addr)
        && len < info.size
    {
        info.size -= len;
        // Rare (a direct mapping REGIONS had no slot for): to ALLOCS,
        // which keeps this program short for the verifier.
        track(tgid, addr + len, info, false, true);
    }
    false
}

/// Adds (or removes) one block to its totals (the entry it names: see
/// `totals`). `new` counts it in the stack's allocations since attach,
/// which is all the totals keep without --combined-only; a block added
/// that is not new (a piece a munmap left) is one free less.
#[inline(always)]
fn combine(tgid: u32, info: AllocInfo, add: bool, new: bool) {
    let sizes = config::combined_only();
    if !sizes && !new {
        return;
    }
    // None: counted as lost when the block was recorded.
    let Some(t) = totals::entry(info.slot, tgid) else {
        return;
    };
    if new {
        totals::add(&mut t.sums.allocs, 1);
        totals::add(&mut t.sums.allocated, info.size);
    }
    if sizes {
        totals::add(&mut t.sums.total_size, if add { info.size } else { info.size.wrapping_neg() });
        if !new {
            totals::add(&mut t.sums.frees, if add { u64::MAX } else { 1 });
        }
    }
}
