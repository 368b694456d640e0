//! Tracing with no PID: every process, new ones (containers too), the
//! kernel's allocators, and `-c COMMAND`.

use std::{
    fs,
    sync::{Mutex, MutexGuard},
    thread,
    time::Duration,
};

use memleak_tests::{Report, Running, Stack, container::Container, fixture, parse_reports, run_memleak};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// Each test here traces every process on the machine (or makes
/// processes that allocate), so it sees the others' processes: one at a
/// time. In CI, `an_exited_process_gives_its_per_stack_totals_back` read
/// 4,400 entries of another test's processes on top of its own 2,400 and
/// failed.
fn alone() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    // A test that failed holding it poisons it; the next still runs.
    ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn leak_of(report: &Report, pid: u32) -> Option<&Stack> {
    let prefix = format!("{pid} ");
    report
        .stacks
        .iter()
        .find(|s| s.process.as_deref().is_some_and(|p| p.starts_with(&prefix)) && s.starts_with(&["fibonacci", "child"]))
}

#[test]
fn no_pid_names_each_leaker_biggest_first_and_not_the_clean_one() {
    let _alone = alone();
    let fast = Running::spawn(fixture("fibonacci"), &["50"]); // 20 blocks/s
    let slow = Running::spawn(fixture("fibonacci"), &["250"]); // 4 blocks/s
    let clean = Running::spawn(fixture("fibonacci-fixed"), &["50"]);
    thread::sleep(Duration::from_millis(200));
    let out = run_memleak(&args(&["--user-only", "--top-procs", "50", "-T", "3", "1", "3"]), Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 3, "{stdout}");
    let last = &reports[2];
    let (f, s) = (leak_of(last, fast.pid()).expect(&stdout), leak_of(last, slow.pid()).expect(&stdout));
    for stack in [f, s] {
        assert_eq!(stack.bytes, 8192 * stack.count, "{stack:?}");
    }
    // Both leak since before attach, at 20/s and 4/s: whatever the load on
    // the machine delays, the counts keep that ratio.
    let ratio = f.count as f64 / s.count as f64;
    assert!(s.count >= 6 && (3.5..=6.5).contains(&ratio), "{} {}", f.count, s.count);
    let order: Vec<&str> = last.stacks.iter().filter_map(|s| s.process.as_deref()).collect();
    let pos = |pid: u32| order.iter().position(|p| p.starts_with(&format!("{pid} "))).unwrap();
    assert!(pos(fast.pid()) < pos(slow.pid()), "biggest first: {order:?}");
    let clean_prefix = format!("{} ", clean.pid());
    assert!(!order.iter().any(|p| p.starts_with(&clean_prefix)), "the fixed program is listed:\n{stdout}");
}

