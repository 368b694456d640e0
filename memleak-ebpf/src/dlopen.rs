//! dlopen's return: the traced process maps a library now, which it may
//! unmap (dlclose) before the next report. User space reads its mappings
//! at once, and keeps what it opened, so that the library's frames still
//! resolve once it is gone.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_ns},
    macros::uretprobe,
    programs::RetProbeContext,
};
use memleak_common::{EVENT_DLOPEN, Event};

use crate::exec::EVENTS;

/// Attached for the traced process only (-p, -c).
#[uretprobe]
pub fn dlopen_exit(_ctx: RetProbeContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    // SAFETY: a helper without arguments.
    let time = unsafe { bpf_ktime_get_ns() };
    // A full ring loses the event: the library is seen at the next report.
    let _ = EVENTS.output::<Event>(Event { kind: EVENT_DLOPEN, tgid, time }, 0);
    0
}
