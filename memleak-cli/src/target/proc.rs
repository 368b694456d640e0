//! What /proc says about the target: that it exists, what it maps, and a
//! pidfd that tells when it exits.

use std::{
    fs,
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
};

use anyhow::Context as _;

use crate::error::{Kind, user_error};

/// The traced process, as it was when tracing started.
#[derive(Debug)]
pub struct Target {
    pub pid: u32,
    pub comm: String,
    /// /proc/PID, as opened when it was read: reads through it fail once
    /// that process is gone, even if its PID names another one by then
    /// (the start time in /proc/PID/stat counts 10 ms ticks: two processes
    /// can share one). None for a command memleak starts itself.
    pub dir: Option<fs::File>,
}

impl Target {
    /// Checks that `pid` names a user process we can trace.
    pub fn open(pid: u32) -> anyhow::Result<Self> {
        let not_found = |e: io::Error| {
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
                user_error(Kind::NoProcess, format!("no process with PID {pid}"))
            } else {
                anyhow::Error::new(e).context(format!("reading /proc/{pid}/stat"))
            }
        };
        let dir = fs::File::open(format!("/proc/{pid}")).map_err(not_found)?;
        let stat = read_at(&dir, c"stat").map_err(not_found)?;
        let stat = Stat::parse(&stat)
            .ok_or_else(|| anyhow::anyhow!("cannot parse /proc/{pid}/stat"))?;
        if stat.is_kernel_thread() {
            return Err(user_error(
                Kind::NoProcess,
                format!("PID {pid} ({}) is a kernel thread: it has no user-space allocator to trace", stat.comm),
            ));
        }
        if stat.state == 'Z' {
            return Err(user_error(
                Kind::NoProcess,
                format!("process {pid} ({}) has exited: a zombie its parent has not reaped yet, with nothing left to trace", stat.comm),
            ));
        }
        Ok(Self { pid, comm: stat.comm, dir: Some(dir) })
    }

    /// Fails if the process opened is gone: its PID names another process
    /// now (it exited and the PID was reused), or none.
    pub fn check_same(&self) -> anyhow::Result<()> {
        let Some(dir) = &self.dir else { return Ok(()) };
        if read_at(dir, c"stat").is_ok() {
            return Ok(());
        }
        let gone = format!("process {} ({}) exited", self.pid, self.comm);
        Err(match Self::open(self.pid) {
            Ok(now) => user_error(Kind::NoProcess, format!("{gone} and its PID now names another process ({})", now.comm)),
            Err(_) => user_error(Kind::NoProcess, gone),
        })
    }

    /// The process's mappings now.
    pub fn maps(&self) -> anyhow::Result<Vec<Mapping>> {
        let text = fs::read_to_string(format!("/proc/{}/maps", self.pid)).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH) {
                user_error(Kind::NoProcess, format!("process {} exited", self.pid))
            } else {
                anyhow::Error::new(e).context(format!("reading /proc/{}/maps", self.pid))
            }
        })?;
        Ok(parse_maps(&text))
    }
}

/// Reads the file `name` in the directory `dir`.
fn read_at(dir: &fs::File, name: &std::ffi::CStr) -> io::Result<String> {
    // SAFETY: openat with a valid directory fd and a NUL-terminated name.
    let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just opened and is owned by nothing else.
    let mut file = unsafe { fs::File::from_raw_fd(fd) };
    let mut text = String::new();
    io::Read::read_to_string(&mut file, &mut text)?;
    Ok(text)
}

/// Process `pid`'s mappings now (none once it is gone).
pub fn maps_of(pid: u32) -> Vec<Mapping> {
    maps_text(pid).map(|text| parse_maps(&text)).unwrap_or_default()
}

/// The text of `/proc/PID/maps`.
pub fn maps_text(pid: u32) -> io::Result<String> {
    fs::read_to_string(format!("/proc/{pid}/maps"))
}

/// memleak's own mappings.
pub fn own_maps() -> io::Result<String> {
    fs::read_to_string("/proc/self/maps")
}

/// The path of the program process `pid` runs, as the kernel names it
/// (None once it is gone).
pub fn exe(pid: u32) -> Option<String> {
    fs::read_link(format!("/proc/{pid}/exe")).ok().map(|p| p.to_string_lossy().into_owned())
}

/// memleak's own program.
pub fn own_exe() -> Option<String> {
    fs::read_link("/proc/self/exe").ok().map(|p| p.to_string_lossy().into_owned())
}

/// memleak's own `/proc/self/status`.
pub fn own_status() -> io::Result<String> {
    fs::read_to_string("/proc/self/status")
}

/// The PIDs of all processes now.
pub fn pids() -> Vec<u32> {
    fs::read_dir("/proc")
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// Whether process `pid` still exists (a zombie does, until reaped).
pub fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Whether process `pid` still runs: it exists and is no zombie (whose
/// mappings are gone already).
pub fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).ok().and_then(|s| Stat::parse(&s)).is_some_and(|s| s.state != 'Z')
}

