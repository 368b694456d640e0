//! Loads the kernel programs, configured through read-only globals and map
//! sizes (no recompiling), and names each program once.

use std::os::fd::AsFd as _;

use anyhow::Context as _;

use aya::{
    Ebpf, EbpfLoader,
    maps::{Map, ProgramArray},
    programs::UProbe,
};
use memleak_common::{BUCKET_SLOTS, FIELD_COUNT, MAX_SHARDS, UNWIND_HOLD_FIRST, UNWIND_TABLES, globals, maps};

use crate::{
    error::{Kind, user_error},
    probe::hooks::Shape,
    probe::multi::{self, Links},
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
    /// Buckets of the allocation table, a power of two; 0 for none (see
    /// `table_buckets`).
    pub table_buckets: u32,
    pub max_stacks: u32,
    /// Outstanding sizes in the per-stack totals (`COMBINED_ONLY`).
    pub combined_only: bool,
    /// Parts of each stack's totals (a power of two): see `CombinedKey`.
    pub shards: u32,
    /// Entries of the per-(process, stack) totals (`TOTALS`), a power of
    /// two: see `totals_entries`.
    pub totals_entries: u32,
    /// Tracepoint field offsets (kernel tracing only).
    pub field_offsets: [u32; FIELD_COUNT],
    /// Kernel text whose allocations are not traced (kernel tracing only).
    pub skip_caller: [u64; 2],
    /// The process whose execs are told (`WATCHED_TGID`), 0 for all.
    pub watched_tgid: u32,
    /// Rows of unwind tables (8 bytes each); 0 to walk by frame pointers only.
    pub unwind_rows: u32,
    /// `-c`: the command is stopped at its first allocation until its
    /// tables are in (see `Unwinder::hold`).
    pub unwind_hold: bool,
}

/// What the options ask of the kernel side, before it is sized.
#[derive(Debug, Clone, Default)]
pub struct Asked {
    pub min_size: Option<u64>,
    pub max_size: Option<u64>,
    pub sample_every: u64,
    pub trace: bool,
    pub max_allocs: u32,
    pub max_stacks: Option<u32>,
    pub combined_only: bool,
    /// Tracing every process (the maps are sized for many).
    pub system: bool,
    /// The process whose execs are told (`-p`), 0 for all.
    pub watched_tgid: u32,
    /// Memory for unwind tables, in MiB; 0 to walk by frame pointers only.
    pub unwind_mib: u32,
}

impl Config {
    pub fn new(asked: &Asked) -> Self {
        let shards = shards(online_cpus());
        let stacks = asked.max_stacks.unwrap_or(DEFAULT_STACKS);
        Self {
            min_size: asked.min_size.unwrap_or(0),
            max_size: asked.max_size.unwrap_or(u64::MAX),
            sample_every: asked.sample_every,
            trace: asked.trace,
            max_allocs: asked.max_allocs,
            table_buckets: table_buckets(asked.max_allocs),
            max_stacks: match (asked.max_stacks, asked.system) {
                (Some(n), _) => n,
                (None, true) => system_stacks(crate::target::proc::mem_available()),
                (None, false) => DEFAULT_STACKS,
            },
            combined_only: asked.combined_only,
            shards,
            // One process has each stack once, plus the blocks without one;
            // system-wide, processes share stacks (of libc, say).
            totals_entries: totals_entries(
                match asked.system {
                    true => stacks.saturating_mul(4).max(1024),
                    false => stacks.saturating_add(1),
                }
                .saturating_mul(shards),
            ),
            field_offsets: [0; FIELD_COUNT],
            skip_caller: [0; 2],
            watched_tgid: asked.watched_tgid,
            unwind_rows: asked.unwind_mib << 20 >> 3,
            unwind_hold: false,
        }
    }
}

