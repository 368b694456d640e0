//! The tool's one flow: load, attach, report every interval, clean up.

use std::{
    num::NonZeroU32,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use aya::Ebpf;
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
    time::{Instant, MissedTickBehavior, interval_at},
};

use crate::{
    probe::attach::{self, Attached, SystemProbes},
    cli::{Args, Format, Mode},
    maps::collect::Recorded,
    target::command::{self, Held},
    export::Exports,
    probe::kernel,
    probe::loader::{self, Config},
    probe::multi::Links,
    output,
    target::proc::{PidFd, Target},
    clock::monotonic_ns,
    report::{Reporter, Scope, dump},
};

/// Traces as `args` say; returns the exit code (the command's with -c).
pub async fn run(args: Args) -> anyhow::Result<u8> {
    match args.mode() {
        Mode::Pid(pid) => trace_pid(&args, pid).await.map(|()| 0),
        Mode::Command(argv) => trace_command(&args, &argv).await,
        Mode::System { user, kernel } => trace_system(&args, user, kernel).await.map(|()| 0),
    }
}

/// SIGINT and SIGTERM, caught from the start: a signal that comes while
/// attaching must not kill memleak with its last report unprinted.
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
}

impl Signals {
    fn catch() -> anyhow::Result<Self> {
        Ok(Self { int: signal(SignalKind::interrupt())?, term: signal(SignalKind::terminate())? })
    }

    /// A signal caught while memleak was busy (SIGINT or SIGTERM), if any.
    /// The runtime notices one only when it polls its driver: a 1 ms
    /// sleep lets it.
    async fn caught(&mut self) -> Option<i32> {
        tokio::select! {
            biased;
            _ = self.int.recv() => Some(libc::SIGINT),
            _ = self.term.recv() => Some(libc::SIGTERM),
            () = tokio::time::sleep(Duration::from_millis(1)) => None,
        }
    }
}

async fn trace_pid(args: &Args, pid: u32) -> anyhow::Result<()> {
    let mut signals = Signals::catch()?;
    let target = Target::open(pid)?;
    let exited = watch(pid)?;
    // The pidfd pins the process from here on; make sure it is the one we
    // looked at, not a newcomer that took the PID in between.
    target.check_same()?;
    let exports = Exports::create(args)?;
    let dump = dump::create(args)?;
    // The probes are worked out while the programs load: both take time.
    let config = Config::from_args(args);
    let (ebpf, planned) = std::thread::scope(|scope| {
        let loading = scope.spawn(|| loader::load(&config));
        let planned = attach::plan_target(&target, args.obj.as_deref(), args.floor);
        (loading.join().expect("loader thread panicked"), planned)
    });
    let (mut ebpf, links) = ebpf?;
    let planned = planned?;
    let mut logger = trace_logger(args, &mut ebpf)?;
    // The run starts as the probes go in: nothing is outstanding before.
    let started = (monotonic_ns(), SystemTime::now());
    for attached in attach::attach(&mut ebpf, &links, planned)? {
        verbose(args, &attached);
    }
    let recorded = Recorded::take(&mut ebpf, config.table_buckets)?;
    let mut reporter = Reporter::new(args, recorded, Scope::Process(pid, target.comm.clone()), exports, dump, started);
    say(args, &format!("Attaching to pid {pid} ({}), Ctrl+C to quit.", target.comm))?;
    let end = report_loop(args, &mut reporter, &mut signals, &mut logger, Some(&exited), |_| Ok(())).await?;
    if end == End::TargetExited {
        eprintln!("memleak: process {pid} ({}) exited", target.comm);
    }
    reporter.report()?;
    detach(args, ebpf, links, &mut signals).await;
    reporter.finish()
}

