//! How memleak ends: Ctrl-C in a blink, no command left behind (or started
//! after a Ctrl-C), output that never blocks a signal or panics, export
//! files never clobbered by a run that fails, and reports that say what
//! they miss. Real probes on real processes: run as root.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::PathBuf,
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use memleak_tests::{Running, fixture, memleak_bin, parse_reports, run_memleak};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn signal(pid: u32, signal: i32) {
    // SAFETY: signalling a process this test started.
    unsafe { libc::kill(pid as i32, signal) };
}

fn alive(pid: u32) -> bool {
    // A zombie is not running: only its exit status is left.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memleak-ending-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// memleak with stdout piped, killed if the test fails before it ends.
struct Memleak {
    child: Child,
    stdout: Option<BufReader<std::process::ChildStdout>>,
}

impl Memleak {
    fn start(list: &[&str]) -> Self {
        let mut child = Command::new(memleak_bin())
            .args(list)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start memleak");
        let stdout = BufReader::new(child.stdout.take().unwrap());
        Self { child, stdout: Some(stdout) }
    }

    /// Reads stdout up to a line starting with `prefix`; returns it.
    fn line_starting(&mut self, prefix: &str) -> String {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.as_mut().unwrap().read_line(&mut line).unwrap() == 0 {
                let mut err = String::new();
                self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
                panic!("memleak ended before a line starting {prefix:?}: {err}");
            }
            if line.starts_with(prefix) {
                return line;
            }
        }
    }

    /// Waits for memleak to exit (killing it past `limit`); returns its
    /// exit code, the time it took, and the rest of stdout and stderr.
    fn wait(mut self, limit: Duration) -> (Option<i32>, Duration, String, String) {
        let start = Instant::now();
        let mut stdout = self.stdout.take().unwrap();
        let reader = thread::spawn(move || {
            let mut out = String::new();
            let _ = stdout.read_to_string(&mut out);
            out
        });
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if start.elapsed() > limit {
                let _ = self.child.kill();
                break self.child.wait().unwrap();
            }
            thread::sleep(Duration::from_millis(5));
        };
        let took = start.elapsed();
        let mut err = String::new();
        self.child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
        (status.code(), took, reader.join().unwrap(), err)
    }
}

