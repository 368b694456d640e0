//! uprobe_multi links (Linux 6.6): all of one program's probes on one file
//! go in through one link, so detaching is one unregistration per link, not
//! one per probe. A perf-event uprobe took 0.18 to 0.23 s to remove, one
//! after the other under one lock: Ctrl-C took 2 to 5 s with `-p` and up to
//! 11 s system-wide.
//!
//! aya 0.14 has no such link, and no way to load a uprobe program with the
//! `expected_attach_type` the kernel requires of one (`BPF_TRACE_UPROBE_MULTI`),
//! so both are raw bpf() calls through the program's fd, here and nowhere
//! else. The instructions are aya's own: the same object, parsed and
//! relocated by aya-obj against the maps aya created. Kernels without the
//! link refuse the load or the link; memleak then attaches through aya's
//! per-probe perf links, as before.

use std::{
    collections::HashMap,
    ffi::CString,
    io,
    mem::size_of,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
    path::Path,
};

use aya::{Ebpf, maps::Map};
use aya_obj::generated::bpf_insn;

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;

/// `union bpf_attr` for `BPF_PROG_LOAD`, up to `expected_attach_type`
/// (include/uapi/linux/bpf.h); the kernel takes the rest as zeros.
#[repr(C)]
#[derive(Default)]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// `union bpf_attr`'s `link_create` with its `uprobe_multi` member.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    path: u64,
    offsets: u64,
    ref_ctr_offsets: u64,
    cookies: u64,
    cnt: u32,
    multi_flags: u32,
    pid: u32,
    /// Explicit: the kernel refuses (EINVAL) an attr whose bytes past the
    /// last field are not zero, and padding may hold anything.
    _pad: u32,
}

/// `union bpf_attr`'s `info` member.
#[repr(C)]
#[derive(Default)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is the #[repr(C)] prefix of `union bpf_attr` this
    // command reads, its pointers valid for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, size_of::<T>()) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd, ours alone.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The uprobe programs' instructions, relocated against aya's maps, ready
/// to load for uprobe_multi links.
pub struct Programs {
    license: CString,
    insns: HashMap<String, Vec<bpf_insn>>,
}

impl Programs {
    /// Relocates the object's programs (`obj`, parsed from the bytes aya
    /// loaded) as aya did: its maps' fds in the map loads, calls resolved.
    pub fn relocate(mut obj: aya_obj::Object, ebpf: &Ebpf) -> anyhow::Result<Self> {
        let maps = std::mem::take(&mut obj.maps);
        let fds: Vec<(&str, i32, &aya_obj::Map)> = ebpf
            .maps()
            .map(|(name, map)| {
                let fd = map_fd(map).ok_or_else(|| anyhow::anyhow!("map {name} of an unexpected type"))?;
                let obj_map = maps.get(name).ok_or_else(|| anyhow::anyhow!("map {name} not in the object"))?;
                Ok((name, fd.as_raw_fd(), obj_map))
            })
            .collect::<anyhow::Result<_>>()?;
        let text_sections = obj.functions.keys().map(|(section, _)| *section).collect();
        obj.relocate_maps(fds.into_iter(), &text_sections)?;
        obj.relocate_calls(&text_sections)?;
        let license = obj.license.clone();
        let insns = obj
            .programs
            .iter()
            .filter_map(|(name, program)| Some((name.clone(), obj.functions.get(&program.function_key())?.instructions.clone())))
            .collect();
        Ok(Self { license, insns })
    }

    /// Loads program `name` for uprobe_multi links.
    pub fn load(&self, name: &str) -> io::Result<OwnedFd> {
        let insns = self.insns.get(name).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_string()))?;
        let mut attr = ProgLoadAttr {
            prog_type: BPF_PROG_TYPE_KPROBE,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: self.license.as_ptr() as u64,
            expected_attach_type: BPF_TRACE_UPROBE_MULTI,
            ..Default::default()
        };
        let n = name.len().min(15);
        attr.prog_name[..n].copy_from_slice(&name.as_bytes()[..n]);
        bpf(BPF_PROG_LOAD, &mut attr).or_else(|e| {
            // Again with the verifier's log, whose last lines say why.
            let mut log = vec![0u8; 1 << 24];
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
            bpf(BPF_PROG_LOAD, &mut attr).map_err(|_| {
                let text = String::from_utf8_lossy(&log[..log.iter().position(|&b| b == 0).unwrap_or(0)]).into_owned();
                let tail: Vec<&str> = text.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect();
                io::Error::new(e.kind(), format!("{e}; the verifier said: {}", tail.join(" | ")))
            })
        })
    }
}

