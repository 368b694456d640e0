//! Each interval's report: read the maps, aggregate, follow each stack's
//! trend, symbolize what is printed, write it (text or JSON), warn about
//! anything the kernel side lost; and at exit, the files asked for.

pub mod aggregate;
pub mod dump;
pub mod json;
pub mod lost;
pub mod peek;
mod print;
mod rows;
pub mod sort;
pub mod text;
pub mod threads;
pub mod trend;

use std::{
    collections::{HashMap, HashSet, hash_map::RandomState},
    hash::BuildHasher as _,
    sync::{Arc, atomic::AtomicUsize},
    time::{SystemTime, UNIX_EPOCH},
};

use memleak_common::{NO_STACK, is_kernel};

use self::{
    aggregate::{Block, StackTotal},
    rows::Built,
    dump::Dump,
    sort::SortKey,
    trend::{Row, Tracker},
};
use crate::{
    clock::monotonic_ns,
    export::{Exports, pprof},
    fasthash::FastMap,
    maps::{
        collect::Recorded,
        reclaim::{Reclaim, Reclaimed},
        totals::Entry,
    },
    probe::exec::{Exec, Execs},
    serve,
    stack_end::End,
    symbolize::{Frame, StackProfile, Symbolizer},
    target::{memory, proc},
};

/// `--format`: how reports are printed on stdout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// bcc's report, with each stack's trend.
    #[default]
    Text,
    /// One JSON object per report, one per line.
    Json,
}

/// What the options ask of reports.
#[derive(Debug, Clone)]
pub struct Options {
    /// -v: says what it lets go of.
    pub verbose: bool,
    /// -T: stacks shown (per process, system-wide).
    pub top: usize,
    /// -o: blocks younger than this are left out.
    pub min_age_ns: u64,
    /// -a: each block's address and size.
    pub show_allocs: bool,
    /// `--peek N`.
    pub peek: Option<u32>,
    /// `--by-thread`.
    pub by_thread: bool,
    pub combined_only: bool,
    pub sort: SortKey,
    pub format: Format,
    /// -s: one allocation in this many is recorded.
    pub sample_rate: u64,
    /// `-q`: reports go to the server only.
    pub quiet: bool,
    /// Frames with file:line (not `--no-source`).
    pub source: bool,
    /// Where debug files not installed are asked for (`DEBUGINFOD_URLS`).
    pub debuginfod: Option<crate::target::debuginfod::Servers>,
}

/// What a report covers.
pub enum Scope {
    /// One process (-p, -c), and its name.
    Process(u32, String),
    /// Every process and the kernel, grouped by process.
    System { top_procs: usize },
}

pub struct Reporter {
    options: Options,
    scope: Scope,
    recorded: Recorded,
    symbolizer: Symbolizer,
    lost: lost::LostWarnings,
    /// `--dump DIR`: each shown stack's blocks written there.
    dump: Option<Dump>,
    /// The names of the threads the last report named.
    names: threads::Names,
    trends: Tracker,
    /// CLOCK_MONOTONIC and wall clock at attach.
    start_ns: u64,
    start: SystemTime,
    reports: u64,
    /// The last report's stacks, every one: what the exit files hold (kept
    /// only for them: 2.1 MiB at 10,000 stacks), and when it was taken
    /// (CLOCK_MONOTONIC).
    last: Vec<Row>,
    last_ns: u64,
    /// How many stacks the last report had.
    last_len: usize,
    exports: Exports,
    ends: Ends,
    /// The kernel's word on execs, when it can be had.
    execs: Option<Execs>,
    /// `--listen`: where each report is published.
    feed: Option<serve::Feed>,
    /// What no block needs any more, given back to the kernel's tables.
    reclaim: Reclaim,
    reclaimed: Reclaimed,
    /// Stacks given back between reports (see `housekeep`).
    housekept: usize,
}