async fn trace_command(args: &Args, argv: &[String]) -> anyhow::Result<u8> {
    let mut signals = Signals::catch()?;
    let mut held = Held::spawn(argv)?;
    let pid = held.pid;
    let exited = watch(pid)?;
    let exports = Exports::create(args)?;
    let dump = dump::create(args)?;
    let config = Config::from_args(args);
    let (mut ebpf, links) = loader::load(&config)?;
    let mut logger = trace_logger(args, &mut ebpf)?;
    // The command will map the same libc as we do (or -O's object): probe
    // it for the child's PID now; the kernel puts the breakpoints into the
    // new program's mappings when it execs.
    let obj = match &args.obj {
        Some(obj) => obj.clone(),
        None => own_libc()?,
    };
    let target = Target { pid, comm: argv[0].clone(), dir: None };
    let attached = attach::attach_file(&mut ebpf, &links, &obj, NonZeroU32::new(pid).expect("child pid"))?;
    verbose(args, &attached);
    let recorded = Recorded::take(&mut ebpf, config.table_buckets)?;
    // A Ctrl-C while attaching: the command is not started (`held` kills
    // and reaps it).
    if let Some(signal) = signals.caught().await {
        eprintln!("memleak: interrupted before {} started", argv[0]);
        drop(held);
        detach(args, ebpf, links, &mut signals).await;
        return Ok(128 + signal as u8);
    }
    let started = (monotonic_ns(), SystemTime::now());
    held.release()?;
    command::wait_for_exec(pid, &argv[0]);
    let scope = Scope::Process(pid, crate::target::proc::module_name(&argv[0]).to_string());
    let mut reporter = Reporter::new(args, recorded, scope, exports, dump, started);
    say(args, &format!("Tracing {} (pid {pid}), Ctrl+C to quit.", argv.join(" ")))?;
    let end = report_loop(args, &mut reporter, &mut signals, &mut logger, Some(&exited), |_| Ok(())).await?;
    let code = if end == End::TargetExited {
        let code = held.reap();
        eprintln!("memleak: {} exited{}", target.comm, code.map(|c| format!(" with {c}")).unwrap_or_default());
        code
    } else {
        None
    };
    reporter.report()?;
    if end != End::TargetExited {
        // After the last report: memleak ends, and its command with it.
        held.end(command::GRACE);
    }
    detach(args, ebpf, links, &mut signals).await;
    reporter.finish()?;
    Ok(code.map_or(0, |c| c as u8))
}

async fn trace_system(args: &Args, user: bool, kernel_too: bool) -> anyhow::Result<()> {
    let mut signals = Signals::catch()?;
    let mut config = Config::from_args(args);
    if kernel_too {
        kernel::ensure_tracefs()?;
        config.field_offsets = kernel::field_offsets()?;
        config.skip_caller = kernel::bpf_refill_range();
    }
    let exports = Exports::create(args)?;
    let dump = dump::create(args)?;
    let (mut ebpf, links) = loader::load(&config)?;
    let mut logger = trace_logger(args, &mut ebpf)?;
    let started = (monotonic_ns(), SystemTime::now());
    let mut probes = SystemProbes::default();
    let mut what = vec![];
    if user {
        match &args.obj {
            Some(obj) => probes.object(&mut ebpf, &links, obj)?,
            None => {
                probes.scan(&mut ebpf, &links)?;
            }
        }
        for attached in &probes.objects {
            verbose(args, attached);
        }
        what.push(format!("all processes ({} allocator files)", probes.objects.len()));
    }
    if kernel_too {
        let events = kernel::attach(&mut ebpf, &links, args.percpu)?;
        if args.verbose {
            eprintln!("memleak: kernel tracepoints: {}", events.join(", "));
        }
        what.push("kernel allocators".to_string());
    }
    let recorded = Recorded::take(&mut ebpf, config.table_buckets)?;
    let mut reporter = Reporter::new(args, recorded, Scope::System { top_procs: args.top_procs }, exports, dump, started);
    say(args, &format!("Tracing {}, Ctrl+C to quit.", what.join(" and ")))?;
    let rescan = user && args.obj.is_none();
    let verbose_on = args.verbose;
    report_loop(args, &mut reporter, &mut signals, &mut logger, None, |_| {
        // Programs and containers started since: probe their allocators too.
        if rescan {
            let before = probes.objects.len();
            if probes.scan(&mut ebpf, &links)? > 0 && verbose_on {
                for attached in &probes.objects[before..] {
                    eprintln!("memleak: now also probing {}", attached.object);
                }
            }
        }
        Ok(())
    })
    .await?;
    reporter.report()?;
    drop(probes);
    detach(args, ebpf, links, &mut signals).await;
    reporter.finish()
}

/// A status line: on stdout, or on stderr when stdout holds JSON only.
fn say(args: &Args, line: &str) -> anyhow::Result<()> {
    if args.format == Format::Json {
        eprintln!("memleak: {line}");
        Ok(())
    } else {
        output::line(line)
    }
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Count,
    Signal,
    TargetExited,
}

