//! The tool's one flow: load, attach, report every interval, clean up.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
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
    probe::exec::{self, Execs},
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
    serve::{self, Server},
    error::{Kind, user_error},
    unwind::{Added, Unwinder},
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
    let server = args.listen.map(Server::bind).transpose()?;
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
    let execs = Execs::follow(&mut ebpf, &links);
    // Tables before probes: no stack recorded in between stops short.
    let mut unwinder = unwinder(args, &mut ebpf, &links, &config)?;
    if let Some(unwinder) = &mut unwinder {
        fits(args.unwind_memory, unwinder.add_process(pid)?)?;
    }
    // The run starts as the probes go in: nothing is outstanding before.
    let started = (monotonic_ns(), SystemTime::now());
    let mut probed = HashSet::new();
    for attached in attach::attach(&mut ebpf, &links, planned)? {
        verbose(args, &attached);
        probed.insert(attached.id);
    }
    let recorded = Recorded::take(&mut ebpf, config.table_buckets)?;
    let mut reporter = Reporter::new(args, recorded, Scope::Process(pid, target.comm.clone()), exports, dump, started);
    reporter.follow(execs);
    listen(server, &mut reporter, &config, &links);
    say(args, &format!("Attaching to pid {pid} ({}), Ctrl+C to quit.", target.comm))?;
    let mut replan = Replan::new(target, probed);
    let end = report_loop(args, &mut reporter, &mut signals, &mut logger, Some(&exited), None, |reporter, wake| {
        replan.on(wake, reporter, &mut ebpf, &links, args);
        // Libraries loaded since (or a new program after an exec) get
        // their tables.
        rescan(args, unwinder.as_mut(), pid)
    })
    .await?;
    if end == End::TargetExited {
        eprintln!("memleak: process {pid} ({}) exited", reporter.comm().unwrap_or_default());
    }
    announce_execs(args, &mut reporter, Some(pid));
    reporter.report()?;
    detach(args, ebpf, links, &mut signals).await;
    reporter.finish()
}

