//! `cargo xtask bench`: what memleak costs the traced program, and what
//! its reports cost, as ratios against baselines measured in the same run.
//!
//! - Churn (tests/fixtures/churn.c): T threads of M malloc+free pairs, run
//!   untraced, under empty programs at function entries (the naive floor,
//!   what any uprobe tracer pays before doing work), under empty programs
//!   where memleak puts its probes (the optimized floor), and under memleak
//!   by default, with `-s 10` and with `--combined-only`. Variants are
//!   interleaved round by round and each one's median is taken. The cost
//!   is the fixture's CPU time (a uprobe's programs run in the traced
//!   thread and are charged to it), which other load on the machine
//!   disturbs far less than its run time.
//! - Hold (tests/fixtures/hold.c): 1,000,000 live blocks from 10,000
//!   stacks: time from the tick to a report's last line (memleak -v says
//!   it), and the tracer's peak RSS, by default, with --combined-only and
//!   with --listen (which renders each report for its server too); and, on
//!   the idle fixture, the time from starting memleak to "Attaching",
//!   several times.
//!
//! Prints a Markdown report (also written to target/xtask/bench.md) and
//! fails if a target of the performance issue is missed.

use std::{
    fmt::Write as _,
    io::{BufRead, BufReader, Read, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdout, Command, Stdio},
    sync::mpsc::{self, Receiver},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::fixtures::{self, Compiler, Running};

#[derive(clap::Args)]
pub struct Options {
    /// Rounds of every churn variant (the median is taken).
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Churn threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// malloc+free pairs per churn thread.
    #[arg(long, default_value_t = 200_000)]
    pairs: u64,
    /// Reports timed per mode at a million outstanding allocations.
    #[arg(long, default_value_t = 5)]
    reports: usize,
    /// Run only this part. The system-wide build runs only when asked
    /// for (`--part build`, about 12 minutes on 2 busy CPUs).
    #[arg(long, value_enum)]
    part: Option<Part>,
    /// Rounds of the system-wide build, each variant once a round.
    #[arg(long, default_value_t = 3)]
    build_rounds: usize,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    Churn,
    Reports,
    /// Only what unwinding by tables costs: the deep churn without frame
    /// pointers, the frame-pointer churn by default and with `--unwind
    /// fp`, attach with and without tables.
    Unwind,
    /// Only the system-wide cost on a real C build (see `build_bench`).
    Build,
}

/// How the churn fixture runs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Untraced,
    NaiveFloor,
    PlacedFloor,
    Default,
    Sampled,
    CombinedOnly,
}

const VARIANTS: [Variant; 6] = [
    Variant::Untraced,
    Variant::NaiveFloor,
    Variant::PlacedFloor,
    Variant::Default,
    Variant::Sampled,
    Variant::CombinedOnly,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Untraced => "untraced",
            Variant::NaiveFloor => "naive floor (empty programs at entries)",
            Variant::PlacedFloor => "optimized floor (empty programs at memleak's offsets)",
            Variant::Default => "memleak",
            Variant::Sampled => "memleak -s 10",
            Variant::CombinedOnly => "memleak --combined-only",
        }
    }

    /// memleak's options, None when untraced.
    fn args(self) -> Option<&'static [&'static str]> {
        match self {
            Variant::Untraced => None,
            Variant::NaiveFloor => Some(&["--floor", "naive"]),
            Variant::PlacedFloor => Some(&["--floor", "placed"]),
            Variant::Default => Some(&[]),
            Variant::Sampled => Some(&["-s", "10"]),
            Variant::CombinedOnly => Some(&["--combined-only"]),
        }
    }
}

