//! Following exec: a traced process that runs a new program keeps its PID
//! but loses its address space, and with it every block the old image
//! allocated. The kernel says when (the `sched:sched_process_exec`
//! tracepoint, through the `EVENTS` ring); each report first forgets what
//! the old images left (see `Recorded::forget_images`).

use std::collections::{HashMap, HashSet};

use anyhow::Context as _;
use tokio::io::{Interest, unix::AsyncFd};
use aya::{
    Ebpf,
    maps::{MapData, RingBuf},
    programs::TracePoint,
};
use memleak_common::{EVENT_DLOPEN, EVENT_EXEC, Event, maps};

use crate::{
    probe::{kernel, multi::Links},
    target::proc,
};

const PROGRAM: &str = "sched_process_exec";

/// A process's execs since the last look.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Exec {
    /// Of the last one, in the blocks' clock.
    pub time: u64,
    pub count: u32,
}

/// The ring the kernel writes exec events to, readable when it holds some.
pub struct Execs {
    ring: AsyncFd<RingBuf<MapData>>,
    /// Processes that returned from dlopen, read from the ring by `take`.
    opened: HashSet<u32>,
}

impl Execs {
    /// Attaches the exec tracepoint. Without it (no tracefs, an old
    /// kernel) memleak still traces, and says once that an exec's blocks
    /// will be reported until the process exits.
    pub fn follow(ebpf: &mut Ebpf, links: &Links) -> Option<Self> {
        match Self::attach(ebpf, links) {
            Ok(execs) => Some(execs),
            Err(e) => {
                crate::warn!("exec is not followed ({e:#}): blocks of a program a process replaced by exec are reported until it exits");
                None
            }
        }
    }

    fn attach(ebpf: &mut Ebpf, links: &Links) -> anyhow::Result<Self> {
        kernel::ensure_tracefs()?;
        let program: &mut TracePoint = ebpf
            .program_mut(PROGRAM)
            .with_context(|| format!("program {PROGRAM} missing from the BPF object"))?
            .try_into()?;
        program.load().with_context(|| format!("loading program {PROGRAM}"))?;
        let link = program.attach("sched", PROGRAM).context("attaching to sched:sched_process_exec")?;
        links.keep(program.take_link(link)?);
        let map = ebpf.take_map(maps::EVENTS).with_context(|| format!("map {} missing", maps::EVENTS))?;
        let ring = RingBuf::try_from(map)?;
        // SAFETY: the ring owns its fd and keeps it open while registered.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|e| anyhow::anyhow!("watching the event ring: {e}"))?;
        Ok(Self { ring, opened: HashSet::new() })
    }

    /// Returns once events are in the ring (call `take` then).
    pub async fn told(&self) {
        if let Ok(mut ready) = self.ring.readable().await {
            ready.clear_ready();
        }
    }

    /// The processes that exec'd since the last call, each with the time
    /// of its last exec (in the blocks' clock) and how many times.
    pub fn take(&mut self) -> HashMap<u32, Exec> {
        let mut execs: HashMap<u32, Exec> = HashMap::new();
        let ring = self.ring.get_mut();
        while let Some(item) = ring.next() {
            if item.len() < size_of::<Event>() {
                continue;
            }
            // SAFETY: the kernel wrote an `Event` (repr(C), any bits valid);
            // the ring's records are only 8-byte aligned, so read unaligned.
            let event: Event = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            match event.kind {
                EVENT_EXEC => {
                    let exec = execs.entry(event.tgid).or_default();
                    exec.time = exec.time.max(event.time);
                    exec.count += 1;
                }
                EVENT_DLOPEN => {
                    self.opened.insert(event.tgid);
                }
                _ => {}
            }
        }
        execs
    }
}

impl Execs {
    /// The processes that returned from dlopen, as read by `take`.
    pub fn take_opened(&mut self) -> HashSet<u32> {
        std::mem::take(&mut self.opened)
    }
}

/// What process `pid` runs now, for the exec message: the path of its
/// executable as the kernel names it (`?` once it is gone).
pub fn program(pid: u32) -> String {
    proc::exe(pid).unwrap_or_else(|| "?".into())
}

/// Waits (up to 50 ms) until process `pid`, which has just exec'd, maps a
/// libc: the dynamic loader maps the libraries after the exec, and frames
/// in them resolve only from mappings read since. A static program maps
/// none, and costs the 50 ms.
pub fn settle(pid: u32) {
    for _ in 0..50 {
        let maps = proc::maps_text(pid).unwrap_or_default();
        if maps.is_empty() || maps.lines().any(|l| l.contains("/libc") || l.contains("/ld-musl")) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