#[test]
fn a_container_started_after_tracing_began_is_caught() {
    let _alone = alone();
    let tracer = std::process::Command::new(memleak_tests::memleak_bin())
        .args(["--user-only", "--top-procs", "50", "1", "4"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    // Its libc is a file of its own: memleak must find and probe it.
    let container = Container::start(&fixture("fibonacci"), &["50"]);
    let out = tracer.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reports = parse_reports(&stdout);
    let last = reports.last().expect(&stdout);
    let stack = leak_of(last, container.pid).unwrap_or_else(|| panic!("container pid {} missing:\n{stdout}", container.pid));
    assert!(stack.count >= 3 && stack.bytes == 8192 * stack.count, "{stack:?}");
    assert!(stack.frames[0].contains("[app]"), "{stack:?}");
}

#[test]
fn command_is_traced_from_its_first_allocation_and_gives_its_exit_code() {
    let _alone = alone();
    let cmd = format!("{} 50 12", fixture("fibonacci").display());
    let out = run_memleak(&args(&["-o", "0", "-c", &cmd, "30"]), Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 1, "{stdout}");
    let stack = reports[0].stacks.iter().find(|s| s.starts_with(&["fibonacci", "child"])).expect(&stdout);
    // All 12, the first included: the probes were in before exec.
    assert_eq!((stack.count, stack.bytes), (12, 12 * 8192));

    let out = run_memleak(&args(&["-c", "false", "30"]), Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(1), "the command's exit code");
    let out = run_memleak(&args(&["-c", "/no/such/command"]), Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no such command"));
}

#[test]
fn a_command_gone_within_milliseconds_has_every_frame_named() {
    let _alone = alone();
    // It dlopens a library, leaks from it and from its own code, and
    // returns: its mappings must be read before they go.
    let cmd = format!("{} {}", fixture("quick").display(), fixture("libquick.so").display());
    let out = run_memleak(&args(&["-o", "0", "-c", &cmd, "30"]), Duration::from_secs(30));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 1, "{stdout}");
    let stacks = &reports[0].stacks;
    let lib = stacks.iter().find(|s| s.starts_with(&["lib_leak", "main"])).expect(&stdout);
    assert_eq!((lib.bytes, lib.count), (4444, 1));
    assert!(lib.frames[0].contains(" [libquick.so] "), "{lib:?}");
    let own = stacks.iter().find(|s| s.starts_with(&["main_leak", "main"])).expect(&stdout);
    assert_eq!((own.bytes, own.count), (5555, 1));
    for frame in stacks.iter().flat_map(|s| &s.frames) {
        assert!(!frame.starts_with("0x") && !frame.contains("[unmapped]"), "{frame} in\n{stdout}");
    }
}

#[test]
fn files_of_exited_processes_are_closed() {
    let _alone = alone();
    // 20 programs, each its own file (a copy), each shown in a report while
    // it lives: memleak opens each one, and must let go of it once it exits.
    let dir = std::env::temp_dir().join(format!("memleak-gone-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let copies: Vec<std::path::PathBuf> = (0..20)
        .map(|i| {
            let copy = dir.join(format!("gone{i}"));
            fs::copy(fixture("fibonacci"), &copy).unwrap();
            copy
        })
        .collect();
    let mut tracer = std::process::Command::new(memleak_tests::memleak_bin())
        .args(["--user-only", "--top-procs", "1000", "-o", "0", "1", "30"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = tracer.stdout.take().unwrap();
    let (reported, reports) = std::sync::mpsc::channel();
    thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            if line.contains("Top ") {
                let _ = reported.send(());
            }
        }
    });
    reports.recv_timeout(Duration::from_secs(30)).expect("a first report");
    // Its descriptors of the copies, counted by what they name.
    let held = |pid: u32| {
        fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|fds| fds.filter_map(|fd| fs::read_link(fd.ok()?.path()).ok()).filter(|t| t.starts_with(&dir)).count())
            .unwrap_or(0)
    };
    // 10 blocks 300 ms apart: each lives through two reports or more.
    let mut apps: Vec<std::process::Child> =
        copies.iter().map(|c| std::process::Command::new(c).args(["300", "10"]).spawn().unwrap()).collect();
    let mut most = 0;
    while apps.iter_mut().any(|a| a.try_wait().unwrap().is_none()) {
        most = most.max(held(tracer.id()));
        thread::sleep(Duration::from_millis(50));
    }
    // Two reports begun after they all exited (not ones queued before).
    while reports.try_recv().is_ok() {}
    for _ in 0..2 {
        reports.recv_timeout(Duration::from_secs(10)).expect("reports after they exited");
    }
    let left = held(tracer.id());
    let _ = tracer.kill();
    let _ = tracer.wait();
    let _ = fs::remove_dir_all(&dir);
    assert!(most >= 15, "memleak opened {most} of the 20 programs' files while they ran");
    assert_eq!(left, 0, "files of exited programs still open ({most} at most)");
}

#[test]
fn kernel_allocations_are_reported_with_kernel_symbols() {
    let _alone = alone();
    let dir = std::env::temp_dir().join(format!("memleak-kernel-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    let churn_dir = dir.clone();
    let churn = thread::spawn(move || {
        // Inodes and dentries: slab allocations, kept while the files exist.
        for i in 0..3000 {
            fs::write(churn_dir.join(format!("f{i}")), b"x").unwrap();
            if i % 2 == 0 {
                fs::remove_file(churn_dir.join(format!("f{i}"))).unwrap();
            }
            thread::sleep(Duration::from_micros(300));
        }
    });
    let out = run_memleak(&args(&["--kernel-only", "-o", "0", "1", "2"]), Duration::from_secs(30));
    churn.join().unwrap();
    let _ = fs::remove_dir_all(&dir);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let reports = parse_reports(&stdout);
    assert_eq!(reports.len(), 2, "{stdout}");
    let kernel: Vec<&Stack> = reports.iter().flat_map(|r| &r.stacks).filter(|s| s.process.as_deref().is_some_and(|p| p.starts_with("kernel"))).collect();
    assert!(!kernel.is_empty(), "{stdout}");
    // Symbolized: function+offset [kernel], not bare addresses.
    assert!(
        kernel.iter().any(|s| s.frames.iter().any(|f| f.contains("+0x") && f.ends_with("[kernel]") && !f.starts_with("0x"))),
        "{stdout}"
    );
    assert!(!reports.iter().flat_map(|r| &r.stacks).any(|s| s.process.as_deref().is_some_and(|p| !p.starts_with("kernel"))));
    // Each names the allocator that made its blocks, one of its pool's.
    for s in &kernel {
        let kinds: &[&str] = match s.process.as_deref() {
            Some("kernel slab") => &["kmalloc", "kmem_cache_alloc"],
            Some("kernel pages") => &["alloc_pages"],
            _ => &["percpu"],
        };
        assert!(s.kind.as_deref().is_some_and(|k| kinds.contains(&k)), "{s:?}\n{stdout}");
    }
    // The inodes and dentries come from their caches.
    assert!(kernel.iter().any(|s| s.kind.as_deref() == Some("kmem_cache_alloc")), "{stdout}");
}

#[test]
fn an_exited_process_gives_its_per_stack_totals_back() {
    let _alone = alone();
    let tracer = std::process::Command::new(memleak_tests::memleak_bin())
        .args(["--user-only", "--combined-only", "-v", "-T", "5", "1", "8"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(1500));
    // 8 processes with a block from each of 300 stacks: 2,400 entries at
    // least (more where a process moved between CPUs).
    let leakers: Vec<std::process::Child> = (0..8)
        .map(|_| {
            let mut child = std::process::Command::new(fixture("exact"))
                .args(["stacks", "300", "1"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null())
                .spawn()
                .unwrap();
            std::io::Write::write_all(child.stdin.as_mut().unwrap(), b"go\n").unwrap();
            child
        })
        .collect();
    thread::sleep(Duration::from_millis(3000));
    for mut child in leakers {
        let _ = child.kill();
        let _ = child.wait();
    }
    let out = tracer.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    // "memleak: report 3 took 0.001 s (2430 entries read)"
    let read: Vec<u64> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("memleak: report ")?.split_once('(')?.1.split(' ').next()?.parse().ok())
        .collect();
    // Other tests' processes come and go too: the fewest entries after the
    // peak, not the last report's.
    let most = *read.iter().max().expect(&stderr);
    let peak = read.iter().position(|&n| n == most).unwrap();
    let after = read[peak + 1..].iter().min().copied();
    assert!(most >= 2400 && after.is_some_and(|n| n + 2400 <= most), "entries read per report: {read:?}");
}