pub fn run(memleak: &Path, opts: &Options) -> anyhow::Result<()> {
    let churn = fixtures::build("churn", Compiler::C, "churn.c", &[])?;
    let hold = fixtures::build("hold", Compiler::C, "hold.c", &[])?;
    let mut out = header()?;
    let mut missed = 0;
    if matches!(opts.part, None | Some(Part::Churn)) {
        missed += churn_bench(memleak, &churn, opts, &mut out)?;
    }
    if matches!(opts.part, None | Some(Part::Reports)) {
        missed += report_bench(memleak, &hold, opts, &mut out)?;
    }
    if matches!(opts.part, None | Some(Part::Unwind)) {
        let deep = fixtures::build("churn-deep", Compiler::C, "churn.c", &["-O2", "-fomit-frame-pointer", "-DDEPTH=8"])?;
        missed += unwind_bench(memleak, &deep, &churn, &hold, opts, &mut out)?;
    }
    if opts.part == Some(Part::Build) {
        missed += crate::build_bench::run(memleak, opts.build_rounds, &mut out)?;
    }
    print!("{out}");
    let file = crate::workspace_root().join("target/xtask/bench.md");
    std::fs::write(&file, &out).with_context(|| format!("writing {}", file.display()))?;
    eprintln!("bench: written to {}", file.display());
    if missed > 0 {
        bail!("{missed} target(s) missed");
    }
    Ok(())
}

fn header() -> anyhow::Result<String> {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")?
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim().to_string();
    let date = String::from_utf8(Command::new("date").arg("-u").arg("+%Y-%m-%d %H:%M UTC").output()?.stdout)?;
    let cores = thread::available_parallelism().map_or(0, |n| n.get());
    Ok(format!("Machine: {cpu}, {cores} CPUs; kernel {kernel}; {}; load average {}\n", date.trim(), load_average()))
}

/// A target checked against a measured value: prints the line, returns
/// 1 if missed.
pub(crate) fn check(out: &mut String, what: &str, value: f64, limit: f64, unit: &str) -> usize {
    let ok = value <= limit;
    let _ = writeln!(out, "| {what} | {value:.3}{unit} | ≤ {limit}{unit} | {} |", if ok { "met" } else { "**missed**" });
    usize::from(!ok)
}

fn churn_bench(memleak: &Path, churn: &Path, opts: &Options, out: &mut String) -> anyhow::Result<usize> {
    let mut runs: Vec<Vec<Run>> = vec![Vec::new(); VARIANTS.len()];
    for round in 0..opts.rounds {
        // Rotate the order so that no variant always runs first.
        for k in 0..VARIANTS.len() {
            let i = (k + round) % VARIANTS.len();
            let run = churn_once(memleak, churn, VARIANTS[i], opts)
                .with_context(|| format!("churn under {}", VARIANTS[i].name()))?;
            runs[i].push(run);
        }
        eprintln!("bench: churn round {}/{} done", round + 1, opts.rounds);
    }
    let pairs = (opts.threads as u64 * opts.pairs) as f64;
    let wall_ms: Vec<f64> = runs.iter().map(|r| median(&r.iter().map(|x| x.wall_ns / 1e6).collect::<Vec<_>>())).collect();
    let cpu_ns: Vec<f64> = runs.iter().map(|r| median(&r.iter().map(|x| x.cpu_ns / pairs).collect::<Vec<_>>())).collect();
    let overhead = |v: Variant| {
        let i = VARIANTS.iter().position(|x| *x == v).expect("variant");
        cpu_ns[i] - cpu_ns[0]
    };
    let _ = writeln!(
        out,
        "\n## Churn: {} threads × {} malloc+free pairs (16..4096 bytes, 1% kept), median of {} interleaved rounds\n",
        opts.threads, opts.pairs, opts.rounds
    );
    let _ = writeln!(out, "Per pair: the fixture's CPU time (user + system) over all its threads, divided by the pairs made.\n");
    let _ = writeln!(out, "| variant | run time (ms) | CPU per pair (ns) | overhead per pair (ns) | vs naive floor | vs optimized floor |");
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: |");
    let (naive, placed) = (overhead(Variant::NaiveFloor), overhead(Variant::PlacedFloor));
    for (i, v) in VARIANTS.iter().enumerate() {
        let o = overhead(*v);
        let ratio = |base: f64| if *v == Variant::Untraced { "".to_string() } else { format!("{:.2}x", o / base) };
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.0} | {:.0} | {} | {} |",
            v.name(),
            wall_ms[i],
            cpu_ns[i],
            o,
            ratio(naive),
            ratio(placed)
        );
    }
    let _ = writeln!(out, "\n| target | measured | limit | |\n| --- | ---: | ---: | --- |");
    let mut missed = check(out, "memleak / naive floor", overhead(Variant::Default) / naive, 0.67, "x");
    missed += check(out, "memleak / optimized floor", overhead(Variant::Default) / placed, 1.25, "x");
    missed += check(out, "--combined-only / optimized floor", overhead(Variant::CombinedOnly) / placed, 1.15, "x");
    program_time(memleak, churn, opts, out)?;
    Ok(missed)
}

