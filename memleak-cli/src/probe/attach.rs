//! Puts the probes on the allocator the target really uses: the file it
//! maps, opened as `file` says, so that a process in another mount
//! namespace (a container) gets probes on its own libc, not the host's.
//!
//! Which file serves malloc: an allocator library the process maps
//! (jemalloc, tcmalloc, mimalloc interpose malloc), else the executable if
//! it defines malloc itself (static, or its own allocator), else libc. C++
//! operator new/delete are probed where they are defined (libstdc++, or the
//! allocator library), so stacks of `new` start in the caller.

use std::{collections::HashSet, num::NonZeroU32, path::Path};

use aya::{
    Ebpf,
    programs::{UProbe, uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeScope}},
};

use crate::{
    target::elf,
    error::{Kind, user_error},
    probe::hooks::{self, C_API, CXX_API, Shape},
    probe::loader,
    probe::multi::Links,
    probe::placement::{self, Placement},
    target::file::TargetFile,
    target::proc::{self, Mapping, Target, module_name},
};

/// `--floor` (bench only): what a probe costs with no work in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Floor {
    /// Entry probes at function entries, as other tracers put them.
    Naive,
    /// Entry probes where memleak puts them (see `placement`).
    Placed,
}

/// What was hooked in one object, for the start-up message and `-v`.
#[derive(Debug)]
pub struct Attached {
    /// The object as the target sees it (e.g. /lib/x86_64-linux-gnu/libc.so.6).
    pub object: String,
    /// The file the probes are on, by its device and inode on the host.
    pub file: String,
    /// That file's (device, inode).
    pub id: (u64, u64),
    /// Each function hooked: its file offset, and where its entry probe went.
    pub functions: Vec<(&'static str, u64, Placement)>,
}

/// The probes for the allocator objects of `target` (or `-O`'s), worked
/// out without the kernel: memleak does it while its programs load.
/// `floor` (bench only) swaps every program for an empty one.
pub fn plan_target(target: &Target, obj: Option<&Path>, floor: Option<Floor>) -> anyhow::Result<TargetPlan> {
    let maps = target.maps()?;
    // An object the process maps is opened from its mapping; only -O's
    // path that it does not map is a host path (the user's choice).
    let open = |object: &str| {
        match maps.iter().find(|m| m.is_file() && m.path == object) {
            Some(mapping) => TargetFile::mapped(target.pid, mapping),
            None => TargetFile::host(Path::new(object)),
        }
        .map_err(|e| user_error(Kind::Attach, format!("cannot open the allocator object {object}: {e}")))
    };
    let gone = |e| exited(target.pid, e);
    let mut plans = vec![];
    if let Some(obj) = obj {
        let object = named_object(&maps, obj, target.pid)?;
        plans.push(open(&object).and_then(|file| plan(file, &object, true, true, floor)).map_err(gone)?);
    } else {
        let serving = serving_object(target.pid, &maps)?;
        plans.push(open(&serving).and_then(|file| plan(file, &serving, true, true, floor)).map_err(gone)?);
        if !plans[0].attached.functions.iter().any(|(f, ..)| *f == "_Znwm")
            && let Some(cxx) = maps.iter().find(|m| m.is_file() && is_cxx_runtime(m.module_name()))
        {
            plans.push(open(&cxx.path).and_then(|file| plan(file, &cxx.path, false, false, floor)).map_err(gone)?);
        }
    }
    // An allocator library serves malloc: dlopen is libc's (or libdl's).
    let has_dlopen = |plans: &[Plan]| plans.iter().any(|p| p.attached.functions.iter().any(|(f, ..)| *f == DLOPEN.0));
    for m in maps.iter().filter(|m| m.is_file() && (is_libc(m.module_name()) || m.module_name().starts_with("libdl."))) {
        if floor.is_some() || has_dlopen(&plans) {
            break;
        }
        // Not fatal: frames of libraries it opens are then read at reports only.
        if let Ok(dl) = open(&m.path).and_then(|file| plan(file, &m.path, false, true, floor))
            && dl.attached.functions.iter().any(|(f, ..)| *f == DLOPEN.0)
        {
            plans.push(dl);
        }
    }
    Ok(TargetPlan { pid: target.pid, plans, floor })
}

/// What `plan_target` worked out.
pub struct TargetPlan {
    pid: u32,
    plans: Vec<Plan>,
    floor: Option<Floor>,
}

impl TargetPlan {
    /// Drops the objects whose file is in `probed` (probed for this
    /// process already: a program it exec'd maps the same libc), and adds
    /// the others' to it.
    pub fn retain_new(&mut self, probed: &mut HashSet<(u64, u64)>) {
        self.plans.retain(|plan| probed.insert(plan.attached.id));
    }

