//! Runs one scenario of the `exact` fixture under memleak, in order:
//! attach first, then the scenario, then one report on SIGINT. No timing
//! guesses: the fixture waits for a line on stdin and says "done".

use std::{
    io::{BufRead, BufReader, Read, Write},
    path::Path,
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::Duration,
};

use crate::{Running, memleak_bin};

pub struct Traced {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    /// What the fixture printed before "done".
    pub fixture_lines: Vec<String>,
}

/// Traces `fixture ARGS` with `memleak -p PID MEMLEAK_ARGS`, which should
/// have a long interval: the report that counts is the one printed on SIGINT.
pub fn trace_scenario(fixture: &Path, args: &[&str], memleak_args: &[&str], limit: Duration) -> Traced {
    trace_scenario_env(fixture, &[], args, memleak_args, limit)
}

/// `trace_scenario` with `env` added to the fixture's environment.
pub fn trace_scenario_env(
    fixture: &Path,
    env: &[(&str, &str)],
    args: &[&str],
    memleak_args: &[&str],
    limit: Duration,
) -> Traced {
    let mut fixture = Waiting::start(fixture, env, args);
    let pid = fixture.pid().to_string();

    let mut tracer = Command::new(memleak_bin())
        .args(["-p", &pid])
        .args(memleak_args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start memleak");
    let (attached_tx, attached_rx) = mpsc::channel();
    let stdout = read_lines(tracer.stdout.take().unwrap(), Some(("Attaching", attached_tx.clone())));
    // With --format json, stdout holds JSON only: the line is on stderr.
    let stderr = read_lines(tracer.stderr.take().unwrap(), Some(("memleak: Attaching", attached_tx)));

    let finish = |tracer: &mut Child| {
        let _ = tracer.kill();
        let _ = tracer.wait();
    };
    if attached_rx.recv_timeout(Duration::from_secs(20)).is_err() {
        finish(&mut tracer);
        panic!("memleak did not attach:\n{}\n{}", stdout.join().unwrap(), stderr.join().unwrap());
    }
    let Some(fixture_lines) = fixture.run(limit) else {
        finish(&mut tracer);
        panic!("fixture {args:?} did not finish within {limit:?}");
    };
    // SAFETY: signalling our own child.
    unsafe { libc::kill(tracer.id() as i32, libc::SIGINT) };
    let status = wait_limited(&mut tracer, Duration::from_secs(30));
    drop(fixture);
    Traced { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap(), fixture_lines }
}

/// The `exact` fixture, started and waiting for its line on stdin.
pub struct Waiting {
    app: Running,
    stdin: ChildStdin,
    stdout: Option<BufReader<ChildStdout>>,
}

impl Waiting {
    /// Starts `fixture ARGS` (with `env` added) and waits until it reads stdin.
    pub fn start(fixture: &Path, env: &[(&str, &str)], args: &[&str]) -> Self {
        let mut app = Command::new(fixture)
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start fixture");
        let stdin = app.stdin.take().unwrap();
        let stdout = Some(BufReader::new(app.stdout.take().unwrap()));
        let app = Running { child: app };
        wait_until_blocked(app.pid());
        Self { app, stdin, stdout }
    }

    pub fn pid(&self) -> u32 {
        self.app.pid()
    }

    /// Runs the scenario; what it printed before "done", or None if it
    /// did not say "done" within `limit`.
    pub fn run(&mut self, limit: Duration) -> Option<Vec<String>> {
        self.stdin.write_all(b"go\n").unwrap();
        let (done_tx, done_rx) = mpsc::channel();
        let out = self.stdout.take().expect("a scenario runs once");
        thread::spawn(move || {
            let mut before = Vec::new();
            for line in out.lines().map_while(Result::ok) {
                if line == "done" {
                    let _ = done_tx.send(std::mem::take(&mut before));
                } else {
                    before.push(line);
                }
            }
        });
        done_rx.recv_timeout(limit).ok()
    }
}

/// Waits until the fixture sleeps (in its read of stdin): its libraries are
/// all mapped by then, so what memleak reads in /proc/PID/maps is complete.
fn wait_until_blocked(pid: u32) {
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").and_then(|(_, rest)| rest.chars().next());
        if state == Some('S') {
            return;
        }
        thread::sleep(Duration::from_millis(5));
    }
    panic!("fixture {pid} never waited for input");
}

fn wait_limited(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("memleak did not exit within {limit:?} of SIGINT");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Collects a stream; signals once when a line starts with the marker.
pub fn read_lines(
    stream: impl Read + Send + 'static,
    mut marker: Option<(&'static str, mpsc::Sender<()>)>,
) -> thread::JoinHandle<String> {
    thread::spawn(move || {
        let mut all = String::new();
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            if let Some((prefix, tx)) = &marker
                && line.starts_with(prefix)
            {
                let _ = tx.send(());
                marker = None;
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    })
}