/// Loads the object, and readies its uprobe programs for uprobe_multi
/// links where the kernel has them.
pub fn load(config: &Config) -> anyhow::Result<(Ebpf, Links)> {
    std::thread::scope(|scope| {
        // Parsed again for those programs while aya loads the object: it
        // took 1 to 3 ms on the way to attaching.
        let parsed = scope.spawn(|| multi::supported().then(|| aya_obj::Object::parse(PROGRAMS)).transpose());
        let ebpf = load_object(config)?;
        let parsed = parsed.join().expect("parser thread panicked")?;
        let links = Links::new(parsed, &ebpf).context("relocating the programs for uprobe_multi links")?;
        Ok((ebpf, links))
    })
}

/// `globals::UNWIND`: what the kernel does with unwind tables.
fn unwind_flags(config: &Config) -> u32 {
    match (config.unwind_rows > 0, config.unwind_hold) {
        (false, _) => 0,
        (true, false) => UNWIND_TABLES,
        (true, true) => UNWIND_TABLES | UNWIND_HOLD_FIRST,
    }
}

fn load_object(config: &Config) -> anyhow::Result<Ebpf> {
    check_privileges()?;
    raise_memlock_limit();
    let self_tgid = std::process::id();
    let trace = u32::from(config.trace);
    without_kernel_btf(EbpfLoader::new)
        .override_global(globals::MIN_SIZE, &config.min_size, true)
        .override_global(globals::MAX_SIZE, &config.max_size, true)
        .override_global(globals::SAMPLE_EVERY, &config.sample_every, true)
        .override_global(globals::SELF_TGID, &self_tgid, true)
        .override_global(globals::TRACE, &trace, true)
        .override_global(globals::SHARD_MASK, &(config.shards - 1), true)
        .override_global(globals::COMBINED_ONLY, &u32::from(config.combined_only), true)
        .override_global(globals::FIELD_OFFSETS, &config.field_offsets, true)
        .override_global(globals::PAGE_SIZE, &page_size(), true)
        .override_global(globals::SKIP_CALLER, &config.skip_caller, true)
        .override_global(globals::WATCHED_TGID, &config.watched_tgid, true)
        .override_global(globals::UNWIND, &unwind_flags(config), true)
        .map_max_entries(maps::UNWIND_ROWS, config.unwind_rows.max(1))
        .map_max_entries(maps::EVENTS, events_bytes(config.watched_tgid).max(page_size() as u32))
        .override_global(globals::TABLE_SHIFT, &table_shift(config.table_buckets), true)
        .override_global(globals::TOTALS_BITS, &config.totals_entries.ilog2(), true)
        .map_max_entries(maps::ALLOC_TABLE, config.table_buckets.max(1))
        .map_max_entries(maps::ALLOCS, config.max_allocs - table_slots(config.table_buckets))
        .map_max_entries(maps::STACKS, config.max_stacks)
        .map_max_entries(maps::TOTALS, config.totals_entries)
        // PENDING, a task storage map: aya creates it but has no type to
        // read it with, and memleak never does.
        .allow_unsupported_maps()
        .load(PROGRAMS)
        .map_err(load_error)
}

/// The allocation table's share of `--max-allocs`: a quarter of it, in
/// slots (rounded down to a power of two of buckets), and the rest in
/// ALLOCS for the blocks whose bucket is full. The table is allocated
/// whole when the map is made (384 bytes a bucket: 12 MiB for the default
/// million), so small limits have none, and keep exactly their count.
fn table_buckets(max_allocs: u32) -> u32 {
    const SMALLEST: u32 = 1 << 16;
    if max_allocs < SMALLEST {
        return 0;
    }
    let buckets = max_allocs / 4 / BUCKET_SLOTS as u32;
    1 << buckets.ilog2()
}

/// Bytes of the event ring (`EVENTS`, 24 bytes an event with its header):
/// its pages are mapped into memleak twice (the kernel maps a ring's data
/// twice so that a record never wraps), all resident, for as long as it
/// runs. System-wide, 128 KiB: 5,461 execs and dlopens between two reads
/// of the ring (memleak reads it as soon as it holds one). One process
/// (-p, -c) tells only its own, and does not exec or dlopen hundreds of
/// times in the moment memleak takes to wake: 16 KiB, 682 events. This
/// took 224 KiB off memleak's RSS with -p. (A ring is at least a page.)
fn events_bytes(watched_tgid: u32) -> u32 {
    if watched_tgid == 0 { 128 << 10 } else { 16 << 10 }
}