/// What unwinding by tables costs. `deep`: the churn built without frame
/// pointers, its pairs 8 calls deep: the walk by unwind tables (memleak's
/// default there) against the frame-pointer walk (`--unwind fp`, which
/// stops after the first frame) and the optimized floor. `churn`: the
/// frame-pointer churn, whose stacks must cost what they cost with the
/// frame-pointer walk alone (only libc's start_thread and clone3 need
/// tables there). Both in interleaved rounds, then the BPF programs' own
/// time as the kernel counts it (far less disturbed by other load), then
/// attach with and without tables.
fn unwind_bench(memleak: &Path, deep: &Path, churn: &Path, hold: &Path, opts: &Options, out: &mut String) -> anyhow::Result<usize> {
    type Variants<'a> = [(&'a str, Option<&'a [&'a str]>)];
    const DEEP: [(&str, Option<&[&str]>); 4] = [
        ("untraced", None),
        ("optimized floor", Some(&["--floor", "placed"])),
        ("memleak (unwind tables)", Some(&[])),
        ("memleak --unwind fp", Some(&["--unwind", "fp"])),
    ];
    const FP: [(&str, Option<&[&str]>); 4] = [
        ("untraced", None),
        ("optimized floor", Some(&["--floor", "placed"])),
        ("memleak (default: tables where needed)", Some(&[])),
        ("memleak --unwind fp", Some(&["--unwind", "fp"])),
    ];
    let pairs = (opts.threads as u64 * opts.pairs) as f64;
    let interleaved = |program: &Path, variants: &Variants, more: &[&str], rounds: usize| -> anyhow::Result<Vec<f64>> {
        let mut per_pair: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
        for round in 0..rounds {
            for k in 0..variants.len() {
                let i = (k + round) % variants.len();
                let (run, lines) = churn_traced(memleak, program, variants[i].1, more, opts)
                    .with_context(|| format!("churn under {}", variants[i].0))?;
                per_pair[i].push(if more.is_empty() {
                    run.cpu_ns / pairs
                } else {
                    lines.iter().filter_map(|l| parse_program_cost(l)).map(|(_, ns)| ns).sum::<u64>() as f64 / pairs
                });
            }
            eprintln!("bench: unwind round {}/{rounds} done", round + 1);
        }
        Ok(per_pair.iter().map(|v| median(v)).collect())
    };
    let table = |out: &mut String, title: &str, variants: &Variants, cpu: &[f64], programs: &[f64]| {
        let _ = writeln!(out, "\n### {title}\n");
        let _ = writeln!(
            out,
            "| variant | CPU per pair (ns) | overhead per pair (ns) | vs optimized floor | BPF programs per pair (ns) |"
        );
        let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: |");
        for (i, (name, _)) in variants.iter().enumerate() {
            let (ratio, bpf) = if i == 0 {
                (String::new(), String::new())
            } else {
                (format!("{:.2}x", (cpu[i] - cpu[0]) / (cpu[1] - cpu[0])), format!("{:.0}", programs[i - 1]))
            };
            let _ = writeln!(out, "| {name} | {:.0} | {:.0} | {ratio} | {bpf} |", cpu[i], cpu[i] - cpu[0]);
        }
    };
    let deep_cpu = interleaved(deep, &DEEP, &[], opts.rounds)?;
    let fp_cpu = interleaved(churn, &FP, &[], opts.rounds)?;
    let (deep_bpf, fp_bpf) = {
        let _stats = BpfStats::enable()?;
        let rounds = opts.rounds.min(3);
        (interleaved(deep, &DEEP[1..], &["-v"], rounds)?, interleaved(churn, &FP[1..], &["-v"], rounds)?)
    };
    let _ = writeln!(out, "\n## Unwinding by tables, median of {} interleaved rounds ({} threads × {} pairs)", opts.rounds, opts.threads, opts.pairs);
    let _ = writeln!(
        out,
        "\nCPU per pair: the fixture's CPU time over the pairs made. BPF programs per pair: their run time as the kernel counts it (`kernel.bpf_stats_enabled`, {} rounds of their own).",
        opts.rounds.min(3)
    );
    table(out, "Churn without frame pointers, pairs 8 calls deep (`-O2 -fomit-frame-pointer -DDEPTH=8`)", &DEEP, &deep_cpu, &deep_bpf);
    table(out, "Churn with frame pointers (the churn above)", &FP, &fp_cpu, &fp_bpf);

    let (attach, _) = attach_times(memleak, hold, &[], ATTACHES)?;
    let (attach_fp, _) = attach_times(memleak, hold, &["--unwind", "fp"], ATTACHES)?;
    let _ = writeln!(
        out,
        "\nAttach to the idle hold fixture (to \"Attaching\"), {ATTACHES} runs each: median {:.1} ms with tables (the program's and libc's), {:.1} ms with `--unwind fp` (none). What `-v` says of the tables:\n",
        median(&attach) * 1e3,
        median(&attach_fp) * 1e3
    );
    for line in table_lines(memleak, hold)? {
        let _ = writeln!(out, "- `{line}`");
    }
    let _ = writeln!(out, "\n| target | measured | limit | |\n| --- | ---: | ---: | --- |");
    let over = |cpu: &[f64], i: usize| (cpu[i] - cpu[0]) / (cpu[1] - cpu[0]);
    let mut missed = check(out, "unwind tables / optimized floor, 8 deep", over(&deep_cpu, 2), 1.5, "x");
    missed += check(out, "frame-pointer churn: default / --unwind fp", (fp_cpu[2] - fp_cpu[0]) / (fp_cpu[3] - fp_cpu[0]), 1.15, "x");
    missed += check(out, "attach with tables", median(&attach) * 1e3, 100.0, " ms");
    Ok(missed)
}

