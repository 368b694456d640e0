//! Debug files from a debuginfod server: a stripped program whose debug
//! file is installed nowhere is named once elfutils' debuginfod (Debian's,
//! unpacked by `cargo xtask setup`) serves it on 127.0.0.1, and a server
//! that cannot be reached, or never answers, neither holds up a report nor
//! is told about more than once.

use std::{
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use memleak_tests::{Report, Running, build_id, fixture, memleak_bin, parse_reports};

/// elfutils' debuginfod, serving the ELF/DWARF files under `dir` on a
/// port of 127.0.0.1's; killed when dropped.
struct Debuginfod {
    child: Child,
    port: u16,
}

impl Debuginfod {
    /// Started, and ready: it serves build `id`'s debug file.
    fn serve(dir: &Path, id: &str) -> Self {
        let bin = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debuginfod/usr/bin/debuginfod");
        assert!(bin.exists(), "{} is missing: run `cargo xtask setup`", bin.display());
        // A free port: taken, then given to debuginfod.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let db = dir.with_extension("sqlite");
        let _ = std::fs::remove_file(&db);
        let log = std::fs::File::create(dir.with_extension("log")).unwrap();
        let child = Command::new(bin)
            .args(["-F", "-t", "0", "-g", "0", "-p", &port.to_string(), "-d"])
            .arg(&db)
            .arg(dir)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start debuginfod");
        let server = Self { child, port };
        let started = Instant::now();
        while get(port, &format!("/buildid/{id}/debuginfo")) != Some(200) {
            assert!(started.elapsed() < Duration::from_secs(60), "debuginfod never served {id}; see {}", dir.with_extension("log").display());
            thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Debuginfod {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The status of `GET path` on 127.0.0.1:port, if it answers.
fn get(port: u16, path: &str) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).ok()?;
    String::from_utf8_lossy(&head[9..12]).parse().ok()
}

/// memleak with `args` and `env` (DEBUGINFOD_* removed first), killed past
/// `limit`; its output and how long it ran.
fn memleak(args: &[&str], env: &[(&str, String)], limit: Duration) -> (Output, Duration) {
    let mut command = Command::new(memleak_bin());
    for name in ["DEBUGINFOD_URLS", "DEBUGINFOD_CACHE_PATH", "DEBUGINFOD_TIMEOUT"] {
        command.env_remove(name);
    }
    let started = Instant::now();
    let mut child = command.args(args).envs(env.iter().map(|(k, v)| (k, v))).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("memleak {args:?} ran past {limit:?}\n{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        thread::sleep(Duration::from_millis(20));
    }
    (child.wait_with_output().unwrap(), started.elapsed())
}

fn cache_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memleak-debuginfod-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn named(report: &Report) -> bool {
    report.stacks.iter().any(|s| s.starts_with(&["fibonacci", "child"]) && s.frames[0].contains("fibonacci.c:"))
}

#[test]
fn a_stripped_program_is_named_from_a_debuginfod_server() {
    // No symbol table, no debuglink, and no debug file on this machine:
    // only its build id names its debug file, which only the server has.
    let app = fixture("fibonacci-stripped");
    let id = build_id(&app);
    let installed = format!("/usr/lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]);
    assert!(!Path::new(&installed).exists(), "{installed} exists: the test would prove nothing");
    let debug = std::fs::read(app.with_extension("debug")).unwrap();
    let served = cache_dir("served");
    std::fs::create_dir_all(&served).unwrap();
    std::fs::write(served.join("fibonacci-stripped.debug"), &debug).unwrap();
    let server = Debuginfod::serve(&served, &id);
    let target = Running::spawn(&app, &["100"]);
    let pid = target.pid().to_string();
    let args = ["-p", &pid, "1", "3"];

    // Without a server: offsets only.
    let (out, _) = memleak(&args, &[], Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 3, "{stdout}");
    assert!(!reports.iter().any(named), "named without its debug file?\n{stdout}");

    let cache = cache_dir("named");
    let env = [("DEBUGINFOD_URLS", server.url()), ("DEBUGINFOD_CACHE_PATH", cache.display().to_string())];
    let (out, _) = memleak(&args, &env, Duration::from_secs(30));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 3, "{stdout}");
    // Fetched while tracing, never waited for: named by the last report.
    assert!(named(reports.last().unwrap()), "not named from the server's file:\n{stdout}\n{stderr}");
    let leak = reports.last().unwrap().stacks.iter().find(|s| s.starts_with(&["fibonacci", "child"])).unwrap();
    assert_eq!(leak.bytes, 8192 * leak.count, "{leak:?}");
    assert!(!stderr.contains("warning"), "{stderr}");
    // Kept where elfutils' client keeps it: the next run needs no server.
    assert_eq!(std::fs::read(cache.join(&id).join("debuginfo")).unwrap(), debug);
    let (out, _) = memleak(&args, &[("DEBUGINFOD_URLS", "http://127.0.0.1:9".into()), env[1].clone()], Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(named(&parse_reports(&stdout)[0]), "the cached file names the first report:\n{stdout}");
    drop(server);
    let _ = std::fs::remove_dir_all(&cache);
    let _ = std::fs::remove_dir_all(&served);
}

#[test]
fn a_server_that_is_down_or_silent_holds_up_no_report_and_is_told_once() {
    // One port that refuses, one server that accepts and never answers.
    let refused = TcpListener::bind("127.0.0.1:0").unwrap();
    let refused_url = format!("http://127.0.0.1:{}", refused.local_addr().unwrap().port());
    drop(refused);
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_url = format!("http://127.0.0.1:{}", silent.local_addr().unwrap().port());
    let held = Arc::new(Mutex::new(Vec::new()));
    let holder = held.clone();
    thread::spawn(move || {
        for stream in silent.incoming().flatten() {
            holder.lock().unwrap().push(stream);
        }
    });
    let target = Running::spawn(fixture("fibonacci-stripped"), &["100"]);
    let pid = target.pid().to_string();
    let cache = cache_dir("down");
    let env = [
        ("DEBUGINFOD_URLS", format!("{refused_url} {silent_url}")),
        ("DEBUGINFOD_CACHE_PATH", cache.display().to_string()),
        ("DEBUGINFOD_TIMEOUT", "60".to_string()),
    ];
    let (out, took) = memleak(&["-p", &pid, "1", "3"], &env, Duration::from_secs(50));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_eq!(parse_reports(&stdout).len(), 3, "{stdout}");
    // Three 1 s reports, while the silent server holds a fetch for 60 s.
    assert!(took < Duration::from_secs(15), "took {took:?}: a report waited for the network\n{stderr}");
    assert!(!held.lock().unwrap().is_empty(), "the silent server was never asked");
    let told: Vec<&str> = stderr.lines().filter(|l| l.contains(&refused_url)).collect();
    assert_eq!(told.len(), 1, "{stderr}");
    assert!(told[0].starts_with("memleak: warning: debuginfod server") && told[0].contains("cannot be reached"), "{stderr}");
    let _ = std::fs::remove_dir_all(&cache);
}
