//! Stacks: a block's stack is stored once in STACKS, under a hash of its
//! frames, and named by the TOTALS entry of (process, stack, kind) that
//! the block keeps the index of.

use aya_ebpf::{
    EbpfContext,
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_get_smp_processor_id, bpf_get_stack},
    programs::RetProbeContext,
};
use memleak_common::{Kind, MAX_STACK_DEPTH, NO_SLOT, NO_STACK, Stack, Stat, totals_owner};

use crate::{
    config,
    maps::{STACK_SCRATCH, STACKS},
    stats::count,
    totals,
    unwind::user_stack,
};

const EEXIST: i32 = -17;

/// The TOTALS entry of (tgid, the stack `fill` writes into a per-CPU
/// scratch buffer, returning its depth, the hooked function `kind`); the
/// stack is stored in STACKS under a hash of its frames. Without room
/// there, the entry of (tgid, no stack, kind): the block still tells its
/// process and function. [`NO_SLOT`] if TOTALS has no room.
#[inline(always)]
pub fn stack_slot(tgid: u32, kind: u8, fill: impl FnOnce(&mut Stack) -> usize) -> u32 {
    let Some(stack) = STACK_SCRATCH.get_ptr_mut(0) else {
        return NO_SLOT;
    };
    // SAFETY: this CPU's scratch value, this program's alone until it ends.
    let stack = unsafe { &mut *stack };
    stack.len = fill(stack) as u64;
    // Read back from the map: to the verifier an unknown depth, the same on
    // every path out of the walk. Known exactly on each, it would check the
    // hash loop below once per possible depth (160 ms per program).
    // SAFETY: a field of the value above.
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
pub fn user_stack_slot(ctx: &RetProbeContext, tgid: u32, kind: u8) -> u32 {
    // SAFETY: a uprobe's context is the task's pt_regs.
    let regs = unsafe { &*ctx.regs };
    stack_slot(tgid, kind, |stack| user_stack(regs, &mut stack.ips))
}

/// The kernel stack of a tracepoint.
#[inline(always)]
pub fn kernel_stack_slot<C: EbpfContext>(ctx: &C, space: u32, kind: Kind) -> u32 {
    stack_slot(space, kind as u8, |stack| {
        // SAFETY: the helper writes at most the size given, the buffer's.
        let bytes = unsafe {
            bpf_get_stack(ctx.as_ptr(), stack.ips.as_mut_ptr().cast(), (MAX_STACK_DEPTH * 8) as u32, 0)
        };
        if bytes <= 0 { 0 } else { bytes as usize / 8 }
    })
}