/// `--max-stacks` with -p and -c.
const DEFAULT_STACKS: u32 = 1 << 14;

/// `--max-stacks` system-wide: STACKS is not allocated whole, but filled it
/// holds about 1.1 KiB of kernel memory per stack (127 return addresses and
/// the hash map's own), so at most 1/256 of the memory available goes to
/// it: 65,536 stacks (70 MiB) from 18 GiB available, never fewer than with
/// -p. A C build filled 16,384 within 5 s; given back as they empty (see
/// `maps::reclaim`), 65,536 held it. The per-stack totals stay sized from
/// 16,384 (they are allocated whole).
fn system_stacks(mem_available: Option<u64>) -> u32 {
    const PER_STACK: u64 = 1126;
    let fit = mem_available.map_or(0, |bytes| bytes / 256 / PER_STACK);
    let fit = u32::try_from(fit).unwrap_or(u32::MAX).clamp(DEFAULT_STACKS, 1 << 16);
    1 << fit.ilog2()
}

/// Entries for this many (process, stack, part) keys: half as many again,
/// rounded up to a power of two, so that a key finds a free entry within
/// `TOTALS_PROBES` of its hash. Allocated whole when the map is made (48
/// bytes each: 3 MiB for the defaults on 2 CPUs), so at most 2^22.
fn totals_entries(keys: u32) -> u32 {
    keys.saturating_add(keys / 2).clamp(1 << 10, 1 << 22).next_power_of_two()
}

fn table_slots(buckets: u32) -> u32 {
    buckets * BUCKET_SLOTS as u32
}

/// A bucket is the top bits of a key's hash (`TABLE_SHIFT`).
fn table_shift(buckets: u32) -> u32 {
    if buckets == 0 { 0 } else { 64 - buckets.ilog2() }
}

/// aya 0.14's `EbpfLoader::new()` always reads and parses the kernel's BTF
/// (6 MB: about 27 ms, a third of the time to attach), which it needs only
/// for CO-RE relocations; memleak's programs have none (they read tracepoint
/// fields at offsets the loader sets). So `f` runs on a thread of its own
/// whose root is a directory without that file: unshared (`CLONE_FS`), so
/// the rest of the process keeps its root, and gone with the thread. Where
/// the thread may not change its root (no `CAP_SYS_CHROOT`), `f` sees the
/// file, and aya parses it as before.
fn without_kernel_btf<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: unshare and chroot change only this thread's
                // fs_struct once CLONE_FS is unshared; the path is a C string.
                unsafe {
                    if libc::unshare(libc::CLONE_FS) == 0 {
                        // Holds numbered files only.
                        libc::chroot(c"/proc/self/fdinfo".as_ptr());
                    }
                }
                f()
            })
            .join()
            .expect("loader thread panicked")
    })
}

/// The munmap program runs once per followed mapping a munmap cuts, by
/// tail-calling itself through UNMAP_AGAIN: put it there (before it is
/// attached).
pub fn chain_unmap(ebpf: &mut Ebpf, links: &Links) -> anyhow::Result<()> {
    chain(ebpf, links, maps::UNMAP_AGAIN, Shape::Munmap.programs().0)
}

/// The program that walks user stacks by unwind tables, a few frames per
/// run: loaded (not attached), and put where alloc_exit and itself
/// tail-call it. Until it is, stacks are walked by frame pointers.
pub fn chain_unwind(ebpf: &mut Ebpf, links: &Links) -> anyhow::Result<()> {
    if links.multi() {
        return chain_unwind_multi(ebpf, links);
    }
    chain(ebpf, links, maps::UNWIND_STEP, UNWIND_STEP)
}

const UNWIND_STEP: &str = "unwind_step";

/// `chain_unwind` for uprobe_multi links: it only reads the object, so
/// it can run while the probes' programs load on other threads (see
/// `attach::attach`): its verification took 16 to 38 ms, most of what
/// tables added to attaching.
pub fn chain_unwind_multi(ebpf: &Ebpf, links: &Links) -> anyhow::Result<()> {
    links.load(UNWIND_STEP).with_context(|| format!("loading program {UNWIND_STEP}"))?;
    chain_multi(ebpf, links, maps::UNWIND_STEP, UNWIND_STEP)
}

