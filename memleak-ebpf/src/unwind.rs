//! The user stack at an allocator's return, walked by frame pointers.
//!
//! Not bpf_get_stack: the kernel's walker (perf_callchain_user) also reads
//! the frame a NULL frame pointer names, the end of every chain (_start and
//! clone3 clear it), and that read takes a page fault, about 0.9 µs on
//! every allocation: most of what recording a stack cost. This walk stops
//! at a NULL, misaligned or non-increasing frame pointer instead (each
//! caller's frame is above its callee's).

use aya_ebpf::{bindings::pt_regs, helpers::bpf_probe_read_user};
use memleak_common::MAX_STACK_DEPTH;

/// Fills `ips` with the return addresses, innermost first (the first is
/// where the allocator returns to); returns how many.
#[inline(always)]
pub fn user_stack(regs: &pt_regs, ips: &mut [u64; MAX_STACK_DEPTH]) -> usize {
    let (ip, mut fp) = ip_and_fp(regs);
    ips[0] = ip;
    let mut depth = 1;
    while depth < MAX_STACK_DEPTH {
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
        ips[depth] = ret;
        depth += 1;
        if next <= fp {
            break;
        }
        fp = next;
    }
    depth
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
