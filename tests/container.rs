//! The case study's failure: the app runs in a container, and bcc prints
//! `[unknown] [app]`. memleak must attach to the container's own libc and
//! symbolize /app through /proc/PID, with no file copied out.

use std::{path::Path, time::Duration};

use memleak_tests::{Report, Stack, build_id, container::Container, fixture, parse_reports, run_memleak};

fn leak_stack(report: &Report) -> Option<&Stack> {
    report.stacks.iter().find(|s| s.starts_with(&["fibonacci", "child"]))
}

fn trace(container: &Container) -> (Vec<Report>, String) {
    let pid = container.pid.to_string();
    let out = run_memleak(
        &["-p", &pid, "-a", "1", "2"].map(String::from),
        Duration::from_secs(20),
    );
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(!stdout.contains("unknown"), "{stdout}");
    (parse_reports(&stdout), stdout)
}

fn assert_leak_found(reports: &[Report], stdout: &str) {
    assert_eq!(reports.len(), 2, "{stdout}");
    for report in reports {
        let stack = leak_stack(report).unwrap_or_else(|| panic!("no fibonacci <- child stack:\n{stdout}"));
        assert_eq!(stack.bytes, 8192 * stack.count);
        assert!(stack.count >= 3, "{stack:?}");
        assert!(stack.frames[0].contains("[app] fixtures/fibonacci.c:"), "{stack:?}");
        assert!(stack.frames[1].contains("[app]"), "{stack:?}");
    }
}

#[test]
fn container_process_is_traced_and_symbolized_without_copying_files() {
    let container = Container::start(&fixture("fibonacci"), &["100"]);
    let maps = container.maps();
    // The situation of the case study: maps name /app, which the host lacks,
    // and a libc that is the container's own file.
    assert!(maps.contains(" /app\n"), "{maps}");
    assert!(maps.contains(" /lib/x86_64-linux-gnu/libc.so.6\n"), "{maps}");
    assert!(!Path::new("/app").exists(), "/app exists on the host: the test would prove nothing");
    let (reports, stdout) = trace(&container);
    assert_leak_found(&reports, &stdout);
}

#[test]
fn binary_deleted_inside_the_container_still_resolves() {
    let container = Container::start(&fixture("fibonacci"), &["100"]);
    container.delete_app();
    assert!(container.maps().contains(" /app (deleted)"), "{}", container.maps());
    let (reports, stdout) = trace(&container);
    assert_leak_found(&reports, &stdout);
}

#[test]
fn separate_debug_info_is_found_by_build_id_inside_the_container() {
    // /app keeps its symbol table and a .gnu_debuglink; its DWARF is in the
    // container only, where distributions put it: under its build id.
    let app = fixture("fibonacci-split");
    let id = build_id(&app);
    let inside = format!("/usr/lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]);
    let debug = app.with_extension("debug");
    let container = Container::start_with(&app, &["100"], &[(&debug, Path::new(&inside))]);
    let (reports, stdout) = trace(&container);
    assert_leak_found(&reports, &stdout);
}

#[test]
fn a_stripped_program_is_named_from_its_debug_file_by_build_id() {
    // /app has no symbol table and no debuglink: only its build id names
    // its debug file, which only the container holds.
    let app = fixture("fibonacci-stripped");
    let id = build_id(&app);
    let inside = format!("/usr/lib/debug/.build-id/{}/{}.debug", &id[..2], &id[2..]);
    assert!(!Path::new(&inside).exists(), "{inside} exists on the host: the test would prove nothing");
    let debug = app.with_extension("debug");
    let container = Container::start_with(&app, &["100"], &[(&debug, Path::new(&inside))]);
    let (reports, stdout) = trace(&container);
    assert_leak_found(&reports, &stdout);
}
