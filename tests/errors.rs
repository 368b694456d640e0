//! Bad input gets one clear line on stderr and its own exit code.

use std::{
    os::unix::process::CommandExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use memleak_tests::{
    Running, fixture, memleak_bin,
    ptrace::{spawn_stopped_at_syscall, spawn_with_pid},
    run_memleak,
};

fn fails_with(args: &[&str], code: i32, message: &str) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let out = run_memleak(&args, Duration::from_secs(10));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(stderr.starts_with("memleak: ") && stderr.contains(message), "{args:?}: {stderr}");
}

#[test]
fn no_such_pid() {
    fails_with(&["-p", "4194000"], 3, "no process with PID 4194000");
}

#[test]
fn kernel_thread() {
    fails_with(&["-p", "2"], 3, "kernel thread");
}

#[test]
fn interval_zero() {
    fails_with(&["-p", "1", "0"], 2, "interval");
}

#[test]
fn min_size_above_max_size() {
    fails_with(&["-p", "1", "-z", "10", "-Z", "5"], 2, "--min-size 10 is larger than --max-size 5");
}

#[test]
fn kernel_only_with_a_pid() {
    fails_with(&["-p", "1", "--kernel-only"], 2, "--kernel-only applies to system-wide tracing");
}

#[test]
fn missing_obj() {
    let me = std::process::id().to_string();
    fails_with(&["-p", &me, "-O", "/no/such/libfoo.so"], 5, "-O /no/such/libfoo.so");
}

#[test]
fn output_file_that_cannot_be_created() {
    let me = std::process::id().to_string();
    fails_with(&["-p", &me, "--pprof", "/no/such/dir/heap.pb.gz"], 2, "cannot create --pprof /no/such/dir/heap.pb.gz");
}

#[test]
fn bad_sort_key() {
    let out = run_memleak(&["-p".into(), "1".into(), "--sort".into(), "speed".into()], Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("size, count, growth, age"));
}

#[test]
fn not_root() {
    let out = Command::new(memleak_bin())
        .args(["-p", "1"])
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run memleak as nobody");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("must be run as root"), "{stderr}");
}

#[test]
fn root_without_capabilities() {
    // Still uid 0, but without the capabilities BPF tracing needs (as in a
    // hardened container): the kernel would refuse bpf() with EPERM.
    let app = Running::spawn(fixture("fibonacci"), &["100"]);
    for dropped in ["-all", "-bpf,-perfmon,-sys_admin"] {
        let out = Command::new("setpriv")
            .args(["--inh-caps=-all", "--ambient-caps=-all", &format!("--bounding-set={dropped}"), "--"])
            .arg(memleak_bin())
            .args(["-p", &app.pid().to_string(), "1", "1"])
            .output()
            .expect("run memleak under setpriv (util-linux)");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{dropped}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
        assert_eq!(stderr.trim_end(), "memleak: BPF not permitted: running as root, but without CAP_SYS_ADMIN (its capabilities were dropped)");
        assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn pid_reused_before_the_pidfd_pins_it() {
    // memleak reads /proc/PID/stat, then opens a pidfd on PID. Held at that
    // pidfd_open, the process it read exits and another takes its PID: the
    // pidfd now pins the newcomer, which memleak must notice and refuse.
    let victim = Running::spawn(fixture("fibonacci"), &["100"]);
    let pid = victim.pid();
    let mut newcomer = None;
    let mut cmd = Command::new(memleak_bin());
    cmd.args(["-p", &pid.to_string(), "1", "1"]).stdout(Stdio::piped()).stderr(Stdio::piped());
    let tracer = spawn_stopped_at_syscall(&mut cmd, libc::SYS_pidfd_open, || {
        drop(victim);
        newcomer = Some(Running { child: spawn_with_pid(pid) });
    });
    let out = tracer.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert_eq!(
        stderr.trim_end(),
        format!("memleak: process {pid} (fibonacci) exited and its PID now names another process (sleep)")
    );
    assert!(out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    drop(newcomer);
}
