//! The tool's one flow: open what is traced, load, attach, report every
//! interval, clean up. What differs by mode (-p, -c, system-wide) is the
//! attach step and what is done before each report (`Ticks`).

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
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
    cli::{Mode, Run, Settings},
    clock,
    error::{Kind, user_error},
    export::Exports,
    maps::collect::Recorded,
    output,
    probe::{
        attach::{self, Attached, SystemProbes, TargetPlan},
        exec::{self, Execs},
        kernel,
        loader::{self, Config},
        multi::Links,
    },
    report::{Reporter, Scope, dump},
    serve::{self, Server},
    target::{
        command::{self, Held},
        proc::{PidFd, Target},
    },
    unwind::{self, Added, Unwind, Unwinder},
    warn,
};

/// Traces as `settings` say; returns the exit code (the command's with -c).
///
/// One flow for every mode: open what is traced, create the output files,
/// load the programs, attach (the step that differs by mode), then report
/// every interval until the end, print the last report, detach, write the
/// files.
pub async fn run(settings: Settings) -> anyhow::Result<u8> {
    let Settings { mode, load, report, exports, dump, run } = settings;
    let mut signals = Signals::catch()?;
    let server = run.listen.map(Server::bind).transpose()?;
    let (opened, config) = open(mode, &load, &run)?;
    let exports = Exports::create(&exports)?;
    let dump = dump::create(dump.as_ref())?;
    let (mut loaded, planned) = self::load(&opened, config, &run)?;
    let attached = match opened {
        Opened::Process { target, exited } => attach_process(&run, &mut loaded, target, exited, planned)?,
        Opened::Command(spawned) => {
            match attach_command(&run, &mut loaded, spawned, &mut signals).await? {
                Ok(attached) => attached,
                Err(code) => {
                    detach(&run, loaded.ebpf, loaded.links, &mut signals).await;
                    return Ok(code);
                }
            }
        }
        Opened::System { user, kernel } => attach_system(&run, &mut loaded, user, kernel)?,
    };
    let Tracing { scope, banner, started, exited, mut command, mut ticks } = attached;
    let Loaded { mut ebpf, links, config, mut logger, execs } = loaded;
    let recorded = Recorded::take(&mut ebpf, config.table_buckets)?;
    let mut reporter = Reporter::new(&report, recorded, scope, exports, dump, started);
    reporter.follow(execs);
    let probes = Arc::new(AtomicUsize::new(links.probes()));
    listen(server, &mut reporter, &config, probes.clone());
    let pid = ticks.pid();
    if command.is_some()
        && let Some(pid) = pid
        && reporter.forget_execs().get(&pid).is_some_and(|exec| exec.count > 1)
    {
        // The command's own exec, from memleak's fork: what the fork
        // allocated before it is gone, and is not told. One after it (the
        // command exec'd another program at once) is.
        eprintln!("memleak: PID {pid} exec'd {}", exec::program(pid));
    }
    say(&run, &banner)?;
    let end = report_loop(&run, &mut reporter, &mut signals, &mut logger, exited.as_ref(), command.as_mut(), |reporter, wake| {
        ticks.on(wake, reporter, &mut ebpf, &links, &run, &probes)
    })
    .await?;
    let code = match (end, &mut command, pid) {
        (End::TargetExited, Some(c), _) => {
            let code = c.held.reap();
            eprintln!("memleak: {} exited{}", c.comm, code.map(|c| format!(" with {c}")).unwrap_or_default());
            code
        }
        (End::TargetExited, None, Some(pid)) => {
            eprintln!("memleak: process {pid} ({}) exited", reporter.comm().unwrap_or_default());
            None
        }
        _ => None,
    };
    ticks.stop();
    announce_execs(&run, &mut reporter, pid);
    reporter.report()?;
    if end != End::TargetExited
        && let Some(c) = &mut command
    {
        // After the last report: memleak ends, and its command with it.
        c.held.end(command::GRACE);
    }
    drop(ticks);
    detach(&run, ebpf, links, &mut signals).await;
    reporter.finish()?;
    Ok(code.map_or(0, |c| c as u8))
}