/// Reports every interval until COUNT reports, a signal, or the target's
/// exit; `each_tick` runs before each report. The caller prints the last
/// report (on a signal or exit), then detaches.
async fn report_loop(
    args: &Args,
    reporter: &mut Reporter,
    signals: &mut Signals,
    logger: &mut Option<TraceLogger>,
    exited: Option<&AsyncFd<PidFd>>,
    mut each_tick: impl FnMut(&mut Reporter) -> anyhow::Result<()>,
) -> anyhow::Result<End> {
    let period = Duration::from_secs(args.interval);
    let mut ticks = interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut reports = 0;
    loop {
        tokio::select! {
            tick = ticks.tick() => {
                each_tick(reporter)?;
                reports += 1;
                if args.count.is_some_and(|c| reports >= c) {
                    return Ok(End::Count);
                }
                let read = reporter.report()?;
                if args.verbose {
                    // From the tick to the report's last line (`cargo xtask bench` reads it).
                    eprintln!("memleak: report {reports} took {:.6} s ({read} entries read)", tick.elapsed().as_secs_f64());
                }
            }
            _ = signals.int.recv() => return Ok(End::Signal),
            _ = signals.term.recv() => return Ok(End::Signal),
            _ = target_exit(exited) => return Ok(End::TargetExited),
            _ = trace_events(logger) => {}
        }
    }
}

async fn target_exit(exited: Option<&AsyncFd<PidFd>>) {
    match exited {
        Some(fd) => {
            let _ = fd.readable().await;
        }
        None => std::future::pending().await,
    }
}

fn watch(pid: u32) -> anyhow::Result<AsyncFd<PidFd>> {
    // SAFETY: PidFd owns its fd and keeps it open while registered.
    unsafe { AsyncFd::register(PidFd::open(pid)?) }.context("watching the target")
}

/// Detaches every probe, in a child process (see `Links::detach_in_child`):
/// the links all at once, then what aya attached (perf-event uprobes on
/// kernels without uprobe_multi, removed one at a time, ~0.2 s each, under
/// one lock). Past 0.2 s, says so, and a second Ctrl-C (or SIGTERM) ends
/// memleak at once, leaving the rest to that child. With -v, says first
/// what each program cost, if the kernel counted it.
async fn detach(args: &Args, ebpf: Ebpf, links: Links, signals: &mut Signals) {
    if args.verbose {
        loader::program_costs(&ebpf, &links).iter().for_each(|line| eprintln!("{line}"));
    }
    let probes = links.probes();
    let Some(child) = links.detach_in_child(ebpf) else { return };
    if let Ok(done) = watch(child.pid) {
        tokio::select! {
            _ = done.readable() => {}
            () = tokio::time::sleep(Duration::from_millis(200)) => {
                eprintln!("memleak: detaching {probes} probes...");
                tokio::select! {
                    _ = done.readable() => {}
                    _ = signals.int.recv() => {}
                    _ = signals.term.recv() => {}
                }
            }
        }
    }
    child.reap();
}

/// The libc this process runs on: what a command started from here loads.
fn own_libc() -> anyhow::Result<PathBuf> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    crate::target::proc::parse_maps(&maps)
        .into_iter()
        .find(|m| m.is_file() && attach::is_libc(m.module_name()))
        .map(|m| PathBuf::from(m.path))
        .context("memleak itself maps no libc: pass the command's allocator with -O")
}

fn verbose(args: &Args, attached: &Attached) {
    let names: Vec<&str> = attached.functions.iter().map(|(f, ..)| *f).collect();
    if !args.verbose {
        eprintln!("memleak: probing {}: {}", attached.object, names.join(" "));
        return;
    }
    eprintln!("memleak: probes on {} ({}):", attached.object, attached.file);
    for (function, offset, placement) in &attached.functions {
        eprintln!(
            "memleak:   {function} at file offset {offset:#x}, entry probe at +{:#x}: {}",
            placement.delta, placement.why
        );
    }
}

type TraceLogger = AsyncFd<aya_log::EbpfLogger<TracePrinter>>;

/// `-t`: the kernel side logs each call through aya-log; print them as they come.
fn trace_logger(args: &Args, ebpf: &mut Ebpf) -> anyhow::Result<Option<TraceLogger>> {
    if !args.trace {
        return Ok(None);
    }
    // With --format json, stdout holds the JSON only.
    let printer = TracePrinter { to_stderr: args.format == Format::Json };
    let logger = aya_log::EbpfLogger::init_with_logger(ebpf, printer)
        .context("starting the -t event log")?;
    // SAFETY: the logger owns its ring buffer fd for as long as it lives.
    Ok(Some(unsafe { AsyncFd::register(logger) }?))
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
            // A failed write is told by the next report.
            let _ = output::line(&record.args().to_string());
        }
    }
    fn flush(&self) {}
}