/// The fd of a map of the types memleak's object has.
fn map_fd(map: &Map) -> Option<BorrowedFd<'_>> {
    let data = match map {
        Map::Array(m)
        | Map::HashMap(m)
        | Map::PerCpuArray(m)
        | Map::PerCpuHashMap(m)
        | Map::ProgramArray(m)
        | Map::RingBuf(m)
        | Map::StackTraceMap(m)
        | Map::LruHashMap(m)
        | Map::PerfEventArray(m)
        | Map::Unsupported(m) => m,
        _ => return None,
    };
    Some(data.fd().as_fd())
}

/// Puts program `prog` on each of `offsets` in the file at `path` (valid
/// on the host), at entry or at return, for process `pid` (0: every
/// process): one link, whose fd removes them all when closed.
pub fn attach(prog: BorrowedFd<'_>, path: &Path, offsets: &[u64], cookies: &[u64], pid: u32, ret: bool) -> io::Result<OwnedFd> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_TRACE_UPROBE_MULTI,
        path: path.as_ptr() as u64,
        offsets: offsets.as_ptr() as u64,
        cookies: if cookies.len() == offsets.len() { cookies.as_ptr() as u64 } else { 0 },
        cnt: offsets.len() as u32,
        multi_flags: if ret { BPF_F_UPROBE_MULTI_RETURN } else { 0 },
        pid,
        ..Default::default()
    };
    bpf(BPF_LINK_CREATE, &mut attr)
}

/// The kernel's id of a loaded program (to find its run statistics).
pub fn program_id(prog: BorrowedFd<'_>) -> io::Result<u32> {
    // `struct bpf_prog_info` starts with its type and id.
    let mut info = [0u32; 2];
    let mut attr = InfoAttr { bpf_fd: prog.as_raw_fd() as u32, info_len: 8, info: info.as_mut_ptr() as u64 };
    // SAFETY: as in `bpf`; this command returns 0, not an fd.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_GET_INFO_BY_FD, &mut attr as *mut InfoAttr, size_of::<InfoAttr>())
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info[1])
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;

/// `union bpf_attr`'s map element member.
#[repr(C)]
#[derive(Default)]
struct MapElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// Sets entry `index` of the program array `map` to `prog` (aya's
/// `ProgramArray::set` takes only programs aya loaded).
pub fn set_program(map: BorrowedFd<'_>, index: u32, prog: BorrowedFd<'_>) -> io::Result<()> {
    let value = prog.as_raw_fd() as u32;
    let mut attr = MapElemAttr {
        map_fd: map.as_raw_fd() as u32,
        key: (&raw const index) as u64,
        value: (&raw const value) as u64,
        ..Default::default()
    };
    // SAFETY: as in `bpf`; this command returns 0, not an fd.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_UPDATE_ELEM, &mut attr as *mut MapElemAttr, size_of::<MapElemAttr>())
    };
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
}

/// Whether the running kernel has uprobe_multi links (Linux 6.6).
pub fn supported() -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let mut parts = release.trim().split(['.', '-']).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (major, minor) >= (6, 6)
}

/// A piece of work for `run_all_forked`.
type Job = Box<dyn FnOnce() + Send>;

/// Runs `jobs` at once, each on a thread of its own, in the child of a
/// fork from the multithreaded memleak. Threads are started with
/// pthread_create, not std::thread: std's thread start takes a lock of its
/// own, which another thread of memleak may have held at the fork, and
/// then the child never ends (it hung 11 minutes once, every new thread
/// blocked in std's `set_current_info`). glibc resets its own locks
/// (malloc's, the thread stack cache's) in a fork's child.
fn run_all_forked(jobs: Vec<Job>) {
    extern "C" fn run(job: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: made by Box::into_raw below, given to this thread alone.
        let job = unsafe { Box::from_raw(job.cast::<Job>()) };
        job();
        std::ptr::null_mut()
    }
    let mut threads = Vec::with_capacity(jobs.len());
    for job in jobs {
        let raw = Box::into_raw(Box::new(job));
        // SAFETY: pthread_t is plain data; zeroed is a valid placeholder.
        let mut thread: libc::pthread_t = unsafe { std::mem::zeroed() };
        // SAFETY: default attributes; `run` takes the job as its argument.
        match unsafe { libc::pthread_create(&mut thread, std::ptr::null(), run, raw.cast()) } {
            0 => threads.push(thread),
            // SAFETY: no thread took it: it is ours again, run here.
            _ => unsafe { Box::from_raw(raw)() },
        }
    }
    for thread in threads {
        // SAFETY: each started above and joined once.
        unsafe { libc::pthread_join(thread, std::ptr::null_mut()) };
    }
}

