//! Clean attach and detach, and a tracer that stays flat and on time.

use std::{
    fs,
    io::Write as _,
    os::unix::fs::FileExt as _,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use memleak_tests::{Running, fixture, memleak_bin, parse_reports, run_memleak};

/// The address of malloc in process `pid`: the same file offset in its libc
/// as in ours (both run the host's libc).
fn malloc_in(pid: u32) -> u64 {
    let libc_base = |maps: &str| -> (u64, String) {
        let line = maps.lines().find(|l| l.contains("/libc.so.6") && l.split_whitespace().nth(2) == Some("00000000")).unwrap();
        let start = u64::from_str_radix(line.split('-').next().unwrap(), 16).unwrap();
        (start, line.split_whitespace().last().unwrap().to_string())
    };
    let (ours, our_path) = libc_base(&fs::read_to_string("/proc/self/maps").unwrap());
    let (theirs, their_path) = libc_base(&fs::read_to_string(format!("/proc/{pid}/maps")).unwrap());
    assert_eq!(our_path, their_path);
    libc::malloc as *const () as u64 - ours + theirs
}

fn first_byte(pid: u32, addr: u64) -> u8 {
    let mem = fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut byte = [0u8];
    mem.read_exact_at(&mut byte, addr).unwrap();
    byte[0]
}

const INT3: u8 = 0xcc;

#[test]
fn probes_are_in_while_tracing_and_gone_after() {
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    thread::sleep(Duration::from_millis(100));
    let addr = malloc_in(app.pid());
    let original = first_byte(app.pid(), addr);
    assert_ne!(original, INT3, "malloc is probed before memleak runs");

    let mut tracer = Command::new(memleak_bin())
        .args(["-p", &app.pid().to_string(), "1", "2"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while first_byte(app.pid(), addr) != INT3 {
        assert!(start.elapsed() < Duration::from_secs(10), "malloc never got its uprobe");
        thread::sleep(Duration::from_millis(20));
    }
    assert!(tracer.wait().unwrap().success());
    assert_eq!(first_byte(app.pid(), addr), original, "a uprobe is left in malloc after memleak exited");
}

/// None once the process has exited (a zombie has no VmRSS).
fn rss_kib(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn sixty_second_soak_at_high_churn_stays_flat_and_on_time() {
    let mut app = Command::new(fixture("exact"))
        .args(["threads", "2", "1000000000"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    app.stdin.take().unwrap().write_all(b"go\n").unwrap();
    let app = Running { child: app };

    let tracer = Command::new(memleak_bin())
        .args(["-p", &app.pid().to_string(), "1", "60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let rss_at = |secs| {
        thread::sleep(started + Duration::from_secs(secs) - Instant::now());
        rss_kib(tracer.id())
    };
    let (early, late) = (rss_at(10), rss_at(57));
    let out = tracer.wait_with_output().unwrap();
    let (Some(early), Some(late)) = (early, late) else {
        panic!("memleak ended early ({:?}): {}", out.status, String::from_utf8_lossy(&out.stderr));
    };
    let elapsed = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(parse_reports(&stdout).len(), 60);
    // Load, attach, 60 intervals and detach (~0.1 s per probe): falling
    // behind would show as more.
    assert!(elapsed < Duration::from_secs(66), "60 one-second reports took {elapsed:?}");
    assert!(late * 10 <= early * 11, "RSS grew from {early} KiB at 10 s to {late} KiB at 57 s");
}

#[test]
fn library_without_malloc_is_refused() {
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    thread::sleep(Duration::from_millis(100));
    let out = run_memleak(
        &["-p".into(), app.pid().to_string(), "-O".into(), "ld-linux-x86-64.so.2".into()],
        Duration::from_secs(10),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("does not define malloc"), "{stderr}");
}