/// Where each user stack really ends (stack_end), and which stack stands
/// for all those that keep the same frames: the first one seen, so a
/// stack's trend carries on from report to report.
#[derive(Default)]
struct Ends {
    /// (process, stack) -> frames kept, why it ends there, its stand-in.
    stacks: FastMap<(u32, u64), (usize, Option<End>, u64)>,
    /// (process, frames kept, cut) -> the stand-in, the frames by a
    /// 128-bit hash (two SipHash-1-3 of random keys; at 10,000 stacks two
    /// colliding is a chance of 1 in 10^30): kept as vectors, they held
    /// 2.5 MiB at 10,000 stacks for as long as their processes lived.
    kept: HashMap<(u32, u128, bool), u64>,
    keys: (RandomState, RandomState),
}

impl Ends {
    fn of(&mut self, recorded: &Recorded, symbolizer: &mut Symbolizer, tgid: u32, stack_id: u64) -> &(usize, Option<End>, u64) {
        let Self { stacks, kept, keys } = self;
        stacks.entry((tgid, stack_id)).or_insert_with(|| {
            if is_kernel(tgid) || stack_id == NO_STACK {
                return (usize::MAX, None, stack_id);
            }
            let addrs = recorded.stack(stack_id);
            let (n, end) = symbolizer.stack_end(tgid, &addrs);
            let frames = &addrs[..n];
            let hash = u128::from(keys.0.hash_one(frames)) << 64 | u128::from(keys.1.hash_one(frames));
            let same = *kept.entry((tgid, hash, end.is_some())).or_insert(stack_id);
            (n, end, same)
        })
    }

    /// The stack that stands for `stack_id`'s.
    fn same(&mut self, recorded: &Recorded, symbolizer: &mut Symbolizer, tgid: u32, stack_id: u64) -> u64 {
        self.of(recorded, symbolizer, tgid, stack_id).2
    }

    /// Forgets the stacks of processes that exited.
    fn forget(&mut self, dead: &HashSet<u32>) {
        self.stacks.retain(|(tgid, _), _| !dead.contains(tgid));
        self.kept.retain(|(tgid, ..), _| !dead.contains(tgid));
    }
}

impl Reporter {
    /// `started`: CLOCK_MONOTONIC and wall-clock time of attach.
    pub fn new(
        options: &Options,
        recorded: Recorded,
        scope: Scope,
        exports: Exports,
        dump: Option<Dump>,
        started: (u64, SystemTime),
    ) -> Self {
        let mut symbolizer = Symbolizer::new(options.source, options.debuginfod.clone());
        if let Scope::Process(pid, _) = scope {
            // Open the target's files now: its frames must still resolve if
            // it exits before the first report.
            symbolizer.refresh(pid);
        }
        let (start_ns, start) = started;
        let min_age_ns = options.min_age_ns;
        Self {
            options: options.clone(),
            scope,
            lost: lost::LostWarnings::new(),
            recorded,
            symbolizer,
            dump,
            names: threads::Names::default(),
            trends: Tracker::new(start_ns, if options.combined_only { 0 } else { min_age_ns }),
            start_ns,
            start,
            reports: 0,
            last: Vec::new(),
            last_len: 0,
            last_ns: start_ns,
            exports,
            ends: Ends::default(),
            execs: None,
            feed: None,
            reclaim: Reclaim::default(),
            reclaimed: Reclaimed::default(),
            housekept: 0,
        }
    }

