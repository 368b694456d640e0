//! Which threads leaked (the seeds' case study 004, where `top -H` showed
//! six `handler` threads): each stack's threads, and `--by-thread`,
//! against the `threads` fixture with real probes: run as root.

use std::time::Duration;

use memleak_tests::{fixture, parse_reports, scenario::trace_scenario};

/// threads.c's block sizes.
const BLOCK: u64 = 96;
const GONE_SIZE: u64 = 64;

/// A thread of the fixture, as it printed itself: name, tid, blocks it
/// leaked (io: pairs it made, none leaked).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Worker {
    name: String,
    tid: u64,
    blocks: u64,
}

/// Traces the fixture with `-o 0` and `memleak_args`; memleak's stdout
/// (the SIGINT report) and the fixture's threads.
fn trace(memleak_args: &[&str]) -> (String, Vec<Worker>) {
    let mut all = vec!["-o", "0"];
    all.extend_from_slice(memleak_args);
    all.push("600"); // the SIGINT report is the one that counts
    let traced = trace_scenario(&fixture("threads"), &[], &all, Duration::from_secs(60));
    assert!(traced.status.success(), "{:?}\n{}\n{}", traced.status, traced.stdout, traced.stderr);
    let workers: Vec<Worker> = traced
        .fixture_lines
        .iter()
        .map(|line| {
            let w: Vec<&str> = line.split(' ').collect();
            Worker { name: w[0].into(), tid: w[1].parse().unwrap(), blocks: w[2].parse().unwrap() }
        })
        .collect();
    assert_eq!(workers.len(), 9, "{:?}", traced.fixture_lines);
    (traced.stdout, workers)
}

fn named<'a>(workers: &'a [Worker], name: &str) -> Vec<&'a Worker> {
    workers.iter().filter(|w| w.name == name).collect()
}

#[test]
fn each_stack_says_which_threads_allocated_its_blocks() {
    let (stdout, workers) = trace(&[]);
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 1, "{stdout}");
    let stack = reports[0].stacks.iter().find(|s| s.starts_with(&["leak_request", "handler"]));
    let stack = stack.unwrap_or_else(|| panic!("no leak_request stack: {stdout}"));
    // 8 + 9 + ... + 13 blocks, all from the six handlers.
    let leaked: u64 = named(&workers, "handler").iter().map(|w| w.blocks).sum();
    assert_eq!(leaked, 63);
    assert_eq!((stack.count, stack.bytes), (leaked, leaked * BLOCK), "{stdout}");
    assert_eq!(stack.threads.as_deref(), Some("handler x6 (63 blocks, 6048 B)"), "{stdout}");
    // The thread that leaked, then exited before the report: no name to
    // read any more, and none seen by an earlier report.
    let gone = reports[0].stacks.iter().find(|s| s.starts_with(&["leak_and_exit", "gone"])).expect("gone's stack");
    assert_eq!(gone.threads.as_deref(), Some("[exited] x1 (3 blocks, 192 B)"), "{stdout}");
    // The io threads freed all they allocated: no stack of theirs.
    assert!(!stdout.contains("io x"), "{stdout}");
}

#[test]
fn json_lists_each_thread_with_its_tid_name_blocks_and_bytes() {
    let (stdout, workers) = trace(&["--format", "json", "--by-thread"]);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let process = &report["processes"][0];
    let stacks = process["stacks"].as_array().unwrap();
    let stack = |symbol: &str| {
        stacks.iter().find(|s| s["frames"][0]["symbol"] == symbol).unwrap_or_else(|| panic!("no {symbol} stack: {stdout}"))
    };
    // Most blocks first: handler 5 (13 blocks) to handler 0 (8).
    let mut handlers = named(&workers, "handler");
    handlers.reverse();
    let expected: Vec<serde_json::Value> = handlers
        .iter()
        .map(|w| serde_json::json!({"tid": w.tid, "comm": "handler", "count": w.blocks, "bytes": w.blocks * BLOCK}))
        .collect();
    assert_eq!(stack("leak_request")["threads"], serde_json::json!(expected), "{stdout}");
    let gone = named(&workers, "gone")[0];
    assert_eq!(
        stack("leak_and_exit")["threads"],
        serde_json::json!([{"tid": gone.tid, "comm": null, "count": 3, "bytes": 3 * GONE_SIZE}]),
        "{stdout}"
    );
    // --by-thread: handler holds all of the handlers' stack, io nothing
    // (its two threads listed, alive), the exited thread its three blocks.
    let groups = process["by_thread"].as_array().unwrap();
    let group = |comm: serde_json::Value| {
        groups.iter().find(|g| g["comm"] == comm).unwrap_or_else(|| panic!("no {comm} group: {stdout}")).clone()
    };
    let tids = |name: &str| named(&workers, name).iter().map(|w| w.tid).collect::<Vec<_>>();
    assert_eq!(
        group("handler".into()),
        serde_json::json!({"comm": "handler", "threads": 6, "tids": tids("handler"), "bytes": 63 * BLOCK, "count": 63})
    );
    assert_eq!(group("io".into()), serde_json::json!({"comm": "io", "threads": 2, "tids": tids("io"), "bytes": 0, "count": 0}));
    assert_eq!(
        group(serde_json::Value::Null),
        serde_json::json!({"comm": null, "threads": 1, "tids": [gone.tid], "bytes": 3 * GONE_SIZE, "count": 3})
    );
    // No thread name holds anything else of the fixture's stacks.
    let counted: u64 = groups.iter().map(|g| g["count"].as_u64().unwrap()).sum();
    assert_eq!(counted, process["count"].as_u64().unwrap(), "{stdout}");
}

#[test]
fn by_thread_groups_the_report_by_thread_name() {
    let (stdout, _) = trace(&["--by-thread"]);
    let lines: Vec<&str> = stdout.lines().collect();
    let header = |name: &str| {
        lines.iter().position(|l| l.starts_with(&format!("{name}: "))).unwrap_or_else(|| panic!("no {name} group: {stdout}"))
    };
    assert!(lines.iter().any(|l| l.ends_with("] Top 10 stacks with outstanding allocations, by thread:")), "{stdout}");
    // handler: all of its stack's blocks, which no other thread holds (no
    // "of its ..." in the parenthesis), then its frames.
    let h = header("handler x6");
    assert_eq!(lines[h], "handler x6: 6048 bytes in 63 allocations", "{stdout}");
    assert!(lines[h + 1].starts_with("    6048 bytes in 63 allocations from stack via malloc  (+6048 B since last, "), "{stdout}");
    assert!(lines[h + 2].trim_start().starts_with("leak_request+"), "{stdout}");
    assert!(lines[h + 3].trim_start().starts_with("handler+"), "{stdout}");
    assert_eq!(lines[header("io x2")], "io x2: 0 bytes in 0 allocations", "{stdout}");
    let g = header("[exited] x1");
    assert_eq!(lines[g], "[exited] x1: 192 bytes in 3 allocations", "{stdout}");
    assert!(lines[g + 2].trim_start().starts_with("leak_and_exit+"), "{stdout}");
    // Biggest first: handler's 6048 bytes before the exited thread's 192.
    assert!(h < g, "{stdout}");
    // The io threads' allocations were all freed: no stack under them.
    let io = header("io x2");
    assert!(lines.get(io + 1).is_none_or(|l| !l.starts_with(' ')), "{stdout}");
}
