//! Frames a reader can trust, against real fixtures with real probes (run
//! as root): offsets in functions gcc splits into hot and `.cold` parts
//! are gdb's; a walk that ran off the frame chain ends with a marker.

use std::{collections::BTreeMap, io::Read as _, process::Command, thread, time::Duration};

use memleak_tests::{Running, fixture, parse_reports, run_memleak};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// The frames of every JSON report line, as (addr, symbol, offset, module, inlined).
fn json_frames(stdout: &str) -> Vec<Vec<serde_json::Value>> {
    let mut stacks = vec![];
    for line in stdout.lines() {
        let report: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        for process in report["processes"].as_array().unwrap() {
            for stack in process["stacks"].as_array().unwrap() {
                stacks.push(stack["frames"].as_array().unwrap().clone());
            }
        }
    }
    stacks
}

/// gdb's `info symbol` for each address of process `pid`: (name, offset).
fn gdb_symbols(pid: u32, addrs: &[u64]) -> BTreeMap<u64, (String, u64)> {
    let mut cmd = Command::new("gdb");
    cmd.args(["-nx", "-batch", "-p", &pid.to_string()]);
    for addr in addrs {
        cmd.args(["-ex", &format!("info symbol {addr:#x}")]);
    }
    let out = cmd.output().expect("gdb runs (cargo xtask setup installs it)");
    let stdout = text(&out.stdout);
    // "make_node + 20 in section .text of /path", "main in section .text"
    let answers: Vec<&str> = stdout.lines().filter(|l| l.contains(" in section ")).collect();
    assert_eq!(answers.len(), addrs.len(), "gdb:\n{stdout}\n{}", text(&out.stderr));
    addrs
        .iter()
        .zip(answers)
        .map(|(&addr, line)| {
            let symbol = line.split(" in section ").next().unwrap();
            let (name, offset) = match symbol.split_once(" + ") {
                Some((name, offset)) => (name, offset.parse().unwrap()),
                None => (symbol, 0),
            };
            // gdb writes the symbol make_node.cold as make_node[cold].
            let name = match name.strip_suffix("[cold]") {
                Some(function) => format!("{function}.cold"),
                None => name.to_string(),
            };
            (addr, (name, offset))
        })
        .collect()
}

#[test]
fn offsets_in_split_functions_are_gdbs() {
    let binary = fixture("frames-split");
    // The fixture is what the test needs: make_node has a .cold part.
    let nm = text(&Command::new("nm").arg(&binary).output().expect("nm").stdout);
    assert!(nm.lines().any(|l| l.ends_with(" make_node.cold")), "{nm}");

    let app = Running::spawn(&binary, &["20"]);
    thread::sleep(Duration::from_millis(200));
    let pid = app.pid();
    let out = run_memleak(&args(&["-p", &pid.to_string(), "--format", "json", "1", "1"]), Duration::from_secs(30));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let text_out = run_memleak(&args(&["-p", &pid.to_string(), "1", "1"]), Duration::from_secs(30));
    let text_stdout = text(&text_out.stdout);
    assert!(text_out.status.success(), "{text_stdout}\n{}", text(&text_out.stderr));

    // Every frame in the fixture itself (not inlined: those have no offset).
    let mut ours: BTreeMap<u64, (String, u64)> = BTreeMap::new();
    let stacks = json_frames(&stdout);
    for frame in stacks.iter().flatten() {
        if frame["module"] != "frames-split" || frame["inlined"] == true {
            continue;
        }
        let addr = u64::from_str_radix(frame["addr"].as_str().unwrap().trim_start_matches("0x"), 16).unwrap();
        let name = frame["symbol"].as_str().unwrap_or_else(|| panic!("no symbol: {frame}")).to_string();
        ours.insert(addr, (name, frame["offset"].as_u64().unwrap()));
    }
    // The hot part, the cold part and a contiguous function (main), and
    // new_node inlined into make_node.
    let names: Vec<&str> = ours.values().map(|(n, _)| n.as_str()).collect();
    for wanted in ["make_node", "make_node.cold", "main"] {
        assert!(names.contains(&wanted), "no {wanted} frame: {names:?}\n{stdout}");
    }
    assert!(
        stacks.iter().flatten().any(|f| f["symbol"] == "new_node" && f["inlined"] == true),
        "new_node inlined into make_node:\n{stdout}"
    );

    let addrs: Vec<u64> = ours.keys().copied().collect();
    let gdb = gdb_symbols(pid, &addrs);
    assert_eq!(ours, gdb, "memleak's (name, offset) by return address against gdb's");
    // The text report prints the same.
    let printed: Vec<String> = parse_reports(&text_stdout).iter().flat_map(|r| &r.stacks).flat_map(|s| s.frames.clone()).collect();
    for (name, offset) in gdb.values() {
        let wanted = format!("{name}+{offset:#x} [frames-split]");
        assert!(printed.iter().any(|f| f.starts_with(&wanted)), "no {wanted}:\n{text_stdout}");
    }
}

