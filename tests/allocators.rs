//! memleak finds the allocator that serves malloc (glibc, jemalloc,
//! tcmalloc, mimalloc, a static executable), and names the leaking
//! function of C, C++ and Rust programs with exact bytes.

use std::time::Duration;

use memleak_tests::{Report, Stack, fixture, parse_reports, run_memleak, scenario::trace_scenario};

/// The report after the fixture leaked, and memleak's stderr.
fn trace(name: &str) -> (Report, String) {
    let traced = trace_scenario(&fixture(name), &[], &["-o", "0", "-T", "100", "600"], Duration::from_secs(60));
    assert!(traced.status.success(), "{name}: {:?}\n{}\n{}", traced.status, traced.stdout, traced.stderr);
    let mut reports = parse_reports(&traced.stdout);
    assert_eq!(reports.len(), 1, "{}", traced.stdout);
    (reports.pop().unwrap(), traced.stderr)
}

/// Total (bytes, blocks) of the stacks with a frame of `function`.
fn through(report: &Report, function: &str) -> (u64, u64) {
    let stacks: Vec<&Stack> = report.stacks.iter().filter(|s| s.frames.iter().any(|f| f.starts_with(function))).collect();
    (stacks.iter().map(|s| s.bytes).sum(), stacks.iter().map(|s| s.count).sum())
}

fn c_leak_found_through(name: &str, library: &str) {
    let (report, stderr) = trace(name);
    assert!(stderr.contains(&format!("memleak: probing {library}")), "{name}: {stderr}");
    let stack = report.stacks.iter().find(|s| s.starts_with(&["leak_here", "main"])).unwrap_or_else(|| panic!("{name}: {report:?}"));
    assert_eq!((stack.bytes, stack.count), (25 * 96, 25), "{name}");
    assert_eq!(through(&report, "leak_here"), (25 * 96, 25), "{name}: frees must cancel: {report:?}");
}

#[test]
fn glibc() {
    c_leak_found_through("leak-glibc", "/usr/lib/x86_64-linux-gnu/libc.so.6");
}

#[test]
fn jemalloc() {
    c_leak_found_through("leak-jemalloc", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2");
}

#[test]
fn tcmalloc() {
    c_leak_found_through("leak-tcmalloc", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4");
}

#[test]
fn mimalloc() {
    c_leak_found_through("leak-mimalloc", "/usr/lib/x86_64-linux-gnu/libmimalloc.so.2");
}

#[test]
fn static_executable() {
    let exe = fixture("leak-static");
    c_leak_found_through("leak-static", &exe.to_string_lossy());
}

#[test]
fn stripped_static_executable_is_explained() {
    let mut app = std::process::Command::new(fixture("leak-static-stripped"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let out = run_memleak(&["-p".into(), app.id().to_string(), "1".into(), "1".into()], Duration::from_secs(10));
    let _ = app.kill();
    let _ = app.wait();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("statically linked and stripped"), "{stderr}");
}

#[test]
fn cpp_new_is_attributed_to_the_caller_demangled() {
    let (report, stderr) = trace("leak-cpp");
    assert!(stderr.contains("libstdc++"), "operator new is probed in libstdc++: {stderr}");
    // Probed at operator new's return, the stack starts in the caller.
    let nodes = report.stacks.iter().find(|s| s.bytes == 25 * 200).unwrap_or_else(|| panic!("{report:?}"));
    assert!(nodes.frames[0].starts_with("shop::leak_nodes()+0x"), "{nodes:?}");
    assert_eq!(nodes.count, 25);
    assert_eq!(through(&report, "shop::leak_nodes()"), (25 * 200 + 10 * 100, 35), "{report:?}");
    // Each line names the operator: new, and new[] for the arrays.
    let arrays = report.stacks.iter().find(|s| s.bytes == 10 * 100).unwrap_or_else(|| panic!("{report:?}"));
    assert_eq!((nodes.kind.as_deref(), arrays.kind.as_deref()), (Some("new"), Some("new[]")), "{report:?}");
}

#[test]
fn rust_box_leak_and_forget_are_attributed_demangled() {
    let (report, _) = trace("leak-rust");
    assert_eq!(through(&report, "leak::leak_boxes"), (25 * 300 + 10 * 1000, 35), "{report:?}");
}