/// What is traced, opened before anything is loaded: a bad PID or command
/// fails first.
enum Opened {
    /// -p: the process, and its pidfd that says when it exits.
    Process { target: Target, exited: AsyncFd<PidFd> },
    /// -c: the command, forked and held before its exec.
    Command(Spawned),
    /// Every process (`user`), the kernel (`kernel`).
    System { user: bool, kernel: bool },
}

/// `-c`'s command, forked and held before its exec.
struct Spawned {
    held: Held,
    argv: Vec<String>,
    /// Says when it exited.
    exited: AsyncFd<PidFd>,
    /// The SIGCHLDs that say it stopped.
    stops: tokio::signal::unix::Signal,
    /// memleak holds it at its exit (ptrace).
    traced: bool,
}

/// Opens what `mode` traces, and sizes the kernel side for it.
fn open(mode: Mode, load: &loader::Asked, run: &Run) -> anyhow::Result<(Opened, Config)> {
    let mut config = Config::new(load);
    let opened = match mode {
        Mode::Pid(pid) => {
            let target = Target::open(pid)?;
            let exited = watch(pid)?;
            // The pidfd pins the process from here on; make sure it is the
            // one we looked at, not a newcomer that took the PID in between.
            target.check_same()?;
            Opened::Process { target, exited }
        }
        Mode::Command(argv) => {
            let mut held = Held::spawn(&argv)?;
            let pid = held.pid;
            let exited = watch(pid)?;
            // Before the command can stop: each stop comes as a SIGCHLD.
            let stops = signal(SignalKind::child())?;
            let traced = match held.hold_at_exit() {
                Ok(()) => true,
                Err(e) => {
                    if run.verbose {
                        eprintln!("memleak: cannot hold {} at its exit ({e}): a short command's frames may show no names", argv[0]);
                    }
                    false
                }
            };
            // Its first allocation waits for its unwind tables: only while
            // memleak traces it (ptrace), which passes that stop on.
            config.watched_tgid = pid;
            config.unwind_hold = traced;
            Opened::Command(Spawned { held, argv, exited, stops, traced })
        }
        Mode::System { user, kernel: kernel_too } => {
            if kernel_too {
                kernel::ensure_tracefs()?;
                config.field_offsets = kernel::field_offsets()?;
                config.skip_caller = kernel::bpf_refill_range();
            }
            Opened::System { user, kernel: kernel_too }
        }
    };
    Ok((opened, config))
}

/// The programs, loaded, and what reads from them as they run.
struct Loaded {
    ebpf: Ebpf,
    links: Links,
    config: Config,
    /// `-t`'s event log.
    logger: Option<TraceLogger>,
    /// The kernel's word on execs.
    execs: Option<Execs>,
}

/// -p: what is worked out while the programs load.
struct Planned {
    probes: TargetPlan,
    tables: unwind::Prebuilt,
}

/// Loads the programs. With -p, the probes and the unwind tables (libc's
/// takes 2 to 3 ms) are worked out while they load: all take time.
fn load(opened: &Opened, config: Config, run: &Run) -> anyhow::Result<(Loaded, Option<Planned>)> {
    let tables = config.unwind_rows > 0 && run.floor.is_none();
    let (loading, planned) = match opened {
        Opened::Process { target, .. } => std::thread::scope(|scope| {
            let loading = scope.spawn(|| loader::load(&config));
            let building = tables.then(|| scope.spawn(|| unwind::prebuild(target.pid, config.unwind_rows)));
            let probes = attach::plan_target(target, run.obj.as_deref(), run.floor);
            let tables = building.map(|b| b.join().expect("table builder panicked")).unwrap_or_default();
            (loading.join().expect("loader thread panicked"), Some(probes.map(|probes| Planned { probes, tables })))
        }),
        _ => (loader::load(&config), None),
    };
    let (mut ebpf, links) = loading?;
    let planned = planned.transpose()?;
    let logger = trace_logger(run, &mut ebpf)?;
    let execs = match opened {
        Opened::System { user: false, .. } => None,
        _ => Execs::follow(&mut ebpf, &links),
    };
    Ok((Loaded { ebpf, links, config, logger, execs }, planned))
}