/// Variants whose BPF programs' own run time is measured.
const TIMED: [Variant; 4] = [Variant::PlacedFloor, Variant::Default, Variant::Sampled, Variant::CombinedOnly];

/// Where the time goes inside the kernel: the BPF programs' own run time
/// per pair, as the kernel counts it with `kernel.bpf_stats_enabled` (memleak
/// -v prints it). Far less noisy than CPU time, but the counting adds two
/// clock reads to every program run, so it is a pass of its own.
fn program_time(memleak: &Path, churn: &Path, opts: &Options, out: &mut String) -> anyhow::Result<()> {
    let _stats = BpfStats::enable()?;
    let rounds = opts.rounds.min(3);
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); TIMED.len()];
    for round in 0..rounds {
        for k in 0..TIMED.len() {
            let i = (k + round) % TIMED.len();
            let (_, lines) = churn_traced(memleak, churn, TIMED[i].args(), &["-v"], opts)
                .with_context(|| format!("timing the programs of {}", TIMED[i].name()))?;
            let total: u64 = lines.iter().filter_map(|l| parse_program_cost(l)).map(|(_, ns)| ns).sum();
            ns[i].push(total as f64 / (opts.threads as u64 * opts.pairs) as f64);
        }
    }
    let floor = median(&ns[0]);
    let _ = writeln!(
        out,
        "\nThe BPF programs' own run time per pair, as the kernel counts it (`kernel.bpf_stats_enabled`, in {rounds} rounds of their own: the counting adds two clock reads to every run):\n"
    );
    let _ = writeln!(out, "| variant | programs per pair (ns) | over the optimized floor's (ns) |\n| --- | ---: | ---: |");
    for (v, ns) in TIMED.iter().zip(&ns) {
        let _ = writeln!(out, "| {} | {:.0} | {:.0} |", v.name(), median(ns), median(ns) - floor);
    }
    Ok(())
}

