//! Shared by the integration tests and `cargo xtask demo`: the fixture
//! programs, the memleak binary, and a parser for its reports.

pub mod container;
pub mod pprof;
pub mod ptrace;
pub mod scenario;

use std::{
    env,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    thread,
    time::{Duration, Instant},
};

/// A fixture program built by this crate's build script.
pub fn fixture(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("FIXTURE_DIR")).join(name);
    assert!(path.exists(), "fixture {} was not built", path.display());
    path
}

/// The memleak binary under test: $MEMLEAK_BIN (set by `cargo xtask test`),
/// else the workspace's release build.
pub fn memleak_bin() -> PathBuf {
    let path = env::var_os("MEMLEAK_BIN").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/release/memleak")
    });
    assert!(path.exists(), "{} is missing: run the tests with `cargo xtask test`", path.display());
    path
}

/// A running fixture, killed (SIGKILL) and reaped when dropped.
pub struct Running {
    pub child: Child,
}

impl Running {
    pub fn spawn(program: impl Into<PathBuf>, args: &[&str]) -> Self {
        let program = program.into();
        let child = Command::new(&program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Self { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The GNU build id of an ELF file, in hex, as readelf prints it.
pub fn build_id(file: &Path) -> String {
    let out = Command::new("readelf").arg("-n").arg(file).output().expect("readelf");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let id = text.lines().find_map(|l| l.trim().strip_prefix("Build ID: ")).unwrap_or_else(|| panic!("no build id:\n{text}"));
    id.trim().to_string()
}

/// Everything `pipe` gives until its end, read on a thread of its own.
pub fn drain(mut pipe: impl std::io::Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut text = Vec::new();
        let _ = pipe.read_to_end(&mut text);
        text
    })
}

/// Runs memleak with `args`; kills it if it runs past `limit`. Its output
/// is read as it comes: a busy machine's system-wide reports outgrow a
/// pipe's 64 KiB, and memleak drops what nobody reads.
pub fn run_memleak(args: &[String], limit: Duration) -> Output {
    let mut child = Command::new(memleak_bin())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot start memleak");
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let start = Instant::now();
    let mut hung = false;
    while child.try_wait().expect("wait").is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            hung = true;
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let status = child.wait().expect("wait");
    let out = Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() };
    if hung {
        panic!(
            "memleak {args:?} hung past {limit:?}\nstdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

/// One stack of a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stack {
    pub bytes: u64,
    pub count: u64,
    /// (addr, size) of the `-a` lines printed before it.
    pub blocks: Vec<(u64, u64)>,
    pub frames: Vec<String>,
    /// System-wide reports: the process ("PID COMM") or kernel allocator
    /// ("kernel slab") the stack belongs to.
    pub process: Option<String>,
    /// The hooked function that made its blocks, after "from stack via"
    /// (`malloc`, `mmap`, ...); None if the line names none.
    pub kind: Option<String>,
    /// The trend after "from stack", without its parentheses:
    /// `+16384 B since last, 8192 B/s, oldest 2.1s, 5 allocs/0 frees, growing`.
    pub trend: String,
    /// The trend says `growing`.
    pub growing: bool,
    /// `--peek` lines under the frames, after `peek `:
    /// `0x55d0c3a2b2a0 (120 B): "channelid=4099..."`.
    pub peeks: Vec<String>,
    /// The `threads:` line under the frames, after `threads: `:
    /// `handler x6 (63 blocks, 6048 B)`.
    pub threads: Option<String>,
}

impl Stack {
    /// Whether the innermost frames are these functions, in this order.
    pub fn starts_with(&self, functions: &[&str]) -> bool {
        functions.len() <= self.frames.len()
            && functions.iter().zip(&self.frames).all(|(f, frame)| frame.starts_with(&format!("{f}+")))
    }
}

/// One interval's report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub clock: String,
    pub stacks: Vec<Stack>,
}

/// Parses memleak's text reports (other lines are ignored).
pub fn parse_reports(text: &str) -> Vec<Report> {
    let mut reports: Vec<Report> = Vec::new();
    let mut blocks = Vec::new();
    let mut process = None;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix('[')
            && rest.contains("] Top ")
        {
            reports.push(Report { clock: rest[..8.min(rest.len())].to_string(), stacks: vec![] });
            process = None;
            continue;
        }
        if !line.starts_with(' ')
            && let Some((name, rest)) = line.split_once(": ")
            && rest.contains(" bytes in ")
        {
            process = Some(name.to_string());
            continue;
        }
        let Some(report) = reports.last_mut() else { continue };
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("addr = ") {
            let mut it = rest.split(" size = ");
            let addr = u64::from_str_radix(it.next().unwrap_or(""), 16).unwrap_or(0);
            let size = it.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            blocks.push((addr, size));
        } else if let Some((head, trend)) = trimmed.split_once(" from stack")
            && head.contains(" bytes in ")
        {
            let words: Vec<&str> = head.split_whitespace().collect();
            let (kind, trend) = match trend.trim().strip_prefix("via ") {
                Some(rest) => {
                    let (kind, trend) = rest.split_once(' ').unwrap_or((rest, ""));
                    (Some(kind.to_string()), trend)
                }
                None => (None, trend),
            };
            let trend = trend.trim().trim_start_matches('(').trim_end_matches(')').to_string();
            report.stacks.push(Stack {
                bytes: words[0].parse().unwrap_or(0),
                count: words[3].parse().unwrap_or(0),
                blocks: std::mem::take(&mut blocks),
                frames: vec![],
                process: process.clone(),
                kind,
                growing: trend.split(", ").any(|part| part == "growing"),
                trend,
                peeks: vec![],
                threads: None,
            });
        } else if line.starts_with("        peek 0x")
            && let Some(stack) = report.stacks.last_mut()
        {
            stack.peeks.push(trimmed["peek ".len()..].to_string());
        } else if line.starts_with("        threads: ")
            && let Some(stack) = report.stacks.last_mut()
        {
            stack.threads = Some(trimmed["threads: ".len()..].to_string());
        } else if line.starts_with("        ")
            && let Some(stack) = report.stacks.last_mut()
        {
            stack.frames.push(trimmed.to_string());
        }
    }
    reports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_system_reports_by_process() {
        let text = "[01:02:03] Top 1 stacks with outstanding allocations, by process:
9 app 9: 500 bytes in 1 allocation
    500 bytes in 1 allocation from stack
        f+0x1 [m]
kernel slab: 64 bytes in 1 allocation
    64 bytes in 1 allocation from stack
        kmalloc+0x1 [kernel]
";
        let r = &parse_reports(text)[0];
        assert_eq!(r.stacks.len(), 2);
        assert_eq!(r.stacks[0].process.as_deref(), Some("9 app 9"));
        assert_eq!(r.stacks[1].process.as_deref(), Some("kernel slab"));
        assert_eq!(r.stacks[1].frames, ["kmalloc+0x1 [kernel]"]);
    }

    #[test]
    fn parses_reports_with_blocks_and_frames() {
        let text = "Attaching to pid 1 (app), Ctrl+C to quit.
[03:00:41] Top 10 stacks with outstanding allocations:
    addr = 7f8f70863220 size = 8192
    addr = 7f8f70861210 size = 8192
    16384 bytes in 2 allocations from stack  (+8192 B since last, 8192 B/s, oldest 2.0s, 2 allocs/0 frees, growing)
        fibonacci+0x1f [app] fixtures/fibonacci.c:20
        child+0x40 [app]
    5 bytes in 1 allocation from stack
        main+0x9 [app]
[03:00:42] Top 10 stacks with outstanding allocations:
";
        let reports = parse_reports(text);
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].clock, "03:00:41");
        let s = &reports[0].stacks[0];
        assert_eq!((s.bytes, s.count), (16384, 2));
        assert_eq!(s.blocks, [(0x7f8f70863220, 8192), (0x7f8f70861210, 8192)]);
        assert!(s.starts_with(&["fibonacci", "child"]));
        assert!(!s.starts_with(&["child"]));
        assert_eq!(s.trend, "+8192 B since last, 8192 B/s, oldest 2.0s, 2 allocs/0 frees, growing");
        assert!(s.growing);
        assert_eq!(reports[0].stacks[1].frames, ["main+0x9 [app]"]);
        assert_eq!((reports[0].stacks[1].trend.as_str(), reports[0].stacks[1].growing), ("", false));
        assert!(reports[1].stacks.is_empty());
    }
}
