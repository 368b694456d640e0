//! The tool's one flow: load, attach, report every interval, clean up.

use std::{io::Write as _, time::Duration};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval_at, Instant},
};

use crate::{
    attach,
    cli::Args,
    collect::{self, Recorded},
    loader::{self, Config},
    proc::{PidFd, Target},
    report::{self, StackTotal},
    symbolize::Symbolizer,
};

pub async fn run(args: Args) -> anyhow::Result<()> {
    let pid = args.pid.expect("validated: -p is given");
    let target = Target::open(pid)?;
    // SAFETY: PidFd owns its fd and keeps it open while registered.
    let exited = unsafe { AsyncFd::register(PidFd::open(pid)?) }.context("watching the target")?;
    // The pidfd pins the process from here on; make sure it is the one we
    // looked at, not a newcomer that took the PID in between.
    target.check_same()?;
    let mut ebpf = loader::load(&Config::from_args(&args))?;
    let mut logger = if args.trace { Some(trace_logger(&mut ebpf)?) } else { None };
    let attached = attach::attach(&mut ebpf, &target, args.obj.as_deref())?;
    let recorded = Recorded::take(&mut ebpf)?;
    if args.verbose {
        eprintln!("memleak: probes on {} (via {}):", attached.object, attached.host_path.display());
        for (function, offset) in &attached.functions {
            eprintln!("memleak:   {function} at file offset {offset:#x}");
        }
        if !attached.missing.is_empty() {
            eprintln!("memleak:   not defined there: {}", attached.missing.join(", "));
        }
    }
    println!("Attaching to pid {pid} ({}), Ctrl+C to quit.", target.comm);

    let mut reporter = Reporter::new(&args, recorded, pid);
    let period = Duration::from_secs(args.interval);
    let mut ticks = interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let mut reports = 0;
    loop {
        tokio::select! {
            _ = ticks.tick() => {
                reporter.report()?;
                reports += 1;
                if args.count.is_some_and(|c| reports >= c) {
                    break;
                }
            }
            _ = sigint.recv() => { reporter.report()?; break; }
            _ = sigterm.recv() => { reporter.report()?; break; }
            _ = exited.readable() => {
                eprintln!("memleak: process {pid} ({}) exited", target.comm);
                reporter.report()?;
                break;
            }
            _ = trace_events(&mut logger) => {}
        }
    }
    // Dropping the Ebpf detaches every probe. The kernel unregisters
    // perf-event uprobes one at a time, ~0.1 s each, under one lock.
    drop(ebpf);
    Ok(())
}

/// Prints each interval's report.
struct Reporter {
    pid: u32,
    recorded: Recorded,
    symbolizer: Symbolizer,
    lost: Vec<u64>,
    top: usize,
    min_age_ns: u64,
    show_allocs: bool,
    combined_only: bool,
}

impl Reporter {
    fn new(args: &Args, recorded: Recorded, pid: u32) -> Self {
        let mut symbolizer = Symbolizer::new(true);
        // Open the target's files now: its frames must still resolve if it
        // exits before the first report.
        symbolizer.refresh(pid);
        Self {
            pid,
            lost: recorded.lost().to_vec(),
            recorded,
            symbolizer,
            top: args.top,
            min_age_ns: args.older.saturating_mul(1_000_000),
            show_allocs: args.show_allocs,
            combined_only: args.combined_only,
        }
    }

    fn report(&mut self) -> anyhow::Result<()> {
        // Libraries loaded since the last report (dlopen) get opened too.
        self.symbolizer.refresh(self.pid);
        let totals = if self.combined_only {
            report::from_combined(self.recorded.combined())
        } else {
            report::by_stack(self.recorded.allocations(), monotonic_ns(), self.min_age_ns)
        };
        let lost = self.recorded.lost();
        for warning in collect::lost_warnings(&self.lost, &lost) {
            eprintln!("{warning}");
        }
        self.lost = lost.to_vec();
        let Self { recorded, symbolizer, .. } = self;
        let mut frames = |total: &StackTotal| {
            let addrs = recorded.stack(total.stack_id);
            symbolizer.frames(total.tgid, &addrs).iter().flat_map(|f| f.lines()).collect()
        };
        let mut out = std::io::stdout().lock();
        report::write(&mut out, &report::clock_now(), self.top, &totals, self.show_allocs, &mut frames)?;
        out.flush()?;
        Ok(())
    }
}

type TraceLogger = AsyncFd<aya_log::EbpfLogger<TracePrinter>>;

/// `-t`: the kernel side logs each call through aya-log; print them as they come.
fn trace_logger(ebpf: &mut aya::Ebpf) -> anyhow::Result<TraceLogger> {
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, TracePrinter)
        .context("starting the -t event log")?;
    // SAFETY: the logger owns its ring buffer fd for as long as it lives.
    Ok(unsafe { AsyncFd::register(logger) }?)
}

async fn trace_events(logger: &mut Option<TraceLogger>) {
    let Some(logger) = logger else {
        return std::future::pending().await;
    };
    if let Ok(mut ready) = logger.readable_mut().await {
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

struct TracePrinter;

impl log::Log for TracePrinter {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        println!("{}", record.args());
    }
    fn flush(&self) {}
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
