//! Whole user stacks through code built without frame pointers: each
//! executable object a traced process maps gets an unwind table (see
//! `table`), written once into the kernel's `UNWIND_ROWS` and shared by
//! every process mapping the same file; each process gets the list of its
//! mappings with tables (`UNWIND_PROCS`), by which the return probe walks
//! its stack (memleak-ebpf/src/unwind.rs). Files are read through the
//! descriptor of what the process maps (`TargetFile`), so a container's
//! own libc is the one read. Libraries mapped later get tables when the process is added
//! again (at each report).

mod table;

use std::{
    collections::{HashMap, HashSet},
    os::fd::AsFd as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Map, MapData},
};
use memleak_common::{UNWIND_MAPPINGS, UnwindMapping, UnwindProcess, maps};
use object::{ReadCache, ReadCacheOps};

use crate::{
    maps::mapped::Layout,
    target::{
        file::TargetFile,
        proc::{self, Mapping},
    },
};

pub use table::{Table, build};

/// `--unwind`: how user stacks are walked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Unwind {
    /// Unwind tables for objects built without frame pointers.
    Auto,
    /// Frame pointers only.
    Fp,
    /// Unwind tables for every object that has them.
    Dwarf,
}

/// Rows per page: a table starts on a page, so it is written through a
/// mapping of its own pages.
const PAGE_ROWS: u32 = 512;

/// The tables written so far, and which process uses which.
pub struct Unwinder {
    rows: MapData,
    capacity: u32,
    used: u32,
    procs: aya::maps::HashMap<MapData, u32, UnwindProcess>,
    /// `-c`'s command, stopped at its first allocation (see `hold`).
    held: aya::maps::Array<MapData, u32>,
    /// By (device, inode) of the file: None for an object without frame
    /// info, or one whose table did not fit.
    tables: HashMap<(String, u64), Option<Placed>>,
    /// Files whose table did not fit: their mappings go in a process's
    /// entry with no rows, and the kernel counts the frames it then walks
    /// by frame pointers (`Stat::UnwindLeftOut`).
    left_out: HashSet<(String, u64)>,
    /// What each process's entry holds now.
    written: HashMap<u32, Vec<UnwindMapping>>,
    /// The last entry's `UnwindProcess::generation`.
    generation: u32,
    /// Tables for objects that keep frame pointers too (`--unwind dwarf`).
    every_object: bool,
    verbose: bool,
    /// Rows one object's table may have (all of them but system-wide).
    object_rows: u32,
    /// Tables built at once.
    builders: usize,
    /// Set when memleak ends: a table being built is dropped (libLLVM's
    /// takes seconds), none is started.
    stop: Arc<AtomicBool>,
}

struct Placed {
    first: u32,
    rows: u32,
    /// Without its rows.
    table: Table,
}

/// What adding a process left out.
#[derive(Debug, Default)]
pub struct Added {
    /// Objects whose table did not fit the memory left.
    pub not_fitting: Vec<String>,
}