/// What the attach step leaves for the rest of the flow.
struct Tracing {
    scope: Scope,
    /// The line that says tracing started.
    banner: String,
    /// CLOCK_MONOTONIC and wall clock as the probes went in: nothing is
    /// outstanding before.
    started: (u64, SystemTime),
    /// -p, -c: says when the process exited.
    exited: Option<AsyncFd<PidFd>>,
    /// -c.
    command: Option<Command>,
    ticks: Ticks,
}

/// -p: tables, then probes on the allocator the process maps.
fn attach_process(
    run: &Run,
    loaded: &mut Loaded,
    target: Target,
    exited: AsyncFd<PidFd>,
    planned: Option<Planned>,
) -> anyhow::Result<Tracing> {
    let pid = target.pid;
    let Loaded { ebpf, links, config, .. } = loaded;
    let Planned { probes, tables: prebuilt } = planned.expect("planned while loading");
    // Tables before probes: no stack recorded in between stops short
    // (`attach` chains the walk by tables before the return probes).
    let tables = unwinder(run, ebpf, links, config, false)?;
    if let Some(unwinder) = &tables {
        fits(run.unwind_memory, unwinder.lock().expect("unwinder poisoned").add_process_with(pid, prebuilt)?)?;
    }
    let started = clock::now();
    let mut probed = HashSet::new();
    for attached in attach::attach(ebpf, links, probes, tables.is_some())? {
        verbose(run, &attached);
        probed.insert(attached.id);
    }
    Ok(Tracing {
        scope: Scope::Process(pid, target.comm.clone()),
        banner: format!("Attaching to pid {pid} ({}), Ctrl+C to quit.", target.comm),
        started,
        exited: Some(exited),
        command: None,
        ticks: Ticks::Process { pid, replan: Replan::new(target, probed), tables },
    })
}

/// -c: probes on the libc the command will map (memleak's own, or -O's),
/// for its PID, then the command is let go; Err(exit code) if a signal
/// came first (the command is killed and reaped, never started).
async fn attach_command(
    run: &Run,
    loaded: &mut Loaded,
    spawned: Spawned,
    signals: &mut Signals,
) -> anyhow::Result<Result<Tracing, u8>> {
    let Spawned { mut held, argv, exited, stops, traced } = spawned;
    let pid = held.pid;
    let Loaded { ebpf, links, config, .. } = loaded;
    // The kernel puts the breakpoints into the new program's mappings
    // when it execs.
    let obj = match &run.obj {
        Some(obj) => obj.clone(),
        None => own_libc()?,
    };
    let attached = attach::attach_file(ebpf, links, &obj, NonZeroU32::new(pid).expect("child pid"))?;
    verbose(run, &attached);
    let tables = unwinder(run, ebpf, links, config, true)?;
    if traced && let Some(unwinder) = &tables {
        unwinder.lock().expect("unwinder poisoned").hold(pid)?;
    }
    if let Some(signal) = signals.caught().await {
        eprintln!("memleak: interrupted before {} started", argv[0]);
        drop(held);
        return Ok(Err(128 + signal as u8));
    }
    let started = clock::now();
    held.release()?;
    // Its tables need its mappings, libc's only there once it runs: held
    // at its exit by ptrace, it is also stopped (the kernel's SIGSTOP) at
    // its first allocation, and at the first after each exec, its tables
    // go in as that stop is passed on (`pass_stops`), and the signal is
    // dropped. A SIGSTOP while it is not held is the command's own.
    let memory = run.unwind_memory;
    if let Some(unwinder) = tables.clone().filter(|_| traced) {
        held.on_own_stop(Box::new(move || {
            let mut unwinder = unwinder.lock().expect("unwinder poisoned");
            if !unwinder.holding(pid) {
                return false;
            }
            if let Err(e) = unwinder.release(pid).and_then(|added| fits(memory, added)) {
                warn!("{e:#}");
            }
            true
        }));
    }
    command::wait_for_exec(&held);
    // Not traced: its tables once it runs (its first allocations are
    // walked by frame pointers). Those that do not fit are a warning, as
    // when traced: the command runs already.
    if let Some(unwinder) = tables.as_ref().filter(|_| !traced) {
        rescan(memory, &mut unwinder.lock().expect("unwinder poisoned"), pid);
    }
    let comm = argv[0].clone();
    let target = Target { pid, comm: comm.clone(), dir: None };
    Ok(Ok(Tracing {
        scope: Scope::Process(pid, crate::target::proc::module_name(&argv[0]).to_string()),
        banner: format!("Tracing {} (pid {pid}), Ctrl+C to quit.", argv.join(" ")),
        started,
        exited: Some(exited),
        command: Some(Command { held, stops, comm }),
        ticks: Ticks::Process { pid, replan: Replan::new(target, HashSet::from([attached.id])), tables },
    }))
}