impl Drop for Memleak {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Ctrl-C after a report; returns how long memleak took to exit, and its
/// output since.
fn exit_time(list: &[&str]) -> (Duration, String, String) {
    let mut memleak = Memleak::start(list);
    memleak.line_starting("[");
    let pid = memleak.child.id();
    signal(pid, libc::SIGINT);
    let (code, took, out, err) = memleak.wait(Duration::from_secs(30));
    assert_eq!(code, Some(0), "{err}");
    (took, out, err)
}

#[test]
fn ctrl_c_ends_a_traced_process_run_in_a_blink() {
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    thread::sleep(Duration::from_millis(200));
    // Each perf-event uprobe took about 0.2 s to remove, one at a time
    // (2 to 5 s for the 11 hooks); the bench records the real figure.
    let (took, out, err) = exit_time(&["-p", &app.pid().to_string(), "1"]);
    assert!(took < Duration::from_millis(1500), "{took:?} to exit after SIGINT: {err}");
    // The last report still came.
    assert_eq!(parse_reports(&out).len(), 1, "{out}");
}

#[test]
fn ctrl_c_ends_a_system_wide_run_in_a_blink() {
    // The allocator files of every process, one report of all of them:
    // 2.6 to 11 s to exit before.
    let (took, out, err) = exit_time(&["--user-only", "-T", "1", "--top-procs", "1", "1"]);
    assert!(took < Duration::from_millis(1500), "{took:?} to exit after SIGINT: {err}");
    assert_eq!(parse_reports(&out).len(), 1, "{out}");
}

#[test]
fn sigterm_to_memleak_ends_its_command() {
    let mut memleak = Memleak::start(&["-c", "sleep 60", "1"]);
    let tracing = memleak.line_starting("Tracing ");
    let pid: u32 = tracing.split("(pid ").nth(1).and_then(|r| r.split(')').next()).unwrap().parse().unwrap();
    assert!(alive(pid), "{tracing}");
    signal(memleak.child.id(), libc::SIGTERM);
    // Not waiting for stdout's end: a command left running holds it open.
    let start = Instant::now();
    let status = loop {
        if let Some(status) = memleak.child.try_wait().unwrap() {
            break status;
        }
        assert!(start.elapsed() < Duration::from_secs(10), "memleak did not exit after SIGTERM");
        thread::sleep(Duration::from_millis(5));
    };
    let left = alive(pid);
    if left {
        signal(pid, libc::SIGKILL);
    }
    assert!(!left, "memleak exited ({status}) and left sleep {pid} running");
    assert_eq!(status.code(), Some(0));
}

#[test]
fn ctrl_c_while_attaching_never_starts_the_command() {
    let dir = scratch("attach");
    let marker = dir.join("started");
    let memleak = Memleak::start(&["-c", &format!("touch {}", marker.display()), "1"]);
    let me = memleak.child.id();
    // The command is forked at once and held until the probes are in: the
    // moment memleak has a child still running memleak, it is attaching.
    let start = Instant::now();
    let held = loop {
        let children = std::fs::read_to_string(format!("/proc/{me}/task/{me}/children")).unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next() {
            break pid.parse::<u32>().unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(10), "memleak forked no command");
        thread::sleep(Duration::from_micros(200));
    };
    assert_eq!(std::fs::read_link(format!("/proc/{held}/exe")).ok(), Some(memleak_bin().canonicalize().unwrap()));
    signal(me, libc::SIGINT);
    let (code, _, _, err) = memleak.wait(Duration::from_secs(10));
    thread::sleep(Duration::from_millis(100));
    assert!(!marker.exists(), "the command ran after the Ctrl-C: {err}");
    assert!(!alive(held), "the held command is still there: {err}");
    assert_eq!(code, Some(128 + libc::SIGINT), "{err}");
    assert!(err.contains("memleak: interrupted before touch started"), "{err}");
}

#[test]
fn a_quoted_command_and_one_after_dashdash_run_as_a_shell_would() {
    // bcc split -c on spaces: `'exit` and `7'` reached sh, a syntax error.
    let out = run_memleak(&args(&["-c", "sh -c 'exit 7'", "1"]), Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
    let out = run_memleak(&args(&["1", "--", "sh", "-c", "exit 9"]), Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(9), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("memleak: sh exited with 9"), "{}", text(&out.stderr));
}

#[test]
fn ctrl_c_ends_memleak_while_nobody_reads_its_stdout() {
    let app = Running::spawn(fixture("fibonacci"), &["5"]);
    thread::sleep(Duration::from_millis(100));
    // A pipe of one page that the test never reads: a report or two of
    // `-a` lines (200 blocks a second) fill it, and memleak's next write blocks.
    let mut fds = [0; 2];
    // SAFETY: a valid two-int array; the fds are owned below.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let (read, write) = unsafe {
        use std::os::fd::FromRawFd as _;
        (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1]))
    };
    use std::os::fd::AsRawFd as _;
    // SAFETY: fcntl and ioctl on a pipe this test owns.
    let size = unsafe { libc::fcntl(read.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    assert!(size >= 4096, "F_SETPIPE_SZ");
    let mut memleak = Command::new(memleak_bin())
        .args(["-p", &app.pid().to_string(), "-a", "-o", "0", "1"])
        .stdout(Stdio::from(write))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let mut queued: libc::c_int = 0;
        unsafe { libc::ioctl(read.as_raw_fd(), libc::FIONREAD, &mut queued) };
        // Past the start-up line: a report is being written (over 4 KiB
        // from the first: a write that takes what fits, then waits).
        if queued > 100 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(20), "memleak did not fill its stdout ({queued} bytes)");
        thread::sleep(Duration::from_millis(20));
    }
    // Two more reports' time: memleak is in a write that cannot end, or
    // (fixed) its writer is.
    thread::sleep(Duration::from_millis(2100));
    signal(memleak.id(), libc::SIGINT);
    let start = Instant::now();
    let status = loop {
        if let Some(status) = memleak.try_wait().unwrap() {
            break Some(status);
        }
        if start.elapsed() > Duration::from_secs(10) {
            let _ = memleak.kill();
            let _ = memleak.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(5));
    };
    let mut err = String::new();
    memleak.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    let took = start.elapsed();
    drop(read);
    let status = status.unwrap_or_else(|| panic!("memleak ignored SIGINT for 10 s with a blocked stdout: {err}"));
    assert!(took < Duration::from_secs(4), "{took:?} to exit: {err}");
    assert_eq!(status.code(), Some(0), "{err}");
    assert!(err.contains("warning: stdout is not being read"), "{err}");
}

