//! Command-line options: bcc memleak's, plus map sizes and `-v`; and the
//! one place they are read: `Args::settings` turns them into what each
//! component is given (the kernel side's sizes, the report's options, the
//! files to write, the tracing flow's own), so no other module sees a flag.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

use crate::{
    error::{Kind, user_error},
    export,
    probe::{attach::Floor, loader},
    report::{self, Format, dump, peek, sort::SortKey},
    target::debuginfod,
    unwind::Unwind,
};

#[derive(Parser, Debug, Clone)]
#[command(
    name = "memleak",
    version,
    about = "Trace outstanding memory allocations that were not freed, with their call stacks.",
    after_help = "EXAMPLES:\n    \
        memleak -p $(pidof app) -a      outstanding allocations of app, with addresses, every 5 s\n    \
        memleak -p 181 10 3             three reports, 10 s apart\n    \
        memleak -p 181 -o 60000         only allocations older than a minute\n    \
        memleak -p 181 --combined-only  totals per stack kept in the kernel (cheapest report)\n    \
        memleak -p 181 -z 4096          only requests of 4 KiB or more\n    \
        memleak -p 181 --sort growth    stacks that grew most since the last report first\n    \
        memleak -p 181 --format json    one JSON object per report\n    \
        memleak -p 181 10 3 --pprof heap.pb.gz --flamegraph heap.svg   files written at exit\n    \
        memleak --listen 9464 -q        serve metrics, heap profiles and a page on 127.0.0.1:9464"
)]
pub struct Args {
    /// Trace this process (its allocator calls only). Without it: the whole system.
    #[arg(short, long)]
    pub pid: Option<u32>,

    /// Print every allocation and free as it happens.
    #[arg(short, long)]
    pub trace: bool,

    /// Show the address and size of each outstanding allocation.
    #[arg(short = 'a', long = "show-allocs")]
    pub show_allocs: bool,

    /// Report only allocations older than this many milliseconds.
    #[arg(short, long, value_name = "MS", default_value_t = 500)]
    pub older: u64,

    /// Run this command and trace it (split as a shell would, without
    /// expanding anything; or give it after `--`, one word per argument).
    #[arg(short, long, value_name = "COMMAND")]
    pub command: Option<String>,

    /// Report from the per-stack totals kept in the kernel, not from each allocation.
    #[arg(long)]
    pub combined_only: bool,

    /// Accepted for bcc compatibility: a block allocated again at an address
    /// whose free was missed always replaces the stale one.
    #[arg(long)]
    pub wa_missing_free: bool,