/// `kernel.bpf_stats_enabled` on while it lives, then back as it was.
struct BpfStats(String);

impl BpfStats {
    const PATH: &str = "/proc/sys/kernel/bpf_stats_enabled";

    fn enable() -> anyhow::Result<Self> {
        let was = std::fs::read_to_string(Self::PATH).with_context(|| format!("reading {}", Self::PATH))?;
        std::fs::write(Self::PATH, "1").with_context(|| format!("writing {}", Self::PATH))?;
        Ok(Self(was))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

/// `memleak: program alloc_exit ran 400003 times, 144001080 ns in all (360 ns each)`
/// -> (runs, ns in all).
fn parse_program_cost(line: &str) -> Option<(u64, u64)> {
    let rest = line.strip_prefix("memleak: program ")?;
    let (_, rest) = rest.split_once(" ran ")?;
    let (runs, rest) = rest.split_once(" times, ")?;
    let (ns, _) = rest.split_once(" ns in all")?;
    Some((runs.parse().ok()?, ns.parse().ok()?))
}

/// What one churn run took: run time, and CPU time over all threads.
#[derive(Clone, Copy)]
struct Run {
    wall_ns: f64,
    cpu_ns: f64,
}

/// One run of the churn fixture.
fn churn_once(memleak: &Path, churn: &Path, variant: Variant, opts: &Options) -> anyhow::Result<Run> {
    churn_traced(memleak, churn, variant.args(), &[], opts).map(|(run, _)| run)
}

/// One run of the churn fixture, traced by memleak with `args` and `more`
/// options (untraced: None); what memleak wrote to stderr after attaching.
fn churn_traced(
    memleak: &Path,
    churn: &Path,
    args: Option<&[&str]>,
    more: &[&str],
    opts: &Options,
) -> anyhow::Result<(Run, Vec<String>)> {
    let mut app = Running::spawn(&churn.to_path_buf(), &[&opts.threads.to_string(), &opts.pairs.to_string()], true)?;
    wait_until_reading(app.pid())?;
    let tracer = match args {
        Some(args) => Some(Tracer::attach(memleak, app.pid(), &[args, more].concat(), &["3600"])?),
        None => None,
    };
    app.0.stdin.take().context("churn stdin")?.write_all(b"go\n")?;
    let mut line = String::new();
    BufReader::new(app.0.stdout.take().context("churn stdout")?).read_line(&mut line)?;
    let numbers: Vec<f64> = line.split_whitespace().filter_map(|w| w.parse().ok()).collect();
    let [wall_ns, cpu_ns] = numbers[..] else { bail!("churn printed {line:?}") };
    let stderr = match tracer {
        // The target exits: memleak prints its last report and detaches.
        Some(tracer) => tracer.finish(Duration::from_secs(60))?,
        None => Vec::new(),
    };
    Ok((Run { wall_ns, cpu_ns }, stderr))
}

fn report_bench(memleak: &Path, hold: &Path, opts: &Options, out: &mut String) -> anyhow::Result<usize> {
    let _ = writeln!(out, "\n## Reports at 1,000,000 outstanding allocations from 10,000 stacks\n");
    let _ = writeln!(
        out,
        "| mode | report, median (ms) | slowest (ms) | per allocation (µs) | tracer peak RSS (MiB) | after: anonymous + file (MiB) | idle: RSS, peak (MiB) |"
    );
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: | ---: | ---: |");
    let mut results = Vec::new();
    // --listen renders every report for the server too: metrics, the two
    // heap profiles (1,000 stacks symbolized), the flame graph, the JSON.
    // --no-source reads no DWARF: what glibc's debug info costs.
    let modes = [
        ("default", &[][..]),
        ("--combined-only", &["--combined-only"][..]),
        ("--listen 0", &["--listen", "0"][..]),
        ("--no-source", &["--no-source"][..]),
    ];
    for (name, args) in modes {
        let r = hold_once(memleak, hold, args, opts.reports).with_context(|| format!("reports in {name} mode"))?;
        let _ = writeln!(
            out,
            "| {name} | {:.1} | {:.1} | {:.3} | {:.1} | {:.1} + {:.1} | {:.1}, {:.1} |",
            r.median_s * 1e3,
            r.max_s * 1e3,
            r.median_s, // s per million = µs per allocation
            mib(r.peak_rss_kib),
            mib(r.after.anon_kib),
            mib(r.after.file_kib),
            mib(r.idle.rss_kib),
            mib(r.idle.hwm_kib),
        );
        results.push(r);
    }
    let (attach, exits) = attach_times(memleak, hold, &[], ATTACHES)?;
    let _ = writeln!(
        out,
        "\nAttach (all hooks, one idle process; from starting memleak to its \"Attaching\" line), {ATTACHES} runs: median {:.1} ms, fastest {:.1} ms.",
        median(&attach) * 1e3,
        attach.iter().copied().fold(f64::INFINITY, f64::min) * 1e3
    );
    let _ = writeln!(
        out,
        "Exit after SIGINT (from the signal to memleak's exit: its last report, then detaching), one process, {ATTACHES} runs: median {:.1} ms, slowest {:.1} ms.",
        median(&exits) * 1e3,
        exits.iter().copied().fold(0.0, f64::max) * 1e3
    );
    let system_exits = system_exit_times(memleak, SYSTEM_EXITS)?;
    let _ = writeln!(
        out,
        "Exit after SIGINT, system-wide (every allocator file, the kernel's tracepoints), {SYSTEM_EXITS} runs: median {:.1} ms, slowest {:.1} ms.",
        median(&system_exits) * 1e3,
        system_exits.iter().copied().fold(0.0, f64::max) * 1e3
    );
    let (full, combined, served) = (&results[0], &results[1], &results[2]);
    let _ = writeln!(out, "\n| target | measured | limit | |\n| --- | ---: | ---: | --- |");
    let mut missed = check(out, "report, default mode", full.median_s, 0.2, " s");
    missed += check(out, "report, --combined-only", combined.median_s, 0.01, " s");
    missed += check(out, "report, --listen", served.median_s, 0.2, " s");
    missed += check(out, "tracer peak RSS", mib(full.peak_rss_kib.max(combined.peak_rss_kib)), 16.0, " MiB");
    missed += check(out, "tracer RSS, idle", mib(full.idle.rss_kib.max(combined.idle.rss_kib)), 6.0, " MiB");
    missed += check(out, "tracer peak RSS, --listen", served.peak_rss_kib as f64 / 1024.0, 40.0, " MiB");
    missed += check(out, "attach, all hooks, one process", median(&attach) * 1e3, 60.0, " ms");
    missed += check(out, "exit after SIGINT, one process", median(&exits) * 1e3, 200.0, " ms");
    missed += check(out, "exit after SIGINT, system-wide", median(&system_exits) * 1e3, 500.0, " ms");
    Ok(missed)
}

const ATTACHES: usize = 7;
const SYSTEM_EXITS: usize = 3;

/// Attaches (memleak given `args`) to an idle hold fixture `runs` times;
/// returns each time to "Attaching", and from SIGINT to exit. A pause
/// between runs lets the kernel finish the previous detach.
fn attach_times(memleak: &Path, hold: &Path, args: &[&str], runs: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let app = Running::spawn(&hold.to_path_buf(), &[], true)?;
    wait_until_reading(app.pid())?;
    let (mut times, mut exits) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        thread::sleep(Duration::from_millis(500));
        let tracer = Tracer::attach(memleak, app.pid(), args, &["3600"])?;
        times.push(tracer.attach_s);
        exits.push(tracer.interrupt(Duration::from_secs(60))?);
    }
    Ok((times, exits))
}

/// What `memleak -v` says of each unwind table it builds for the idle
/// hold fixture: rows, bytes, bytes per MiB of text, time to build.
fn table_lines(memleak: &Path, hold: &Path) -> anyhow::Result<Vec<String>> {
    let app = Running::spawn(&hold.to_path_buf(), &[], true)?;
    wait_until_reading(app.pid())?;
    thread::sleep(Duration::from_millis(500));
    let tracer = Tracer::attach(memleak, app.pid(), &["-v"], &["3600"])?;
    let lines = tracer.finish(Duration::from_secs(60))?;
    Ok(lines.into_iter().filter_map(|l| l.contains(": unwind table of ").then(|| l.trim_start_matches("memleak: ").to_string())).collect())
}

/// Starts system-wide memleak `runs` times; returns the time from SIGINT
/// (after its first report) to its exit.
fn system_exit_times(memleak: &Path, runs: usize) -> anyhow::Result<Vec<f64>> {
    let mut exits = Vec::new();
    for _ in 0..runs {
        thread::sleep(Duration::from_millis(500));
        let tracer = Tracer::start(Command::new(memleak).args(["1"]), "[")?;
        exits.push(tracer.interrupt(Duration::from_secs(60))?);
    }
    Ok(exits)
}

struct HoldResult {
    median_s: f64,
    max_s: f64,
    /// VmHWM after the timed reports.
    peak_rss_kib: u64,
    /// After two reports of the idle fixture, before it allocates.
    idle: Memory,
    /// After the timed reports.
    after: Memory,
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// A process's memory, from /proc/PID/status (KiB).
#[derive(Default)]
struct Memory {
    hwm_kib: u64,
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
}

impl Memory {
    fn of(pid: u32) -> anyhow::Result<Self> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
                .with_context(|| format!("no {name} in /proc/{pid}/status"))
        };
        Ok(Self { hwm_kib: field("VmHWM")?, rss_kib: field("VmRSS")?, anon_kib: field("RssAnon")?, file_kib: field("RssFile")? })
    }
}