async fn trace_command(args: &Args, argv: &[String]) -> anyhow::Result<u8> {
    let mut signals = Signals::catch()?;
    let server = args.listen.map(Server::bind).transpose()?;
    let mut held = Held::spawn(argv)?;
    let pid = held.pid;
    let exited = watch(pid)?;
    // Before the command can stop: each stop comes as a SIGCHLD.
    let mut stops = signal(SignalKind::child())?;
    let traced = match held.hold_at_exit() {
        Ok(()) => true,
        Err(e) => {
            if args.verbose {
                eprintln!("memleak: cannot hold {} at its exit ({e}): a short command's frames may show no names", argv[0]);
            }
            false
        }
    };
    let exports = Exports::create(args)?;
    let dump = dump::create(args)?;
    let config = Config::from_args(args);
    // Its first allocation waits for its unwind tables: only while memleak
    // traces it (ptrace), which passes that stop on.
    let config = Config { watched_tgid: pid, unwind_hold: traced, ..config };
    let (mut ebpf, links) = loader::load(&config)?;
    let mut logger = trace_logger(args, &mut ebpf)?;
    let execs = Execs::follow(&mut ebpf, &links);
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
    let unwinder = unwinder(args, &mut ebpf, &links, &config)?.map(|mut unwinder| {
        let held = if traced { unwinder.hold(pid) } else { Ok(()) };
        held.map(|()| Arc::new(Mutex::new(unwinder)))
    });
    let unwinder = unwinder.transpose()?;
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
    // Its tables need its mappings, libc's only there once it runs: held
    // at its exit by ptrace, it is also stopped (the kernel's SIGSTOP) at
    // its first allocation, its tables go in as that stop is passed on
    // (`pass_stops`), and the signal is dropped.
    let memory = args.unwind_memory;
    if let Some(unwinder) = unwinder.clone().filter(|_| traced) {
        held.on_first_stop(Box::new(move || {
            let added = unwinder.lock().expect("unwinder poisoned").release(pid);
            if let Err(e) = added.and_then(|added| fits(memory, added)) {
                eprintln!("warning: {e:#}");
            }
        }));
    }
    command::wait_for_exec(&held);
    // Not traced: its tables once it runs (its first allocations are
    // walked by frame pointers).
    if let Some(unwinder) = unwinder.as_ref().filter(|_| !traced) {
        fits(memory, unwinder.lock().expect("unwinder poisoned").add_process(pid)?)?;
    }
    let scope = Scope::Process(pid, crate::target::proc::module_name(&argv[0]).to_string());
    let mut reporter = Reporter::new(args, recorded, scope, exports, dump, started);
    reporter.follow(execs);
    listen(server, &mut reporter, &config, &links);
    // The command's own exec, from memleak's fork: what the fork allocated
    // before it is gone, and is not told. One after it (the command
    // exec'd another program at once) is.
    if reporter.forget_execs().get(&pid).is_some_and(|exec| exec.count > 1) {
        eprintln!("memleak: PID {pid} exec'd {}", exec::program(pid));
    }
    say(args, &format!("Tracing {} (pid {pid}), Ctrl+C to quit.", argv.join(" ")))?;
    let mut replan = Replan::new(Target { pid, comm: target.comm.clone(), dir: None }, HashSet::from([attached.id]));
    let command = Some(Command { held: &mut held, stops: &mut stops });
    let end = report_loop(args, &mut reporter, &mut signals, &mut logger, Some(&exited), command, |reporter, wake| {
        replan.on(wake, reporter, &mut ebpf, &links, args);
        match &unwinder {
            Some(unwinder) => rescan(args, Some(&mut unwinder.lock().expect("unwinder poisoned")), pid),
            None => Ok(()),
        }
    })
    .await?;
    let code = if end == End::TargetExited {
        let code = held.reap();
        eprintln!("memleak: {} exited{}", target.comm, code.map(|c| format!(" with {c}")).unwrap_or_default());
        code
    } else {
        None
    };
    announce_execs(args, &mut reporter, Some(pid));
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
    let server = args.listen.map(Server::bind).transpose()?;
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
    let execs = if user { Execs::follow(&mut ebpf, &links) } else { None };
    // Every process's tables: far too many to wait for (libLLVM's alone
    // took 1.5 to 3.9 s), so built on a thread of their own while tracing,
    // and again each interval for new processes; until a process has its
    // tables, its stacks are walked by frame pointers.
    let mut stop_tables = None;
    if user && let Some(mut unwinder) = unwinder(args, &mut ebpf, &links, &config)? {
        unwinder.share();
        let (args, period) = (args.clone(), Duration::from_secs(args.interval));
        stop_tables = Some(unwinder.stopper());
        std::thread::spawn(move || {
            loop {
                rescan_all(&args, Some(&mut unwinder));
                std::thread::sleep(period);
            }
        });
    }
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
    reporter.follow(execs);
    let attached_count = listen(server, &mut reporter, &config, &links);
    say(args, &format!("Tracing {}, Ctrl+C to quit.", what.join(" and ")))?;
    let rescan = user && args.obj.is_none();
    let verbose_on = args.verbose;
    report_loop(args, &mut reporter, &mut signals, &mut logger, None, None, |reporter, _| {
        announce_execs(args, reporter, None);
        // Programs and containers started since: probe their allocators too.
        if rescan {
            let before = probes.objects.len();
            if probes.scan(&mut ebpf, &links)? > 0 && verbose_on {
                for attached in &probes.objects[before..] {
                    eprintln!("memleak: now also probing {}", attached.object);
                }
            }
            attached_count.store(links.probes(), Ordering::Relaxed);
        }
        Ok(())
    })
    .await?;
    // No table is wanted any more: the builders stop within milliseconds.
    if let Some(stop) = stop_tables {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    announce_execs(args, &mut reporter, None);
    reporter.report()?;
    drop(probes);
    detach(args, ebpf, links, &mut signals).await;
    reporter.finish()
}

/// Forgets what the processes that exec'd since the last call left (see
/// `Reporter::forget_execs`), and says so for the traced process (`pid`),
/// or system-wide (None) with -v only: a machine execs all the time.
/// Returns them.
fn announce_execs(args: &Args, reporter: &mut Reporter, pid: Option<u32>) -> HashMap<u32, exec::Exec> {
    let execs = reporter.forget_execs();
    for &tgid in execs.keys() {
        if pid.is_none_or(|pid| pid == tgid) && (pid.is_some() || args.verbose) {
            eprintln!("memleak: PID {tgid} exec'd {}", exec::program(tgid));
        }
    }
    execs
}

/// The probes of a traced process that exec'd, for its new program: the
/// allocator files it maps now that were not probed for it before (one it
/// shares with the old program keeps its probes: they are on the file,
/// for this process, across exec). Its libraries are mapped by the
/// dynamic loader after the exec: one not found yet is looked for again
/// at the next reports.
struct Replan {
    target: Target,
    /// (device, inode) of the files probed for it.
    probed: HashSet<(u64, u64)>,
    /// Reports left to find the new program's allocator; 0 when none is due.
    tries: u8,
}

impl Replan {
    const TRIES: u8 = 3;

    fn new(target: Target, probed: HashSet<(u64, u64)>) -> Self {
        Self { target, probed, tries: 0 }
    }

    /// Before each report, and as an exec is told: forgets what the old
    /// program left, says so, and probes the new one.
    fn on(&mut self, wake: Wake, reporter: &mut Reporter, ebpf: &mut Ebpf, links: &Links, args: &Args) {
        let pid = self.target.pid;
        if wake == Wake::Exec {
            exec::settle(pid);
        }
        if announce_execs(args, reporter, Some(pid)).contains_key(&pid) {
            self.tries = Self::TRIES;
        }
        if self.tries == 0 {
            return;
        }
        self.tries -= 1;
        let attached = attach::plan_target(&self.target, args.obj.as_deref(), args.floor).and_then(|mut plan| {
            let mut probed = self.probed.clone();
            plan.retain_new(&mut probed);
            let attached = if plan.is_empty() { vec![] } else { attach::attach(ebpf, links, plan)? };
            self.probed = probed;
            Ok(attached)
        });
        match attached {
            Ok(attached) => {
                self.tries = 0;
                attached.iter().for_each(|a| verbose(args, a));
            }
            Err(e) if self.tries == 0 && crate::error::exit_code(&e) != crate::error::Kind::NoProcess as u8 => {
                eprintln!("warning: PID {pid} exec'd, and its new program cannot be probed: {e:#}");
            }
            Err(_) => {}
        }
    }
}

/// `--listen`: serves each report from now on; returns the count of
/// probes the server reports, for the caller to keep up to date.
fn listen(server: Option<Server>, reporter: &mut Reporter, config: &Config, links: &Links) -> Arc<AtomicUsize> {
    let probes = Arc::new(AtomicUsize::new(links.probes()));
    if let Some(server) = server {
        let shared = serve::Shared::default();
        let capacity = serve::Capacity {
            blocks: config.max_allocs.into(),
            totals: config.totals_entries.into(),
            stacks: config.max_stacks.into(),
        };
        reporter.serve(shared.clone(), capacity, probes.clone());
        server.spawn(shared);
    }
    probes
}

/// The walk by unwind tables, its program chained; None with `--unwind fp`
/// (and `--floor`, whose programs walk nothing).
fn unwinder(args: &Args, ebpf: &mut Ebpf, links: &Links, config: &Config) -> anyhow::Result<Option<Unwinder>> {
    if config.unwind_rows == 0 || args.floor.is_some() {
        return Ok(None);
    }
    loader::chain_unwind(ebpf, links)?;
    let every_object = args.unwind == crate::cli::Unwind::Dwarf;
    Ok(Some(Unwinder::new(ebpf, config.unwind_rows, every_object, args.verbose)?))
}

/// The traced process's tables must all fit: its stacks would stop at
/// the first frame without one.
fn fits(unwind_memory: u32, added: Added) -> anyhow::Result<()> {
    if added.not_fitting.is_empty() {
        return Ok(());
    }
    let n = added.not_fitting.len();
    let mut left_out = added.not_fitting[..n.min(3)].join(", ");
    if n > 3 {
        left_out += &format!(" and {} more", n - 3);
    }
    Err(user_error(
        Kind::UnwindMemory,
        format!(
            "unwind tables do not fit --unwind-memory {unwind_memory} MiB (left out: {left_out}): raise it, or walk by frame pointers with --unwind fp"
        ),
    ))
}

/// At each report: tables for the libraries a process loaded since. Past
/// attach, one that does not fit is a warning, its frames walked by frame
/// pointers.
fn rescan(args: &Args, unwinder: Option<&mut Unwinder>, pid: u32) -> anyhow::Result<()> {
    let Some(unwinder) = unwinder else { return Ok(()) };
    if let Err(e) = unwinder.add_process(pid).and_then(|added| fits(args.unwind_memory, added)) {
        eprintln!("warning: {e:#}");
    }
    Ok(())
}

/// System-wide, at start and each report: tables for every process.
fn rescan_all(args: &Args, unwinder: Option<&mut Unwinder>) {
    let Some(unwinder) = unwinder else { return };
    if let Err(e) = unwinder.add_all().and_then(|added| fits(args.unwind_memory, added)) {
        eprintln!("warning: {e:#}");
    }
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

/// Why `report_loop` calls its `each_tick`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Wake {
    /// A report is due.
    Report,
    /// The kernel told of an exec.
    Exec,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Count,
    Signal,
    TargetExited,
}

/// The `-c` command, held at its exit (see `Held::hold_at_exit`), and the
/// SIGCHLDs that say it stopped.
struct Command<'a> {
    held: &'a mut Held,
    stops: &'a mut tokio::signal::unix::Signal,
}