/// System-wide: probes on every allocator file any process maps (or -O's),
/// and the kernel's tracepoints.
fn attach_system(run: &Run, loaded: &mut Loaded, user: bool, kernel_too: bool) -> anyhow::Result<Tracing> {
    let Loaded { ebpf, links, config, .. } = loaded;
    // Every process's tables: far too many to wait for (libLLVM's alone
    // took 1.5 to 3.9 s), so built on a thread of their own while tracing,
    // and again each interval for new processes; until a process has its
    // tables, its stacks are walked by frame pointers.
    let mut stop_tables = None;
    if user && let Some(unwinder) = unwinder(run, ebpf, links, config, true)? {
        let mut unwinder = Arc::into_inner(unwinder).expect("one owner").into_inner().expect("unwinder poisoned");
        unwinder.share();
        let (memory, period) = (run.unwind_memory, run.interval);
        stop_tables = Some(unwinder.stopper());
        std::thread::spawn(move || {
            loop {
                rescan_all(memory, &mut unwinder);
                std::thread::sleep(period);
            }
        });
    }
    let started = clock::now();
    let mut probes = SystemProbes::default();
    probes.floor = run.floor;
    let mut what = vec![];
    if user {
        match &run.obj {
            Some(obj) => probes.object(ebpf, links, obj)?,
            None => {
                probes.scan(ebpf, links)?;
            }
        }
        for attached in &probes.objects {
            verbose(run, attached);
        }
        what.push(format!("all processes ({} allocator files)", probes.objects.len()));
    }
    if kernel_too {
        let events = kernel::attach(ebpf, links, run.percpu)?;
        if run.verbose {
            eprintln!("memleak: kernel tracepoints: {}", events.join(", "));
        }
        what.push("kernel allocators".to_string());
    }
    Ok(Tracing {
        scope: Scope::System { top_procs: run.top_procs },
        banner: format!("Tracing {}, Ctrl+C to quit.", what.join(" and ")),
        started,
        exited: None,
        command: None,
        // The bench's floor is the probes alone: no rescans.
        ticks: Ticks::System { probes, rescan: user && run.obj.is_none() && run.floor.is_none(), stop_tables },
    })
}