/// Traces the hold fixture with 1 s reports; times `reports` of them once
/// all million blocks are live.
fn hold_once(memleak: &Path, hold: &Path, args: &[&str], reports: usize) -> anyhow::Result<HoldResult> {
    let mut app = Running::spawn(&hold.to_path_buf(), &[], true)?;
    wait_until_reading(app.pid())?;
    let tracer = Tracer::attach(memleak, app.pid(), &[args, &["-v"]].concat(), &["1"])?;
    // Idle: two reports of nothing.
    let mut idle_reports = 0;
    while idle_reports < 2 {
        let line = tracer.stderr.recv_timeout(Duration::from_secs(30)).context("no report timing from memleak -v")?;
        idle_reports += usize::from(parse_timing(&line).is_some());
    }
    let idle = Memory::of(tracer.child.id())?;
    let mut app_in = app.0.stdin.take().context("hold stdin")?;
    app_in.write_all(b"go\n")?;
    let mut line = String::new();
    BufReader::new(app.0.stdout.take().context("hold stdout")?).read_line(&mut line)?;
    if line.trim() != "done 1000000" {
        bail!("hold printed {line:?}");
    }
    // Reports under way while the blocks were allocated do not count.
    let done = Instant::now();
    let mut times = Vec::new();
    while times.len() < reports {
        let line = tracer.stderr.recv_timeout(Duration::from_secs(30)).context("no report timing from memleak -v")?;
        let Some((took, read)) = parse_timing(&line) else { continue };
        if done.elapsed() < Duration::from_millis(1100) {
            continue;
        }
        let expected = if args.contains(&"--combined-only") { 10_000 } else { 1_000_000 };
        if read < expected {
            bail!("a report read {read} entries, not {expected}");
        }
        times.push(took);
    }
    let after = Memory::of(tracer.child.id())?;
    drop(app_in);
    tracer.finish(Duration::from_secs(60))?;
    let max_s = times.iter().copied().fold(0.0, f64::max);
    Ok(HoldResult { median_s: median(&times), max_s, peak_rss_kib: after.hwm_kib, idle, after })
}

