//! The user stack at an allocator's return, walked by frame pointers.
//!
//! Not bpf_get_stack: the kernel's walker (perf_callchain_user) also reads
//! the frame a NULL frame pointer names, the end of every chain (_start and
//! clone3 clear it), and that read takes a page fault, about 0.9 µs on
//! every allocation: most of what recording a stack cost. This walk stops
//! at a NULL, misaligned or non-increasing frame pointer instead (each
//! caller's frame is above its callee's).

use aya_ebpf::{
    EbpfContext,
    bindings::pt_regs,
    helpers::{bpf_probe_read_user, bpf_send_signal},
};
use memleak_common::{
    MAX_STACK_DEPTH, Stat, TRUNCATED_IP, UNWIND_CACHE_SLOTS, UNWIND_CFA_RBP, UNWIND_END, UNWIND_LEFT_OUT,
    UNWIND_MAPPINGS, UNWIND_NONE, UNWIND_OFFSET_SHIFT, UNWIND_RBP_SAVED, UNWIND_SLOT_SHIFT, UnwindCache,
    UnwindProcess, UnwindState,
};

use crate::{
    config,
    maps::{STACK_SCRATCH, UNWIND_CACHE, UNWIND_HOLD, UNWIND_PROCS, UNWIND_ROWS, UNWIND_STATE, UNWIND_STEP},
};

/// Fills `ips` with the return addresses, innermost first (the first is
/// where the allocator returns to); returns how many. A stack with more
/// frames than `ips` holds ends with TRUNCATED_IP in its last slot.
#[inline(always)]
pub fn user_stack(regs: &pt_regs, ips: &mut [u64; MAX_STACK_DEPTH]) -> usize {
    let (ip, mut fp) = ip_and_fp(regs);
    ips[0] = ip;
    let mut depth = 1;
    while depth <= MAX_STACK_DEPTH {
        if fp == 0 || fp & 7 != 0 {
            break;
        }
        // A frame record: the caller's frame pointer, then the return address.
        // SAFETY: bpf_probe_read_user checks the user address.
        let Ok([next, ret]) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }) else {
            break;
        };
        if ret == 0 {
            break;
        }
        if depth == MAX_STACK_DEPTH {
            // A frame more than there is room for: cut, and said so (else
            // it reads as a stack that ends there).
            ips[MAX_STACK_DEPTH - 1] = TRUNCATED_IP;
            break;
        }
        ips[depth] = ret;
        depth += 1;
        if next <= fp {
            break;
        }
        fp = next;
    }
    depth
}

// The walk by unwind tables (`--unwind auto|dwarf`): for processes the
// loader gave tables (UNWIND_PROCS), from the registers at the return
// probe. Each frame: the mapping holding the pc (a binary search of the
// process's mappings), its table's row for the pc (a binary search of the
// rows), then the caller's registers from the row's rule. Where there is
// no rule to follow, a frame-pointer step. Tail calls, not bpf_loop: aya
// 0.14 cannot relocate the callback's address bpf_loop needs.

/// Frames per run of `unwind_step` (see `maps::UNWIND_STEP`).
const FRAMES_PER_RUN: usize = 4;
/// Binary search steps over a process's mappings (log2 of UNWIND_MAPPINGS, plus one).
const MAPPING_STEPS: usize = 9;
/// Binary search steps over a table: up to 2^24 rows (128 MiB of tables,
/// the most `--unwind-memory` allows).
const ROW_STEPS: usize = 25;

/// `-c`: at an allocation's entry, the command (`UNWIND_HOLD`) is stopped
/// until memleak has written its tables' entry, which needs its mappings:
/// libc is mapped only once the command runs, and its first allocation
/// came before memleak could see that, walked by frame pointers (a stack
/// of its own, one block of 12 in tests/system.rs). The signal is taken
/// before the allocator returns, so its return probe walks by tables;
/// memleak then clears `UNWIND_HOLD` and sends SIGCONT. Off (a constant
/// the verifier prunes) unless memleak started the command.
#[inline(always)]
pub fn hold(tgid: u32) {
    const SIGSTOP: u32 = 19;
    if !config::unwind_hold_first() {
        return;
    }
    if UNWIND_HOLD.get(0).is_some_and(|&held| held == tgid) {
        // SAFETY: a helper call; it fails only where no signal can go.
        unsafe { bpf_send_signal(SIGSTOP) };
    }
}

