//! Puts the probes on the allocator the target really uses: the file it
//! maps, reached through /proc/PID/root so that a process in another mount
//! namespace (a container) gets probes on its own libc, not the host's.

use std::{
    collections::{HashMap, HashSet},
    num::NonZeroU32,
    path::{Path, PathBuf},
};

use aya::{Ebpf, programs::uprobe::UProbeScope};

use crate::{
    elf,
    error::{Kind, user_error},
    loader,
    proc::{self, Mapping, Target, mapped_file, module_name},
};

/// One allocator function: the program at its entry and the one at its return.
struct Hook {
    function: &'static str,
    entry: &'static str,
    exit: Option<&'static str>,
}

const fn hook(function: &'static str, entry: &'static str, exit: Option<&'static str>) -> Hook {
    Hook { function, entry, exit }
}

/// The allocator family, as bcc hooks it. malloc and free are required.
const HOOKS: &[Hook] = &[
    hook("malloc", "malloc_enter", Some("malloc_exit")),
    hook("free", "free_enter", None),
    hook("calloc", "calloc_enter", Some("calloc_exit")),
    hook("realloc", "realloc_enter", Some("realloc_exit")),
    hook("reallocarray", "reallocarray_enter", Some("reallocarray_exit")),
    hook("posix_memalign", "posix_memalign_enter", Some("posix_memalign_exit")),
    hook("aligned_alloc", "aligned_alloc_enter", Some("aligned_alloc_exit")),
    hook("memalign", "memalign_enter", Some("memalign_exit")),
    hook("valloc", "valloc_enter", Some("valloc_exit")),
    hook("pvalloc", "pvalloc_enter", Some("pvalloc_exit")),
    hook("mmap", "mmap_enter", Some("mmap_exit")),
    hook("munmap", "munmap_enter", None),
];

const REQUIRED: &[&str] = &["malloc", "free"];

/// What was hooked, for the start-up message and `-v`.
#[derive(Debug)]
pub struct Attached {
    /// The object as the target sees it (e.g. /lib/x86_64-linux-gnu/libc.so.6).
    pub object: String,
    /// The file the probes are on, valid on the host.
    pub host_path: PathBuf,
    /// (function, file offset) of each probe placed.
    pub functions: Vec<(&'static str, u64)>,
    /// Functions the object does not define.
    pub missing: Vec<&'static str>,
}

/// Attaches every hook to the allocator object of `target`.
pub fn attach(ebpf: &mut Ebpf, target: &Target, obj: Option<&Path>) -> anyhow::Result<Attached> {
    let maps = target.maps()?;
    let object = allocator_object(&maps, obj, target.pid)?;
    let host_path = match maps.iter().find(|m| m.path == object) {
        Some(mapping) => mapped_file(target.pid, mapping),
        None => PathBuf::from(&object),
    };
    let scope = UProbeScope::OneProcess(NonZeroU32::new(target.pid).expect("pid is non-zero"));
    probe_object(ebpf, &host_path, &object, scope).map_err(|e| {
        if Path::new(&format!("/proc/{}", target.pid)).exists() {
            e
        } else {
            user_error(Kind::NoProcess, format!("process {} exited", target.pid))
        }
    })
}

/// Attaches every hook to the object at `path` (valid on the host) for
/// process `pid`, mapped or not yet (-c: the command has not exec'd).
pub fn attach_file(ebpf: &mut Ebpf, path: &Path, pid: NonZeroU32) -> anyhow::Result<Attached> {
    if !path.exists() {
        return Err(user_error(Kind::Attach, format!("-O {}: no such file", path.display())));
    }
    probe_object(ebpf, path, &path.to_string_lossy(), UProbeScope::OneProcess(pid))
}

/// Attaches every hook the object defines, at `host_path` (a path valid on
/// the host), for the processes in `scope`.
fn probe_object(ebpf: &mut Ebpf, host_path: &Path, object: &str, scope: UProbeScope) -> anyhow::Result<Attached> {
    let names: Vec<&str> = HOOKS.iter().map(|h| h.function).collect();
    let offsets = elf::function_offsets(host_path, &names).map_err(|e| {
        user_error(Kind::Attach, format!("cannot read the allocator object {object}: {e:#}"))
    })?;
    if let Some(missing) = REQUIRED.iter().find(|f| !offsets.contains_key(**f)) {
        return Err(user_error(
            Kind::Attach,
            format!("{object} does not define {missing}: pass the allocator library with -O"),
        ));
    }
    let mut attached = Attached {
        object: object.to_string(),
        host_path: host_path.to_path_buf(),
        functions: vec![],
        missing: vec![],
    };
    // Aliases (memalign = aligned_alloc in glibc) share an offset: probing
    // one twice would count every call twice.
    let mut seen: HashMap<u64, &str> = HashMap::new();
    for hook in HOOKS {
        let Some(&offset) = offsets.get(hook.function) else {
            attached.missing.push(hook.function);
            continue;
        };
        if seen.insert(offset, hook.function).is_some() {
            continue;
        }
        for program in std::iter::once(hook.entry).chain(hook.exit) {
            loader::uprobe(ebpf, program)?.attach(offset, host_path, scope).map_err(|e| {
                user_error(Kind::Attach, format!("cannot probe {} in {object}: {e:#}", hook.function))
            })?;
        }
        attached.functions.push((hook.function, offset));
    }
    Ok(attached)
}

/// System-wide: the allocator objects probed so far, one per file (the
/// host's libc and each container's own), found by scanning /proc.
#[derive(Default)]
pub struct SystemProbes {
    files: HashSet<(u64, u64)>,
    pub objects: Vec<Attached>,
}

impl SystemProbes {
    /// Probes `obj` (a host path) for every process.
    pub fn object(&mut self, ebpf: &mut Ebpf, obj: &Path) -> anyhow::Result<()> {
        if !obj.is_absolute() || !obj.exists() {
            return Err(user_error(Kind::Attach, format!("-O {}: system-wide tracing needs an existing absolute path", obj.display())));
        }
        let object = obj.to_string_lossy().into_owned();
        self.objects.push(probe_object(ebpf, obj, &object, UProbeScope::AllProcesses)?);
        Ok(())
    }