/// The uprobe_multi side of a run: the programs loaded for it, and the
/// links (each a program on some offsets of one file). `None` programs:
/// the kernel has no such links, and aya's perf links serve.
pub struct Links {
    relocated: Option<Programs>,
    programs: std::sync::Mutex<HashMap<String, OwnedFd>>,
    links: std::sync::Mutex<Vec<OwnedFd>>,
    /// Other links (the kernel's tracepoints), detached with these.
    others: std::sync::Mutex<Vec<Box<dyn Send>>>,
    /// Probes in, through links or not (for the message at exit).
    probes: std::sync::atomic::AtomicUsize,
}

impl Links {
    /// For `ebpf`, just loaded from the object `parsed` was parsed from
    /// (`None`: the kernel has no uprobe_multi links).
    pub fn new(parsed: Option<aya_obj::Object>, ebpf: &Ebpf) -> anyhow::Result<Self> {
        let relocated = parsed.map(|obj| Programs::relocate(obj, ebpf)).transpose()?;
        Ok(Self {
            relocated,
            programs: Default::default(),
            links: Default::default(),
            others: Default::default(),
            probes: Default::default(),
        })
    }

    /// Whether probes go in through uprobe_multi links.
    pub fn multi(&self) -> bool {
        self.relocated.is_some()
    }

    /// Loads `name` unless loaded already; returns whether it was loaded now.
    pub fn load(&self, name: &str) -> io::Result<bool> {
        let Some(relocated) = &self.relocated else { return Err(io::ErrorKind::Unsupported.into()) };
        if self.programs.lock().expect("programs").contains_key(name) {
            return Ok(false);
        }
        let fd = relocated.load(name)?;
        self.programs.lock().expect("programs").insert(name.to_string(), fd);
        Ok(true)
    }