/// What is done before each report (and as an exec is told), by mode.
enum Ticks {
    /// -p, -c: the probes of a program it exec'd, and tables for the
    /// libraries it loaded since (or a new program after an exec).
    Process { pid: u32, replan: Replan, tables: Option<Arc<Mutex<Unwinder>>> },
    /// System-wide: probes for the programs and containers started since;
    /// tables are built on their own thread until `stop_tables`.
    System { probes: SystemProbes, rescan: bool, stop_tables: Option<Arc<AtomicBool>> },
}

impl Ticks {
    /// The traced process, if one.
    fn pid(&self) -> Option<u32> {
        match self {
            Self::Process { pid, .. } => Some(*pid),
            Self::System { .. } => None,
        }
    }

    fn on(&mut self, wake: Wake, reporter: &mut Reporter, ebpf: &mut Ebpf, links: &Links, run: &Run, count: &AtomicUsize) -> anyhow::Result<()> {
        match self {
            Self::Process { pid, replan, tables } => {
                if wake == Wake::Exec {
                    exec::settle(*pid);
                }
                // Tables before probes, as at attach: probes put into a
                // program it exec'd (a static one, with its own malloc)
                // recorded its first stacks before its tables were in,
                // cut short (one test run in eight split a leak in two).
                if let Some(unwinder) = tables {
                    rescan(run.unwind_memory, &mut unwinder.lock().expect("unwinder poisoned"), *pid);
                }
                replan.on(reporter, ebpf, links, run);
            }
            Self::System { probes, rescan, .. } => {
                announce_execs(run, reporter, None);
                if *rescan {
                    let before = probes.objects.len();
                    if probes.scan(ebpf, links)? > 0 && run.verbose {
                        for attached in &probes.objects[before..] {
                            eprintln!("memleak: now also probing {}", attached.object);
                        }
                    }
                    count.store(links.probes(), Ordering::Relaxed);
                }
            }
        }
        Ok(())
    }