impl Unwinder {
    /// Takes the unwind maps out of `ebpf` (loaded with `rows` rows).
    /// Objects that keep frame pointers are walked by them, unless
    /// `every_object`.
    pub fn new(ebpf: &mut Ebpf, rows: u32, every_object: bool, verbose: bool) -> anyhow::Result<Self> {
        let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("map {name} missing"));
        let Map::Array(data) = take(maps::UNWIND_ROWS)? else { anyhow::bail!("map UNWIND_ROWS is not an array") };
        let procs = aya::maps::HashMap::try_from(take(maps::UNWIND_PROCS)?)?;
        let held = aya::maps::Array::try_from(take(maps::UNWIND_HOLD)?)?;
        Ok(Self {
            rows: data,
            capacity: rows,
            used: 0,
            procs,
            held,
            tables: HashMap::new(),
            left_out: HashSet::new(),
            written: HashMap::new(),
            generation: 0,
            every_object,
            verbose,
            stop: Arc::new(AtomicBool::new(false)),
            object_rows: rows,
            // libc's takes about as long as all the rest of a small
            // program's: one thread each, as many at once as CPUs.
            builders: std::thread::available_parallelism().map_or(1, |n| n.get()),
        })
    }

    /// System-wide: an object's table may take a quarter of the rows at
    /// most (in a first come, first served budget, libLLVM's and
    /// librustc_driver's, 11 and 9 MiB, alone took the 16 MiB default
    /// from the many small objects of everything else running), and
    /// tables are built one at a time, in the background: builders on
    /// every CPU held the reports back (4.9 s from Ctrl-C to exit once).
    pub fn share(&mut self) {
        self.object_rows = self.capacity / 4;
        self.builders = 1;
    }

    /// A flag that, set, makes the building of tables stop soon (from
    /// another thread: memleak ends).
    pub fn stopper(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// `-c`: the kernel stops process `pid` at its first allocation's
    /// entry (loaded with `Config::unwind_hold`), for `release` to add it
    /// while nothing of it runs.
    pub fn hold(&mut self, pid: u32) -> anyhow::Result<()> {
        self.held.set(0, pid, 0).context("writing UNWIND_HOLD")
    }

    /// Whether process `pid` is held (see `hold`): set by memleak before
    /// the command runs, and by the kernel as it execs.
    pub fn holding(&self, pid: u32) -> bool {
        self.held.get(&0, 0).is_ok_and(|held| held == pid)
    }

    /// Process `pid`, stopped by `hold`: its tables and entry, then no
    /// more stops. The caller lets it go on (its tracer drops the signal).
    pub fn release(&mut self, pid: u32) -> anyhow::Result<Added> {
        let added = self.add_process(pid);
        self.held.set(0, 0, 0).context("clearing UNWIND_HOLD")?;
        added
    }

    /// Tables for every executable file process `pid` maps (those not
    /// built yet), then its entry. A process that has exited adds nothing.
    pub fn add_process(&mut self, pid: u32) -> anyhow::Result<Added> {
        self.add_process_with(pid, Prebuilt::default())
    }

    /// `add_process`, taking the tables in `prebuilt` instead of building
    /// them again.
    pub fn add_process_with(&mut self, pid: u32, mut prebuilt: Prebuilt) -> anyhow::Result<Added> {
        let Ok(text) = proc::maps_text(pid) else { return Ok(Added::default()) };
        let maps = executable(&text);
        let new: Vec<&Mapping> = {
            let mut seen = HashSet::new();
            maps.iter().filter(|m| !self.tables.contains_key(&key(m)) && seen.insert(key(m))).collect()
        };
        let (ready, to_build): (Vec<&Mapping>, Vec<&Mapping>) = new.iter().partition(|m| prebuilt.0.contains_key(&key(m)));
        let stop = &self.stop;
        let mut built = build_tables(pid, &to_build, stop, u64::from(self.object_rows), self.builders);
        if stop.load(Ordering::Relaxed) {
            return Ok(Added::default());
        }
        let new: Vec<&Mapping> = to_build.into_iter().chain(ready.iter().copied()).collect();
        built.extend(ready.iter().map(|m| prebuilt.0.remove(&key(m)).map_or((None, Duration::ZERO), |(t, d)| (Some(t), d))));
        let mut added = Added::default();
        for (m, (table, took)) in new.iter().zip(built) {
            let Some(table) = table else { continue };
            let placed = match table {
                Ok(Table { too_big: Some(rows), .. }) => {
                    let share = if self.object_rows < self.capacity { "a quarter of " } else { "" };
                    self.say(format_args!(
                        "{}: its unwind table (about {} KiB) would take more than {share}--unwind-memory: walked by frame pointers",
                        m.path,
                        rows * 8 / 1024
                    ));
                    added.not_fitting.push(m.path.clone());
                    self.left_out.insert(key(m));
                    None
                }
                Ok(table) if table.keeps_frame_pointers && !self.every_object => {
                    self.say(format_args!("{}: keeps frame pointers: walked by them", m.path));
                    None
                }
                Ok(table) if table.rows.is_empty() => {
                    self.say(format_args!("{}: no frame info: walked by frame pointers", m.path));
                    None
                }
                Ok(table) => {
                    let rows = table.rows.len() as u64;
                    match self.place(table) {
                        Some(placed) => {
                            let (rows, text) = (placed.rows as u64, placed.table.text_bytes.max(1));
                            self.say(format_args!(
                                "{}: unwind table of {rows} rows, {} KiB ({} KiB per MiB of text), built in {:.1} ms",
                                m.path,
                                rows * 8 / 1024,
                                (rows * 8 * 1024 / text),
                                took.as_secs_f64() * 1e3
                            ));
                            Some(placed)
                        }
                        None => {
                            self.say(format_args!(
                                "{}: its unwind table ({rows} rows, {} KiB) does not fit what --unwind-memory has left ({} KiB): walked by frame pointers",
                                m.path,
                                rows * 8 / 1024,
                                u64::from(self.capacity.saturating_sub(self.used)) * 8 / 1024
                            ));
                            added.not_fitting.push(m.path.clone());
                            self.left_out.insert(key(m));
                            None
                        }
                    }
                }
                Err(e) => {
                    self.say(format_args!("{}: no unwind table ({e:#}): walked by frame pointers", m.path));
                    None
                }
            };
            self.tables.insert(key(m), placed);
        }
        let mut entries: Vec<UnwindMapping> = maps
            .iter()
            .filter_map(|m| {
                if self.left_out.contains(&key(m)) {
                    return Some(UnwindMapping { start: m.start, end: m.end, bias: 0, first: 0, rows: 0 });
                }
                let placed = self.tables.get(&key(m))?.as_ref()?;
                Some(UnwindMapping {
                    start: m.start,
                    end: m.end,
                    bias: placed.table.bias(m.start, m.offset)?,
                    first: placed.first,
                    rows: placed.rows,
                })
            })
            .collect();
        entries.sort_by_key(|e| e.start);
        entries.truncate(UNWIND_MAPPINGS);
        if entries.is_empty() || self.written.get(&pid) == Some(&entries) {
            return Ok(added);
        }
        // Rules the kernel cached for the entry this one replaces are not
        // this one's (see `UnwindProcess::generation`).
        self.generation = self.generation.checked_add(1).unwrap_or(1);
        let mut value = UnwindProcess {
            count: entries.len() as u32,
            generation: self.generation,
            mappings: [UnwindMapping::default(); UNWIND_MAPPINGS],
        };
        value.mappings[..entries.len()].copy_from_slice(&entries);
        self.procs.insert(pid, value, 0).context("writing a process's unwind mappings")?;
        self.written.insert(pid, entries);
        Ok(added)
    }

    /// Every process but memleak, as `add_process`; processes gone since
    /// the last call are forgotten.
    pub fn add_all(&mut self) -> anyhow::Result<Added> {
        let me = std::process::id();
        let pids: HashSet<u32> = proc::pids().into_iter().filter(|&p| p != me).collect();
        let gone: Vec<u32> = self.written.keys().filter(|p| !pids.contains(p)).copied().collect();
        for pid in gone {
            self.written.remove(&pid);
            let _ = self.procs.remove(&pid);
        }
        let mut all = Added::default();
        let mut failed = None;
        // Newest first (the highest PIDs, until they wrap): most likely
        // what a user just started to look at.
        let mut pids: Vec<u32> = pids.into_iter().collect();
        pids.sort_unstable_by(|a, b| b.cmp(a));
        for pid in pids {
            match self.add_process(pid) {
                Ok(added) => all.not_fitting.extend(added.not_fitting),
                // UNWIND_PROCS full: the others are still worth adding.
                Err(e) => failed = Some(e),
            }
        }
        match failed {
            Some(e) if all.not_fitting.is_empty() => Err(e),
            _ => Ok(all),
        }
    }

    /// Writes a table into the rows left, on pages of its own; None if it
    /// does not fit.
    fn place(&mut self, table: Table) -> Option<Placed> {
        let first = self.used.div_ceil(PAGE_ROWS) * PAGE_ROWS;
        let end = first.checked_add(u32::try_from(table.rows.len()).ok()?)?;
        if end > self.capacity {
            return None;
        }
        let layout = Layout::<u64>::new(1 << 16, PAGE_ROWS);
        let mut i = 0;
        let written = layout.for_each(self.rows.fd().as_fd(), first..end, |row| {
            // SAFETY: a row of the mapped window, past every table written
            // before: the kernel reads it only once a process's entry names
            // it, written after this.
            unsafe { row.write(table.rows[i]) };
            i += 1;
        });
        if let Err(e) = written {
            crate::warn!("cannot write an unwind table ({e}): walked by frame pointers");
            return None;
        }
        self.used = end;
        // The rows are the kernel's now: libLLVM's are 11 MiB.
        let rows = table.rows.len() as u32;
        Some(Placed { first, rows, table: Table { rows: vec![], ..table } })
    }

    fn say(&self, what: std::fmt::Arguments<'_>) {
        if self.verbose {
            eprintln!("memleak: {what}");
        }
    }
}

