//! Bench only (`memleak --floor`, used by `cargo xtask bench`): empty
//! programs put where the real ones go, so that what a probe costs before
//! it does any work (the trap, and the return hook) can be measured apart
//! from what memleak's programs add. Never loaded otherwise.

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

#[uprobe]
pub fn floor_enter(_ctx: ProbeContext) -> u32 {
    0
}

#[uretprobe]
pub fn floor_exit(_ctx: RetProbeContext) -> u32 {
    0
}
