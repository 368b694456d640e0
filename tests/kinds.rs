//! The hooked function that made each stack's blocks (its "kind"): on the
//! text line, in JSON, as a pprof label and a folded leaf; direct mappings
//! reported after the heap; and blocks past a full stack table still
//! attributed to their process and function. Real probes on the `exact`
//! fixture, exact bytes: run as root.

use std::time::Duration;

use memleak_tests::{Report, Stack, fixture, parse_reports, pprof, scenario::trace_scenario};

/// The SIGINT report of `exact ARGS` traced with `memleak -p PID ARGS`.
fn trace(args: &[&str], memleak_args: &[&str]) -> (String, String) {
    let mut all = vec!["-o", "0", "-T", "5000"];
    all.extend_from_slice(memleak_args);
    all.push("600");
    let traced = trace_scenario(&fixture("exact"), args, &all, Duration::from_secs(120));
    assert!(traced.status.success(), "{:?}\n{}\n{}", traced.status, traced.stdout, traced.stderr);
    (traced.stdout, traced.stderr)
}

fn one_report(stdout: &str) -> Report {
    let mut reports = parse_reports(stdout);
    assert_eq!(reports.len(), 1, "{stdout}");
    reports.pop().unwrap()
}

/// (kind, bytes, count) of each stack, in the report's order.
fn rows(stacks: &[&Stack]) -> Vec<(String, u64, u64)> {
    stacks.iter().map(|s| (s.kind.clone().unwrap_or_default(), s.bytes, s.count)).collect()
}

fn page() -> u64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