/// Starts a walk by tables if the process has any: the block's record
/// goes with it to `unwind_step`. Returns only if there is none (or the
/// tail call failed): then the caller walks by frame pointers.
#[inline(always)]
pub fn by_tables<C: EbpfContext>(ctx: &C, regs: &pt_regs, mut state: UnwindState) {
    if !config::unwind_tables() {
        return;
    }
    // SAFETY: a hash map's value, alive until this program ends.
    let Some(process) = (unsafe { UNWIND_PROCS.get(&state.tgid) }) else { return };
    state.generation = process.generation;
    let (Some(saved), Some(stack)) = (UNWIND_STATE.get_ptr_mut(0), STACK_SCRATCH.get_ptr_mut(0)) else {
        return;
    };
    let (ip, bp) = ip_and_fp(regs);
    state.pc = ip;
    state.bp = bp;
    state.sp = stack_pointer(regs);
    // SAFETY: per-CPU values, this program's alone until it ends.
    unsafe {
        *saved = state;
        (*stack).ips[0] = ip;
        (*stack).len = 1;
        let _ = UNWIND_STEP.tail_call(ctx, 0);
    }
}

/// One run of `unwind_step`: up to FRAMES_PER_RUN more frames into the
/// per-CPU stack. Some(true) once the walk is over.
#[inline(always)]
pub fn walk_some() -> Option<bool> {
    // SAFETY: per-CPU values, this program's alone until it ends.
    let state = unsafe { &mut *UNWIND_STATE.get_ptr_mut(0)? };
    // SAFETY: as above.
    let stack = unsafe { &mut *STACK_SCRATCH.get_ptr_mut(0)? };
    // SAFETY: as `state`.
    let cache = unsafe { &mut *UNWIND_CACHE.get_ptr_mut(0)? };
    let mut len = stack.len as usize;
    let mut done = false;
    for _ in 0..FRAMES_PER_RUN {
        if !step(state, cache) {
            done = true;
            break;
        }
        let Some(slot) = stack.ips.get_mut(len) else {
            done = true;
            break;
        };
        len += 1;
        if len == MAX_STACK_DEPTH {
            // A frame more, and room for one: the stack says it is cut.
            *slot = TRUNCATED_IP;
            done = true;
            break;
        }
        *slot = state.pc;
    }
    stack.len = len as u64;
    Some(done)
}

/// Ends the per-CPU stack with TRUNCATED_IP (a walk that could not go on).
#[inline(always)]
pub fn truncate() {
    let Some(stack) = STACK_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: per-CPU value, this program's alone until it ends.
    let stack = unsafe { &mut *stack };
    let len = (stack.len as usize).min(MAX_STACK_DEPTH - 1);
    if let Some(slot) = stack.ips.get_mut(len) {
        *slot = TRUNCATED_IP;
        stack.len = len as u64 + 1;
    }
}

