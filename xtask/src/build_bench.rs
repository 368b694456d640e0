//! `cargo xtask bench --part build`: what system-wide tracing costs a real
//! C build. GNU awk (Debian's source package, unpacked by `cargo xtask
//! setup` into target/gawk-src and configured here once) is built with
//! `make -j2` from clean, untraced, under empty programs where memleak
//! puts its probes in every process (`memleak --user-only --floor placed`,
//! the system-wide optimized floor: the probes alone, no rescans), and
//! under `memleak --user-only`, each once a round in a rotating order;
//! medians of the rounds. The cost is the build's run time (memleak's own
//! work, rescans and reports, competes with the build for the CPUs), and
//! its CPU time is shown too, and memleak's own.
//!
//! Two of the variants trace every process on the machine: anything else
//! measured meanwhile (another bench) is traced too.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::bench::{Tracer, check, load_average, median};

/// How the build runs.
const VARIANTS: [(&str, Option<&[&str]>); 3] = [
    ("untraced", None),
    ("optimized floor, every process (`--user-only --floor placed`)", Some(&["--user-only", "--floor", "placed"])),
    ("`memleak --user-only`", Some(&["--user-only"])),
];

/// One build: its run time and CPU time (all its processes), and the
/// tracer's CPU time and what it said with -v.
#[derive(Default)]
struct Build {
    wall_s: f64,
    cpu_s: f64,
    tracer_cpu_s: f64,
    verbose: Vec<String>,
}

pub fn run(memleak: &Path, rounds: usize, out: &mut String) -> anyhow::Result<usize> {
    let dir = project()?;
    let started = Instant::now();
    let mut loads = Vec::new();
    let mut builds: Vec<Vec<Build>> = VARIANTS.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..VARIANTS.len() {
            let i = (k + round) % VARIANTS.len();
            loads.push(load_average());
            let build = build_once(memleak, &dir, VARIANTS[i].1).with_context(|| format!("building under {}", VARIANTS[i].0))?;
            eprintln!("bench: build {} round {}: {:.1} s", VARIANTS[i].0, round + 1, build.wall_s);
            builds[i].push(build);
        }
    }
    let minutes = started.elapsed().as_secs_f64() / 60.0;
    let med = |i: usize, f: fn(&Build) -> f64| median(&builds[i].iter().map(f).collect::<Vec<_>>());
    let _ = writeln!(
        out,
        "\n## System-wide: GNU awk built with `make -j2`, median of {rounds} interleaved rounds ({minutes:.0} minutes; load average before each build: {})\n",
        loads.join(", ")
    );
    let _ = writeln!(out, "| variant | build run time (s) | over untraced (s) | build CPU (s) | memleak's own CPU (s) |");
    let _ = writeln!(out, "| --- | ---: | ---: | ---: | ---: |");
    let untraced = med(0, |b| b.wall_s);
    for (i, (name, args)) in VARIANTS.iter().enumerate() {
        let own = if args.is_some() { format!("{:.1}", med(i, |b| b.tracer_cpu_s)) } else { String::new() };
        let wall = med(i, |b| b.wall_s);
        let _ = writeln!(out, "| {name} | {wall:.1} | {:.1} | {:.1} | {own} |", wall - untraced, med(i, |b| b.cpu_s));
    }
    let _ = writeln!(out, "\nWhat memleak did in each build (its -v):\n");
    for (n, build) in builds[2].iter().enumerate() {
        let _ = writeln!(out, "- round {}: {}", n + 1, summary(&build.verbose));
    }
    let floor = med(1, |b| b.wall_s) - untraced;
    let memleak = med(2, |b| b.wall_s) - untraced;
    let _ = writeln!(out, "\n| target | measured | limit | |\n| --- | ---: | ---: | --- |");
    Ok(check(out, "system-wide build: memleak's overhead / the floor's", memleak / floor, 1.15, "x"))
}