#[test]
fn heap_first_then_direct_mappings_each_with_its_function() {
    let dir = std::env::temp_dir().join(format!("memleak-kinds-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (folded, profile) = (dir.join("kinds.folded"), dir.join("kinds.pb.gz"));
    let (stdout, stderr) =
        trace(&["kinds"], &["--folded", folded.to_str().unwrap(), "--pprof", profile.to_str().unwrap()]);
    let report = one_report(&stdout);
    let page = page();
    // By size the 5-page mapping is the biggest; the heap comes first all
    // the same, then the mappings under a line of their own.
    let stacks: Vec<&Stack> = report.stacks.iter().collect();
    let want = [("malloc", 3000, 3), ("calloc", 1000, 2), ("mmap", 5 * page, 1), ("mmap", 2 * page, 1)];
    let want: Vec<(String, u64, u64)> = want.iter().map(|&(k, b, c)| (k.to_string(), b, c)).collect();
    assert_eq!(rows(&stacks), want, "{stdout}\n{stderr}");
    for (stack, function) in stacks.iter().zip(["leak_heap", "leak_heap", "map_anon", "map_file"]) {
        assert!(stack.starts_with(&[function]), "{stack:?}");
    }
    let header = format!("    direct mappings (mmap): {} bytes in 2 allocations", 7 * page);
    let lines: Vec<&str> = stdout.lines().collect();
    let at = lines.iter().position(|l| *l == header).unwrap_or_else(|| panic!("no {header:?}:\n{stdout}"));
    assert!(lines[at + 1].starts_with(&format!("    {} bytes in 1 allocation from stack via mmap  (", 5 * page)), "{stdout}");
    assert!(lines[..at].iter().all(|l| !l.contains("via mmap")), "{stdout}");

    // Folded: the function is the leaf frame.
    let folded = std::fs::read_to_string(&folded).unwrap();
    let leaf = |function: &str, kind: &str| -> u64 {
        folded
            .lines()
            .filter_map(|l| l.rsplit_once(' '))
            .filter(|(names, _)| names.ends_with(&format!(";{function};{kind}")))
            .map(|(_, bytes)| bytes.parse::<u64>().unwrap())
            .sum()
    };
    assert_eq!(
        [leaf("leak_heap", "malloc"), leaf("leak_heap", "calloc"), leaf("map_anon", "mmap"), leaf("map_file", "mmap")],
        [3000, 1000, 5 * page, 2 * page],
        "{folded}"
    );

    // pprof: a `kind` label on each sample.
    let p = pprof::decode(&std::fs::read(&profile).unwrap());
    let mut labelled: Vec<(String, String, i64)> = p
        .sample
        .iter()
        .map(|s| {
            let kind = s.label.iter().find(|l| p.string(l.key) == "kind").map(|l| p.string(l.str).to_string());
            let leaf = p.names(s).first().map(|n| n.to_string()).unwrap_or_default();
            (leaf, kind.unwrap_or_default(), s.value[1])
        })
        .collect();
    labelled.sort();
    let want = [
        ("leak_heap", "calloc", 1000),
        ("leak_heap", "malloc", 3000),
        ("map_anon", "mmap", 5 * page as i64),
        ("map_file", "mmap", 2 * page as i64),
    ];
    assert_eq!(labelled, want.map(|(f, k, b)| (f.to_string(), k.to_string(), b)), "{p:?}");
    let _ = std::fs::remove_dir_all(&dir);

    // JSON: `kind` on each stack, heap first, the mapped part counted.
    let (stdout, stderr) = trace(&["kinds"], &["--format", "json"]);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().next().expect(&stderr)).unwrap();
    let process = &report["processes"][0];
    let listed: Vec<(&str, &str, u64)> = process["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["kind"].as_str().unwrap(), s["frames"][0]["symbol"].as_str().unwrap(), s["bytes"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        listed,
        [("malloc", "leak_heap", 3000), ("calloc", "leak_heap", 1000), ("mmap", "map_anon", 5 * page), ("mmap", "map_file", 2 * page)],
        "{stdout}"
    );
    assert_eq!((process["bytes"].as_u64(), process["mapped_bytes"].as_u64()), (Some(4000 + 7 * page), Some(7 * page)), "{stdout}");
    assert_eq!((process["count"].as_u64(), process["mapped_count"].as_u64()), (Some(7), Some(2)), "{stdout}");
}

#[test]
fn blocks_past_a_full_stack_table_keep_their_process_and_function() {
    // 8 call paths, each leaking 5 blocks through malloc(16) and 5 through
    // calloc(2, 24): 16 stacks, room for 2 (path 0's, the first seen).
    let (stdout, stderr) = trace(&["twokinds", "8", "5"], &["--max-stacks", "2"]);
    assert!(
        stderr.contains("warning: 70 allocations recorded without a stack (stack map full, raise --max-stacks)"),
        "{stderr}\n{stdout}"
    );
    let report = one_report(&stdout);
    let walks: Vec<&Stack> = report.stacks.iter().filter(|s| s.starts_with(&["walk"])).collect();
    let lost: Vec<&Stack> =
        report.stacks.iter().filter(|s| s.frames.iter().any(|f| f.starts_with("[stack not recorded"))).collect();
    assert_eq!(walks.len() + lost.len(), report.stacks.len(), "{stdout}");
    let own = |v: [(&str, u64, u64); 2]| v.map(|(k, b, c)| (k.to_string(), b, c)).to_vec();
    assert_eq!(rows(&walks), own([("calloc", 5 * 48, 5), ("malloc", 5 * 16, 5)]), "{stdout}");
    // The other 7 paths' blocks, exactly, by the function that made them.
    assert_eq!(rows(&lost), own([("calloc", 7 * 5 * 48, 35), ("malloc", 7 * 5 * 16, 35)]), "{stdout}");

    // JSON names the process too.
    let (stdout, stderr) = trace(&["twokinds", "8", "5"], &["--max-stacks", "2", "--format", "json"]);
    let report: serde_json::Value = serde_json::from_str(stdout.lines().next().expect(&stderr)).unwrap();
    assert_eq!(report["lost"]["stacks_unrecorded"], 70, "{stdout}");
    let process = &report["processes"][0];
    assert_eq!(process["comm"], "exact", "{stdout}");
    let lost: Vec<(&str, u64, u64)> = process["stacks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["stack_recorded"] == false)
        .map(|s| (s["kind"].as_str().unwrap(), s["bytes"].as_u64().unwrap(), s["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(lost, [("calloc", 7 * 5 * 48, 35), ("malloc", 7 * 5 * 16, 35)], "{stdout}");
}