    /// Record one allocation in every N.
    #[arg(short, long, value_name = "N", default_value_t = 1,
          value_parser = clap::value_parser!(u64).range(1..))]
    pub sample_rate: u64,

    /// Show this many stacks with the most outstanding bytes.
    #[arg(short = 'T', long, value_name = "N", default_value_t = 10)]
    pub top: usize,

    /// Trace only requests of at least this many bytes.
    #[arg(short = 'z', long, value_name = "BYTES")]
    pub min_size: Option<u64>,

    /// Trace only requests of at most this many bytes.
    #[arg(short = 'Z', long, value_name = "BYTES")]
    pub max_size: Option<u64>,

    /// Hook the allocator in this object (path or library name) instead of the process's libc.
    #[arg(short = 'O', long, value_name = "OBJ")]
    pub obj: Option<PathBuf>,

    /// Also trace kernel per-CPU allocations (system-wide mode).
    #[arg(long)]
    pub percpu: bool,

    /// System-wide: show at most this many processes, most outstanding bytes first.
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = clap::builder::TypedValueParser::map(clap::value_parser!(u64).range(1..), |n| n as usize))]
    pub top_procs: usize,

    /// System-wide: trace only kernel allocators (kmalloc, slab, pages).
    #[arg(long, conflicts_with = "user_only")]
    pub kernel_only: bool,

    /// System-wide: trace only user-space allocators.
    #[arg(long)]
    pub user_only: bool,

    /// Most outstanding allocations tracked at once.
    #[arg(long, value_name = "N", default_value_t = 1 << 20, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_allocs: u32,

    /// Most distinct call stacks recorded at once (default 16384; system-wide
    /// 16384 to 65536, from the memory available: see the README).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_stacks: Option<u32>,

    /// How user stacks are walked: auto, by unwind tables (.eh_frame) in
    /// objects built without frame pointers and by frame pointers in the
    /// others; dwarf, by tables wherever an object has them; fp, by frame
    /// pointers only (stacks stop where code was built without them).
    #[arg(long, value_enum, value_name = "HOW", default_value_t = Unwind::Auto)]
    pub unwind: Unwind,

    /// Most memory for unwind tables, in MiB (1 to 128), shared by all
    /// traced processes.
    #[arg(long, value_name = "MIB", default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=128))]
    pub unwind_memory: u32,

    /// Say what is hooked where, how long each report took, and at exit
    /// what each BPF program cost (if kernel.bpf_stats_enabled=1).
    #[arg(short, long)]
    pub verbose: bool,

    /// Order of the stacks in a report (and which are the top N).
    #[arg(long, value_enum, value_name = "KEY", default_value_t = SortKey::Size)]
    pub sort: SortKey,

    /// Show the first N bytes (1 to 4096) of each reported stack's oldest
    /// outstanding blocks (up to 3), read from the process at each report.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=peek::MAX_BYTES as i64))]
    pub peek: Option<u32>,

    /// Group the report by thread name (the threads that allocated the
    /// outstanding blocks) instead of by stack.
    #[arg(long)]
    pub by_thread: bool,

    /// At each report, write the outstanding blocks of each reported stack
    /// to DIR/REPORT-RANK.bin, with DIR/index.json (DIR is created 0700;
    /// it keeps the latest report's files).
    #[arg(long, value_name = "DIR")]
    pub dump: Option<PathBuf>,

    /// Most bytes of blocks --dump writes per report.
    #[arg(long, value_name = "BYTES", default_value_t = 64 << 20, value_parser = clap::value_parser!(u64).range(1..))]
    pub dump_budget: u64,

    /// Let --dump write into a directory that is not empty.
    #[arg(long)]
    pub force: bool,

    /// Print frames without file:line (and without inlined functions).
    #[arg(long)]
    pub no_source: bool,

    /// Report format on stdout.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,

    /// At exit, write the last report's stacks to FILE as collapsed stacks (`root;...;leaf bytes`).
    #[arg(long, value_name = "FILE")]
    pub folded: Option<PathBuf>,

    /// At exit, write an SVG flame graph of outstanding bytes to FILE.
    #[arg(long, value_name = "FILE.svg")]
    pub flamegraph: Option<PathBuf>,

    /// At exit, write a gzipped pprof profile (inuse_space, inuse_objects) to FILE.
    #[arg(long, value_name = "FILE")]
    pub pprof: Option<PathBuf>,

    /// Serve the last report over HTTP on [ADDR:]PORT (a bare port binds
    /// 127.0.0.1): /metrics for Prometheus, /debug/pprof/heap and
    /// /debug/pprof/allocs for Parca and Pyroscope, a page at /.
    #[arg(long, value_name = "[ADDR:]PORT", value_parser = crate::serve::parse_listen)]
    pub listen: Option<std::net::SocketAddr>,

    /// Print no reports on stdout (with --listen: serve them only).
    #[arg(short, long)]
    pub quiet: bool,

    /// Bench only (`cargo xtask bench`): empty programs on every hook, at
    /// function entries (naive) or where memleak puts its probes (placed).
    #[arg(long, value_enum, hide = true)]
    pub floor: Option<Floor>,

    /// Seconds between reports.
    #[arg(default_value_t = 5)]
    pub interval: u64,

    /// Number of reports, then exit (default: until Ctrl-C or the target exits).
    pub count: Option<u64>,

    /// `memleak [OPTIONS] -- CMD ARGS...`: as -c, one word per argument.
    #[arg(last = true, value_name = "CMD")]
    pub argv: Vec<String>,
}

/// What to trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// One running process.
    Pid(u32),
    /// A command memleak starts (-c split as a shell would, or after --).
    Command(Vec<String>),
    /// Every process, and the kernel.
    System { user: bool, kernel: bool },
}

/// The options resolved once, for the components that use them.
#[derive(Debug, Clone)]
pub struct Settings {
    pub mode: Mode,
    /// The kernel side's filters and map sizes.
    pub load: loader::Asked,
    pub report: report::Options,
    pub exports: export::Paths,
    pub dump: Option<dump::Options>,
    pub run: Run,
}

