//! `memleak -p PID` against the real fixtures, with real probes: run as root.

use std::{thread, time::Duration};

use memleak_tests::{Report, Running, Stack, fixture, parse_reports, run_memleak};

const BLOCK: u64 = 8192; // calloc(1024, sizeof(long long))

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn leak_stack(report: &Report) -> Option<&Stack> {
    report.stacks.iter().find(|s| s.starts_with(&["fibonacci", "child"]))
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn leak_is_attributed_to_fibonacci_from_child_with_exact_sizes() {
    // One leaked block every 100 ms.
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    thread::sleep(Duration::from_millis(200));
    let pid = app.pid().to_string();
    let out = run_memleak(&args(&["-p", &pid, "-a", "1", "3"]), Duration::from_secs(30));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    assert!(stdout.starts_with(&format!("Attaching to pid {pid} (fibonacci)")), "{stdout}");
    assert!(!stdout.contains("[unknown]"), "{stdout}");

    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 3, "{stdout}");
    let mut counts = vec![];
    for report in &reports {
        let stack = leak_stack(report).unwrap_or_else(|| panic!("no fibonacci <- child stack:\n{stdout}"));
        assert_eq!(stack.bytes, BLOCK * stack.count, "{stack:?}");
        assert_eq!(stack.blocks.len() as u64, stack.count, "one -a line per allocation: {stack:?}");
        assert!(stack.blocks.iter().all(|&(addr, size)| size == BLOCK && addr != 0), "{stack:?}");
        assert!(stack.frames[0].contains("[fibonacci] fixtures/fibonacci.c:"), "{stack:?}");
        // Nothing else in the fixture leaks.
        assert_eq!(report.stacks.len(), 1, "{stdout}");
        counts.push(stack.count);
    }
    // Allocations older than -o 500 ms, made since attach: about 5 after the
    // first second, then 10 more per second.
    assert!((2..=8).contains(&counts[0]), "{counts:?}");
    for pair in counts.windows(2) {
        assert!((6..=14).contains(&(pair[1] - pair[0])), "growth per 1 s interval at 10/s: {counts:?}");
    }
    // Blocks seen once stay listed (never freed).
    let first: Vec<_> = leak_stack(&reports[0]).unwrap().blocks.clone();
    let last = &leak_stack(&reports[2]).unwrap().blocks;
    assert!(first.iter().all(|b| last.contains(b)), "{first:?} not all in {last:?}");
}

#[test]
fn fixed_twin_has_no_outstanding_allocations() {
    let app = Running::spawn(fixture("fibonacci-fixed"), &["50"]);
    thread::sleep(Duration::from_millis(200));
    let out = run_memleak(&args(&["-p", &app.pid().to_string(), "-a", "1", "2"]), Duration::from_secs(20));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 2, "{stdout}");
    assert!(reports.iter().all(|r| r.stacks.is_empty()), "{stdout}");
}

#[test]
fn combined_only_totals_match_the_leak() {
    let app = Running::spawn(fixture("fibonacci"), &["50"]);
    thread::sleep(Duration::from_millis(200));
    let out = run_memleak(&args(&["-p", &app.pid().to_string(), "--combined-only", "1", "2"]), Duration::from_secs(20));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 2, "{stdout}");
    let counts: Vec<u64> = reports.iter().map(|r| leak_stack(r).expect(&stdout).count).collect();
    for r in &reports {
        let s = leak_stack(r).unwrap();
        assert_eq!(s.bytes, BLOCK * s.count);
    }
    // No age filter here: every block since attach, 20 per second.
    assert!((12..=28).contains(&counts[0]) && (12..=28).contains(&(counts[1] - counts[0])), "{counts:?}");
}

#[test]
fn target_exit_ends_the_trace_with_a_symbolized_last_report() {
    // 20 allocations, 100 ms apart, then the fixture exits: long enough
    // for memleak to attach on a loaded machine.
    let app = Running::spawn(fixture("fibonacci"), &["100", "20"]);
    let pid = app.pid().to_string();
    let out = run_memleak(&args(&["-p", &pid, "-o", "0", "5"]), Duration::from_secs(15));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    assert!(stderr.contains(&format!("process {pid} (fibonacci) exited")), "{stderr}");
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 1, "exits before the first 5 s interval:\n{stdout}");
    let stack = leak_stack(&reports[0]).unwrap_or_else(|| panic!("{stdout}"));
    // The first calls may come before the probes are in.
    assert!((10..=20).contains(&stack.count), "{stack:?}");
    assert_eq!(stack.bytes, BLOCK * stack.count);
}

#[test]
fn sigint_prints_a_last_report_and_exits_zero() {
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    let pid = app.pid().to_string();
    let child = std::process::Command::new(memleak_tests::memleak_bin())
        .args(["-p", &pid, "-o", "0", "60"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{:?}\n{stdout}\n{}", out.status, text(&out.stderr));
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 1, "{stdout}");
    assert!(leak_stack(&reports[0]).is_some_and(|s| s.count >= 5), "{stdout}");
}

#[test]
fn verbose_says_where_each_probe_went_and_how_long_each_report_took() {
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    thread::sleep(Duration::from_millis(200));
    let pid = app.pid().to_string();
    let out = run_memleak(&args(&["-p", &pid, "-v", "1", "3"]), Duration::from_secs(30));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    for function in ["malloc", "free"] {
        assert!(stderr.contains(&format!("memleak:   {function} at file offset 0x")), "{stderr}");
    }
    // Reports 1 and 2 come on ticks; the third is the last, at exit.
    let reports = parse_reports(&stdout);
    for (n, report) in reports.iter().take(2).enumerate() {
        let prefix = format!("memleak: report {} took ", n + 1);
        let line = stderr.lines().find(|l| l.starts_with(&prefix)).unwrap_or_else(|| panic!("{stderr}"));
        let (secs, read) = line[prefix.len()..].split_once(" s (").expect(line);
        assert!(secs.parse::<f64>().is_ok_and(|s| s > 0.0 && s < 1.0), "{line}");
        let read: u64 = read.split_whitespace().next().unwrap().parse().expect(line);
        // Every outstanding block is read, old enough to count or not.
        let counted: u64 = report.stacks.iter().map(|s| s.count).sum();
        assert!(read >= counted && counted > 0, "{line}\n{stdout}");
    }
}
