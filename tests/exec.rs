//! A traced process that changes what it maps. dlclose: a library closed
//! before the first report keeps its frames' names (the last test).
//!
//! exec, a process that runs another program: what its old image
//! allocated died with the old address space, so only the new program's
//! leak may be reported, symbolized against the new program, and the user
//! is told once. `tests/fixtures/exec.c`: exec-old leaks 3 blocks of 1000
//! bytes from old_leak(), then execs exec-new, which leaks 5 blocks of
//! 3000 bytes from new_leak() <- new_path(). Both are built at fixed
//! addresses, so the old image's return addresses fall in the new one's
//! code: reported, they would read as calls of the new program.

use std::{
    io::{BufRead as _, BufReader, Read, Write as _},
    path::Path,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use memleak_tests::{Report, Running, Stack, fixture, memleak_bin, parse_reports, run_memleak, scenario::trace_scenario};

/// The new program's leak, exactly: 5 blocks of 3000 bytes from new_leak,
/// symbolized in `module`.
fn assert_new_leak(stack: &Stack, module: &str) {
    assert!(stack.starts_with(&["new_leak", "new_path", "main"]), "{stack:?}");
    assert!(stack.frames[0].contains(&format!("[{module}]")), "{stack:?}");
    assert_eq!((stack.bytes, stack.count), (15000, 5), "{stack:?}");
}

/// The one exec message memleak printed, which names `program`.
fn assert_told_once(stderr: &str, pid: u32, program: &Path) {
    let told: Vec<&str> = stderr.lines().filter(|l| l.contains(" exec'd ")).collect();
    assert_eq!(told, [format!("memleak: PID {pid} exec'd {}", program.display())], "{stderr}");
}

fn attached_pid(stdout: &str) -> u32 {
    let line = stdout.lines().find(|l| l.starts_with("Attaching to pid ")).expect(stdout);
    line["Attaching to pid ".len()..].split(' ').next().unwrap().parse().unwrap()
}

#[test]
fn after_exec_only_the_new_programs_leak_is_reported() {
    let new = fixture("exec-new");
    let new_path = new.to_str().unwrap();
    // --combined-only: the blocks' times are jiffies, and the old program
    // execs within one of its last malloc.
    for mode in [&[][..], &["--combined-only"]] {
        let mut memleak_args = vec!["-o", "0", "600"];
        memleak_args.extend_from_slice(mode);
        let traced = trace_scenario(&fixture("exec-old"), &[new_path, "wait"], &memleak_args, Duration::from_secs(60));
        let (stdout, stderr) = (&traced.stdout, &traced.stderr);
        assert!(traced.status.success(), "{mode:?} {:?}\n{stdout}\n{stderr}", traced.status);
        let reports = parse_reports(stdout);
        assert_eq!(reports.len(), 1, "{stdout}");
        let stacks = &reports[0].stacks;
        assert_eq!(stacks.len(), 1, "{mode:?}: the old program's blocks are still reported:\n{stdout}\n{stderr}");
        assert_new_leak(&stacks[0], "exec-new");
        assert_told_once(stderr, attached_pid(stdout), &new);
    }
}

/// A line-by-line reader of a child's output, kept whole for messages.
struct Lines {
    rx: mpsc::Receiver<String>,
    seen: String,
}

impl Lines {
    fn of(out: impl Read + Send + 'static) -> Self {
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Self { rx, seen: String::new() }
    }

    /// Waits (up to 30 s) for a line that starts with `prefix`.
    fn wait_for(&mut self, prefix: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.rx.recv_timeout(left) else { break };
            self.seen.push_str(&line);
            self.seen.push('\n');
            if line.starts_with(prefix) {
                return;
            }
        }
        panic!("no line starting with {prefix:?} in:\n{}", self.seen);
    }

    /// The rest, once the child closed it.
    fn rest(mut self) -> String {
        while let Ok(line) = self.rx.recv_timeout(Duration::from_secs(30)) {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        self.seen
    }
}

fn start(args: &[String]) -> (Child, Lines, Lines) {
    let mut tracer =
        Command::new(memleak_bin()).args(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let stdout = Lines::of(tracer.stdout.take().unwrap());
    let stderr = Lines::of(tracer.stderr.take().unwrap());
    (tracer, stdout, stderr)
}

/// SIGINT, then what it printed (its last report included).
fn stop(mut tracer: Child, stdout: Lines, stderr: Lines) -> (String, String) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let status = tracer.wait().unwrap();
    let (stdout, stderr) = (stdout.rest(), stderr.rest());
    assert!(status.success(), "{status:?}\n{stdout}\n{stderr}");
    (stdout, stderr)
}

fn fixture_waiting(args: &[&str]) -> (Running, std::process::ChildStdin, Lines) {
    let mut child = Command::new(fixture("exec-old"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdin = child.stdin.take().unwrap();
    let stdout = Lines::of(child.stdout.take().unwrap());
    (Running { child }, stdin, stdout)
}

fn strings(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_process_that_execs_a_static_program_gets_probes_in_it() {
    // The new program has its own malloc: memleak must put probes into it
    // (the old ones are on a libc it no longer maps), then report its leak.
    let new = fixture("exec-new-static");
    let (app, mut app_in, mut app_out) = fixture_waiting(&[new.to_str().unwrap(), "wait", "go"]);
    let pid = app.pid().to_string();
    let (tracer, mut stdout, mut stderr) = start(&strings(&["-p", &pid, "-o", "0", "1"]));
    stdout.wait_for("Attaching to pid");
    app_in.write_all(b"go\n").unwrap();
    stderr.wait_for(&format!("memleak: PID {pid} exec'd "));
    stderr.wait_for(&format!("memleak: probing {}: malloc free", new.display()));
    app_in.write_all(b"go\n").unwrap();
    app_out.wait_for("done");
    let (stdout, stderr) = stop(tracer, stdout, stderr);
    let reports = parse_reports(&stdout);
    let last = reports.last().expect(&stdout);
    assert_eq!(last.stacks.len(), 1, "{stdout}\n{stderr}");
    assert_new_leak(&last.stacks[0], "exec-new-static");
    assert_told_once(&stderr, app.pid(), &new);
}

#[test]
fn a_command_that_execs_another_program_is_told_and_traced_on() {
    let new = fixture("exec-new");
    let cmd = format!("{} {} nowait", fixture("exec-old").display(), new.display());
    let out = run_memleak(&strings(&["-o", "0", "-c", &cmd, "30"]), Duration::from_secs(30));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let reports = parse_reports(&stdout);
    let last = reports.last().expect(&stdout);
    let new_leak: Vec<&Stack> = last.stacks.iter().filter(|s| s.starts_with(&["new_leak"])).collect();
    assert_eq!(new_leak.len(), 1, "{stdout}");
    assert_new_leak(new_leak[0], "exec-new");
    // The old program's 3 blocks of 1000 bytes, under whatever name.
    assert!(!last.stacks.iter().any(|s| s.bytes == 3000 || s.starts_with(&["old_leak"])), "{stdout}");
    let pid: u32 = stdout
        .lines()
        .find_map(|l| l.split_once("(pid ")?.1.split(')').next()?.parse().ok())
        .expect(&stdout);
    assert_told_once(&stderr, pid, &new);
}

fn of_process<'a>(report: &'a Report, pid: u32) -> Vec<&'a Stack> {
    let prefix = format!("{pid} ");
    report.stacks.iter().filter(|s| s.process.as_deref().is_some_and(|p| p.starts_with(&prefix))).collect()
}

#[test]
fn system_wide_a_process_that_execs_leaves_no_phantom_leak() {
    let new = fixture("exec-new");
    let (app, mut app_in, mut app_out) = fixture_waiting(&[new.to_str().unwrap(), "wait"]);
    let (tracer, mut stdout, stderr) = start(&strings(&["--user-only", "--top-procs", "1000", "-o", "0", "1"]));
    stdout.wait_for("Tracing all processes");
    app_in.write_all(b"go\n").unwrap();
    app_out.wait_for("done");
    // Two reports after the exec: one judged the new program's mappings.
    stdout.wait_for("[");
    stdout.wait_for("[");
    let (stdout, stderr) = stop(tracer, stdout, stderr);
    let reports = parse_reports(&stdout);
    let last = reports.last().expect(&stdout);
    let stacks = of_process(last, app.pid());
    assert_eq!(stacks.len(), 1, "the old program's blocks are still reported: {stacks:?}\n{stderr}");
    assert_new_leak(stacks[0], "exec-new");
    // Said with -v only: a machine execs all the time.
    assert!(!stderr.contains(" exec'd "), "{stderr}");
}

#[test]
fn a_library_closed_before_the_first_report_keeps_its_names() {
    // tests/fixtures/dlclose.c opens libplugin.so, whose plugin_leak()
    // leaks 4 blocks of 2000 bytes, and closes it 300 ms later: memleak
    // reads the mappings when dlopen returns (0.15 to 6.5 ms later in 10
    // runs, on 2 busy CPUs), long before the only report, at the end.
    let lib = fixture("libplugin.so");
    let traced =
        trace_scenario(&fixture("dlclose"), &[lib.to_str().unwrap(), "300"], &["-o", "0", "600"], Duration::from_secs(60));
    let (stdout, stderr) = (&traced.stdout, &traced.stderr);
    assert!(traced.status.success(), "{:?}\n{stdout}\n{stderr}", traced.status);
    let reports = parse_reports(stdout);
    assert_eq!(reports.len(), 1, "{stdout}");
    let plugin: Vec<&Stack> = reports[0].stacks.iter().filter(|s| s.bytes == 8000).collect();
    assert_eq!(plugin.len(), 1, "{stdout}\n{stderr}");
    let stack = plugin[0];
    assert!(stack.starts_with(&["plugin_leak", "plugin_entry", "main"]), "{stdout}\n{stderr}");
    assert!(stack.frames[0].contains("[libplugin.so] fixtures/plugin.c:"), "{stack:?}");
    assert_eq!(stack.count, 4, "{stack:?}");
    assert!(!stdout.contains("unmapped"), "{stdout}");
}