    /// Publishes each report to a server from now on, starting with an
    /// empty one: a scrape before the first report finds the process at 0.
    pub fn serve(&mut self, shared: serve::Shared, capacity: serve::Capacity, probes: Arc<AtomicUsize>) {
        let coverage = match self.scope {
            Scope::Process(pid, _) => serve::Coverage::Process(pid),
            Scope::System { top_procs } => serve::Coverage::System { top_procs },
        };
        let mut feed = serve::Feed::new(shared, coverage, capacity, probes);
        let comms = self.comms(&[]);
        let report = serve::Report {
            rows: &[],
            combined: &[],
            live: None,
            comms: &comms,
            lost: lost::Lost::default(),
            blocks_read: None,
            totals_used: 0,
            stacks_used: 0,
            duration_s: 0.0,
        };
        let meta = pprof::Meta {
            time_nanos: self.start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64),
            duration_nanos: 0,
            period: self.options.sample_rate as i64,
        };
        let views = serve::Views { stacks: &[], json: Vec::new(), meta, elapsed_ns: 0 };
        feed.publish(&report, views, &mut |_, _| None);
        self.feed = Some(feed);
    }

    /// Reads execs from `execs` (see `forget_execs`).
    pub fn follow(&mut self, execs: Option<Execs>) {
        self.execs = execs;
    }

    /// Returns once the kernel told of an exec (never without `follow`).
    pub async fn exec_told(&self) {
        match &self.execs {
            Some(execs) => execs.told().await,
            None => std::future::pending().await,
        }
    }

    /// The traced process's name (its program's since its last exec).
    pub fn comm(&self) -> Option<String> {
        match &self.scope {
            Scope::Process(_, comm) => Some(comm.clone()),
            Scope::System { .. } => None,
        }
    }

    /// The processes that exec'd since the last call (see `Execs::take`);
    /// what their old images left is forgotten.
    /// Processes that returned from dlopen have their mappings read now:
    /// a library they map may be gone (dlclose) by the next report.
    pub fn forget_execs(&mut self) -> HashMap<u32, Exec> {
        let Some(told) = &mut self.execs else { return HashMap::new() };
        let execs = told.take();
        for pid in told.take_opened() {
            if !execs.contains_key(&pid) {
                self.symbolizer.refresh(pid);
            }
        }
        if !execs.is_empty() {
            // One pass over the maps for all of them: 6.5 ms for 209 execs
            // system-wide (default sizes, 2 busy CPUs), 84 ms for 214 with
            // --combined-only, which reads each one's mappings.
            self.forget_images(&execs);
        }
        execs
    }

    /// Forgets what the old images of processes that exec'd left: their
    /// blocks and totals in the kernel maps, and their stacks here. Their
    /// frames would be symbolized against the new image's mappings: calls
    /// that never happened.
    fn forget_images(&mut self, execs: &HashMap<u32, Exec>) {
        let pids: HashSet<u32> = execs.keys().copied().collect();
        // With --combined-only the times are jiffies (4 ms at HZ=250), and
        // a program often execs within one of its last malloc (a shell's
        // child): the blocks of the exec's jiffy are the old image's if
        // their address is not mapped in the new one. The new image's are
        // (they are live); an old one is, by chance, where the two images'
        // heaps overlap (their starts are random, 32 MiB apart at most for
        // the brk heap).
        let mapped: HashMap<u32, Vec<proc::Mapping>> = match self.options.combined_only {
            true => pids.iter().map(|&pid| (pid, proc::maps_of(pid))).collect(),
            false => HashMap::new(),
        };
        self.recorded.forget_images(&pids, |key, info| {
            let exec = execs.get(&key.tgid)?;
            let in_new = || mapped.get(&key.tgid).is_some_and(|maps| maps.iter().any(|m| m.contains(key.addr)));
            Some(info.timestamp_ns < exec.time || (info.timestamp_ns == exec.time && self.options.combined_only && !in_new()))
        });
        self.ends.forget(&pids);
        for &pid in &pids {
            self.symbolizer.forget(pid);
            if let Scope::Process(traced, comm) = &mut self.scope
                && *traced == pid
            {
                let now = proc::comm(pid);
                if now != "?" {
                    *comm = now;
                }
            }
        }
    }

    /// Reads the traced process's mappings again (it is about to exit):
    /// libraries it loaded since still symbolize after it is gone.
    pub fn refresh_target(&mut self) {
        if let Scope::Process(pid, _) = self.scope {
            self.symbolizer.refresh(pid);
        }
    }

    /// Prints one report; returns how many map entries it read (for -v).
    pub fn report(&mut self) -> anyhow::Result<usize> {
        self.symbolizer.next_report();
        let built = self.build();
        self.print(&built)?;
        self.give_back(&built);
        let Built { rows, now, read, .. } = built;
        self.last_len = rows.len();
        self.last = if self.exports.is_empty() { Vec::new() } else { rows };
        self.last_ns = now;
        let files = self.symbolizer.let_go();
        if self.options.verbose && files > 0 {
            let cached = self.symbolizer.frames_cached();
            let resets = self.symbolizer.cache_resets;
            let most = crate::symbolize::MAX_FRAMES;
            eprintln!("memleak: let go of the symbols of {files} files; {cached} frames cached (at most {most}, emptied {resets} times)");
        }
        crate::heap::give_back();
        Ok(read)
    }

    /// After a report: the totals entries no block named are set aside,
    /// and stacks no entry names given back (see `maps::reclaim`).
    fn give_back(&mut self, built: &Built) {
        let Built { entries, live_slots, given, .. } = built;
        if let Some(live) = live_slots {
            self.reclaim.set_aside(&self.recorded, entries, live);
        }
        let r = self.reclaim.stacks(&mut self.recorded, entries);
        // Counting what housekeeping gave back since the last report too.
        self.reclaimed = Reclaimed { entries: *given, stacks: std::mem::take(&mut self.housekept) + r.stacks, ..r };
    }

    /// Of these processes and those holding totals `entries`, the ones
    /// that exited: what they left is dropped, in the kernel maps too.
    fn forget_dead(&mut self, tgids: impl Iterator<Item = u32>, entries: &[Entry]) -> HashSet<u32> {
        let dead = self.reclaim.forget_dead(&mut self.recorded, tgids, entries);
        self.ends.forget(&dead);
        dead
    }

    /// Between reports, system-wide: gives back what processes that exited
    /// left, and the stacks no entry names any more. A build's compilers
    /// come and go by the hundred within one interval, each with thousands
    /// of stacks; given back only at reports, they filled the 65,536
    /// stacks when a report took 10 s on a loaded machine.
    pub fn housekeep(&mut self) {
        if let Scope::System { .. } = self.scope {
            let entries = self.recorded.totals();
            if !self.forget_dead(std::iter::empty(), &entries).is_empty() {
                self.housekept += self.reclaim.stacks(&mut self.recorded, &entries).stacks;
            }
        }
    }

    /// What the last report gave back, and how full the stacks are (`-v`).
    pub fn reclaimed(&self) -> (Reclaimed, u32) {
        (self.reclaimed, self.recorded.stacks_capacity())
    }

    /// Names of the processes a report names: the traced one, or (system
    /// wide) every process in it, kernel allocators included.
    fn comms(&self, rows: &[Row]) -> HashMap<u32, String> {
        match &self.scope {
            Scope::Process(pid, comm) => HashMap::from([(*pid, comm.clone())]),
            Scope::System { .. } => rows
                .iter()
                .map(|r| r.total.tgid)
                .collect::<HashSet<_>>()
                .into_iter()
                .map(|tgid| {
                    let name = if is_kernel(tgid) { text::process_name(tgid, &mut proc::comm) } else { proc::comm(tgid) };
                    (tgid, name)
                })
                .collect(),
        }
    }

    /// At exit: losses not told yet, then `--folded`, `--flamegraph`,
    /// `--pprof` (every stack of the last report).
    pub fn finish(&mut self) -> anyhow::Result<()> {
        for warning in self.lost.rest(&self.recorded.lost(), monotonic_ns()) {
            eprintln!("memleak: {warning}");
        }
        if self.exports.is_empty() {
            return Ok(());
        }
        let comms = self.comms(&self.last);
        let Self { recorded, symbolizer, ends, .. } = self;
        let stacks: Vec<StackProfile> = self
            .last
            .iter()
            .map(|Row { total, .. }| StackProfile {
                tgid: total.tgid,
                kind: total.kind,
                bytes: total.bytes,
                count: total.count,
                frames: frames_of(recorded, symbolizer, ends, total),
                ..Default::default()
            })
            .collect();
        let elapsed_ns = self.last_ns.saturating_sub(self.start_ns);
        let what = match &self.scope {
            Scope::Process(pid, comm) => format!("pid {pid} ({comm})"),
            Scope::System { .. } => "all processes".to_string(),
        };
        let title = format!("{what}, {:.1} s after attach", elapsed_ns as f64 / 1e9);
        let meta = pprof::Meta {
            time_nanos: self.start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64),
            duration_nanos: elapsed_ns as i64,
            period: self.options.sample_rate as i64,
        };
        self.exports.write(&stacks, &title, &mut |pid, addr| symbolizer.mapping(pid, addr), &mut |pid| comms.get(&pid).cloned(), meta)
    }
}