#[test]
fn a_walk_off_the_frame_chain_ends_with_a_marker_not_garbage() {
    // push() allocates with the previous node in %rbp: a frame-pointer
    // walk (`--unwind fp`; by default this program is walked by its unwind
    // table, see tests/unwind.rs) reads the node as a frame record, a
    // different heap address at every call.
    let app = Running::spawn(fixture("frames-nofp"), &["20"]);
    thread::sleep(Duration::from_millis(200));
    let pid = app.pid().to_string();
    let dir = std::env::temp_dir().join(format!("memleak-frames-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (folded, pprof) = (dir.join("out.folded"), dir.join("out.pb.gz"));
    let out = run_memleak(
        &args(&["--unwind", "fp", "-p", &pid, "--folded", folded.to_str().unwrap(), "--pprof", pprof.to_str().unwrap(), "1", "2"]),
        Duration::from_secs(30),
    );
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));

    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 2, "{stdout}");
    for report in &reports {
        for frame in report.stacks.iter().flat_map(|s| &s.frames) {
            for garbage in ["[[heap]]", "[[stack]]", "[unmapped]", "[anon]"] {
                assert!(!frame.contains(garbage), "garbage frame {frame}:\n{stdout}");
            }
        }
        // Every allocation of push's one call site, in one stack that says
        // where it ends: 50 a second, those older than 500 ms.
        let push: Vec<_> = report.stacks.iter().filter(|s| s.starts_with(&["push"])).collect();
        assert_eq!(push.len(), 1, "{stdout}");
        assert!(push[0].count >= 10, "{stdout}");
        assert_eq!(push[0].frames.len(), 2, "{stdout}");
        assert_eq!(push[0].frames[1], "[stack ends: next address in heap, not code]", "{stdout}");
    }

    // The exit files end the stack the same way.
    let folded = std::fs::read_to_string(&folded).unwrap();
    let push: Vec<&str> = folded.lines().filter(|l| l.contains("push")).collect();
    assert_eq!(push.len(), 1, "{folded}");
    assert!(push[0].starts_with("[stack ends: next address in heap, not code];push;malloc "), "{folded}");
    let mut profile = Vec::new();
    flate2::read::GzDecoder::new(std::fs::File::open(&pprof).unwrap()).read_to_end(&mut profile).unwrap();
    let marker = b"[stack ends: next address in heap, not code]";
    assert!(profile.windows(marker.len()).any(|w| w == marker), "no marker function in the pprof profile");

    // JSON says it in the stack's "end".
    let out = run_memleak(&args(&["--unwind", "fp", "-p", &pid, "--format", "json", "1", "1"]), Duration::from_secs(30));
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", text(&out.stderr));
    let report: serde_json::Value = serde_json::from_str(stdout.lines().next().unwrap()).unwrap();
    let stacks = report["processes"][0]["stacks"].as_array().unwrap();
    let push: Vec<_> = stacks.iter().filter(|s| s["frames"][0]["symbol"] == "push").collect();
    assert_eq!(push.len(), 1, "{stdout}");
    assert_eq!(push[0]["end"], "next address in heap, not code", "{stdout}");
    assert_eq!(push[0]["frames"].as_array().unwrap().len(), 1, "{stdout}");
    let _ = std::fs::remove_dir_all(&dir);
}
