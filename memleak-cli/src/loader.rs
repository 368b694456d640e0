//! Loads the kernel programs, configured through read-only globals and map
//! sizes (no recompiling), and names each program once.

use anyhow::Context as _;
use aya::{Ebpf, EbpfLoader};
use memleak_common::{FIELD_COUNT, globals, maps};

use crate::{
    cli::Args,
    error::{Kind, user_error},
};

pub static PROGRAMS: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/memleak"));

/// Kernel-side settings taken from the options.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub min_size: u64,
    pub max_size: u64,
    pub sample_every: u64,
    pub trace: bool,
    pub max_allocs: u32,
    pub max_stacks: u32,
    /// Tracepoint field offsets (kernel tracing only).
    pub field_offsets: [u32; FIELD_COUNT],
    /// Kernel text whose allocations are not traced (kernel tracing only).
    pub skip_caller: [u64; 2],
}

impl Config {
    pub fn from_args(args: &Args) -> Self {
        Self {
            min_size: args.min_size.unwrap_or(0),
            max_size: args.max_size.unwrap_or(u64::MAX),
            sample_every: args.sample_rate,
            trace: args.trace,
            max_allocs: args.max_allocs,
            max_stacks: args.max_stacks,
            field_offsets: [0; FIELD_COUNT],
            skip_caller: [0; 2],
        }
    }
}

pub fn load(config: &Config) -> anyhow::Result<Ebpf> {
    check_privileges()?;
    raise_memlock_limit();
    let self_tgid = std::process::id();
    let trace = u32::from(config.trace);
    let combined = config.max_stacks.saturating_mul(4).max(1024);
    EbpfLoader::new()
        .override_global(globals::MIN_SIZE, &config.min_size, true)
        .override_global(globals::MAX_SIZE, &config.max_size, true)
        .override_global(globals::SAMPLE_EVERY, &config.sample_every, true)
        .override_global(globals::SELF_TGID, &self_tgid, true)
        .override_global(globals::TRACE, &trace, true)
        .override_global(globals::FIELD_OFFSETS, &config.field_offsets, true)
        .override_global(globals::PAGE_SIZE, &page_size(), true)
        .override_global(globals::SKIP_CALLER, &config.skip_caller, true)
        .map_max_entries(maps::ALLOCS, config.max_allocs)
        .map_max_entries(maps::STACKS, config.max_stacks)
        .map_max_entries(maps::COMBINED, combined)
        .load(PROGRAMS)
        .map_err(|e| {
            let text = format!("{e:#}");
            if text.contains("EPERM") || text.contains("Operation not permitted") {
                user_error(
                    Kind::Permission,
                    format!("the kernel refused to load BPF programs ({text}): run as root, and check kernel.unprivileged_bpf_disabled and lockdown"),
                )
            } else {
                anyhow::Error::new(e).context("loading the BPF programs")
            }
        })
}

fn page_size() -> u64 {
    // SAFETY: sysconf with a valid name.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// Root, or the capabilities BPF tracing needs.
fn check_privileges() -> anyhow::Result<()> {
    // SAFETY: no arguments, cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    // CAP_PERFMON (38), CAP_BPF (39) and CAP_SYS_ADMIN (21, for /proc/PID/map_files).
    let caps = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0);
    let needed = (1u64 << 38) | (1 << 39) | (1 << 21);
    if caps & needed == needed {
        return Ok(());
    }
    Err(user_error(
        Kind::Permission,
        "must be run as root (or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN): try sudo memleak ...",
    ))
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK. Newer ones (and
/// unprivileged containers, where raising it fails) do not need it: never fatal.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: a valid rlimit struct.
    let _ = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) };
}

/// Loads these uprobe programs into the kernel, on every CPU at once: the
/// verifier is the biggest part of the time to attach. Programs loaded
/// already are skipped.
pub fn preload(ebpf: &mut Ebpf, names: &[&str]) -> anyhow::Result<()> {
    let mut programs: Vec<(&str, &mut aya::programs::UProbe)> = ebpf
        .programs_mut()
        .filter(|(name, _)| names.contains(name))
        .filter_map(|(name, program)| <&mut aya::programs::UProbe>::try_from(program).ok().map(|p| (name, p)))
        .filter(|(_, program)| program.fd().is_err())
        .collect();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(programs.len().max(1));
    let per_thread = programs.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let loads: Vec<_> = programs
            .chunks_mut(per_thread)
            .map(|chunk| {
                scope.spawn(move || {
                    for (name, program) in chunk {
                        program.load().with_context(|| format!("loading program {name}"))?;
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        loads.into_iter().try_for_each(|load| load.join().expect("program loader thread panicked"))
    })
}

/// Loads one program into the kernel, by name, for attaching.
pub fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut aya::programs::UProbe> {
    let program: &mut aya::programs::UProbe = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the BPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a uprobe"))?;
    if program.fd().is_err() {
        program.load().with_context(|| format!("loading program {name}"))?;
    }
    Ok(program)
}
