//! Whole stacks through code built without frame pointers (`--unwind`):
//! memleak's stack of each leak must be gdb's `bt` at that malloc, frame
//! for frame from the allocating function to `main`. `--unwind fp` is
//! the control: the frame-pointer walk stops after the first frame.

use std::{
    process::{Command, Output},
    thread,
    time::Duration,
};

use memleak_tests::{Running, Stack, container::Container, fixture, parse_reports, run_memleak};

/// deep.c's leak five calls deep, and its strdup.
const DEEP: u64 = 4242;
const NAME: u64 = 7; // "worker" and its NUL

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The functions of gdb's `bt` at a breakpoint (`location`, `condition`)
/// in the fixture, innermost first to main, as gdb names them. Not at
/// malloc: a uprobe there (any memleak probing libc, a test running
/// alongside) takes the trap, and gdb's breakpoint never fires.
fn gdb_backtrace(program: &str, location: &str, condition: &str) -> Vec<String> {
    // Bounded: a breakpoint that never fires must fail the test, not hang it.
    let out = Command::new("timeout")
        .args(["60", "gdb", "-batch", "-nx", "-ex", "set breakpoint pending on"])
        .args(["-ex", &format!("break {location} if {condition}"), "-ex", "run", "-ex", "bt", "-ex", "kill"])
        .args(["--args", program, "1"])
        .output()
        .expect("cannot run gdb: `cargo xtask setup` installs it");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let frames: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            let rest = l.split_once(" in ").map_or_else(|| l.split_whitespace().nth(1).unwrap_or(""), |(_, r)| r);
            rest.split([' ', '(']).next().unwrap_or("").to_string()
        })
        .collect();
    assert!(frames.len() > 1 && frames.last().map(String::as_str) == Some("main"), "gdb's bt:\n{text}");
    frames
}

/// The functions of a memleak stack, innermost first, down to main.
fn functions(stack: &Stack) -> Vec<String> {
    let names: Vec<String> = stack.frames.iter().map(|f| f.split('+').next().unwrap_or("").to_string()).collect();
    let main = names.iter().position(|n| n == "main").map_or(names.len(), |i| i + 1);
    names[..main].to_vec()
}

/// The longest stacks (as functions down to main) of deep.c's two leaks
/// in any report (system-wide, a last report that a busy machine's pipe
/// did not take in the second memleak waits for it is cut short), of
/// process `pid` if given (system-wide).
fn longest_stacks(out: &Output, pid: Option<u32>) -> (Vec<String>, Vec<String>) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "exit {:?}\n{stdout}\n{stderr}", out.status);
    let reports = parse_reports(&stdout);
    assert!(!reports.is_empty(), "no report:\n{stdout}\n{stderr}");
    let ours = |s: &&Stack| pid.is_none_or(|pid| s.process.as_deref().is_some_and(|p| p.starts_with(&format!("{pid} "))));
    let longest = |size: u64| {
        let stacks = reports.iter().flat_map(|r| &r.stacks).filter(ours).filter(|s| s.count > 0 && s.bytes == size * s.count);
        let longest = stacks.map(functions).max_by_key(Vec::len);
        longest.unwrap_or_else(|| panic!("no stack of {size}-byte blocks:\n{stdout}\n{stderr}"))
    };
    (longest(DEEP), longest(NAME))
}

/// deep.c's leaks traced with `-p` (or `-c` when `command`), walking by `unwind`.
fn deep_stacks(command: bool, unwind: &str) -> (Vec<String>, Vec<String>) {
    let program = fixture("deep");
    let mut all = args(&["--unwind", unwind, "-a"]);
    if command {
        all.extend(args(&["-c", &format!("{} 20", program.display()), "1", "2"]));
        return longest_stacks(&run_memleak(&all, Duration::from_secs(60)), None);
    }
    let app = Running::spawn(&program, &["20"]);
    thread::sleep(Duration::from_millis(200));
    all.extend(args(&["-p", &app.pid().to_string(), "1", "2"]));
    longest_stacks(&run_memleak(&all, Duration::from_secs(60)), None)
}

/// Asserts that memleak's stacks of deep.c's two leaks are gdb's.
fn assert_gdbs(memleaks: (Vec<String>, Vec<String>)) {
    let program = fixture("deep");
    let program = program.to_str().unwrap();
    // alloc(4242) calls malloc; strdup("worker") is copy_name's.
    let deep = gdb_backtrace(program, "alloc", &format!("$rdi == {DEEP}"));
    let name = gdb_backtrace(program, "strdup", "$rdi != 0 && *(char *)$rdi == 'w'");
    // The fixture is what it says, with glibc's strdup (no frame pointers).
    assert_eq!(deep, ["alloc", "parse", "handle", "loop", "run", "main"]);
    assert_eq!(name, ["__GI___strdup", "copy_name", "run", "main"]);
    assert_eq!(memleaks, (deep, name));
}

#[test]
fn stacks_without_frame_pointers_are_gdbs_backtrace() {
    assert_gdbs(deep_stacks(false, "auto"));
}

#[test]
fn a_command_started_by_memleak_too() {
    assert_gdbs(deep_stacks(true, "dwarf"));
}

#[test]
fn frame_pointers_alone_stop_at_the_first_frame() {
    // The control: what memleak showed before tables.
    let (deep, name) = deep_stacks(false, "fp");
    assert_eq!(deep.first().map(String::as_str), Some("alloc"));
    assert!(!deep.iter().any(|f| f == "parse" || f == "main"), "{deep:?}");
    assert_eq!(name.first().map(String::as_str), Some("__GI___strdup"));
    assert!(!name.iter().any(|f| f == "copy_name" || f == "main"), "{name:?}");
}

#[test]
fn a_container_process_with_its_own_libc() {
    // /app and the container's libc: files of their own (another inode),
    // read through the descriptors of what it maps.
    let container = Container::start(&fixture("deep"), &["20"]);
    assert!(container.maps().contains(" /app\n"), "{}", container.maps());
    let out = run_memleak(&args(&["-a", "-p", &container.pid.to_string(), "1", "2"]), Duration::from_secs(60));
    let (deep, mut name) = longest_stacks(&out, None);
    // The container has no debug info for its libc (the host's is not
    // used for it): strdup goes by its symbol, gdb's (on the host's libc)
    // by its debug info's name. The same function.
    if name.first().is_some_and(|f| f == "__strdup") {
        name[0] = "__GI___strdup".into();
    }
    assert_gdbs((deep, name));
}

#[test]
fn system_wide_too() {
    let app = Running::spawn(fixture("deep"), &["20"]);
    thread::sleep(Duration::from_millis(200));
    // Tables come on a thread of their own system-wide (every process's:
    // seconds), the newest processes first: four reports leave time.
    let out = run_memleak(&args(&["--user-only", "--top-procs", "50", "-T", "5", "1", "4"]), Duration::from_secs(90));
    assert_gdbs(longest_stacks(&out, Some(app.pid())));
}