/// `memleak: report 3 took 0.183 s (1000000 entries read)` -> (seconds, entries).
fn parse_timing(line: &str) -> Option<(f64, u64)> {
    let rest = line.strip_prefix("memleak: report ")?;
    let (_, rest) = rest.split_once(" took ")?;
    let (secs, rest) = rest.split_once(" s (")?;
    let read = rest.split_whitespace().next()?;
    Some((secs.parse().ok()?, read.parse().ok()?))
}

/// A running memleak, attached.
pub(crate) struct Tracer {
    pub(crate) child: Child,
    /// From spawn to the "Attaching" line.
    attach_s: f64,
    stderr: Receiver<String>,
    stdout: thread::JoinHandle<()>,
}

impl Tracer {
    fn attach(memleak: &Path, pid: u32, args: &[&str], positional: &[&str]) -> anyhow::Result<Self> {
        Self::start(Command::new(memleak).args(["-p", &pid.to_string()]).args(args).args(positional), "Attaching")
    }

    /// Starts memleak as `command` says, up to its first stdout line that
    /// starts with `ready`.
    pub(crate) fn start(command: &mut Command, ready: &str) -> anyhow::Result<Self> {
        let started = Instant::now();
        let mut child = command
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting memleak")?;
        let stderr = lines(child.stderr.take().context("memleak stderr")?);
        let mut stdout = BufReader::new(child.stdout.take().context("memleak stdout")?);
        let mut line = String::new();
        loop {
            line.clear();
            if stdout.read_line(&mut line)? == 0 {
                let _ = child.wait();
                let err: Vec<String> = stderr.try_iter().collect();
                bail!("memleak exited before attaching: {}", err.join("\n"));
            }
            if line.starts_with(ready) {
                break;
            }
        }
        let attach_s = started.elapsed().as_secs_f64();
        let stdout = thread::spawn(move || drain(stdout));
        Ok(Self { child, attach_s, stderr, stdout })
    }

