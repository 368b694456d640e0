//! Trends and the output formats (`--format json`, `--folded`,
//! `--flamegraph`, `--pprof`, `--no-source`) against the real fixtures,
//! with real probes: run as root.

use std::{
    path::{Path, PathBuf},
    thread,
    time::Duration,
};

use memleak_tests::{Report, Running, Stack, fixture, parse_reports, pprof, run_memleak};

const BLOCK: u64 = 8192; // calloc(1024, sizeof(long long))

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn leak_stack(report: &Report) -> Option<&Stack> {
    report.stacks.iter().find(|s| s.starts_with(&["fibonacci", "child"]))
}

/// `204,800`, as inferno prints counts.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A fresh directory for one test's files.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memleak-formats-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn path_arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn read_pprof(path: &Path) -> pprof::Profile {
    pprof::decode(&std::fs::read(path).unwrap())
}

#[test]
fn json_reports_name_fibonacci_from_child_with_trends() {
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    thread::sleep(Duration::from_millis(200));
    let pid = app.pid().to_string();
    let out = run_memleak(&args(&["-p", &pid, "--format", "json", "1", "3"]), Duration::from_secs(30));
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    assert!(stderr.contains("Attaching to pid"), "the banner goes to stderr: {stderr}");

    let reports: Vec<serde_json::Value> =
        stdout.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect();
    assert_eq!(reports.len(), 3, "one object per report:\n{stdout}");
    let mut bytes = vec![];
    for (i, report) in reports.iter().enumerate() {
        assert_eq!(report["report"].as_u64(), Some(i as u64 + 1));
        assert!(report["timestamp"].as_str().is_some_and(|t| t.ends_with('Z') && t.contains('T')), "{report}");
        assert_eq!(report["sort"], "size");
        let process = &report["processes"][0];
        assert_eq!(process["pid"].as_u64(), Some(app.pid() as u64));
        assert_eq!(process["comm"], "fibonacci");
        let stacks = process["stacks"].as_array().unwrap();
        assert_eq!(stacks.len(), 1, "nothing else leaks: {report}");
        let stack = &stacks[0];
        let frames: Vec<&serde_json::Value> =
            stack["frames"].as_array().unwrap().iter().filter(|f| f["inlined"] == false).collect();
        assert_eq!((frames[0]["symbol"].as_str(), frames[1]["symbol"].as_str()), (Some("fibonacci"), Some("child")));
        assert_eq!(frames[0]["module"], "fibonacci");
        assert_eq!(frames[0]["file"], "fixtures/fibonacci.c");
        assert!(frames[0]["line"].as_u64().is_some() && frames[0]["offset"].as_u64().is_some(), "{stack}");
        assert!(frames[0]["addr"].as_str().unwrap().starts_with("0x"));
        let (b, count) = (stack["bytes"].as_u64().unwrap(), stack["count"].as_u64().unwrap());
        assert_eq!(b, BLOCK * count, "{stack}");
        assert!(count >= 2, "{stack}");

        let trend = &stack["trend"];
        assert_eq!(trend["reports"].as_u64(), Some(i as u64 + 1), "{trend}");
        assert_eq!(trend["growing"], i > 0, "rose at every report, from the second on: {trend}");
        // Allocated since attach, of any age: the outstanding ones older
        // than -o and the young ones. The leak frees nothing.
        assert!(trend["allocs"].as_u64().unwrap() >= count, "{trend}");
        assert_eq!(trend["frees"].as_u64(), Some(0), "{trend}");
        let age = trend["oldest_age_ms"].as_u64().unwrap();
        let elapsed_ms = (report["elapsed_s"].as_f64().unwrap() * 1000.0) as u64;
        assert!((500..=elapsed_ms).contains(&age), "oldest block of the run, {elapsed_ms} ms: {trend}");
        // 10 blocks per second.
        let rate = trend["rate_bytes_per_s"].as_f64().unwrap();
        assert!((40_000.0..=120_000.0).contains(&rate), "{trend}");
        if i > 0 {
            assert_eq!(trend["change_bytes"].as_i64(), Some(b as i64 - bytes[i - 1] as i64), "{trend}");
        }
        bytes.push(b);
    }
}

