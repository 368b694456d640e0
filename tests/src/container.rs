//! A process "in a container" without a container engine: new mount and PID
//! namespaces on a tmpfs root of its own (pivot_root), holding the program
//! at /app and its own copies of libc and the dynamic loader. Its
//! /proc/PID/maps then shows /app and /lib/..., as for a Docker container:
//! paths that on the host lead nowhere or to other files.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

pub struct Container {
    launcher: Child,
    /// The program's PID on the host.
    pub pid: u32,
    rootfs: PathBuf,
}

impl Container {
    /// Starts `program` as /app (PID 1 of its namespace) with `args`.
    pub fn start(program: &Path, args: &[&str]) -> Self {
        Self::start_with(program, args, &[])
    }

    /// `start`, with more files in the container: (host file, path inside).
    pub fn start_with(program: &Path, args: &[&str], files: &[(&Path, &Path)]) -> Self {
        Self::launch(program, args, files, None)
    }

    /// `start`, with /app at inode number `inode` of the container's tmpfs
    /// (a tmpfs numbers its inodes one after the other: empty files take
    /// the numbers before it). The inode number of a host file, say: a
    /// check of the inode number alone would take one for the other.
    pub fn start_with_app_inode(program: &Path, args: &[&str], inode: u64) -> Self {
        Self::launch(program, args, &[], Some(inode))
    }

    fn launch(program: &Path, args: &[&str], files: &[(&Path, &Path)], app_inode: Option<u64>) -> Self {
        let base = std::env::temp_dir().join(format!("memleak-ct-{}-{}", std::process::id(), unique()));
        let rootfs = base.join("rootfs");
        let mountpoint = base.join("mnt");
        fs::create_dir_all(&mountpoint).unwrap();
        copy_into(&rootfs, program, Path::new("/app"));
        for lib in shared_libraries(program) {
            copy_into(&rootfs, &lib, &lib);
        }
        for (from, to) in files {
            copy_into(&rootfs, from, to);
        }
        // Empty files up to the inode before, then a copy of /app takes it.
        let pad = app_inode.map_or_else(String::new, |inode| {
            format!(
                "mkdir .pad && : > .pad/first && i=$(stat -c %i .pad/first) && \
                 while [ $i -lt {last} ]; do i=$((i+1)); : > .pad/$i; done && cp app app.new && mv app.new app && ",
                last = inode - 1
            )
        });
        let script = format!(
            "mount -t tmpfs none {mnt} && cp -a {root}/. {mnt}/ && cd {mnt} && {pad}mkdir .old && pivot_root . .old && exec /app {args}",
            mnt = mountpoint.display(),
            root = rootfs.display(),
            args = args.join(" "),
        );
        let launcher = Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unshare (util-linux) is needed for the container tests");
        let pid = wait_for_app(launcher.id());
        Self { launcher, pid, rootfs: base }
    }

    /// The process's maps, as the host sees them.
    pub fn maps(&self) -> String {
        fs::read_to_string(format!("/proc/{}/maps", self.pid)).unwrap_or_default()
    }

    /// Deletes /app inside the container (the process keeps running).
    pub fn delete_app(&self) {
        fs::remove_file(format!("/proc/{}/root/app", self.pid)).expect("delete /app in the container");
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // PID 1 of its namespace ignores SIGTERM from outside: SIGKILL.
        // SAFETY: signalling a process we started.
        unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        let _ = self.launcher.kill();
        let _ = self.launcher.wait();
        let _ = fs::remove_dir_all(&self.rootfs);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Copies `from` to `rootfs` + `to`.
fn copy_into(rootfs: &Path, from: &Path, to: &Path) {
    let dest = rootfs.join(to.strip_prefix("/").unwrap());
    fs::create_dir_all(dest.parent().unwrap()).unwrap();
    fs::copy(from, &dest).unwrap_or_else(|e| panic!("copy {} -> {}: {e}", from.display(), dest.display()));
}

/// The shared libraries `program` loads, as ldd lists them (paths as the
/// program asks for them, so the copies sit where it will look).
fn shared_libraries(program: &Path) -> Vec<PathBuf> {
    let out = Command::new("ldd").arg(program).output().expect("ldd");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once(" => ") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// The host PID of /app: the child of the launcher's forked namespace init.
fn wait_for_app(launcher: u32) -> u32 {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        let children = fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children")).unwrap_or_default();
        if let Some(pid) = children.split_whitespace().next().and_then(|p| p.parse::<u32>().ok())
            && fs::read_to_string(format!("/proc/{pid}/maps")).is_ok_and(|m| m.contains(" /app"))
        {
            return pid;
        }
        thread::sleep(Duration::from_millis(20));
    }
    panic!("the container did not start /app within 10 s");
}
