//! The tool's one flow: load, attach, report every interval, clean up.

use std::{
    collections::HashMap,
    io::Write as _,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context as _;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::{MissedTickBehavior, interval_at, Instant},
};

use memleak_common::NO_STACK;

use crate::{
    attach,
    cli::{Args, Format},
    collect::{self, Recorded},
    exports::{Exports, StackProfile},
    json,
    loader::{self, Config},
    pprof,
    proc::{PidFd, Target},
    report::{self, StackTotal},
    sort::{self, SortKey},
    symbolize::Symbolizer,
    trend::{self, Row, Tracker},
};

pub async fn run(args: Args) -> anyhow::Result<()> {
    let pid = args.pid.expect("validated: -p is given");
    let target = Target::open(pid)?;
    // SAFETY: PidFd owns its fd and keeps it open while registered.
    let exited = unsafe { AsyncFd::register(PidFd::open(pid)?) }.context("watching the target")?;
    let exports = Exports::create(&args)?;
    let mut ebpf = loader::load(&Config::from_args(&args))?;
    // With --format json, stdout holds JSON only.
    let json = args.format == Format::Json;
    let mut logger = if args.trace { Some(trace_logger(&mut ebpf, json)?) } else { None };
    // The run starts as the probes go in: nothing is outstanding before.
    let started = (monotonic_ns(), SystemTime::now());
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
    let attaching = format!("Attaching to pid {pid} ({}), Ctrl+C to quit.", target.comm);
    if json {
        eprintln!("memleak: {attaching}");
    } else {
        println!("{attaching}");
    }

    let mut reporter = Reporter::new(&args, recorded, &target, exports, started);
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
    reporter.write_exports()
}

/// Prints each interval's report, follows each stack's trend, and writes
/// the files asked for at exit.
struct Reporter {
    pid: u32,
    comms: HashMap<u32, String>,
    recorded: Recorded,
    symbolizer: Symbolizer,
    lost: Vec<u64>,
    top: usize,
    min_age_ns: u64,
    show_allocs: bool,
    combined_only: bool,
    sort: SortKey,
    format: Format,
    sample_rate: u64,
    trends: Tracker,
    /// CLOCK_MONOTONIC and wall clock at attach.
    start_ns: u64,
    start: SystemTime,
    reports: u64,
    /// The last report's stacks, every one: what the exit files hold, and
    /// when it was taken (CLOCK_MONOTONIC).
    last: Vec<Row>,
    last_ns: u64,
    exports: Exports,
}

impl Reporter {
    /// `started`: CLOCK_MONOTONIC and wall-clock time of attach.
    fn new(args: &Args, recorded: Recorded, target: &Target, exports: Exports, started: (u64, SystemTime)) -> Self {
        let mut symbolizer = Symbolizer::new(!args.no_source);
        // Open the target's files now: its frames must still resolve if it
        // exits before the first report.
        symbolizer.refresh(target.pid);
        let (start_ns, start) = started;
        let min_age_ns = args.older.saturating_mul(1_000_000);
        Self {
            pid: target.pid,
            comms: HashMap::from([(target.pid, target.comm.clone())]),
            lost: recorded.lost().to_vec(),
            recorded,
            symbolizer,
            top: args.top,
            min_age_ns,
            show_allocs: args.show_allocs,
            combined_only: args.combined_only,
            sort: args.sort,
            format: args.format,
            sample_rate: args.sample_rate,
            trends: Tracker::new(start_ns, if args.combined_only { 0 } else { min_age_ns }),
            start_ns,
            start,
            reports: 0,
            last: Vec::new(),
            last_ns: start_ns,
            exports,
        }
    }

    fn report(&mut self) -> anyhow::Result<()> {
        // Libraries loaded since the last report (dlopen) get opened too.
        self.symbolizer.refresh(self.pid);
        let now = monotonic_ns();
        let combined = self.recorded.combined();
        let totals = if self.combined_only {
            report::from_combined(combined.iter().copied())
        } else {
            report::by_stack(self.recorded.allocations(), now, self.min_age_ns)
        };
        let mut rows = self.trends.update(totals, now, &trend::counts(&combined));
        sort::sort(&mut rows, self.sort);
        self.reports += 1;
        let lost = self.recorded.lost();
        for warning in collect::lost_warnings(&self.lost, &lost) {
            eprintln!("{warning}");
        }
        self.lost = lost.to_vec();
        let Self { recorded, symbolizer, .. } = self;
        let mut out = std::io::stdout().lock();
        match self.format {
            Format::Text => {
                let mut frames = |total: &StackTotal| {
                    let addrs = recorded.stack(total.stack_id);
                    symbolizer.frames(total.tgid, &addrs).iter().flat_map(|f| f.lines()).collect()
                };
                report::write(&mut out, &report::clock_now(), self.top, &rows, self.show_allocs, &mut frames)?;
            }
            Format::Json => {
                let ctx = json::Context {
                    now: SystemTime::now(),
                    elapsed_s: now.saturating_sub(self.start_ns) as f64 / 1e9,
                    report: self.reports,
                    sort: self.sort.name(),
                    min_age_ms: (!self.combined_only).then_some(self.min_age_ns / 1_000_000),
                    top: self.top,
                    show_allocs: self.show_allocs,
                    comms: &self.comms,
                };
                let mut frames = |total: &StackTotal| symbolizer.frames(total.tgid, &recorded.stack(total.stack_id));
                json::write(&mut out, &json::interval(&ctx, &rows, &mut frames))?;
            }
        }
        out.flush()?;
        self.last = rows;
        self.last_ns = now;
        Ok(())
    }

    /// `--folded`, `--flamegraph`, `--pprof`: every stack of the last report.
    fn write_exports(&mut self) -> anyhow::Result<()> {
        if self.exports.is_empty() {
            return Ok(());
        }
        let Self { recorded, symbolizer, .. } = self;
        let stacks: Vec<StackProfile> = self
            .last
            .iter()
            .map(|Row { total, .. }| StackProfile {
                tgid: total.tgid,
                bytes: total.bytes,
                count: total.count,
                frames: if total.stack_id == NO_STACK {
                    vec![]
                } else {
                    symbolizer.frames(total.tgid, &recorded.stack(total.stack_id))
                },
            })
            .collect();
        let elapsed_ns = self.last_ns.saturating_sub(self.start_ns);
        let comm = self.comms.get(&self.pid).map_or("?", String::as_str);
        let title = format!("pid {} ({comm}), {:.1} s after attach", self.pid, elapsed_ns as f64 / 1e9);
        let meta = pprof::Meta {
            time_nanos: self.start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64),
            duration_nanos: elapsed_ns as i64,
            period: self.sample_rate as i64,
        };
        self.exports.write(&stacks, &title, &mut |pid, addr| symbolizer.mapping(pid, addr), meta)
    }
}

type TraceLogger = AsyncFd<aya_log::EbpfLogger<TracePrinter>>;

/// `-t`: the kernel side logs each call through aya-log; print them as they come.
fn trace_logger(ebpf: &mut aya::Ebpf, to_stderr: bool) -> anyhow::Result<TraceLogger> {
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, TracePrinter { to_stderr })
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

struct TracePrinter {
    /// With --format json: stdout holds the JSON only.
    to_stderr: bool,
}

impl log::Log for TracePrinter {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.to_stderr {
            eprintln!("{}", record.args());
        } else {
            println!("{}", record.args());
        }
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