    /// Sends SIGINT at once; returns the time memleak took to exit.
    fn interrupt(mut self, limit: Duration) -> anyhow::Result<f64> {
        let start = Instant::now();
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > limit {
                let _ = self.child.kill();
                bail!("memleak did not exit within {limit:?} of SIGINT");
            }
            thread::sleep(Duration::from_millis(1));
        }
        let took = start.elapsed().as_secs_f64();
        let _ = self.stdout.join();
        Ok(took)
    }

    /// Stops memleak (SIGINT unless it is ending by itself) and waits;
    /// returns the stderr lines not read yet.
    pub(crate) fn finish(mut self, limit: Duration) -> anyhow::Result<Vec<String>> {
        let start = Instant::now();
        while self.child.try_wait()?.is_none() {
            if start.elapsed() > Duration::from_secs(2) {
                // SAFETY: signalling our own child.
                unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                bail!("memleak did not exit within {limit:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.stdout.join();
        // The reader thread ends at EOF, once the pipe is drained.
        Ok(self.stderr.iter().collect())
    }
}

fn lines(pipe: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn drain(mut stdout: BufReader<ChildStdout>) {
    let _ = std::io::copy(&mut stdout, &mut std::io::sink());
}

/// Waits until the fixture's main thread blocks reading stdin: its
/// libraries are mapped and its threads started by then.
fn wait_until_reading(pid: u32) -> anyhow::Result<()> {
    let path = PathBuf::from(format!("/proc/{pid}/syscall"));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if std::fs::read_to_string(&path).is_ok_and(|s| s.starts_with("0 ")) {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(5));
    }
    bail!("fixture {pid} never waited for input")
}

/// The 1-minute load average: how busy the machine was with other work
/// when a number was taken.
pub(crate) fn load_average() -> String {
    let avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    avg.split_whitespace().next().unwrap_or("?").to_string()
}

pub(crate) fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_program_costs() {
        let line = "memleak: program alloc_exit ran 400003 times, 144001080 ns in all (360 ns each)";
        assert_eq!(parse_program_cost(line), Some((400003, 144001080)));
        assert_eq!(parse_program_cost("memleak: report 3 took 0.183 s (1000000 entries read)"), None);
    }

    #[test]
    fn reads_report_timings() {
        assert_eq!(parse_timing("memleak: report 3 took 0.183000 s (1000000 entries read)"), Some((0.183, 1_000_000)));
        assert_eq!(parse_timing("memleak: probing /lib/libc.so.6: malloc"), None);
    }

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
    }
}