    pub fn is_empty(&self) -> bool {
        self.plans.is_empty()
    }
}

/// Attaches the planned probes. `unwind`: chains the walk by unwind
/// tables too (`loader::chain_unwind`), before the return probes go in.
pub fn attach(ebpf: &mut Ebpf, links: &Links, planned: TargetPlan, unwind: bool) -> anyhow::Result<Vec<Attached>> {
    let TargetPlan { pid, plans, floor } = planned;
    let scope = UProbeScope::OneProcess(NonZeroU32::new(pid).expect("pid is non-zero"));
    attach_plans(ebpf, links, &plans, scope, floor, unwind).map_err(|e| exited(pid, e))?;
    Ok(plans.into_iter().map(|plan| plan.attached).collect())
}

/// An error on a process that has exited since is that it exited (a
/// zombie too: its files are gone, and opening them fails).
fn exited(pid: u32, e: anyhow::Error) -> anyhow::Error {
    if crate::target::proc::running(pid) {
        e
    } else {
        user_error(Kind::NoProcess, format!("process {pid} exited"))
    }
}

/// Attaches every hook to the object at `path` (a host path: -O's, or
/// memleak's own libc) for process `pid`, mapped or not yet (-c: the
/// command has not exec'd).
pub fn attach_file(ebpf: &mut Ebpf, links: &Links, path: &Path, pid: NonZeroU32) -> anyhow::Result<Attached> {
    let file = TargetFile::host(path)
        .map_err(|e| user_error(Kind::Attach, format!("-O {}: cannot open it: {e}", path.display())))?;
    probe_object(ebpf, links, file, &path.to_string_lossy(), UProbeScope::OneProcess(pid), true, true, None)
}

/// Attaches the hooks the object open as `file` defines, for the
/// processes in `scope`. The object serving malloc must define malloc and
/// free.
fn probe_object(
    ebpf: &mut Ebpf,
    links: &Links,
    file: TargetFile,
    object: &str,
    scope: UProbeScope,
    serves_malloc: bool,
    dlopen: bool,
    floor: Option<Floor>,
) -> anyhow::Result<Attached> {
    let plan = plan(file, object, serves_malloc, dlopen, floor)?;
    attach_plans(ebpf, links, std::slice::from_ref(&plan), scope, floor, false)?;
    Ok(plan.attached)
}

/// One object's probes, worked out before any program is loaded.
struct Plan {
    /// The object, held open until its probes are in: they go on this
    /// descriptor's file, whatever its name leads to by then.
    file: TargetFile,
    attached: Attached,
    /// (program, function, file offset, cookie: the function's `Kind`)
    /// of each probe.
    probes: Vec<(&'static str, &'static str, u64, u64)>,
}

/// The probes for the hooks the object defines.
/// With `dlopen` (one traced process), dlopen's return too, if the
/// object defines it (see `DLOPEN`).
fn plan(file: TargetFile, object: &str, serves_malloc: bool, dlopen: bool, floor: Option<Floor>) -> anyhow::Result<Plan> {
    let hooks: Vec<(&'static str, Shape)> =
        if serves_malloc { C_API.iter().chain(CXX_API).copied().collect() } else { CXX_API.to_vec() };
    let mut names: Vec<&str> = hooks.iter().map(|(f, _)| *f).collect();
    let dlopen = dlopen && floor.is_none();
    if dlopen {
        names.push(DLOPEN.0);
    }
    let functions = elf::functions(&file, &names).map_err(|e| {
        user_error(Kind::Attach, format!("cannot read the allocator object {object}: {e:#}"))
    })?;
    if serves_malloc && let Some(missing) = ["malloc", "free"].iter().find(|f| !functions.contains_key(**f)) {
        return Err(user_error(
            Kind::Attach,
            format!("{object} does not define {missing}: pass the allocator library with -O"),
        ));
    }
    let attached = Attached { object: object.to_string(), file: file.describe(), id: file.id(), functions: vec![] };
    let mut plan = Plan { file, attached, probes: vec![] };
    // Aliases (memalign = aligned_alloc in glibc, malloc = tc_malloc) share
    // an offset: probing one twice would count every call twice.
    let mut seen: HashSet<u64> = HashSet::new();
    for (function, shape) in hooks {
        let Some(code) = functions.get(function) else { continue };
        let offset = code.offset;
        if !seen.insert(offset) {
            continue;
        }
        let (entry, exit) = programs(shape, floor);
        let placement = match floor {
            Some(Floor::Naive) => Placement { delta: 0, why: "entry (--floor naive)" },
            _ => place(shape, exit.is_some(), &code.code),
        };
        let kind = hooks::kind(function, shape) as u64;
        plan.probes.push((entry, function, offset + placement.delta, kind));
        plan.probes.extend(exit.map(|exit| (exit, function, offset, kind)));
        plan.attached.functions.push((function, offset, placement));
    }
    if let Some(code) = functions.get(DLOPEN.0).filter(|_| dlopen) {
        plan.probes.push((DLOPEN.1, DLOPEN.0, code.offset, 0));
        plan.attached.functions.push((DLOPEN.0, code.offset, Placement { delta: 0, why: "return probe only" }));
    }
    Ok(plan)
}

/// dlopen, and the program at its return: a library the traced process
/// opens is read at once, while it is mapped (it may be closed before
/// the next report). In libc (glibc 2.34 on, musl), or libdl before.
const DLOPEN: (&str, &str) = ("dlopen", "dlopen_exit");

/// Loads the programs the plans need and attaches each one's probes as
/// soon as it is verified: the kernel's first uprobe registration waits
/// for an RCU grace period (about 20 ms), which then passes while the
/// larger programs are verified. The munmap program goes in last, once it
/// is chained to itself (see `loader::chain_unmap`). With uprobe_multi
/// links, each program's probes on one file are one link (see `multi`).
fn attach_plans(
    ebpf: &mut Ebpf,
    links: &Links,
    plans: &[Plan],
    scope: UProbeScope,
    floor: Option<Floor>,
    unwind: bool,
) -> anyhow::Result<()> {
    let unmap = Shape::Munmap.programs().0;
    let chained = floor.is_none();
    let mut names: Vec<&str> = plans.iter().flat_map(|plan| plan.probes.iter().map(|&(program, ..)| program)).collect();
    names.sort_by_key(|name| (load_order(name), *name));
    names.dedup();
    let cannot = |function: &str, object: &str, e: &dyn std::fmt::Display| {
        user_error(Kind::Attach, format!("cannot probe {function} in {object}: {e:#}"))
    };
    if links.multi() {
        let pid = match scope {
            UProbeScope::OneProcess(pid) => pid.get(),
            _ => 0,
        };
        let attach_program = |name: &str| {
            for plan in plans {
                let probes: Vec<_> = plan.probes.iter().filter(|(p, ..)| *p == name).collect();
                if probes.is_empty() {
                    continue;
                }
                let functions: Vec<&str> = probes.iter().map(|p| p.1).collect();
                let offsets: Vec<u64> = probes.iter().map(|p| p.2).collect();
                let cookies: Vec<u64> = probes.iter().map(|p| p.3).collect();
                links
                    .attach(name, &plan.file.path(), &offsets, &cookies, pid, is_return(name))
                    .map_err(|e| cannot(&functions.join(", "), &plan.attached.object, &e))?;
            }
            anyhow::Ok(())
        };
        // The walk by tables loads beside the probes' programs; the return
        // probes, which tail-call it, wait for it (a stack recorded before
        // would stop at the first frame without frame pointers).
        let unwound = Gate::default();
        let shared: &Ebpf = ebpf;
        let loaded = std::thread::scope(|threads| {
            if unwind {
                threads.spawn(|| unwound.open(loader::chain_unwind_multi(shared, links)));
            } else {
                unwound.open(Ok(()));
            }
            loader::load_each_multi(links, &names, |name| {
                if is_return(name) {
                    unwound.wait()?;
                }
                if chained && name == unmap { Ok(()) } else { attach_program(name) }
            })
        })?;
        if chained && names.contains(&unmap) {
            if loaded.contains(&unmap) {
                loader::chain_unmap(ebpf, links)?;
            }
            attach_program(unmap)?;
        }
        return Ok(());
    }
    if unwind {
        loader::chain_unwind(ebpf, links)?;
    }
    let attach_program = |name: &str, program: &mut UProbe| {
        for plan in plans {
            let object = &plan.attached.object;
            for &(_, function, at, cookie) in plan.probes.iter().filter(|(p, ..)| *p == name) {
                let point = UProbeAttachPoint { location: UProbeAttachLocation::AbsoluteOffset(at), cookie: Some(cookie) };
                program.attach(point, plan.file.path(), scope).map_err(|e| cannot(function, object, &e))?;
                links.count_probes(1);
            }
        }
        anyhow::Ok(())
    };
    let loaded = loader::load_each(ebpf, &names, |name, program| {
        if chained && name == unmap { Ok(()) } else { attach_program(name, program) }
    })?;
    if chained && names.contains(&unmap) {
        if loaded.contains(&unmap) {
            loader::chain_unmap(ebpf, links)?;
        }
        attach_program(unmap, loader::uprobe(ebpf, unmap)?)?;
    }
    Ok(())
}

/// A result some threads wait for, given once by another.
#[derive(Default)]
struct Gate {
    done: std::sync::Mutex<Option<Result<(), String>>>,
    opened: std::sync::Condvar,
}

impl Gate {
    fn open(&self, result: anyhow::Result<()>) {
        *self.done.lock().expect("gate") = Some(result.map_err(|e| format!("{e:#}")));
        self.opened.notify_all();
    }

    fn wait(&self) -> anyhow::Result<()> {
        let done = self.done.lock().expect("gate");
        let done = self.opened.wait_while(done, |done| done.is_none()).expect("gate");
        done.clone().expect("opened").map_err(anyhow::Error::msg)
    }
}

/// Whether a program runs at return (`alloc_exit`, `floor_exit`).
fn is_return(program: &str) -> bool {
    program.ends_with("_exit")
}

/// The order to verify programs in: free's small one first, so that its
/// probe, and the kernel's one-time wait, go in at once; then the largest
/// (munmap's, the return probes' stack walks), so the CPUs end together.
fn load_order(program: &str) -> u8 {
    match program {
        "free_enter" | "floor_enter" => 0,
        "munmap_enter" => 1,
        p if is_return(p) => 2,
        _ => 3,
    }
}

/// The programs a hook runs at entry and return: memleak's, or with
/// `--floor` (bench only) empty ones.
fn programs(shape: Shape, floor: Option<Floor>) -> (&'static str, Option<&'static str>) {
    match floor {
        None => shape.programs(),
        Some(_) => ("floor_enter", shape.programs().1.map(|_| "floor_exit")),
    }
}

/// Where a hook's entry probe goes. A return probe is placed by the kernel
/// at the entry (it takes over the return address there), and a uprobe at
/// the same place shares its trap: such hooks keep their entry probe there.
/// Probes that ignore a NULL first argument (free, delete, munmap) may go
/// past a prologue that branches away on NULL (see `placement`).
fn place(shape: Shape, has_exit: bool, code: &[u8]) -> Placement {
    if has_exit {
        return Placement { delta: 0, why: "entry (shared with the return probe)" };
    }
    placement::entry_probe(code, matches!(shape, Shape::Free | Shape::Munmap))
}

/// The object whose malloc the process's calls reach.
fn serving_object(pid: u32, maps: &[Mapping]) -> anyhow::Result<String> {
    let files: Vec<&Mapping> = maps.iter().filter(|m| m.is_file()).collect();
    if let Some(lib) = files.iter().find(|m| is_allocator_library(m.module_name())) {
        return Ok(lib.path.clone());
    }
    let exe = proc::exe(pid);
    let exe_mapping = exe.as_ref().and_then(|exe| files.iter().find(|m| &m.path == exe));
    let exe_file = exe_mapping.and_then(|exe| TargetFile::mapped(pid, exe).ok());
    if let Some((exe, file)) = exe_mapping.zip(exe_file.as_ref()) {
        let defines = elf::function_offsets(file, &["malloc", "free"]).unwrap_or_default();
        if defines.len() == 2 {
            return Ok(exe.path.clone());
        }
    }
    if let Some(libc) = files.iter().find(|m| is_libc(m.module_name())) {
        return Ok(libc.path.clone());
    }
    let why = match exe_mapping {
        Some(exe) if exe_file.as_ref().is_some_and(|file| elf::is_stripped(file).unwrap_or(false)) => {
            format!("process {pid} is statically linked and stripped: {} has no malloc symbol to probe (rebuild it with symbols, or pass the allocator with -O)", exe.path)
        }
        _ => format!("process {pid} maps no libc or known allocator: pass the object that holds malloc with -O"),
    };
    Err(user_error(Kind::Attach, why))
}

/// System-wide: the allocator objects probed so far, one per file (the
/// host's libc, each container's own, allocator and C++ libraries), found
/// by scanning /proc.
#[derive(Default)]
pub struct SystemProbes {
    files: HashSet<(u64, u64)>,
    pub objects: Vec<Attached>,
    /// `--floor` (bench only): empty programs, for every process.
    pub floor: Option<Floor>,
}

impl SystemProbes {
    /// Probes `obj` (a host path) for every process.
    pub fn object(&mut self, ebpf: &mut Ebpf, links: &Links, obj: &Path) -> anyhow::Result<()> {
        if !obj.is_absolute() || !obj.exists() {
            return Err(user_error(
                Kind::Attach,
                format!("-O {}: system-wide tracing needs an existing absolute path", obj.display()),
            ));
        }
        let object = obj.to_string_lossy().into_owned();
        let file = TargetFile::host(obj).map_err(|e| user_error(Kind::Attach, format!("-O {object}: {e}")))?;
        self.objects.push(probe_object(ebpf, links, file, &object, UProbeScope::AllProcesses, true, false, None)?);
        Ok(())
    }

    /// Probes the allocator files of every process not probed yet; returns
    /// how many were added. Called at start and each interval, so new
    /// containers and programs are caught.
    pub fn scan(&mut self, ebpf: &mut Ebpf, links: &Links) -> anyhow::Result<usize> {
        let me = std::process::id();
        let mut added = 0;
        for pid in proc::pids() {
            if pid == me {
                continue;
            }
            let Ok(text) = proc::maps_text(pid) else { continue };
            let maps = proc::parse_maps(&text);
            let mut paths = HashSet::new();
            for mapping in maps.iter().filter(|m| m.is_file() && paths.insert(m.path.as_str())) {
                let name = mapping.module_name();
                let serves_malloc = is_libc(name) || is_allocator_library(name);
                if !serves_malloc && !is_cxx_runtime(name) {
                    continue;
                }
                let Ok(file) = TargetFile::mapped(pid, mapping) else { continue };
                let id = file.id();
                if !self.files.insert(id) {
                    continue;
                }
                let label = format!("{} (of pid {pid})", mapping.path);
                match probe_object(ebpf, links, file, &label, UProbeScope::AllProcesses, serves_malloc, false, self.floor) {
                    Ok(attached) => {
                        self.objects.push(attached);
                        added += 1;
                    }
                    // The process may be gone by now; its file is retried if
                    // another process maps it.
                    Err(_) if !crate::target::proc::exists(pid) => {
                        self.files.remove(&id);
                    }
                    Err(e) => crate::warn!("{e:#}"),
                }
            }
        }
        if self.objects.is_empty() {
            return Err(user_error(Kind::Attach, "no process maps a libc: pass the allocator object with -O"));
        }
        Ok(added)
    }
}

/// `-O OBJ`: a path, or a library name looked up in the target's maps.
pub fn named_object(maps: &[Mapping], obj: &Path, pid: u32) -> anyhow::Result<String> {
    let mut files = maps.iter().filter(|m| m.is_file());
    if obj.is_absolute() {
        let text = obj.to_string_lossy().into_owned();
        return if files.any(|m| m.path == text) || obj.exists() {
            Ok(text)
        } else {
            Err(user_error(Kind::Attach, format!("-O {text}: no such file, and process {pid} does not map it")))
        };
    }
    let name = obj.to_string_lossy();
    files
        .find(|m| module_name(&m.path) == name || module_name(&m.path).starts_with(&format!("{name}.")))
        .map(|m| m.path.clone())
        .ok_or_else(|| user_error(Kind::Attach, format!("-O {name}: process {pid} maps no such library")))
}

pub fn is_libc(name: &str) -> bool {
    name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so")) || name.starts_with("ld-musl-")
}

/// Libraries that replace malloc when loaded.
fn is_allocator_library(name: &str) -> bool {
    ["libjemalloc.so", "libtcmalloc.so", "libtcmalloc_minimal.so", "libmimalloc.so"].iter().any(|l| name.starts_with(l))
}

/// Libraries that define C++ operator new/delete.
fn is_cxx_runtime(name: &str) -> bool {
    name.starts_with("libstdc++.so") || name.starts_with("libc++.so")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::proc::parse_maps;

    const MAPS: &str = "\
5600-5700 r-xp 00001000 00:2a 12 /app
7f00-7f10 r-xp 00028000 00:2a 13 /lib/x86_64-linux-gnu/libc.so.6
7f20-7f30 r-xp 00002000 00:2a 14 /usr/lib/libjemalloc.so.2
7f40-7f50 rw-p 00000000 00:00 0 
";

    #[test]
    fn an_error_on_a_zombie_is_that_it_exited() {
        // Exited and not reaped yet: its /proc entry is there, its files
        // are not (map_files is empty).
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        let start = std::time::Instant::now();
        while crate::target::proc::running(pid) {
            assert!(start.elapsed() < std::time::Duration::from_secs(5));
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(crate::target::proc::exists(pid), "a zombie until reaped");
        let err = exited(pid, anyhow::anyhow!("cannot open the allocator object: No such file or directory"));
        assert_eq!(crate::error::exit_code(&err), Kind::NoProcess as u8);
        assert_eq!(err.to_string(), format!("process {pid} exited"));
        child.wait().unwrap();
        let err = exited(std::process::id(), anyhow::anyhow!("other"));
        assert_eq!(err.to_string(), "other", "a running process's error is its own");
    }

    #[test]
    fn allocator_libraries_serve_malloc_before_libc() {
        assert_eq!(serving_object(u32::MAX - 1, &parse_maps(MAPS)).unwrap(), "/usr/lib/libjemalloc.so.2");
        let plain = "7f00-7f10 r-xp 00028000 00:2a 13 /lib/x86_64-linux-gnu/libc.so.6\n";
        assert_eq!(serving_object(u32::MAX - 1, &parse_maps(plain)).unwrap(), "/lib/x86_64-linux-gnu/libc.so.6");
        let err = serving_object(u32::MAX - 1, &parse_maps("5600-5700 r-xp 00001000 00:2a 12 /app\n")).unwrap_err();
        assert!(err.to_string().contains("-O"), "{err}");
    }

    #[test]
    fn obj_by_library_name_or_path() {
        let maps = parse_maps(MAPS);
        assert_eq!(named_object(&maps, Path::new("libjemalloc"), 1).unwrap(), "/usr/lib/libjemalloc.so.2");
        assert_eq!(named_object(&maps, Path::new("libjemalloc.so.2"), 1).unwrap(), "/usr/lib/libjemalloc.so.2");
        assert_eq!(named_object(&maps, Path::new("/app"), 1).unwrap(), "/app");
        let err = named_object(&maps, Path::new("libtcmalloc"), 1).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), Kind::Attach as u8);
        let err = named_object(&maps, Path::new("/no/such/lib.so"), 1).unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
    }

    #[test]
    fn library_names() {
        assert!(is_libc("libc.so.6") && is_libc("libc-2.27.so") && is_libc("ld-musl-x86_64.so.1"));
        assert!(!is_libc("libcrypto.so.3") && !is_libc("libcap.so.2"));
        assert!(is_allocator_library("libjemalloc.so.2") && is_allocator_library("libtcmalloc.so.4"));
        assert!(is_allocator_library("libmimalloc.so.2.0") && !is_allocator_library("libc.so.6"));
        assert!(is_cxx_runtime("libstdc++.so.6") && !is_cxx_runtime("libstdc.so"));
    }
}