/// Puts program `name` (loaded) at index 0 of the program array `map`.
fn chain(ebpf: &mut Ebpf, links: &Links, map: &str, name: &str) -> anyhow::Result<()> {
    if links.multi() {
        return chain_multi(ebpf, links, map, name);
    }
    let fd = uprobe(ebpf, name)?.fd()?.try_clone().with_context(|| format!("duplicating program {name}'s fd"))?;
    let array = ebpf.map_mut(map).with_context(|| format!("map {map} missing"))?;
    ProgramArray::try_from(array)?.set(0, &fd, 0).with_context(|| format!("chaining program {name}"))?;
    Ok(())
}

fn chain_multi(ebpf: &Ebpf, links: &Links, map: &str, name: &str) -> anyhow::Result<()> {
    let array = ebpf.map(map).with_context(|| format!("map {map} missing"))?;
    let Map::ProgramArray(array) = array else { anyhow::bail!("map {map} is not a program array") };
    links
        .with_program(name, |prog| multi::set_program(array.fd().as_fd(), 0, prog))
        .with_context(|| format!("chaining program {name}"))
}

/// What each program cost while the kernel counted (sysctl
/// `kernel.bpf_stats_enabled=1`; it counts nothing otherwise), for -v:
/// `memleak: program alloc_exit ran 400003 times, 144001080 ns in all (360 ns each)`.
pub fn program_costs(ebpf: &Ebpf, links: &Links) -> Vec<String> {
    let line = |name: &str, info: aya::programs::ProgramInfo| {
        let (runs, ns) = (info.run_count(), info.run_time().as_nanos());
        (runs > 0).then(|| format!("memleak: program {name} ran {runs} times, {ns} ns in all ({} ns each)", ns / runs as u128))
    };
    let mut lines: Vec<String> =
        ebpf.programs().filter_map(|(name, program)| line(name, program.info().ok()?)).collect();
    let ids = links.program_ids();
    if !ids.is_empty() {
        lines.extend(aya::programs::loaded_programs().filter_map(Result::ok).filter_map(|info| {
            let (name, _) = ids.iter().find(|(_, id)| *id == info.id())?;
            line(name, info)
        }));
    }
    lines.sort();
    lines
}

/// EPERM anywhere in the cause (aya wraps the errno of bpf() a few layers
/// down) is a permission error; anything else is unexpected.
fn load_error(e: aya::EbpfError) -> anyhow::Error {
    let errno = std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
        .find_map(|e| e.downcast_ref::<std::io::Error>()?.raw_os_error());
    let err = anyhow::Error::new(e).context("loading the BPF programs");
    if errno != Some(libc::EPERM) {
        return err;
    }
    user_error(
        Kind::Permission,
        format!("BPF not permitted: the kernel refused it ({err:#}): check kernel lockdown, seccomp and LSM policy"),
    )
}

/// One part of the per-stack totals per CPU, up to `MAX_SHARDS`: CPUs
/// beyond that share parts (atomic adds keep them exact).
fn shards(cpus: u32) -> u32 {
    cpus.clamp(1, MAX_SHARDS).next_power_of_two().min(MAX_SHARDS)
}

fn online_cpus() -> u32 {
    // SAFETY: sysconf with a valid name.
    unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.clamp(1, i64::from(u32::MAX)) as u32
}

fn page_size() -> u64 {
    // SAFETY: sysconf with a valid name.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as u64 }
}