impl Command<'_> {
    /// Lets the command go on from its stops, its mappings read again at
    /// its exit stop; true once it has exited.
    fn pass_stops(&mut self, reporter: &mut Reporter) -> bool {
        self.held.pass_stops(false, &mut || reporter.refresh_target()).is_some()
    }
}

async fn stopped(command: &mut Option<Command<'_>>) {
    match command {
        Some(c) => {
            c.stops.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// Reports every interval until COUNT reports, a signal, or the target's
/// exit; `each_tick` runs before each report (and as an exec is told, with
/// one traced process). The caller prints the last
/// report (on a signal or exit), then detaches.
const HOUSEKEEPING: Duration = Duration::from_secs(1);

async fn report_loop(
    args: &Args,
    reporter: &mut Reporter,
    signals: &mut Signals,
    logger: &mut Option<TraceLogger>,
    exited: Option<&AsyncFd<PidFd>>,
    mut command: Option<Command<'_>>,
    mut each_tick: impl FnMut(&mut Reporter, Wake) -> anyhow::Result<()>,
) -> anyhow::Result<End> {
    let period = Duration::from_secs(args.interval);
    let mut ticks = interval_at(Instant::now() + period, period);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // System-wide, what exited processes left is given back every second
    // (see `Reporter::housekeep`), not only at reports.
    let mut housekeeping = interval_at(Instant::now() + HOUSEKEEPING, HOUSEKEEPING);
    housekeeping.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let system = exited.is_none();
    let mut reports = 0;
    // A stop that came before the loop (a command done at once).
    if let Some(c) = &mut command
        && c.pass_stops(reporter)
    {
        return Ok(End::TargetExited);
    }
    loop {
        tokio::select! {
            tick = ticks.tick() => {
                each_tick(reporter, Wake::Report)?;
                reports += 1;
                if args.count.is_some_and(|c| reports >= c) {
                    return Ok(End::Count);
                }
                let read = reporter.report()?;
                if args.verbose {
                    // From the tick to the report's last line (`cargo xtask bench` reads it).
                    eprintln!("memleak: report {reports} took {:.6} s ({read} entries read)", tick.elapsed().as_secs_f64());
                    let (r, capacity) = reporter.reclaimed();
                    eprintln!(
                        "memleak: gave back {} totals entries and {} stacks; {} stacks in use of {capacity} ({:.1}%)",
                        r.entries,
                        r.stacks,
                        r.stacks_in_use,
                        r.stacks_in_use as f64 * 100.0 / f64::from(capacity.max(1))
                    );
                }
            }
            _ = signals.int.recv() => return Ok(End::Signal),
            _ = signals.term.recv() => return Ok(End::Signal),
            _ = target_exit(exited) => return Ok(End::TargetExited),
            () = stopped(&mut command) => {
                if let Some(c) = &mut command
                    && c.pass_stops(reporter)
                {
                    return Ok(End::TargetExited);
                }
            }
            _ = trace_events(logger) => {}
            _ = housekeeping.tick(), if system => reporter.housekeep(),
            // One traced process: its exec is handled at once, while it
            // runs (it may exit before the next report), and its new
            // program probed as soon as its allocator is mapped.
            () = reporter.exec_told(), if exited.is_some() => each_tick(reporter, Wake::Exec)?,
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
                // One write: a reader waiting for this line (a test, a
                // script) never sees half of it, as eprintln's three
                // writes let it.
                let _ = std::io::Write::write_all(
                    &mut std::io::stderr(),
                    format!("memleak: detaching {probes} probes...\n").as_bytes(),
                );
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