fn key(m: &Mapping) -> (String, u64) {
    (m.dev.clone(), m.inode)
}

/// The executable file mappings of a `/proc/PID/maps` text.
fn executable(maps: &str) -> Vec<Mapping> {
    proc::parse_maps(maps).into_iter().filter(|m| m.is_file() && m.perms.contains('x')).collect()
}

/// Tables built before the kernel's maps exist, by file (see `prebuild`).
#[derive(Default)]
pub struct Prebuilt(HashMap<(String, u64), (anyhow::Result<Table>, Duration)>);

/// With `-p`, the tables of the process's objects, built while the
/// programs load (libc's takes 2 to 3 ms): `Unwinder::add_process_with`
/// takes them. Limited to `rows` rows an object, as `Unwinder` is.
pub fn prebuild(pid: u32, rows: u32) -> Prebuilt {
    let Ok(text) = proc::maps_text(pid) else { return Prebuilt::default() };
    let maps = executable(&text);
    let mut seen = HashSet::new();
    let new: Vec<&Mapping> = maps.iter().filter(|m| seen.insert(key(m))).collect();
    let builders = std::thread::available_parallelism().map_or(1, |n| n.get());
    let built = build_tables(pid, &new, &AtomicBool::new(false), u64::from(rows), builders);
    let tables = new.iter().zip(built).filter_map(|(m, (table, took))| Some((key(m), (table?, took)))).collect();
    Prebuilt(tables)
}

