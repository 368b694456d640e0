//! What each hooked call does: an allocator's entry notes the call for
//! its return, which records the block; free and munmap forget theirs.

use core::ptr;

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_prandom_u32, bpf_ktime_get_ns, bpf_probe_read_user},
    EbpfContext,
    helpers::generated::{bpf_get_attach_cookie, bpf_jiffies64},
    programs::{ProbeContext, RetProbeContext},
};
use memleak_common::{
    PENDING_ACTIVE, PENDING_COARSE, PENDING_HAS_OLD, PENDING_KIND_SHIFT, PENDING_MMAP, PENDING_RECORD, Pending, Region,
    Stat, UnwindState,
};

use crate::{
    blocks::{Origin, Place, new_block, take, track},
    config,
    maps::{LAST_FREE, PENDING, UNWIND_STATE, UNWIND_STEP},
    regions,
    stacks::{stack_slot, user_stack_slot},
    stats::count,
    unwind::{self, stack_pointer},
};

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
pub fn now() -> u64 {
    // SAFETY: helpers without arguments.
    if config::combined_only() { unsafe { bpf_jiffies64() } } else { unsafe { bpf_ktime_get_ns() } }
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
    // new, glibc's reallocarray to realloc: a tail call) is one call, in
    // one frame: its kind is the first function's, and so is the old block
    // the first one took (restored if the call fails).
    let (function, kept) = if pending.flags & PENDING_ACTIVE != 0 && pending.sp == sp && fresh(pending) {
        (pending.flags & (0xff << PENDING_KIND_SHIFT), pending.flags & PENDING_HAS_OLD)
    } else {
        // SAFETY: the helper reads the probe's cookie from the context.
        ((unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32 & 0xff) << PENDING_KIND_SHIFT, 0)
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
    // SAFETY: fields of this thread's own value, which only it writes.
    unsafe {
        ptr::write_volatile(&mut pending.memptr, memptr);
        ptr::write_volatile(&mut pending.old_addr, old_addr);
    }
    pending.entered_ns = entered;
    pending.sp = sp;
    pending.depth = 0;
    pending.flags = PENDING_ACTIVE | kind | coarse | function | kept | if traced { PENDING_RECORD } else { 0 };
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
    // SAFETY: a helper without arguments.
    let jiffies = unsafe { bpf_jiffies64() };
    if last.pid_tgid != pid_tgid || sp >= last.sp || jiffies.wrapping_sub(last.jiffies) > 1 {
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
    let origin = if new { Origin::New } else { Origin::Back };
    if track(tgid, addr, info, origin, if mmap { Place::Spilled } else { Place::Table }) && mmap {
        regions::follow(tgid, Region { start: addr, timestamp_ns: info.timestamp_ns });
    }
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
    if track(state.tgid, state.addr, info, Origin::New, if mmap { Place::Spilled } else { Place::Table }) && mmap {
        regions::follow(state.tgid, Region { start: state.addr, timestamp_ns: info.timestamp_ns });
    }
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
        track(tgid, addr + len, info, Origin::Back, Place::Spilled);
    }
    false
}