    /// Probes the allocator of every process whose allocator file is not
    /// probed yet; returns how many files were added. Called at start and
    /// each interval, so new containers and programs are caught.
    pub fn scan(&mut self, ebpf: &mut Ebpf) -> anyhow::Result<usize> {
        use std::os::unix::fs::MetadataExt as _;
        let me = std::process::id();
        let mut added = 0;
        for pid in proc::pids() {
            if pid == me {
                continue;
            }
            let Ok(text) = std::fs::read_to_string(format!("/proc/{pid}/maps")) else { continue };
            let maps = proc::parse_maps(&text);
            let Some(mapping) = maps.iter().find(|m| m.is_file() && is_libc(m.module_name())) else { continue };
            let host_path = mapped_file(pid, mapping);
            let Ok(meta) = std::fs::metadata(&host_path) else { continue };
            if !self.files.insert((meta.dev(), meta.ino())) {
                continue;
            }
            let label = format!("{} (of pid {pid})", mapping.path);
            match probe_object(ebpf, &host_path, &label, UProbeScope::AllProcesses) {
                Ok(attached) => {
                    self.objects.push(attached);
                    added += 1;
                }
                // The process may be gone by now; its file is retried if
                // another process maps it.
                Err(_) if !Path::new(&format!("/proc/{pid}")).exists() => {
                    self.files.remove(&(meta.dev(), meta.ino()));
                }
                Err(e) => eprintln!("warning: {e:#}"),
            }
        }
        if self.objects.is_empty() {
            return Err(user_error(Kind::Attach, "no process maps a libc: pass the allocator object with -O"));
        }
        Ok(added)
    }
}

/// The object whose allocator the target calls: `-O` if given (a path, or
/// a library name looked up in the target's maps), else the mapped libc.
pub fn allocator_object(maps: &[Mapping], obj: Option<&Path>, pid: u32) -> anyhow::Result<String> {
    let files = || maps.iter().filter(|m| m.is_file());
    match obj {
        Some(obj) if obj.is_absolute() => {
            let text = obj.to_string_lossy().into_owned();
            if files().any(|m| m.path == text) || obj.exists() {
                Ok(text)
            } else {
                Err(user_error(Kind::Attach, format!("-O {text}: no such file, and process {pid} does not map it")))
            }
        }
        Some(obj) => {
            let name = obj.to_string_lossy();
            files()
                .find(|m| module_name(&m.path) == name || module_name(&m.path).starts_with(&format!("{name}.")))
                .map(|m| m.path.clone())
                .ok_or_else(|| user_error(Kind::Attach, format!("-O {name}: process {pid} maps no such library")))
        }
        None => files()
            .find(|m| is_libc(module_name(&m.path)))
            .map(|m| m.path.clone())
            .ok_or_else(|| {
                user_error(
                    Kind::Attach,
                    format!("process {pid} maps no libc (statically linked?): pass the object that holds malloc with -O"),
                )
            }),
    }
}

pub fn is_libc(name: &str) -> bool {
    name.starts_with("libc.so") || (name.starts_with("libc-") && name.ends_with(".so")) || name.starts_with("ld-musl-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proc::parse_maps;

    const MAPS: &str = "\
5600-5700 r-xp 00001000 00:2a 12 /app
7f00-7f10 r-xp 00028000 00:2a 13 /lib/x86_64-linux-gnu/libc.so.6
7f20-7f30 r-xp 00002000 00:2a 14 /usr/lib/libjemalloc.so.2
7f40-7f50 rw-p 00000000 00:00 0 
";

    #[test]
    fn default_object_is_the_mapped_libc() {
        let maps = parse_maps(MAPS);
        assert_eq!(allocator_object(&maps, None, 1).unwrap(), "/lib/x86_64-linux-gnu/libc.so.6");
    }

    #[test]
    fn obj_by_library_name_or_path() {
        let maps = parse_maps(MAPS);
        assert_eq!(allocator_object(&maps, Some(Path::new("libjemalloc")), 1).unwrap(), "/usr/lib/libjemalloc.so.2");
        assert_eq!(allocator_object(&maps, Some(Path::new("libjemalloc.so.2")), 1).unwrap(), "/usr/lib/libjemalloc.so.2");
        assert_eq!(allocator_object(&maps, Some(Path::new("/app")), 1).unwrap(), "/app");
        let err = allocator_object(&maps, Some(Path::new("libtcmalloc")), 1).unwrap_err();
        assert_eq!(crate::error::exit_code(&err), Kind::Attach as u8);
        let err = allocator_object(&maps, Some(Path::new("/no/such/lib.so")), 1).unwrap_err();
        assert!(err.to_string().contains("no such file"), "{err}");
    }

    #[test]
    fn static_binary_has_no_default_object() {
        let maps = parse_maps("5600-5700 r-xp 00001000 00:2a 12 /app\n");
        let err = allocator_object(&maps, None, 9).unwrap_err();
        assert!(err.to_string().contains("-O"), "{err}");
    }

    #[test]
    fn libc_names() {
        assert!(is_libc("libc.so.6") && is_libc("libc-2.27.so") && is_libc("ld-musl-x86_64.so.1"));
        assert!(!is_libc("libcrypto.so.3") && !is_libc("libcap.so.2"));
    }
}