/// Root with its capabilities, or the capabilities BPF tracing needs.
fn check_privileges() -> anyhow::Result<()> {
    let caps = effective_capabilities();
    // SAFETY: no arguments, cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // Root whose capabilities were dropped (setpriv, capsh, a container)
        // would get a bare EPERM from bpf(), or EACCES from perf_event_open()
        // for the uprobes: without CAP_SYS_ADMIN, even with CAP_BPF and
        // CAP_PERFMON, this kernel refuses them (seen on 6.18).
        if caps & CAP_SYS_ADMIN != 0 {
            return Ok(());
        }
        return Err(user_error(
            Kind::Permission,
            "BPF not permitted: running as root, but without CAP_SYS_ADMIN (its capabilities were dropped)",
        ));
    }
    let needed = CAP_PERFMON | CAP_BPF | CAP_SYS_ADMIN;
    if caps & needed == needed {
        return Ok(());
    }
    Err(user_error(
        Kind::Permission,
        "must be run as root (or with CAP_BPF, CAP_PERFMON and CAP_SYS_ADMIN): try sudo memleak ...",
    ))
}

const CAP_SYS_ADMIN: u64 = 1 << 21; // also for /proc/PID/map_files
const CAP_PERFMON: u64 = 1 << 38;
const CAP_BPF: u64 = 1 << 39;

/// This process's effective capability set (0 if unreadable).
fn effective_capabilities() -> u64 {
    crate::target::proc::own_status()
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
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

/// Loads these uprobe programs into the kernel, on every CPU at once (the
/// verifier is the biggest part of the time to attach), and hands each to
/// `then` on the thread that loaded it, as soon as it is loaded: probes go
/// in while other programs are verified. Programs loaded already go to
/// `then` too. `names` is the order to load in; returns the names loaded now.
pub fn load_each<'n>(
    ebpf: &mut Ebpf,
    names: &[&'n str],
    then: impl Fn(&str, &mut UProbe) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<Vec<&'n str>> {
    let mut programs: Vec<(&'n str, &mut UProbe)> = ebpf
        .programs_mut()
        .filter_map(|(name, program)| Some((*names.iter().find(|n| **n == name)?, program)))
        .filter_map(|(name, program)| <&mut UProbe>::try_from(program).ok().map(|p| (name, p)))
        .collect();
    programs.sort_by_key(|(name, _)| names.iter().position(|n| n == name));
    let loaded: Vec<&'n str> = programs.iter().filter(|(_, p)| p.fd().is_err()).map(|(name, _)| *name).collect();
    in_parallel(programs, |(name, program)| {
        if program.fd().is_err() {
            program.load().with_context(|| format!("loading program {name}"))?;
        }
        then(name, program)
    })?;
    Ok(loaded)
}

/// [`load_each`] for uprobe_multi links: the programs are loaded through
/// `links`, `then` gets each one's name once it is loaded.
pub fn load_each_multi<'n>(
    links: &Links,
    names: &[&'n str],
    then: impl Fn(&str) -> anyhow::Result<()> + Sync,
) -> anyhow::Result<Vec<&'n str>> {
    let loaded = std::sync::Mutex::new(vec![]);
    in_parallel(names.to_vec(), |name| {
        if links.load(name).with_context(|| format!("loading program {name}"))? {
            loaded.lock().expect("loaded").push(name);
        }
        then(name)
    })?;
    Ok(loaded.into_inner().expect("loaded"))
}

/// Runs `f` on each item, on one thread more than CPUs: the kernel's first
/// uprobe registration sleeps for an RCU grace period, and a CPU would idle
/// through it. Each thread takes the next item when done with one (their
/// verification times differ tenfold); the first error stops them all.
fn in_parallel<T: Send>(items: Vec<T>, f: impl Fn(T) -> anyhow::Result<()> + Sync) -> anyhow::Result<()> {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (cpus + 1).min(items.len().max(1));
    let queue = std::sync::Mutex::new(std::collections::VecDeque::from(items));
    let next = || queue.lock().expect("program queue").pop_front();
    let give_up = || queue.lock().expect("program queue").clear();
    std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    while let Some(item) = next() {
                        if let Err(e) = f(item) {
                            give_up();
                            return Err(e);
                        }
                    }
                    anyhow::Ok(())
                })
            })
            .collect();
        workers.into_iter().try_for_each(|worker| worker.join().expect("program loader thread panicked"))
    })
}