/// The configured source tree of GNU awk.
fn project() -> anyhow::Result<PathBuf> {
    let src = crate::workspace_root().join("target/gawk-src");
    let dir = std::fs::read_dir(&src)
        .ok()
        .and_then(|d| d.filter_map(Result::ok).map(|e| e.path()).find(|p| p.is_dir() && p.join("configure").exists()))
        .with_context(|| format!("no GNU awk source in {}: run `cargo xtask setup`", src.display()))?;
    if !dir.join("Makefile").exists() {
        eprintln!("bench: configuring {}", dir.display());
        let status = Command::new("./configure").current_dir(&dir).stdout(Stdio::null()).status()?;
        if !status.success() {
            bail!("configuring {} failed", dir.display());
        }
    }
    // Debian's source leaves out the manual's Texinfo source (GFDL), which
    // doc/ and awklib/ (the manual's example programs) are made from: the
    // build is the program, its library and its 14 extensions.
    let makefile = dir.join("Makefile");
    let text = std::fs::read_to_string(&makefile)?;
    let subdirs = |l: &str| l.split_whitespace().filter(|w| !["doc", "awklib"].contains(w)).collect::<Vec<_>>().join(" ");
    let patched: String = text.lines().map(|l| if l.starts_with("SUBDIRS =") { subdirs(l) } else { l.to_string() } + "\n").collect();
    if patched != text {
        std::fs::write(&makefile, patched)?;
    }
    Ok(dir)
}

fn build_once(memleak: &Path, dir: &Path, args: Option<&[&str]>) -> anyhow::Result<Build> {
    let quiet = |program: &str, args: &[&str]| Command::new(program).args(args).current_dir(dir).stdout(Stdio::null()).stderr(Stdio::null()).status();
    if !quiet("make", &["clean"])?.success() {
        bail!("make clean failed in {}", dir.display());
    }
    // The default interval (5 s), as it would run.
    let tracer = match args {
        Some(args) => Some(Tracer::start(Command::new(memleak).args(args).arg("-v"), "Tracing")?),
        None => None,
    };
    let before = children_cpu_s();
    let start = Instant::now();
    let status = quiet("make", &["-j2"])?;
    let wall_s = start.elapsed().as_secs_f64();
    let cpu_s = children_cpu_s() - before;
    if !status.success() {
        bail!("make -j2 failed in {}", dir.display());
    }
    let mut build = Build { wall_s, cpu_s, ..Default::default() };
    if let Some(tracer) = tracer {
        build.tracer_cpu_s = process_cpu_s(tracer.child.id()).unwrap_or(f64::NAN);
        build.verbose = tracer.finish(Duration::from_secs(60))?;
    }
    Ok(build)
}

/// CPU time (user + system) of this process's children that were waited
/// for: the build's processes, once make has exited.
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage writes into the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// CPU time (user + system, all threads) of a running process.
fn process_cpu_s(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name's closing parenthesis: field 3 on; utime and
    // stime are fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Some(ticks / hz)
}

/// What memleak -v said over one build: its reports and their time, the
/// allocator files it probed after start, the files of exited processes
/// it closed.
fn summary(lines: &[String]) -> String {
    let took: Vec<f64> = lines
        .iter()
        .filter_map(|l| l.strip_prefix("memleak: report ")?.split_once(" took ")?.1.split_once(" s")?.0.parse().ok())
        .collect();
    let probed = lines.iter().filter(|l| l.starts_with("memleak: now also probing")).count();
    let closed: usize = lines
        .iter()
        .filter_map(|l| l.strip_prefix("memleak: closed ")?.split_whitespace().next()?.parse::<usize>().ok())
        .sum();
    let slowest = took.iter().copied().fold(0.0, f64::max);
    format!(
        "{} reports, {:.2} s in all (slowest {:.2} s); {probed} allocator files probed after start; {closed} files of exited processes closed",
        took.len(),
        took.iter().sum::<f64>(),
        slowest
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_up_what_memleak_said() {
        let lines: Vec<String> = [
            "memleak: report 1 took 0.250000 s (100 entries read)",
            "memleak: now also probing /lib/libc.so.6 (of pid 7)",
            "memleak: closed 12 files of 30 exited processes",
            "memleak: report 2 took 0.500000 s (100 entries read)",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            summary(&lines),
            "2 reports, 0.75 s in all (slowest 0.50 s); 1 allocator files probed after start; 12 files of exited processes closed"
        );
    }

    #[test]
    fn reads_own_cpu_time() {
        assert!(process_cpu_s(std::process::id()).is_some_and(|s| s >= 0.0));
    }
}
