//! Events user space must hear of between reports: a traced process
//! replaced its image (exec), so the blocks it recorded died with the old
//! address space.

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_jiffies64, bpf_ktime_get_ns},
    macros::{map, tracepoint},
    maps::RingBuf,
    programs::TracePointContext,
};
use memleak_common::{EVENT_EXEC, Event};

use crate::{config, maps::UNWIND_HOLD};

/// Events of 24 bytes (16 and the ring's 8-byte header). Sized by user
/// space as it loads the programs (`events_bytes`: 128 KiB system-wide,
/// 16 KiB for one process); this is the larger.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(128 << 10, 0);

/// sched:sched_process_exec fires in the task that exec'd, once the new
/// image is in place and before it runs: the time taken here is after
/// every block of the old image and before any of the new one.
#[tracepoint]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    let watched = config::watched_tgid();
    if watched != 0 && tgid != watched {
        return 0;
    }
    // In the blocks' clock (see `calls::now`): user space forgets the
    // blocks from before this time (jiffies with --combined-only: blocks
    // of the exec's own jiffy are judged by their address, see
    // `Reporter::forget_execs`).
    // SAFETY: helpers without arguments.
    let time = unsafe { if config::combined_only() { bpf_jiffies64() } else { bpf_ktime_get_ns() } };
    // `-c`: the new program is held at its first allocation too, until
    // memleak has its tables (see `unwind::hold`): a command started
    // through a wrapper (`sh -c 'exec ...'`, pyenv's shims) would
    // otherwise have its first blocks walked by frame pointers only.
    if config::unwind_hold_first()
        && let Some(held) = UNWIND_HOLD.get_ptr_mut(0)
    {
        // SAFETY: the map's one element; memleak clears it as it
        // releases the command.
        unsafe { *held = tgid };
    }
    // A full ring loses the event: the old image's blocks then stay until
    // the process exits (user space reads the ring every report).
    let _ = EVENTS.output::<Event>(Event { kind: EVENT_EXEC, tgid, time }, 0);
    0
}