/// Loads one program into the kernel, by name, for attaching.
pub fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &str) -> anyhow::Result<&'a mut UProbe> {
    let program: &mut UProbe = ebpf
        .program_mut(name)
        .with_context(|| format!("program {name} missing from the BPF object"))?
        .try_into()
        .with_context(|| format!("program {name} is not a uprobe"))?;
    if program.fd().is_err() {
        program.load().with_context(|| format!("loading program {name}"))?;
    }
    Ok(program)
}

#[cfg(test)]
mod tests {
    use std::io;

    use aya::{EbpfError, maps::MapError};

    use super::*;

    fn map_error(errno: i32) -> EbpfError {
        EbpfError::MapError(MapError::CreateError { name: "STATS".into(), io_error: io::Error::from_raw_os_error(errno) })
    }

    #[test]
    fn eperm_from_the_kernel_is_a_permission_error() {
        let err = load_error(map_error(libc::EPERM));
        assert_eq!(crate::error::exit_code(&err), Kind::Permission as u8);
        let text = format!("{err:#}");
        assert_eq!(text.lines().count(), 1, "{text}");
        assert!(text.starts_with("BPF not permitted: ") && text.contains("Operation not permitted"), "{text}");
    }

    #[test]
    fn other_load_failures_are_unexpected() {
        let err = load_error(map_error(libc::EINVAL));
        assert_eq!(crate::error::exit_code(&err), 1);
        assert!(format!("{err:#}").starts_with("loading the BPF programs: "), "{err:#}");
    }

    #[test]
    fn a_quarter_of_max_allocs_is_table_slots_from_65536_up() {
        assert_eq!(table_buckets(65535), 0);
        assert_eq!(table_shift(0), 0);
        assert_eq!((table_buckets(65536), table_shift(2048)), (2048, 53));
        assert_eq!(table_slots(table_buckets(1 << 20)), 1 << 18);
        // Rounded down to a power of two of buckets: the hash map has the rest.
        assert_eq!(table_buckets(1_000_000), 16384);
        assert_eq!(table_buckets(u32::MAX), 1 << 26);
    }

    #[test]
    fn totals_have_half_as_many_entries_again_as_keys_in_a_power_of_two() {
        assert_eq!(totals_entries(16385 * 2), 1 << 16);
        assert_eq!(totals_entries(43690), 1 << 16);
        assert_eq!(totals_entries(43692), 1 << 17);
        assert_eq!(totals_entries(1), 1 << 10);
        assert_eq!(system_stacks(None), 1 << 14);
        assert_eq!(system_stacks(Some(1 << 30)), 1 << 14, "1 GiB available: as with -p");
        assert_eq!(system_stacks(Some(9 << 30)), 1 << 15);
        assert_eq!(system_stacks(Some(18 << 30)), 1 << 16);
        assert_eq!(system_stacks(Some(1 << 40)), 1 << 16);
        assert_eq!(totals_entries(u32::MAX), 1 << 22);
    }

    #[test]
    fn one_part_of_the_totals_per_cpu_up_to_eight() {
        let parts: Vec<u32> = [0, 1, 2, 3, 4, 6, 8, 9, 64, 1024].into_iter().map(shards).collect();
        assert_eq!(parts, [1, 1, 2, 4, 4, 8, 8, 8, 8, 8]);
    }

    #[test]
    fn kernel_btf_is_hidden_from_the_loader_only() {
        const CAP_SYS_CHROOT: u64 = 1 << 18;
        let btf = std::path::Path::new("/sys/kernel/btf/vmlinux");
        if !btf.exists() || effective_capabilities() & CAP_SYS_CHROOT == 0 {
            eprintln!("skipped: no kernel BTF, or not allowed to chroot");
            return;
        }
        let (seen, procfs) = without_kernel_btf(|| (btf.exists(), std::path::Path::new("/proc/self/stat").exists()));
        assert!(!seen, "the loader's thread still sees the kernel BTF");
        assert!(!procfs, "the loader's thread kept its root");
        // This thread, and the process, keep theirs.
        assert!(btf.exists() && std::path::Path::new("/proc/self/stat").exists());
        assert!(std::thread::spawn(move || btf.exists()).join().unwrap());
    }
}