    /// Runs `f` with the fd of loaded program `name`.
    pub fn with_program<T>(&self, name: &str, f: impl FnOnce(BorrowedFd<'_>) -> io::Result<T>) -> io::Result<T> {
        let programs = self.programs.lock().expect("programs");
        let fd = programs.get(name).ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, name.to_string()))?;
        f(fd.as_fd())
    }

    /// Attaches loaded program `name`: see [`attach`].
    pub fn attach(&self, name: &str, path: &Path, offsets: &[u64], cookies: &[u64], pid: u32, ret: bool) -> io::Result<()> {
        // Dup'd out of the lock: attaching takes a while, other threads load.
        let prog = self.with_program(name, |fd| fd.try_clone_to_owned())?;
        let link = attach(prog.as_fd(), path, offsets, cookies, pid, ret)?;
        self.links.lock().expect("links").push(link);
        self.count_probes(offsets.len());
        Ok(())
    }

    /// Counts probes attached (here, or by aya).
    pub fn count_probes(&self, n: usize) {
        self.probes.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Probes attached.
    pub fn probes(&self) -> usize {
        self.probes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps another link (one that detaches when dropped) to detach with these.
    pub fn keep(&self, link: impl Send + 'static) {
        self.others.lock().expect("links").push(Box::new(link));
        self.count_probes(1);
    }

    /// The kernel ids of the programs loaded here, by name (for -v).
    pub fn program_ids(&self) -> Vec<(String, u32)> {
        let programs = self.programs.lock().expect("programs");
        programs.iter().filter_map(|(name, fd)| Some((name.clone(), program_id(fd.as_fd()).ok()?))).collect()
    }

    /// Detaches in a child process holding a copy of every fd, which it
    /// closes once memleak has closed its own: the last close of a probe's
    /// fd waits while the kernel removes it, at exit too, so memleak itself
    /// could not end sooner. memleak waits for the child unless told not to
    /// (a second Ctrl-C); the kernel finishes either way. `rest` (aya's
    /// `Ebpf`) is closed the same way. `None`: detached here (no fork).
    pub fn detach_in_child<T>(self, rest: T) -> Option<Detaching> {
        let mut fds = [0; 2];
        // SAFETY: a valid two-int array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            self.detach();
            drop(rest);
            return None;
        }
        let [wait, go] = fds;
        // SAFETY: the child closes fds and exits; its threads (one per
        // link) need malloc, which glibc makes safe to call after a fork.
        match unsafe { libc::fork() } {
            -1 => {
                for fd in fds {
                    // SAFETY: our pipe's ends.
                    unsafe { libc::close(fd) };
                }
                self.detach();
                drop(rest);
                None
            }
            0 => unsafe {
                // Not the terminal's second Ctrl-C, nor memleak's pipes kept open.
                libc::signal(libc::SIGINT, libc::SIG_IGN);
                libc::signal(libc::SIGTERM, libc::SIG_IGN);
                for fd in [0, 1, 2, go] {
                    libc::close(fd);
                }
                // EOF once memleak closed its copies: these are the last.
                let mut byte = 0u8;
                libc::read(wait, (&raw mut byte).cast(), 1);
                self.detach_forked();
                drop(rest);
                libc::_exit(0)
            },
            pid => {
                drop(self);
                drop(rest);
                for fd in fds {
                    // SAFETY: our pipe's ends; closing `go` lets the child on.
                    unsafe { libc::close(fd) };
                }
                Some(Detaching { pid: pid as u32 })
            }
        }
    }

    /// `detach`, in the child of a fork: without std's threads (see
    /// `run_all_forked`).
    fn detach_forked(self) {
        let links = self.links.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        let others = self.others.into_inner().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Every close at once, aya's links (the kernel's tracepoints) too:
        // closed one after the other, a system-wide Ctrl-C took 600 ms
        // instead of 300.
        let closes = links.into_iter().map(|link| Box::new(move || drop(link)) as Job);
        run_all_forked(closes.chain(others.into_iter().map(|link| Box::new(move || drop(link)) as Job)).collect());
    }

    /// Closes every link, all at once: each close waits for an RCU grace
    /// period, which concurrent closes share.
    fn detach(self) {
        let links = self.links.into_inner().expect("links");
        let others = self.others.into_inner().expect("links");
        std::thread::scope(|scope| {
            for link in links {
                scope.spawn(move || drop(link));
            }
            for link in others {
                scope.spawn(move || drop(link));
            }
        });
    }
}

/// The child process detaching the probes.
pub struct Detaching {
    pub pid: u32,
}

impl Detaching {
    /// Reaps the child if it is done; else it is reaped as an orphan once
    /// memleak has exited.
    pub fn reap(self) {
        let mut status = 0;
        // SAFETY: our own child; WNOHANG never blocks.
        unsafe { libc::waitpid(self.pid as i32, &mut status, libc::WNOHANG) };
    }
}

#[cfg(test)]
mod tests {
    use std::{
        sync::{
            Arc,
            atomic::{AtomicBool, Ordering},
        },
        time::{Duration, Instant},
    };

    use super::*;

    /// Forks while other threads keep starting std threads, and closes two
    /// fds in each child as the detach child does: every child ends. With
    /// std::thread::scope in the child (the code before), 5 of 5000
    /// children never ended; this takes about 8 s.
    #[test]
    fn a_forked_child_closes_its_fds_however_busy_the_parent_is() {
        let stop = Arc::new(AtomicBool::new(false));
        let churners: Vec<_> = (0..4)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        let _ = std::thread::spawn(|| {}).join();
                    }
                })
            })
            .collect();
        let mut hung = 0;
        for _ in 0..5000 {
            let mut fds = [0; 2];
            // SAFETY: a valid two-int array.
            assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
            // SAFETY: the child only closes fds and exits.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: each closes one of our pipe's ends.
                let close = |fd: libc::c_int| Box::new(move || unsafe { libc::close(fd); }) as Job;
                run_all_forked(fds.iter().map(|&fd| close(fd)).collect());
                // SAFETY: ends the child without running the parent's destructors.
                unsafe { libc::_exit(0) };
            }
            for fd in fds {
                // SAFETY: our pipe's ends.
                unsafe { libc::close(fd) };
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let mut status = 0;
                // SAFETY: our child.
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                    break;
                }
                if Instant::now() > deadline {
                    hung += 1;
                    // SAFETY: our child, then reaped.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, &mut status, 0);
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        stop.store(true, Ordering::Relaxed);
        churners.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(hung, 0, "children that never ended, of 5000");
    }
}