/// The kernel's estimate of memory available for new work (MemAvailable
/// in /proc/meminfo), in bytes.
pub fn mem_available() -> Option<u64> {
    parse_mem_available(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

fn parse_mem_available(meminfo: &str) -> Option<u64> {
    let kib = meminfo.lines().find_map(|l| l.strip_prefix("MemAvailable:"))?.trim().strip_suffix(" kB")?;
    kib.trim().parse::<u64>().ok()?.checked_mul(1024)
}

/// A process's command name, or "?" once it is gone.
pub fn comm(pid: u32) -> String {
    fs::read_to_string(format!("/proc/{pid}/comm")).map_or_else(|_| "?".into(), |c| c.trim_end().to_string())
}

/// The name a thread of process `pid` has now (`/proc/PID/task/TID/comm`:
/// a tid is only looked for in its own process); None once it is gone.
pub fn thread_comm(pid: u32, tid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm")).ok().map(|c| c.trim_end_matches('\n').to_string())
}

/// The name of task `tid`, in whatever process (`/proc/TID/comm` names
/// threads too, though /proc lists only processes); None once it is gone.
pub fn task_comm(tid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{tid}/comm")).ok().map(|c| c.trim_end_matches('\n').to_string())
}

/// The threads of process `pid` now (none once it is gone).
pub fn threads(pid: u32) -> Vec<u32> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .map(|dir| dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok()).collect())
        .unwrap_or_default()
}

/// The fields of /proc/PID/stat that memleak uses.
#[derive(Debug, PartialEq, Eq)]
pub struct Stat {
    pub comm: String,
    /// `R`, `S`, ..., `Z` for a zombie.
    pub state: char,
    pub flags: u64,
    pub start_time: u64,
}

impl Stat {
    /// Parses /proc/PID/stat; `comm` may hold spaces and parentheses, so
    /// the fields after it are found from the last ')'.
    pub fn parse(text: &str) -> Option<Self> {
        let open = text.find('(')?;
        let close = text.rfind(')')?;
        let comm = text.get(open + 1..close)?.to_string();
        // Fields after comm, numbered from 3 (state) as in proc(5).
        let rest: Vec<&str> = text.get(close + 1..)?.split_whitespace().collect();
        let field = |n: usize| rest.get(n - 3)?.parse::<u64>().ok();
        Some(Self {
            comm,
            state: rest.first()?.chars().next()?,
            flags: field(9)?,
            start_time: field(22)?,
        })
    }

    pub fn is_kernel_thread(&self) -> bool {
        const PF_KTHREAD: u64 = 0x0020_0000;
        self.flags & PF_KTHREAD != 0
    }
}

/// One line of /proc/PID/maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    pub offset: u64,
    /// Device, as "major:minor" in hex: with the inode, names the file.
    pub dev: String,
    pub inode: u64,
    /// The path as the process sees it ("" for anonymous memory); a file
    /// deleted since it was mapped keeps its " (deleted)" suffix here.
    pub path: String,
}

impl Mapping {
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }

    pub fn contains(&self, addr: u64) -> bool {
        self.start <= addr && addr < self.end
    }

    /// The device's (major, minor) numbers.
    pub fn device(&self) -> Option<(u32, u32)> {
        let (major, minor) = self.dev.split_once(':')?;
        Some((u32::from_str_radix(major, 16).ok()?, u32::from_str_radix(minor, 16).ok()?))
    }

    /// The name printed in frames: `[app]`, `[libc.so.6]`.
    pub fn module_name(&self) -> &str {
        module_name(&self.path)
    }
}

/// The last component of a module path, without " (deleted)".
pub fn module_name(path: &str) -> &str {
    let path = path.strip_suffix(" (deleted)").unwrap_or(path);
    path.rsplit('/').next().unwrap_or(path)
}

/// Parses /proc/PID/maps; malformed lines are skipped, never fatal.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let (start, end) = fields.next()?.split_once('-')?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim_start();
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        perms: perms.to_string(),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev: dev.to_string(),
        inode: inode.parse().ok()?,
        path: path.to_string(),
    })
}

/// A pidfd: readable once the process has exited.
pub struct PidFd(OwnedFd);