/// What the tracing flow itself is asked (`trace.rs`).
#[derive(Debug, Clone)]
pub struct Run {
    pub interval: Duration,
    /// Reports, then exit.
    pub count: Option<u64>,
    pub verbose: bool,
    /// `-t`: each call, as it happens.
    pub trace: bool,
    /// Status lines go to stderr: stdout holds JSON only.
    pub json: bool,
    pub listen: Option<SocketAddr>,
    /// `-O`: the allocator's object.
    pub obj: Option<PathBuf>,
    pub percpu: bool,
    pub top_procs: usize,
    pub floor: Option<Floor>,
    pub unwind: Unwind,
    /// `--unwind-memory`, in MiB.
    pub unwind_memory: u32,
}

impl Args {
    /// Checks the options (see `validate`) and resolves them.
    pub fn settings(self) -> anyhow::Result<Settings> {
        self.validate()?;
        let mode = self.mode();
        let system = matches!(mode, Mode::System { .. });
        let load = loader::Asked {
            min_size: self.min_size,
            max_size: self.max_size,
            sample_every: self.sample_rate,
            trace: self.trace,
            max_allocs: self.max_allocs,
            max_stacks: self.max_stacks,
            combined_only: self.combined_only,
            system,
            watched_tgid: self.pid.unwrap_or(0),
            unwind_mib: if self.unwind == Unwind::Fp { 0 } else { self.unwind_memory },
        };
        let report = report::Options {
            verbose: self.verbose,
            top: self.top,
            min_age_ns: self.older.saturating_mul(1_000_000),
            show_allocs: self.show_allocs,
            peek: self.peek,
            by_thread: self.by_thread,
            combined_only: self.combined_only,
            sort: self.sort,
            format: self.format,
            sample_rate: self.sample_rate,
            quiet: self.quiet,
            source: !self.no_source,
            debuginfod: debuginfod::Servers::from_env(|name| std::env::var(name).ok()),
        };
        let exports = export::Paths { folded: self.folded, flamegraph: self.flamegraph, pprof: self.pprof };
        let dump = self.dump.map(|dir| dump::Options { dir, budget: self.dump_budget, force: self.force });
        let run = Run {
            interval: Duration::from_secs(self.interval),
            count: self.count,
            verbose: self.verbose,
            trace: self.trace,
            json: self.format == Format::Json,
            listen: self.listen,
            obj: self.obj,
            percpu: self.percpu,
            top_procs: self.top_procs,
            floor: self.floor,
            unwind: self.unwind,
            unwind_memory: self.unwind_memory,
        };
        Ok(Settings { mode, load, report, exports, dump, run })
    }

    pub fn mode(&self) -> Mode {
        if let Some(pid) = self.pid {
            Mode::Pid(pid)
        } else if let Some(command) = &self.command {
            Mode::Command(shlex::split(command).unwrap_or_default())
        } else if !self.argv.is_empty() {
            Mode::Command(self.argv.clone())
        } else {
            Mode::System { user: !self.kernel_only, kernel: !self.user_only }
        }
    }

