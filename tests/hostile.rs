//! Hostile and changing targets. Root on a shared host: whatever a
//! container does to its own files, memleak must never be steered to host
//! files (probes, reads) by a name the container controls.

use std::{
    ffi::CString,
    fs,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use memleak_tests::{Report, Stack, container::Container, fixture, parse_reports, run_memleak};

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// A host file that no traced process maps by a libc-like name: a copy of
/// the host's libc (so that the offsets of malloc and the others fall in
/// it), mapped read-only by this test process as a program maps its text.
/// The kernel puts a uprobe's breakpoint into every such mapping of the
/// probed file, whatever the process.
struct HostFile {
    dir: PathBuf,
    path: PathBuf,
    map: *const u8,
    len: usize,
}

impl HostFile {
    fn copy_of_libc() -> Self {
        let dir = std::env::temp_dir().join(format!("memleak-host-{}-{:?}", std::process::id(), thread::current().id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("host-program.bin");
        fs::copy(host_libc(), &path).unwrap();
        let file = fs::File::open(&path).unwrap();
        let len = file.metadata().unwrap().len() as usize;
        // SAFETY: a new private read-only mapping of a file we own; it is
        // only read, and unmapped in Drop.
        let map = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ, libc::MAP_PRIVATE, std::os::fd::AsRawFd::as_raw_fd(&file), 0)
        };
        assert_ne!(map, libc::MAP_FAILED);
        Self { dir, path, map: map.cast(), len }
    }

    /// Whether this process's mapping of the file differs from the file:
    /// a breakpoint was written into it.
    fn mapping_differs(&self, file: &[u8]) -> bool {
        // SAFETY: the mapping lives as long as self.
        let mapped = unsafe { std::slice::from_raw_parts(self.map, self.len) };
        mapped != file
    }
}

impl Drop for HostFile {
    fn drop(&mut self) {
        // SAFETY: the mapping made in copy_of_libc.
        unsafe { libc::munmap(self.map as *mut libc::c_void, self.len) };
        let _ = fs::remove_dir_all(&self.dir);
    }
}

fn host_libc() -> PathBuf {
    let maps = fs::read_to_string("/proc/self/maps").unwrap();
    let line = maps.lines().find(|l| l.ends_with("/libc.so.6")).expect("this test runs on glibc");
    line.split_whitespace().last().unwrap().into()
}

/// The container's libc: its path in the container, device and inode.
fn container_libc(container: &Container) -> (String, String, u64) {
    // The container's init may not have mapped its libc yet: under load
    // the first read of its maps came before ld.so had (CI, once).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let maps = loop {
        let maps = container.maps();
        if maps.lines().any(|l| l.ends_with("/libc.so.6")) || std::time::Instant::now() > deadline {
            break maps;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let line = maps.lines().find(|l| l.ends_with("/libc.so.6")).expect("the container maps a libc");
    let fields: Vec<&str> = line.split_whitespace().collect();
    (fields[5].to_string(), fields[3].to_string(), fields[4].parse().unwrap())
}

/// Swaps `path` of the container of process `pid` for a symlink to the
/// host file `target` as soon as something opens it (inotify): what a
/// hostile container does to the tracer that came to read its libc.
/// Returns whether it swapped (within 30 s).
fn swap_on_open(pid: u32, path: &str, target: &Path) -> thread::JoinHandle<bool> {
    let inside = PathBuf::from(format!("/proc/{pid}/root{path}"));
    // SAFETY: plain system calls on a new descriptor we own.
    let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    assert!(fd >= 0);
    let c_inside = CString::new(inside.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path.
    assert!(unsafe { libc::inotify_add_watch(fd, c_inside.as_ptr(), libc::IN_OPEN) } >= 0);
    let target = target.to_path_buf();
    thread::spawn(move || {
        let mut poll = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let ready = unsafe { libc::poll(&mut poll, 1, 30_000) } == 1;
        if ready {
            let temp = inside.with_extension("swap");
            std::os::unix::fs::symlink(&target, &temp).unwrap();
            fs::rename(&temp, &inside).unwrap();
        }
        // SAFETY: closing the descriptor made above.
        unsafe { libc::close(fd) };
        ready
    })
}

fn leak_stack<'a>(report: &'a Report, process: Option<u32>) -> Option<&'a Stack> {
    report.stacks.iter().find(|s| {
        s.starts_with(&["fibonacci", "child"])
            && process.is_none_or(|pid| s.process.as_deref().is_some_and(|p| p.starts_with(&format!("{pid} "))))
    })
}

fn assert_container_leak(stdout: &str, process: Option<u32>) {
    let reports = parse_reports(stdout);
    assert!(!reports.is_empty(), "{stdout}");
    let stack = leak_stack(reports.last().unwrap(), process)
        .unwrap_or_else(|| panic!("the container's leak is not reported:\n{stdout}"));
    assert!(stack.count >= 3 && stack.bytes == 8192 * stack.count, "{stack:?}");
    assert!(stack.frames[0].contains("[app] fixtures/fibonacci.c:"), "{stack:?}");
}

/// `-p`: the swap comes between memleak's open of the container's libc
/// and its attach. The probes must go on the file the container maps, so
/// its leak is reported, and -v names that file by its inode.
#[test]
fn a_libc_swapped_for_a_host_file_keeps_the_probes_in_the_container() {
    let host = HostFile::copy_of_libc();
    let container = Container::start(&fixture("fibonacci"), &["100"]);
    let (libc, dev, inode) = container_libc(&container);
    let swapped = swap_on_open(container.pid, &libc, &host.path);
    let out = run_memleak(&args(&["-p", &container.pid.to_string(), "-v", "1", "2"]), Duration::from_secs(30));
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(swapped.join().unwrap(), "memleak never opened the container's libc:\n{stderr}");
    // The container's path now leads to the host file, on the host.
    assert_eq!(fs::read_link(format!("/proc/{}/root{libc}", container.pid)).unwrap(), host.path);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_container_leak(&stdout, None);
    let probed = format!("memleak: probes on {libc} (inode {inode} on device {dev}):");
    assert!(stderr.contains(&probed), "no `{probed}`:\n{stderr}");
}

/// System-wide: the same swap must not put a breakpoint into the host
/// file (read back from a mapping of it while memleak is attached), and the
/// container's leak is still reported.
#[test]
fn system_wide_a_swapped_libc_puts_no_breakpoint_into_a_host_file() {
    let host = HostFile::copy_of_libc();
    let bytes = fs::read(&host.path).unwrap();
    let container = Container::start(&fixture("fibonacci"), &["100"]);
    let (libc, ..) = container_libc(&container);
    let swapped = swap_on_open(container.pid, &libc, &host.path);
    let mut tracer = Command::new(memleak_tests::memleak_bin())
        .args(["--user-only", "--top-procs", "50", "1", "3"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Its output read as it comes: a busy machine's system-wide reports
    // outgrow a pipe's 64 KiB, and memleak drops what nobody reads.
    let stdout = memleak_tests::drain(tracer.stdout.take().unwrap());
    let stderr = memleak_tests::drain(tracer.stderr.take().unwrap());
    // Read the mapping back while memleak is attached (its probes go at
    // exit): every 20 ms until it ends.
    let start = Instant::now();
    let mut written = false;
    while tracer.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(60) {
        written |= host.mapping_differs(&bytes);
        thread::sleep(Duration::from_millis(20));
    }
    let _ = tracer.kill();
    let status = tracer.wait().unwrap();
    let out = std::process::Output { status, stdout: stdout.join().unwrap(), stderr: stderr.join().unwrap() };
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(swapped.join().unwrap(), "memleak never opened the container's libc:\n{stderr}");
    assert!(!written, "memleak wrote breakpoints into the host file the container pointed at");
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert_container_leak(&stdout, Some(container.pid));
}

/// What memleak opened (open, openat, openat2), as strace saw it: every
/// path, each with its result.
fn opened_paths(log: &Path) -> Vec<String> {
    let text = fs::read_to_string(log).unwrap_or_default();
    text.lines().filter(|l| l.contains("open")).map(str::to_string).collect()
}

/// memleak, traced by strace (its file system calls logged to `log`).
fn memleak_under_strace(log: &Path, args: &[&str]) -> std::process::Output {
    let mut all = vec!["-f", "-qq", "-e", "trace=open,openat,openat2", "-o"];
    let log = log.to_str().unwrap();
    all.push(log);
    let bin = memleak_tests::memleak_bin();
    all.push(bin.to_str().unwrap());
    all.extend(args);
    let child = Command::new("strace").args(&all).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn();
    child.expect("strace is needed: `cargo xtask setup` installs it").wait_with_output().unwrap()
}

/// The matching-inode trick: the container's /app has the inode number of
/// a host file that memleak must never read (/etc/shadow), and the
/// container turns /app into a symlink to that host path as soon as
/// memleak opens it. A tracer that resolves the name on the host and
/// checks the inode number alone opens /etc/shadow. memleak opens the
/// container's files only through the mappings (/proc/PID/map_files),
/// device and inode checked: strace sees no open of the host file, with
/// -p and system-wide, and the leak is still named from the real /app.
#[test]
fn a_container_file_with_a_host_files_inode_never_leads_to_the_host_file() {
    let decoy = Path::new("/etc/shadow");
    let inode = std::os::unix::fs::MetadataExt::ino(&fs::metadata(decoy).unwrap());
    for system_wide in [false, true] {
        let container = Container::start_with_app_inode(&fixture("fibonacci"), &["100"], inode);
        let app = fs::metadata(format!("/proc/{}/root/app", container.pid)).unwrap();
        assert_eq!(std::os::unix::fs::MetadataExt::ino(&app), inode, "the container's /app did not get the decoy's inode number");
        let swapped = swap_on_open(container.pid, "/app", decoy);
        let log = std::env::temp_dir().join(format!("memleak-decoy-{}-{system_wide}.strace", std::process::id()));
        let pid = container.pid.to_string();
        let args: &[&str] = if system_wide { &["--user-only", "--top-procs", "50", "1", "3"] } else { &["-p", &pid, "1", "3"] };
        let out = memleak_under_strace(&log, args);
        let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(swapped.join().unwrap(), "memleak never opened the container's /app:\n{stderr}");
        assert!(out.status.success(), "{stdout}\n{stderr}");
        let opened = opened_paths(&log);
        assert!(opened.len() > 10, "strace saw no opens: {opened:?}");
        let decoys: Vec<&String> = opened.iter().filter(|l| l.contains("/etc/shadow") || l.contains("root/app\"")).collect();
        assert!(decoys.is_empty(), "memleak opened by name what the container points at:\n{decoys:#?}");
        assert_container_leak(&stdout, system_wide.then_some(container.pid));
        let _ = fs::remove_file(&log);
    }
}