#[test]
fn a_full_stdout_is_one_line_naming_it_and_its_own_exit_code() {
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    thread::sleep(Duration::from_millis(200));
    for format in ["text", "json"] {
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        let out = Command::new(memleak_bin())
            .args(["-p", &app.pid().to_string(), "--format", format, "1", "1"])
            .stdout(Stdio::from(full))
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(6), "{format}: {err}");
        let last = err.lines().last().unwrap_or("");
        assert_eq!(last, "memleak: writing stdout: No space left on device (os error 28)", "{format}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn an_old_export_file_outlives_a_run_that_never_traced() {
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    let dir = scratch("exports");
    let (pprof, folded) = (dir.join("heap.pb.gz"), dir.join("heap.folded"));
    std::fs::write(&pprof, b"an older profile").unwrap();
    std::fs::write(&folded, b"main 1\n").unwrap();
    let pid = app.pid().to_string();
    let list = ["-p", &pid, "--pprof", pprof.to_str().unwrap(), "--folded", folded.to_str().unwrap(), "-O", "/nonexistent.so", "1", "1"];
    let out = run_memleak(&args(&list), Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(5), "{}", text(&out.stderr));
    assert_eq!(std::fs::read(&pprof).unwrap(), b"an older profile");
    assert_eq!(std::fs::read_to_string(&folded).unwrap(), "main 1\n");
    let mut left: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    left.sort();
    assert_eq!(left, ["heap.folded", "heap.pb.gz"], "no temporary file left");
    // Two exports into one file: refused before anything is traced.
    let same = dir.join(".").join("heap.pb.gz");
    let list = ["-p", &pid, "--pprof", pprof.to_str().unwrap(), "--folded", same.to_str().unwrap(), "1", "1"];
    let out = run_memleak(&args(&list), Duration::from_secs(20));
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.trim_end(), format!("memleak: --folded and --pprof name the same file: {}", same.display()));
    assert_eq!(std::fs::read(&pprof).unwrap(), b"an older profile");
    // A run that traces replaces both.
    let list = ["-p", &pid, "--pprof", pprof.to_str().unwrap(), "--folded", folded.to_str().unwrap(), "1", "1"];
    let out = run_memleak(&args(&list), Duration::from_secs(20));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(&std::fs::read(&pprof).unwrap()[..2], &[0x1f, 0x8b]);
    assert!(std::fs::read_to_string(&folded).unwrap().contains("child;fibonacci;calloc "));
}