/// Stacks the served heap profiles hold: by outstanding bytes, then by
/// bytes allocated since attach, at most [`SERVED_STACKS`]; each with both.
fn served_stacks(
    rows: &[Row],
    since: &FastMap<trend::Key, (u64, u64)>,
    mut frames: impl FnMut(&StackTotal) -> Vec<Frame>,
) -> Vec<StackProfile> {
    let mut stacks: FastMap<trend::Key, StackProfile> = FastMap::default();
    for Row { total, .. } in rows {
        let s = stacks.entry((total.tgid, total.stack_id, total.kind)).or_default();
        (s.tgid, s.kind, s.bytes, s.count) = (total.tgid, total.kind, s.bytes + total.bytes, s.count + total.count);
    }
    for (&(tgid, stack_id, kind), &(allocs, allocated)) in since {
        let s = stacks.entry((tgid, stack_id, kind)).or_default();
        (s.tgid, s.kind, s.allocs, s.allocated) = (tgid, kind, allocs, allocated);
    }
    let mut all: Vec<(trend::Key, StackProfile)> = stacks.into_iter().collect();
    all.sort_unstable_by_key(|(k, s)| (std::cmp::Reverse(s.bytes), std::cmp::Reverse(s.allocated), *k));
    let first = all.len().min(SERVED_STACKS / 2);
    all[first..].sort_unstable_by_key(|(k, s)| (std::cmp::Reverse(s.allocated), *k));
    all.truncate(SERVED_STACKS);
    all.into_iter()
        .filter_map(|((tgid, stack_id, _), mut s)| {
            s.frames = frames(&StackTotal { tgid, stack_id, ..Default::default() });
            // A stack given back (idle, nothing outstanding: see
            // maps::reclaim) is no longer known: its counts stay in the
            // counters, not in the profiles.
            (stack_id == NO_STACK || !s.frames.is_empty()).then_some(s)
        })
        .collect()
}