#[test]
fn exit_files_hold_the_last_report_and_the_leak_is_growing() {
    let dir = scratch("leak");
    let (folded, svg, pprof) = (dir.join("leak.folded"), dir.join("leak.svg"), dir.join("leak.pb.gz"));
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    thread::sleep(Duration::from_millis(200));
    let pid = app.pid().to_string();
    let out = run_memleak(
        &args(&["-p", &pid, "--folded", path_arg(&folded), "--flamegraph", path_arg(&svg),
                "--pprof", path_arg(&pprof), "1", "3"]),
        Duration::from_secs(30),
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);

    // Text: bcc's lines, the trend after them.
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 3, "{stdout}");
    let growing: Vec<bool> = reports.iter().map(|r| leak_stack(r).expect(&stdout).growing).collect();
    assert_eq!(growing, [false, true, true], "{stdout}");
    let last = leak_stack(&reports[2]).unwrap();
    assert!(last.trend.contains(" B since last, ") && last.trend.contains(" B/s, oldest "), "{last:?}");
    let leaked = last.bytes;
    assert_eq!(leaked, BLOCK * last.count);

    // Folded: root first, the leak's line with the last report's bytes.
    let folded = std::fs::read_to_string(&folded).unwrap();
    let lines: Vec<&str> = folded.lines().collect();
    assert_eq!(lines.len(), 1, "{folded}");
    let (names, bytes) = lines[0].rsplit_once(' ').unwrap();
    // The hooked function that made the blocks is the leaf.
    assert!(names.ends_with(";child;fibonacci;calloc"), "{folded}");
    assert_eq!(bytes.parse::<u64>().unwrap(), leaked, "{folded}");

    // Flame graph: well-formed SVG naming the leaking function.
    let svg = std::fs::read_to_string(&svg).unwrap();
    let options = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    let doc = roxmltree::Document::parse_with_options(&svg, options).expect("well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let titles: Vec<&str> = doc.descendants().filter(|n| n.has_tag_name("title")).filter_map(|n| n.text()).collect();
    let width = format!("fibonacci ({} bytes", thousands(leaked));
    assert!(titles.iter().any(|t| t.starts_with(&width)), "{width} in {titles:?}");
    assert!(titles.iter().any(|t| t.starts_with("child (")), "{titles:?}");

    // pprof: the same stack, leaf first, inuse_objects and inuse_space.
    let p = read_pprof(&pprof);
    let s = |i: i64| p.string_table[i as usize].as_str();
    let types: Vec<(&str, &str)> = p.sample_type.iter().map(|t| (s(t.r#type), s(t.unit))).collect();
    assert_eq!(types, [("inuse_objects", "count"), ("inuse_space", "bytes")]);
    assert_eq!(s(p.default_sample_type), "inuse_space");
    assert_eq!(p.sample.len(), 1, "{p:?}");
    assert_eq!(p.sample[0].value, [last.count as i64, leaked as i64]);
    let functions: Vec<&str> = p.sample[0]
        .location_id
        .iter()
        .map(|id| {
            let location = p.location.iter().find(|l| l.id == *id).expect("location");
            let line = location.line.last().expect("a line");
            s(p.function.iter().find(|f| f.id == line.function_id).expect("function").name)
        })
        .collect();
    assert_eq!(&functions[..2], ["fibonacci", "child"], "{functions:?}");
    let leaf = p.location.iter().find(|l| l.id == p.sample[0].location_id[0]).unwrap();
    let mapping = p.mapping.iter().find(|m| m.id == leaf.mapping_id).expect("leaf has a mapping");
    assert!(mapping.memory_start <= leaf.address && leaf.address < mapping.memory_limit);
    assert!(s(mapping.filename).ends_with("/fibonacci"), "{}", s(mapping.filename));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fixed_twin_has_no_growing_stack_and_empty_exit_files() {
    let dir = scratch("fixed");
    let (folded, svg, pprof) = (dir.join("fixed.folded"), dir.join("fixed.svg"), dir.join("fixed.pb.gz"));
    let app = Running::spawn(fixture("fibonacci-fixed"), &["20"]);
    thread::sleep(Duration::from_millis(200));
    let out = run_memleak(
        &args(&["-p", &app.pid().to_string(), "-o", "0", "--folded", path_arg(&folded),
                "--flamegraph", path_arg(&svg), "--pprof", path_arg(&pprof), "1", "3"]),
        Duration::from_secs(30),
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 3, "{stdout}");
    // A block caught between calloc and free may show (-o 0), never growing.
    assert!(reports.iter().flat_map(|r| &r.stacks).all(|s| !s.growing && s.count <= 1), "{stdout}");
    let last_bytes: u64 = reports[2].stacks.iter().map(|s| s.bytes).sum();
    let folded_bytes: u64 = std::fs::read_to_string(&folded)
        .unwrap()
        .lines()
        .map(|l| l.rsplit_once(' ').unwrap().1.parse::<u64>().unwrap())
        .sum();
    assert_eq!(folded_bytes, last_bytes);
    let svg = std::fs::read_to_string(&svg).unwrap();
    let options = roxmltree::ParsingOptions { allow_dtd: true, ..Default::default() };
    roxmltree::Document::parse_with_options(&svg, options).expect("well-formed XML");
    let p = read_pprof(&pprof);
    let pprof_bytes: i64 = p.sample.iter().map(|s| s.value[1]).sum();
    assert_eq!(pprof_bytes as u64, last_bytes);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_source_drops_file_and_line_and_sort_keys_run() {
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    thread::sleep(Duration::from_millis(200));
    let pid = app.pid().to_string();
    let out = run_memleak(&args(&["-p", &pid, "--no-source", "--sort", "age", "1", "1"]), Duration::from_secs(20));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let reports = parse_reports(&stdout);
    let stack = leak_stack(&reports[0]).unwrap_or_else(|| panic!("{stdout}"));
    let frame = &stack.frames[0];
    assert!(frame.starts_with("fibonacci+0x") && frame.ends_with(" [fibonacci]"), "{stdout}");
    assert!(!stdout.contains("fibonacci.c"), "{stdout}");
}

#[test]
fn a_failed_write_at_exit_is_one_line_and_a_failure() {
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    thread::sleep(Duration::from_millis(200));
    let out = run_memleak(&args(&["-p", &app.pid().to_string(), "--folded", "/dev/full", "1", "1"]), Duration::from_secs(20));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    // Past the start-up line naming what is probed, one line: the error.
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.starts_with("memleak: probing ")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("memleak: writing --folded /dev/full: No space left on device"), "{stderr}");
    assert_eq!(parse_reports(&text(&out.stdout)).len(), 1, "the report itself was printed");
}