#[test]
fn system_wide_json_keeps_top_stacks_per_process() {
    // Two leaking processes: -T applied to the rows of all processes
    // together gave the smaller one `stacks: []` beside `stacks_total: 1`.
    let apps = [Running::spawn(fixture("fibonacci"), &["20"]), Running::spawn(fixture("fibonacci"), &["50"])];
    thread::sleep(Duration::from_millis(100));
    let out = run_memleak(&args(&["--user-only", "--format", "json", "-T", "1", "1", "1"]), Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    for app in &apps {
        let process = report["processes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["pid"].as_u64() == Some(u64::from(app.pid())))
            .unwrap_or_else(|| panic!("pid {} not in {stdout}", app.pid()));
        assert!(process["stacks_total"].as_u64().unwrap() >= 1, "{process}");
        let stacks = process["stacks"].as_array().unwrap();
        assert_eq!(stacks.len(), 1, "-T 1: one stack of each process: {process}");
        assert_eq!(stacks[0]["frames"][0]["symbol"], "fibonacci", "{process}");
    }
}

#[test]
fn a_report_says_what_was_lost_since_attach() {
    // 200 blocks a second into a map of 100: most are not tracked.
    let app = Running::spawn(fixture("fibonacci"), &["5"]);
    thread::sleep(Duration::from_millis(100));
    let pid = app.pid().to_string();
    let out = run_memleak(&args(&["-p", &pid, "--max-allocs", "100", "1", "2"]), Duration::from_secs(30));
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let header = stdout.lines().skip_while(|l| !l.starts_with('[')).nth(1).unwrap_or("");
    let untracked: u64 = header
        .strip_prefix("lost since attach: ")
        .and_then(|rest| rest.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("no loss in the header: {stdout}"));
    assert!(untracked > 0 && header.contains(" allocations not tracked (allocation map full, raise --max-allocs)"), "{header}");
    // By the second report, the map's 100 blocks are all old enough to show.
    let report = &parse_reports(&stdout)[1];
    assert_eq!(report.stacks.iter().map(|s| s.count).sum::<u64>(), 100, "the map's 100 blocks: {stdout}");
    let out = run_memleak(&args(&["-p", &pid, "--max-allocs", "100", "--format", "json", "1", "1"]), Duration::from_secs(30));
    let json: serde_json::Value = serde_json::from_str(text(&out.stdout).trim()).unwrap();
    assert!(json["lost"]["allocations_untracked"].as_u64().unwrap() > 0, "{json}");
    assert_eq!(json["lost"]["mappings_unfollowed"], 0, "{json}");
}

#[test]
fn a_zombie_pid_is_said_to_have_exited() {
    // A child of this test that exited and is not reaped yet.
    let mut child = Command::new("true").spawn().unwrap();
    let pid = child.id();
    let start = Instant::now();
    while alive(pid) {
        assert!(start.elapsed() < Duration::from_secs(5));
        thread::sleep(Duration::from_millis(5));
    }
    let out = run_memleak(&args(&["-p", &pid.to_string(), "1", "1"]), Duration::from_secs(20));
    let _ = child.wait();
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert_eq!(
        err.trim_end(),
        format!("memleak: process {pid} (true) has exited: a zombie its parent has not reaped yet, with nothing left to trace")
    );
}

#[test]
fn a_second_ctrl_c_while_detaching_ends_memleak_at_once() {
    // System-wide, the kernel's tracepoints too: detaching took 0.3 s on
    // the machine this was written on, past the 0.2 s memleak waits
    // before it says so. A faster machine may never say it.
    let mut memleak = Memleak::start(&["1"]);
    memleak.line_starting("[");
    let pid = memleak.child.id();
    let mut stderr = memleak.child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut text = String::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf) {
            if n == 0 {
                break;
            }
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
            // The whole line: eprintln! writes its pieces one write(2)
            // each, so a read may end in the middle of it.
            if text.lines().any(|l| l.starts_with("memleak: detaching ") && l.ends_with(" probes...")) {
                let _ = tx.send(text.clone());
            }
        }
    });
    signal(pid, libc::SIGINT);
    // The last report comes first: system-wide on a loaded machine it took
    // 30 s once.
    let Ok(text) = rx.recv_timeout(Duration::from_secs(120)) else {
        // No word of detaching: it took less than the 0.2 s memleak waits
        // before it says so, and there is nothing to cut short.
        let _ = memleak.child.wait();
        return;
    };
    assert!(text.lines().any(|l| l.starts_with("memleak: detaching ") && l.ends_with(" probes...")), "{text}");
    // The child memleak detaches in, stopped: memleak must end without
    // waiting for it. (A time limit failed on a loaded machine, where
    // ending and detaching both slow down; an order of exits too, as the
    // child could finish first.)
    let detacher = children(pid);
    assert_eq!(detacher.len(), 1, "one detaching child: {detacher:?}");
    signal(detacher[0], libc::SIGSTOP);
    let start = Instant::now();
    signal(pid, libc::SIGINT);
    let ended = loop {
        if memleak.child.try_wait().unwrap().is_some() {
            break true;
        }
        if start.elapsed() > Duration::from_secs(10) {
            break false;
        }
        thread::sleep(Duration::from_millis(2));
    };
    signal(detacher[0], libc::SIGCONT);
    assert!(ended, "memleak still waiting for its detaching child 10 s after a second SIGINT");
}

/// The processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| {
            std::fs::read_to_string(format!("/proc/{child}/stat")).is_ok_and(|stat| {
                stat.rsplit_once(") ").and_then(|(_, rest)| rest.split(' ').nth(1)?.parse::<u32>().ok()) == Some(pid)
            })
        })
        .collect()
}