    /// Checks what clap does not: value combinations, and values whose
    /// one-line messages scripts and tests know (the interval, -T, -z/-Z).
    /// Ranges clap checks are declared on the options.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.interval == 0 {
            return Err(user_error(Kind::Usage, "interval must be at least 1 second"));
        }
        if self.count == Some(0) {
            return Err(user_error(Kind::Usage, "count must be at least 1"));
        }
        if self.top == 0 {
            return Err(user_error(Kind::Usage, "--top must be at least 1"));
        }
        if let (Some(min), Some(max)) = (self.min_size, self.max_size)
            && min > max
        {
            return Err(user_error(
                Kind::Usage,
                format!("--min-size {min} is larger than --max-size {max}"),
            ));
        }
        if self.pid == Some(0) {
            return Err(user_error(Kind::Usage, "PID 0 is not a process"));
        }
        let system_only = [("--kernel-only", self.kernel_only), ("--user-only", self.user_only), ("--percpu", self.percpu)];
        let command = self.command.is_some() || !self.argv.is_empty();
        if self.command.is_some() && !self.argv.is_empty() {
            return Err(user_error(Kind::Usage, "-c and a command after -- exclude each other"));
        }
        if self.pid.is_some() || command {
            if self.pid.is_some() && command {
                return Err(user_error(Kind::Usage, "-p and a command (-c, or after --) exclude each other"));
            }
            if let Some((flag, _)) = system_only.iter().find(|(_, on)| *on) {
                return Err(user_error(Kind::Usage, format!("{flag} applies to system-wide tracing (no -p, no -c)")));
            }
        }
        if self.combined_only && let Some(flag) = [("--peek", self.peek.is_some()), ("--dump", self.dump.is_some()), ("--by-thread", self.by_thread)]
            .iter()
            .find_map(|(flag, on)| on.then_some(flag))
        {
            return Err(user_error(Kind::Usage, format!("{flag} reads outstanding blocks, which --combined-only does not keep")));
        }
        if self.dump.is_none() && self.force {
            return Err(user_error(Kind::Usage, "--force applies to --dump"));
        }
        if self.floor.is_some() && self.pid.is_none() && !self.user_only {
            return Err(user_error(Kind::Usage, "--floor needs -p or --user-only"));
        }
        if let Some(command) = &self.command {
            match shlex::split(command) {
                None => return Err(user_error(Kind::Usage, format!("-c {command}: unbalanced quotes or a trailing backslash"))),
                Some(words) if words.is_empty() => return Err(user_error(Kind::Usage, "-c needs a command")),
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("memleak").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_match_bcc() {
        let a = parse(&["-p", "42"]).unwrap();
        assert_eq!(a.pid, Some(42));
        assert_eq!((a.interval, a.count, a.older, a.top, a.sample_rate), (5, None, 500, 10, 1));
        assert!(!a.show_allocs && !a.combined_only && !a.trace);
        assert_eq!((a.sort, a.format, a.no_source), (SortKey::Size, Format::Text, false));
        assert!(a.folded.is_none() && a.flamegraph.is_none() && a.pprof.is_none());
        a.validate().unwrap();
    }

    #[test]
    fn trend_and_format_options() {
        let a = parse(&["-p", "7", "--sort", "growth", "--no-source", "--format", "json", "--folded", "a.folded",
                        "--flamegraph", "a.svg", "--pprof", "a.pb.gz"]).unwrap();
        assert_eq!((a.sort, a.format, a.no_source), (SortKey::Growth, Format::Json, true));
        assert_eq!(a.folded.as_deref(), Some(std::path::Path::new("a.folded")));
        assert_eq!(a.flamegraph.as_deref(), Some(std::path::Path::new("a.svg")));
        assert_eq!(a.pprof.as_deref(), Some(std::path::Path::new("a.pb.gz")));
        for key in ["size", "count", "age"] {
            parse(&["-p", "7", "--sort", key]).unwrap();
        }
        assert!(parse(&["-p", "7", "--sort", "speed"]).is_err());
        assert!(parse(&["-p", "7", "--format", "xml"]).is_err());
    }

    #[test]
    fn bcc_short_options_and_positionals() {
        let a = parse(&["-p", "7", "-a", "-t", "-o", "100", "-T", "3", "-s", "10", "-z", "16",
                        "-Z", "4096", "-O", "libc.so.6", "1", "3"]).unwrap();
        assert_eq!((a.pid, a.interval, a.count), (Some(7), 1, Some(3)));
        assert_eq!((a.older, a.top, a.sample_rate), (100, 3, 10));
        assert_eq!((a.min_size, a.max_size), (Some(16), Some(4096)));
        assert_eq!(a.obj.as_deref(), Some(std::path::Path::new("libc.so.6")));
        assert!(a.show_allocs && a.trace);
        a.validate().unwrap();
    }

    #[test]
    fn bad_values_are_usage_errors() {
        assert!(parse(&["-p", "x"]).is_err());
        assert!(parse(&["-p", "1", "-s", "0"]).is_err());
        assert!(parse(&["-p", "1", "-z", "-5"]).is_err());
        for args in [&["-p", "1", "0"][..], &["-p", "1", "1", "0"], &["-p", "1", "-z", "10", "-Z", "5"],
                     &["-p", "0"], &["-p", "1", "-T", "0"]] {
            let err = parse(args).unwrap().validate().unwrap_err();
            assert_eq!(crate::error::exit_code(&err), Kind::Usage as u8, "{args:?}: {err}");
        }
    }

    #[test]
    fn ranges_are_clap_usage_errors() {
        for args in [&["--unwind-memory", "0"][..], &["--unwind-memory", "129"], &["--top-procs", "0"],
                     &["--max-allocs", "0"], &["--max-stacks", "0"]] {
            assert_eq!(parse(args).unwrap_err().exit_code(), 2, "{args:?}");
        }
        let a = parse(&["--unwind-memory", "128", "--top-procs", "1", "--max-allocs", "1", "--max-stacks", "1"]).unwrap();
        assert_eq!((a.unwind_memory, a.top_procs, a.max_allocs, a.max_stacks), (128, 1, 1, Some(1)));
        a.validate().unwrap();
    }

    #[test]
    fn modes() {
        assert_eq!(parse(&["-p", "5"]).unwrap().mode(), Mode::Pid(5));
        assert_eq!(parse(&[]).unwrap().mode(), Mode::System { user: true, kernel: true });
        assert_eq!(parse(&["--kernel-only"]).unwrap().mode(), Mode::System { user: false, kernel: true });
        assert_eq!(parse(&["--user-only"]).unwrap().mode(), Mode::System { user: true, kernel: false });
        assert_eq!(parse(&["-c", "./app 50 3"]).unwrap().mode(), Mode::Command(vec!["./app".into(), "50".into(), "3".into()]));
        // Quoted as a shell would: python3 -c 'print(1)' is three words.
        let quoted = parse(&["-c", "python3 -c 'print(1)' \"a b\""]).unwrap();
        quoted.validate().unwrap();
        assert_eq!(quoted.mode(), Mode::Command(vec!["python3".into(), "-c".into(), "print(1)".into(), "a b".into()]));
        // After --, one word per argument, after the interval and count.
        let after = parse(&["-a", "2", "3", "--", "sh", "-c", "exit 7"]).unwrap();
        after.validate().unwrap();
        assert_eq!((after.interval, after.count), (2, Some(3)));
        assert_eq!(after.mode(), Mode::Command(vec!["sh".into(), "-c".into(), "exit 7".into()]));
        assert!(parse(&["--kernel-only", "--user-only"]).is_err());
        for args in [&["-p", "1", "--percpu"][..], &["-p", "1", "--kernel-only"], &["-p", "1", "-c", "ls"], &["-c", " "],
                     &["-c", "sh -c 'exit"], &["-c", "ls", "--", "ls"], &["-p", "1", "--", "ls"]] {
            let err = parse(args).unwrap().validate().unwrap_err();
            assert_eq!(crate::error::exit_code(&err), Kind::Usage as u8, "{args:?}: {err}");
        }
        parse(&["--percpu", "--top-procs", "3", "10"]).unwrap().validate().unwrap();
        // --peek: 1 to 4096 bytes, of blocks --combined-only does not read.
        assert_eq!(parse(&["-p", "1", "--peek", "4096"]).unwrap().peek, Some(4096));
        for n in ["0", "4097", "-1"] {
            assert_eq!(parse(&["-p", "1", "--peek", n]).unwrap_err().exit_code(), 2);
        }
        for args in [&["-p", "1", "--peek", "8", "--combined-only"][..], &["-p", "1", "--dump", "d", "--combined-only"], &["-p", "1", "--by-thread", "--combined-only"],
                     &["-p", "1", "--force"]] {
            let err = parse(args).unwrap().validate().unwrap_err();
            assert_eq!(crate::error::exit_code(&err), Kind::Usage as u8, "{args:?}");
        }
        let dump = parse(&["-p", "1", "--dump", "d", "--force"]).unwrap();
        assert_eq!((dump.dump_budget, dump.force), (64 << 20, true));
        assert_eq!(parse(&["-p", "1", "--dump", "d", "--dump-budget", "0"]).unwrap_err().exit_code(), 2);
        // The bench's empty programs go on one process, or every process's
        // allocators (not on the kernel's tracepoints).
        parse(&["-p", "7", "--floor", "naive"]).unwrap().validate().unwrap();
        parse(&["--user-only", "--floor", "placed"]).unwrap().validate().unwrap();
        let err = parse(&["--floor", "placed"]).unwrap().validate().unwrap_err();
        assert_eq!(crate::error::exit_code(&err), Kind::Usage as u8);
    }
}