    /// No table is wanted any more: the builders stop within milliseconds.
    fn stop(&self) {
        if let Self::System { stop_tables: Some(stop), .. } = self {
            stop.store(true, Ordering::Relaxed);
        }
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

/// Forgets what the processes that exec'd since the last call left (see
/// `Reporter::forget_execs`), and says so for the traced process (`pid`),
/// or system-wide (None) with -v only: a machine execs all the time.
/// Returns them.
fn announce_execs(run: &Run, reporter: &mut Reporter, pid: Option<u32>) -> HashMap<u32, exec::Exec> {
    let execs = reporter.forget_execs();
    for &tgid in execs.keys() {
        if pid.is_none_or(|pid| pid == tgid) && (pid.is_some() || run.verbose) {
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
    fn on(&mut self, reporter: &mut Reporter, ebpf: &mut Ebpf, links: &Links, run: &Run) {
        let pid = self.target.pid;
        if announce_execs(run, reporter, Some(pid)).contains_key(&pid) {
            self.tries = Self::TRIES;
        }
        if self.tries == 0 {
            return;
        }
        self.tries -= 1;
        let attached = attach::plan_target(&self.target, run.obj.as_deref(), run.floor).and_then(|mut plan| {
            let mut probed = self.probed.clone();
            plan.retain_new(&mut probed);
            let attached = if plan.is_empty() { vec![] } else { attach::attach(ebpf, links, plan, false)? };
            self.probed = probed;
            Ok(attached)
        });
        match attached {
            Ok(attached) => {
                self.tries = 0;
                attached.iter().for_each(|a| verbose(run, a));
            }
            Err(e) if self.tries == 0 && crate::error::exit_code(&e) != crate::error::Kind::NoProcess as u8 => {
                warn!("PID {pid} exec'd, and its new program cannot be probed: {e:#}");
            }
            Err(_) => {}
        }
    }
}

/// `--listen`: serves each report from now on, with the count of probes
/// (kept up to date by the caller).
fn listen(server: Option<Server>, reporter: &mut Reporter, config: &Config, probes: Arc<AtomicUsize>) {
    if let Some(server) = server {
        let shared = serve::Shared::default();
        let capacity = serve::Capacity {
            blocks: config.max_allocs.into(),
            totals: config.totals_entries.into(),
            stacks: config.max_stacks.into(),
        };
        reporter.serve(shared.clone(), capacity, probes);
        server.spawn(shared);
    }
}

/// The walk by unwind tables, its program chained unless `attach` is to
/// (`chain` false); None with `--unwind fp` (and `--floor`, whose programs
/// walk nothing).
fn unwinder(
    run: &Run,
    ebpf: &mut Ebpf,
    links: &Links,
    config: &Config,
    chain: bool,
) -> anyhow::Result<Option<Arc<Mutex<Unwinder>>>> {
    if config.unwind_rows == 0 || run.floor.is_some() {
        return Ok(None);
    }
    if chain {
        loader::chain_unwind(ebpf, links)?;
    }
    let every_object = run.unwind == Unwind::Dwarf;
    Ok(Some(Arc::new(Mutex::new(Unwinder::new(ebpf, config.unwind_rows, every_object, run.verbose)?))))
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
fn rescan(unwind_memory: u32, unwinder: &mut Unwinder, pid: u32) {
    if let Err(e) = unwinder.add_process(pid).and_then(|added| fits(unwind_memory, added)) {
        warn!("{e:#}");
    }
}

/// System-wide, at start and each report: tables for every process.
fn rescan_all(unwind_memory: u32, unwinder: &mut Unwinder) {
    if let Err(e) = unwinder.add_all().and_then(|added| fits(unwind_memory, added)) {
        warn!("{e:#}");
    }
}

/// A status line: on stdout, or on stderr when stdout holds JSON only.
fn say(run: &Run, line: &str) -> anyhow::Result<()> {
    if run.json {
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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    Count,
    Signal,
    TargetExited,
}

/// The `-c` command, held at its exit (see `Held::hold_at_exit`), and the
/// SIGCHLDs that say it stopped.
struct Command {
    held: Held,
    stops: tokio::signal::unix::Signal,
    /// How the user named it.
    comm: String,
}

impl Command {
    /// Lets the command go on from its stops, its mappings read again at
    /// its exit stop; true once it has exited.
    fn pass_stops(&mut self, reporter: &mut Reporter) -> bool {
        self.held.pass_stops(false, &mut || reporter.refresh_target()).is_some()
    }
}

async fn stopped(command: &mut Option<&mut Command>) {
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
    run: &Run,
    reporter: &mut Reporter,
    signals: &mut Signals,
    logger: &mut Option<TraceLogger>,
    exited: Option<&AsyncFd<PidFd>>,
    mut command: Option<&mut Command>,
    mut each_tick: impl FnMut(&mut Reporter, Wake) -> anyhow::Result<()>,
) -> anyhow::Result<End> {
    let period = run.interval;
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
                if run.count.is_some_and(|c| reports >= c) {
                    return Ok(End::Count);
                }
                let read = reporter.report()?;
                if run.verbose {
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
async fn detach(run: &Run, ebpf: Ebpf, links: Links, signals: &mut Signals) {
    if run.verbose {
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
    let maps = crate::target::proc::own_maps()?;
    crate::target::proc::parse_maps(&maps)
        .into_iter()
        .find(|m| m.is_file() && attach::is_libc(m.module_name()))
        .map(|m| PathBuf::from(m.path))
        .context("memleak itself maps no libc: pass the command's allocator with -O")
}

fn verbose(run: &Run, attached: &Attached) {
    let names: Vec<&str> = attached.functions.iter().map(|(f, ..)| *f).collect();
    if !run.verbose {
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
fn trace_logger(run: &Run, ebpf: &mut Ebpf) -> anyhow::Result<Option<TraceLogger>> {
    if !run.trace {
        return Ok(None);
    }
    // With --format json, stdout holds the JSON only.
    let printer = TracePrinter { to_stderr: run.json };
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