/// The most stacks a served profile holds: half the most outstanding, half
/// the most allocating. Symbolizing them is most of what --listen adds to
/// a report.
const SERVED_STACKS: usize = 1000;

/// The rows of user processes a report shows (each process's first
/// `top` of its heap and of its mappings), whose blocks `--peek` and
/// `--dump` read: the kernel's cannot be.
fn shown(rows: &[Row], top: usize) -> Vec<usize> {
    let mut ranks: HashMap<(u32, bool), usize> = HashMap::new();
    (0..rows.len())
        .filter(|&i| {
            let tgid = rows[i].total.tgid;
            let rank = ranks.entry((tgid, rows[i].total.kind.is_mapping())).or_default();
            *rank += 1;
            *rank <= top && !is_kernel(tgid)
        })
        .collect()
}

/// The traced processes' memory, and the kernel's record of their blocks.
struct Traced<'a>(&'a Recorded);

impl peek::Memory for Traced<'_> {
    fn read(&self, tgid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
        memory::read(tgid, addr, len).ok()
    }

    fn live(&self, tgid: u32, block: &Block) -> bool {
        self.0.outstanding(tgid, block.addr).is_some_and(|i| (i.timestamp_ns, i.size) == (block.born_ns, block.size))
    }
}

/// The frames of a stack: kernel frames, or user frames of its process up
/// to where the stack really ends, then a marker saying why if it ends
/// before the walk did.
fn frames_of(recorded: &Recorded, symbolizer: &mut Symbolizer, ends: &mut Ends, total: &StackTotal) -> Vec<Frame> {
    if total.stack_id == NO_STACK {
        return vec![];
    }
    let mut addrs = recorded.stack(total.stack_id);
    if is_kernel(total.tgid) {
        return symbolizer.kernel_frames(&addrs);
    }
    let (n, end, _) = ends.of(recorded, symbolizer, total.tgid, total.stack_id).clone();
    addrs.truncate(n);
    let mut frames = symbolizer.frames(total.tgid, &addrs);
    frames.extend(end.as_ref().map(Frame::end));
    frames
}

fn frame_lines(recorded: &Recorded, symbolizer: &mut Symbolizer, ends: &mut Ends, total: &StackTotal) -> Vec<String> {
    frames_of(recorded, symbolizer, ends, total).iter().flat_map(|f| f.lines()).collect()
}