/// From one frame's registers to its caller's; false at the end of the
/// stack (or where the memory read fails).
#[inline(always)]
fn step(s: &mut UnwindState, cache: &mut UnwindCache) -> bool {
    // pc is a return address: the call before it is what the caller runs
    // (the rule at the call instruction holds after the return too, and
    // after a call to a noreturn function pc is past the caller's end).
    let rule = cached_rule_at(s, cache, s.pc.wrapping_sub(1));
    let kind = rule & 3;
    if kind == UNWIND_END {
        return false;
    }
    if kind == UNWIND_NONE {
        if rule & UNWIND_LEFT_OUT != 0 {
            crate::stats::count(Stat::UnwindLeftOut);
        }
        return saved_bp(s) && frame_pointer_step(s);
    }
    let base = if kind == UNWIND_CFA_RBP {
        if !saved_bp(s) {
            return false;
        }
        s.bp
    } else {
        s.sp
    };
    let cfa = base.wrapping_add(u64::from(rule >> UNWIND_OFFSET_SHIFT));
    // A caller's frame is above its callee's: anything else is garbage.
    if cfa <= s.sp {
        return false;
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    let Ok(ret) = (unsafe { bpf_probe_read_user((cfa - 8) as *const u64) }) else {
        return false;
    };
    if rule & UNWIND_RBP_SAVED != 0 {
        // Read only if a rule needs it (see `saved_bp`): code without
        // frame pointers saves rbp as any other register, and no later
        // rule needs it; read at once, it was a second read in most of
        // gcc's `cc1` frames, 270 ns of each allocation's return probe
        // (1,437 -> 1,170).
        let slot = u64::from((rule >> UNWIND_SLOT_SHIFT) & 0xff);
        s.bp_at = cfa.wrapping_sub(8 * slot);
    }
    s.sp = cfa;
    s.pc = ret;
    ret != 0
}

/// Makes `s.bp` the frame's rbp, reading it where a callee saved it (see
/// `UnwindState::bp_at`); false if that read fails.
#[inline(always)]
fn saved_bp(s: &mut UnwindState) -> bool {
    if s.bp_at == 0 {
        return true;
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    let Ok(bp) = (unsafe { bpf_probe_read_user(s.bp_at as *const u64) }) else {
        return false;
    };
    s.bp = bp;
    s.bp_at = 0;
    true
}

/// The frame-pointer step of `user_stack`, for a frame without a rule.
#[inline(always)]
fn frame_pointer_step(s: &mut UnwindState) -> bool {
    let fp = s.bp;
    if fp == 0 || fp & 7 != 0 || fp < s.sp {
        return false;
    }
    // SAFETY: bpf_probe_read_user checks the user address.
    let Ok([next, ret]) = (unsafe { bpf_probe_read_user(fp as *const [u64; 2]) }) else {
        return false;
    };
    s.bp = next;
    s.sp = fp + 16;
    s.pc = ret;
    ret != 0
}

/// `v`, unknown to the verifier: written to the per-CPU state and read
/// back. The binary searches index memory by it: known exactly, each path
/// through a search is a state of its own to the verifier (it gave up
/// past a million instructions on the first search).
#[inline(always)]
fn opaque(s: &mut UnwindState, v: u64) -> u64 {
    // SAFETY: a field of a live value.
    unsafe {
        core::ptr::write_volatile(&mut s.scratch, v);
        core::ptr::read_volatile(&s.scratch)
    }
}

/// `rule_at`, from the per-CPU cache when it holds the rule for `pc` in
/// the process's entry the walk started with (its generation), else
/// searched in the entry and kept there. Only a miss looks the entry up,
/// not every run of `unwind_step`: gcc's `cc1` (no frame pointers, deep
/// stacks) spent 2.4% of its run time in that hash lookup, and its
/// allocations' return probe 50 ns less each without it (1,487 -> 1,437).
#[inline(always)]
fn cached_rule_at(s: &mut UnwindState, cache: &mut UnwindCache, pc: u64) -> u32 {
    // Return addresses of nearby calls differ in the low bits; the
    // generation spreads processes that run the same code.
    let hash = pc ^ pc >> 10 ^ u64::from(s.generation).wrapping_mul(0x9e37_79b9);
    let slot = &mut cache.slots[hash as usize & (UNWIND_CACHE_SLOTS - 1)];
    if slot.pc == pc && slot.generation == s.generation {
        return slot.rule;
    }
    // Gone since the walk started: the process exited (or was forgotten),
    // and the walk ends here.
    // SAFETY: a hash map's value, alive until this program ends.
    let Some(p) = (unsafe { UNWIND_PROCS.get(&s.tgid) }) else { return UNWIND_END };
    let rule = rule_at(s, p, pc);
    // Under the entry's own generation: one rewritten since the walk
    // started (a library loaded) is not the one walks by it start with.
    slot.pc = pc;
    slot.generation = p.generation;
    slot.rule = rule;
    rule
}

/// The rule for address `pc` of a process: its mapping's table's last row
/// at or before it. UNWIND_NONE where no table covers it.
#[inline(always)]
fn rule_at(s: &mut UnwindState, p: &UnwindProcess, pc: u64) -> u32 {
    let count = (p.count as usize).min(UNWIND_MAPPINGS);
    let (mut lo, mut hi) = (0usize, count);
    for _ in 0..MAPPING_STEPS {
        if lo >= hi {
            break;
        }
        let mid = opaque(s, ((lo + hi) / 2) as u64) as usize;
        if pc < p.mappings[mid & (UNWIND_MAPPINGS - 1)].start {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    if lo == 0 {
        return UNWIND_NONE;
    }
    let m = &p.mappings[(lo - 1) & (UNWIND_MAPPINGS - 1)];
    if pc >= m.end {
        return UNWIND_NONE;
    }
    if m.rows == 0 {
        return UNWIND_NONE | UNWIND_LEFT_OUT;
    }
    let at = pc.wrapping_sub(m.bias);
    if at > u64::from(u32::MAX) {
        return UNWIND_NONE;
    }
    // The last row whose address is at or before `at`.
    let key = at << 32 | 0xffff_ffff;
    let (first, mut lo, mut hi) = (m.first, m.first, m.first.saturating_add(m.rows));
    for _ in 0..ROW_STEPS {
        if lo >= hi {
            break;
        }
        let mid = opaque(s, u64::from(lo + (hi - lo) / 2)) as u32;
        let Some(&row) = UNWIND_ROWS.get(mid) else { return UNWIND_NONE };
        if row <= key {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    if lo == first {
        return UNWIND_NONE;
    }
    UNWIND_ROWS.get(lo - 1).map_or(UNWIND_NONE, |&row| row as u32)
}

#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
fn ip_and_fp(regs: &pt_regs) -> (u64, u64) {
    (regs.rip, regs.rbp)
}

/// The stack pointer: at a function's entry it points at the return
/// address; once the function returns, 8 bytes above.
#[cfg(bpf_target_arch = "x86_64")]
#[inline(always)]
pub fn stack_pointer(regs: &pt_regs) -> u64 {
    regs.rsp
}

#[cfg(not(bpf_target_arch = "x86_64"))]
compile_error!("memleak's user stack walk reads x86-64 registers: port ip_and_fp and stack_pointer to this architecture");
