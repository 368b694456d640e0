//! The stack table on a busy machine: stacks whose blocks were all freed
//! are given back, so short-lived processes with thousands of stacks each
//! never fill it. Real probes, system-wide: run as root.
//!
//! The fixture is linked statically and traced with `-O` (its own malloc):
//! system-wide, yet only its processes are counted. Other programs on a
//! loaded machine (a Rust build, without frame pointers: a new stack for
//! almost every allocation) would otherwise fill the table on their own.

use std::{
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use memleak_tests::{fixture, memleak_bin};

/// The leaker: `leak N`, once it has leaked; stdin closed ends it.
fn leaker(blocks: u32) -> Child {
    let mut child = Command::new(fixture("stacks-static"))
        .args(["leak", &blocks.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "leaked\n");
    child
}

#[test]
fn short_lived_processes_with_thousands_of_stacks_never_fill_the_table() {
    // System-wide with the default sizes, JSON reports every 2 s.
    let program = fixture("stacks-static");
    let tracer = Command::new(memleak_bin())
        .args(["--user-only", "-O", program.to_str().unwrap(), "--format", "json", "-v", "2", "34"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_secs(3));
    let mut leak = leaker(3);
    // 200 processes over about 60 s, two at a time, each with 2,048
    // stacks (2^11 paths) of malloc + free, 3 rounds; with ASLR each
    // process's stacks are its own: 409,600 stacks in all, six times
    // what the table holds.
    let start = Instant::now();
    let mut churners: Vec<Child> = Vec::new();
    for i in 0..200u32 {
        let due = Duration::from_millis(300 * u64::from(i));
        if let Some(wait) = due.checked_sub(start.elapsed()) {
            thread::sleep(wait);
        }
        churners.retain_mut(|c| c.try_wait().unwrap().is_none());
        while churners.len() >= 2 {
            thread::sleep(Duration::from_millis(20));
            churners.retain_mut(|c| c.try_wait().unwrap().is_none());
        }
        churners.push(Command::new(&program).args(["churn", "11", "3"]).spawn().unwrap());
    }
    for mut c in churners {
        assert!(c.wait().unwrap().success());
    }
    let out = tracer.wait_with_output().unwrap();
    drop(leak.stdin.take());
    let _ = leak.wait();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let reports: Vec<serde_json::Value> = stdout.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(reports.len() >= 30, "{} reports\n{stderr}", reports.len());
    let lost: Vec<(u64, u64)> = reports.iter().map(|r| (r["lost"]["stacks_unrecorded"].as_u64().unwrap(), r["lost"]["totals_missed"].as_u64().unwrap())).collect();
    eprintln!("lost per report (stacks, totals): {lost:?}");
    for r in &reports {
        let lost = &r["lost"];
        assert_eq!(lost["stacks_unrecorded"], 0, "report {}: allocations without a stack\n{stderr}", r["report"]);
        assert_eq!(lost["totals_missed"], 0, "report {}\n{stderr}", r["report"]);
    }
    // "memleak: gave back 4096 totals entries and 2048 stacks; 9120 stacks in use of 65536 (13.9%)"
    let given: u64 = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("memleak: gave back ")?.split(" and ").nth(1)?.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(given >= 200 * 2048 * 9 / 10, "stacks given back: {given}\n{stderr}");
    // The leak among them, with its whole stack, in the last report.
    let last = reports.last().unwrap();
    let process = last["processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["pid"] == leak.id())
        .unwrap_or_else(|| panic!("the leaker in the last report: {last}"));
    let stack = &process["stacks"][0];
    assert_eq!((stack["bytes"].as_u64(), stack["count"].as_u64()), (Some(3 * 4242), Some(3)), "{process}");
    let names: Vec<&str> = stack["frames"].as_array().unwrap().iter().filter_map(|f| f["symbol"].as_str()).collect();
    assert!(names.starts_with(&["leak_here", "leak_path", "main"]), "{names:?}");
}
