//! The counters of what the kernel side could not record (`STATS`, by
//! `memleak_common::Stat`; user space adds up the CPUs).

use memleak_common::Stat;

use crate::maps::STATS;

/// One more event of `stat`, on this CPU.
#[inline(always)]
pub fn count(stat: Stat) {
    if let Some(n) = STATS.get_ptr_mut(stat as u32) {
        // SAFETY: this CPU's slot of a per-CPU array: no other CPU writes
        // it, and a program runs to its end on one CPU.
        unsafe { *n += 1 };
    }
}