impl PidFd {
    pub fn open(pid: u32) -> anyhow::Result<Self> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
        if fd < 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::ESRCH) {
                return Err(user_error(Kind::NoProcess, format!("process {pid} exited")));
            }
            return Err(err).context("pidfd_open");
        }
        // SAFETY: the fd was just returned to us and nobody else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd as RawFd) }))
    }
}

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn memory_available_from_meminfo() {
        let meminfo = "MemTotal:       24576000 kB\nMemFree:         1000 kB\nMemAvailable:   20971520 kB\n";
        assert_eq!(parse_mem_available(meminfo), Some(20 << 30));
        assert_eq!(parse_mem_available("MemTotal: 5 kB\n"), None);
        assert!(mem_available().is_some_and(|b| b > 0));
    }

    use super::*;

    #[test]
    fn parses_maps_lines_of_every_kind() {
        let text = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 00:2a 12 /app
7f1e2a000000-7f1e2a028000 r-xp 00028000 fd:01 1835 /lib/x86_64-linux-gnu/libc.so.6
7f1e2b000000-7f1e2b021000 rw-p 00000000 00:00 0 
7ffd5a000000-7ffd5a021000 rw-p 00000000 00:00 0                          [stack]
7f00-7f10 r-xp 00000000 00:2a 99 /srv/my app (deleted)
garbage line
";
        let maps = parse_maps(text);
        assert_eq!(maps.len(), 5);
        assert_eq!(maps[0].path, "/app");
        assert_eq!((maps[1].start, maps[1].end, maps[1].offset), (0x7f1e2a000000, 0x7f1e2a028000, 0x28000));
        assert_eq!(maps[1].module_name(), "libc.so.6");
        assert_eq!((maps[1].dev.as_str(), maps[1].inode), ("fd:01", 1835));
        assert_eq!((maps[1].device(), maps[0].device()), (Some((0xfd, 1)), Some((0, 0x2a))));
        assert!(maps[1].is_file() && !maps[2].is_file() && !maps[3].is_file());
        assert_eq!(maps[3].path, "[stack]");
        assert_eq!(maps[4].path, "/srv/my app (deleted)");
        assert_eq!(maps[4].module_name(), "my app");
        assert!(maps[1].contains(0x7f1e2a000000) && !maps[1].contains(0x7f1e2a028000));
    }

    #[test]
    fn parses_stat_with_awkward_comm() {
        let line = "1234 (a (b) c) S 1 1234 1234 0 -1 4194560 10 0 0 0 1 2 0 0 20 0 3 0 987654 1000 100";
        let stat = Stat::parse(line).unwrap();
        assert_eq!(stat.comm, "a (b) c");
        assert_eq!(stat.flags, 4194560);
        assert_eq!((stat.start_time, stat.state), (987654, 'S'));
        assert!(!stat.is_kernel_thread());
        let kthread = "2 (kthreadd) S 0 0 0 0 -1 2129984 0 0 0 0 0 0 0 0 20 0 1 0 5 0 0";
        assert!(Stat::parse(kthread).unwrap().is_kernel_thread());
        assert_eq!(Stat::parse("nonsense"), None);
    }

    #[test]
    fn real_process_is_found_and_missing_one_is_not() {
        let me = Target::open(std::process::id()).unwrap();
        assert!(me.maps().unwrap().iter().any(Mapping::is_file));
        me.check_same().unwrap();
        // A process that exited (and was reaped) is gone, whatever its PID
        // names by now.
        let mut child = std::process::Command::new("sleep").arg("5").spawn().unwrap();
        let opened = Target::open(child.id()).unwrap();
        opened.check_same().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let err = opened.check_same().unwrap_err();
        assert_eq!(crate::error::exit_code(&err), Kind::NoProcess as u8);
        assert!(err.to_string().starts_with(&format!("process {} (sleep) exited", child.id())), "{err}");
        let err = Target::open(u32::MAX - 1).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), Kind::NoProcess as u8);
        let err = Target::open(2).unwrap_err(); // kthreadd
        assert!(err.to_string().contains("kernel thread"), "{err}");
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Any text: parsing never panics, and what it returns is well-formed.
        #[test]
        fn maps_parser_never_panics(text in "\\PC*") {
            for m in parse_maps(&text) {
                let _ = (m.module_name(), m.is_file(), m.contains(m.start));
            }
        }

        #[test]
        fn maps_lines_round_trip(start in 0u64..1 << 47, len in 1u64..1 << 30, offset in any::<u32>(),
                                 inode in any::<u32>(), path in "(/[a-z0-9._ -]{1,12}){0,4}") {
            let line = format!("{:x}-{:x} r-xp {:08x} fd:01 {inode}    {path}", start, start + len, offset);
            let m = &parse_maps(&line)[0];
            prop_assert_eq!((m.start, m.end, m.offset, m.inode), (start, start + len, offset as u64, inode as u64));
            prop_assert_eq!(&m.path, path.trim_start());
        }

        #[test]
        fn stat_parser_never_panics(text in "\\PC*") {
            let _ = Stat::parse(&text);
        }

        #[test]
        fn stat_comm_may_hold_anything(comm in "[^\n]{0,15}", flags in any::<u32>(), start in any::<u64>()) {
            let line = format!("7 ({comm}) S 1 1 1 0 -1 {flags} 0 0 0 0 0 0 0 0 20 0 1 0 {start} 0 0");
            let stat = Stat::parse(&line).unwrap();
            prop_assert_eq!((stat.comm, stat.flags, stat.start_time), (comm, flags as u64, start));
        }
    }
}