/// The tables of mappings `new` of process `pid`, `builders` at once, in
/// their order; None for a file that could not be read.
fn build_tables(
    pid: u32,
    new: &[&Mapping],
    stop: &AtomicBool,
    max_rows: u64,
    builders: usize,
) -> Vec<(Option<anyhow::Result<Table>>, Duration)> {
    let mut built = vec![];
    for chunk in new.chunks(builders.max(1)) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        built.extend(std::thread::scope(|scope| {
            let threads: Vec<_> = chunk
                .iter()
                .map(|m| {
                    scope.spawn(move || {
                        let started = Instant::now();
                        // Not readable (the process exited, the range
                        // maps another file now): tried again with the
                        // next process that maps it.
                        let file = TargetFile::mapped(pid, m).and_then(|file| Ok((file.len()?, file))).ok();
                        let table = file.map(|(len, file)| {
                            let cache = ReadCache::new(AtOffsets { file: &file, at: 0, len });
                            build(&cache, stop, max_rows)
                        });
                        (table, started.elapsed())
                    })
                })
                .collect();
            threads.into_iter().map(|t| t.join().expect("table builder panicked")).collect::<Vec<_>>()
        }));
    }
    built
}

/// A file read at offsets, for object's `ReadCache`: only what the table
/// needs is read (headers, `.eh_frame`: 150 KiB of libc's 2 MiB, 7 of
/// libLLVM's 190), never the descriptor's position.
struct AtOffsets<'a> {
    file: &'a TargetFile,
    at: u64,
    len: u64,
}

impl ReadCacheOps for AtOffsets<'_> {
    fn len(&mut self) -> Result<u64, ()> {
        Ok(self.len)
    }

    fn seek(&mut self, at: u64) -> Result<u64, ()> {
        self.at = at;
        Ok(at)
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<usize, ()> {
        let n = buf.len().min(self.len.saturating_sub(self.at) as usize);
        self.read_exact(&mut buf[..n])?;
        Ok(n)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), ()> {
        self.file.read_exact_at(buf, self.at).map_err(|_| ())?;
        self.at += buf.len() as u64;
        Ok(())
    }
}
