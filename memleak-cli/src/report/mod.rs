//! Each interval's report: read the maps, aggregate, follow each stack's
//! trend, symbolize what is printed, write it (text or JSON), warn about
//! anything the kernel side lost; and at exit, the files asked for.

pub mod aggregate;
pub mod dump;
pub mod json;
pub mod lost;
pub mod peek;
pub mod sort;
pub mod text;
pub mod threads;
pub mod trend;

use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, atomic::AtomicUsize},
    time::{SystemTime, UNIX_EPOCH},
};

use memleak_common::{Kind, NO_STACK, is_kernel};

use self::{
    aggregate::{Block, StackTotal},
    dump::Dump,
    sort::SortKey,
    trend::{Row, Tracker},
};
use crate::{
    cli::{Args, Format},
    clock::{self, monotonic_ns},
    export::{Exports, pprof},
    fasthash::FastMap,
    maps::{
        collect::{self, Recorded},
        reclaim::{Reclaim, Reclaimed},
        totals::Entry,
    },
    output,
    probe::exec::{Exec, Execs},
    serve,
    stack_end::End,
    symbolize::{Frame, StackProfile, Symbolizer},
    target::{memory, proc},
};

/// What a report covers.
pub enum Scope {
    /// One process (-p, -c), and its name.
    Process(u32, String),
    /// Every process and the kernel, grouped by process.
    System { top_procs: usize },
}

pub struct Reporter {
    scope: Scope,
    /// -v: says what it lets go of.
    verbose: bool,
    recorded: Recorded,
    symbolizer: Symbolizer,
    lost: lost::LostWarnings,
    top: usize,
    min_age_ns: u64,
    show_allocs: bool,
    /// `--peek N`: bytes read of each shown stack's oldest blocks.
    peek: Option<u32>,
    /// `--dump DIR`: each shown stack's blocks written there.
    dump: Option<Dump>,
    /// `--by-thread`: the report grouped by thread name.
    by_thread: bool,
    /// The names of the threads the last report named.
    names: threads::Names,
    combined_only: bool,
    sort: SortKey,
    format: Format,
    sample_rate: u64,
    trends: Tracker,
    /// CLOCK_MONOTONIC and wall clock at attach.
    start_ns: u64,
    start: SystemTime,
    reports: u64,
    /// The last report's stacks, every one: what the exit files hold, and
    /// when it was taken (CLOCK_MONOTONIC).
    last: Vec<Row>,
    last_ns: u64,
    exports: Exports,
    ends: Ends,
    /// The kernel's word on execs, when it can be had.
    execs: Option<Execs>,
    /// `--listen`: where each report is published.
    feed: Option<serve::Feed>,
    /// `-q`: reports go to the server only.
    quiet: bool,
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
    /// (process, frames kept, cut) -> the stand-in.
    kept: HashMap<(u32, Vec<u64>, bool), u64>,
}

impl Ends {
    fn of(&mut self, recorded: &Recorded, symbolizer: &mut Symbolizer, tgid: u32, stack_id: u64) -> &(usize, Option<End>, u64) {
        let Self { stacks, kept } = self;
        stacks.entry((tgid, stack_id)).or_insert_with(|| {
            if is_kernel(tgid) || stack_id == NO_STACK {
                return (usize::MAX, None, stack_id);
            }
            let mut addrs = recorded.stack(stack_id);
            let (n, end) = symbolizer.stack_end(tgid, &addrs);
            addrs.truncate(n);
            let same = *kept.entry((tgid, addrs, end.is_some())).or_insert(stack_id);
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
        args: &Args,
        recorded: Recorded,
        scope: Scope,
        exports: Exports,
        dump: Option<Dump>,
        started: (u64, SystemTime),
    ) -> Self {
        let mut symbolizer = Symbolizer::new(!args.no_source);
        if let Scope::Process(pid, _) = scope {
            // Open the target's files now: its frames must still resolve if
            // it exits before the first report.
            symbolizer.refresh(pid);
        }
        let (start_ns, start) = started;
        let min_age_ns = args.older.saturating_mul(1_000_000);
        Self {
            scope,
            verbose: args.verbose,
            lost: lost::LostWarnings::new(),
            recorded,
            symbolizer,
            top: args.top,
            min_age_ns,
            show_allocs: args.show_allocs,
            peek: args.peek,
            dump,
            by_thread: args.by_thread,
            names: threads::Names::default(),
            combined_only: args.combined_only,
            sort: args.sort,
            format: args.format,
            sample_rate: args.sample_rate,
            trends: Tracker::new(start_ns, if args.combined_only { 0 } else { min_age_ns }),
            start_ns,
            start,
            reports: 0,
            last: Vec::new(),
            last_ns: start_ns,
            exports,
            ends: Ends::default(),
            execs: None,
            feed: None,
            quiet: args.quiet,
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
            period: self.sample_rate as i64,
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
        let mapped: HashMap<u32, Vec<proc::Mapping>> = match self.combined_only {
            true => pids.iter().map(|&pid| (pid, proc::maps_of(pid))).collect(),
            false => HashMap::new(),
        };
        self.recorded.forget_images(&pids, |key, info| {
            let exec = execs.get(&key.tgid)?;
            let in_new = || mapped.get(&key.tgid).is_some_and(|maps| maps.iter().any(|m| m.contains(key.addr)));
            Some(info.timestamp_ns < exec.time || (info.timestamp_ns == exec.time && self.combined_only && !in_new()))
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
        let now = monotonic_ns();
        self.symbolizer.next_report();
        let mut read = 0;
        let aggregated = (!self.combined_only).then(|| {
            // JSON lists blocks with -a too.
            // As many stacks as last time, most likely: no table regrown by doubling.
            // --dump writes every block of the stacks shown.
            let keep_blocks = self.show_allocs || self.dump.is_some();
            let (min_age_ns, stacks) = (self.min_age_ns, self.last.len());
            let oldest = if self.peek.is_some() { peek::BLOCKS } else { 0 };
            let mut parts = self.recorded.allocations_into(
                || (aggregate::Aggregator::new(now, min_age_ns, keep_blocks, oldest, stacks), 0),
                |(aggregator, n), key, info| {
                    *n += 1;
                    aggregator.add(key, info)
                },
            );
            let (mut all, n) = parts.remove(0);
            read += n;
            for (aggregator, n) in parts {
                read += n;
                all.merge(aggregator);
            }
            all
        });
        // The entries the blocks name: those set aside at the last report
        // and named now are restored, the rest given back.
        let live_slots = aggregated.as_ref().map(aggregate::Aggregator::slots);
        let given = live_slots.as_ref().map_or(0, |live| self.reclaim.settle(&self.recorded, live));
        // After the blocks: it has every entry they name.
        let entries = self.recorded.totals();
        read += entries.len();
        let parts: Vec<_> = entries.iter().copied().chain(self.reclaim.carried()).collect();
        let combined = collect::add_parts(&parts);
        // Stacks that differ only past where they really end are one: the
        // blocks of all are summed under one before a stack with young
        // blocks only is left out (its blocks still count in `live`).
        // System-wide, only in the processes the text report shows: judging
        // every stack of every process reads the mappings and code of all
        // of them. A process's total does not depend on how its stacks
        // merge, so which are shown is known now.
        let judged: Option<HashSet<u32>> = match self.scope {
            Scope::Process(..) => None,
            Scope::System { top_procs } => {
                let bytes = match &aggregated {
                    Some(all) => all.process_bytes(),
                    None => combined.iter().fold(FastMap::default(), |mut by, (k, c)| {
                        *by.entry(k.tgid).or_default() += c.total_size;
                        by
                    }),
                };
                let mut procs: Vec<(u32, u64)> = bytes.into_iter().filter(|(tgid, _)| !is_kernel(*tgid)).collect();
                procs.sort_unstable_by_key(|&(tgid, bytes)| (std::cmp::Reverse(bytes), tgid));
                Some(procs.into_iter().take(top_procs).map(|(tgid, _)| tgid).collect())
            }
        };
        let Self { recorded, symbolizer, ends, .. } = self;
        let mut same = |tgid, id| match &judged {
            Some(procs) if !procs.contains(&tgid) => id,
            _ => ends.same(recorded, symbolizer, tgid, id),
        };
        let mut live = None;
        let mut totals = match aggregated {
            None => aggregate::merge_stacks(aggregate::from_combined(combined.iter().copied()), &mut same),
            Some(all) => {
                if self.feed.is_some() {
                    live = Some(all.live_by_process());
                }
                let stacks: FastMap<u32, (u64, Kind)> = entries
                    .iter()
                    .map(|&(slot, key, _)| (slot, (same(key.tgid, key.stack_id), Kind::from_u8(key.kind))))
                    .collect();
                all.finish(|slot| stacks.get(&slot).copied())
            }
        };
        let mut allocs: FastMap<trend::Key, u64> = FastMap::default();
        for ((tgid, id, kind), n) in trend::allocs(&combined) {
            *allocs.entry((tgid, same(tgid, id), kind)).or_default() += n;
        }
        // --listen's heap profiles: blocks and bytes since attach, by stack.
        let mut since: FastMap<trend::Key, (u64, u64)> = FastMap::default();
        if self.feed.is_some() {
            for (k, c) in &combined {
                if judged.as_ref().is_none_or(|procs| procs.contains(&k.tgid) || is_kernel(k.tgid)) {
                    let s = since.entry((k.tgid, same(k.tgid, k.stack_id), Kind::from_u8(k.kind))).or_default();
                    (s.0, s.1) = (s.0 + c.allocs, s.1 + c.allocated);
                }
            }
        }
        if let Scope::System { .. } = self.scope {
            // A process that exited without freeing is not leaking any
            // more: drop what it left, in the kernel maps too. One that
            // freed all it allocated still holds totals entries and their
            // stacks: given back too (a build's compilers come and go).
            let dead = self.forget_dead(totals.iter().map(|t| t.tgid), &entries);
            if !dead.is_empty() {
                totals.retain(|t| !dead.contains(&t.tgid));
                since.retain(|(tgid, ..), _| !dead.contains(tgid));
            }
            // Gone too: those that freed all they had, whose files memleak
            // still holds.
            let (procs, files) = self.symbolizer.forget_exited();
            if self.verbose && procs > 0 {
                eprintln!("memleak: closed {files} files of {procs} exited processes");
            }
        }
        let mut rows = self.trends.update(totals, now, &allocs);
        sort::sort(&mut rows, self.sort);
        let shown_rows = shown(&rows, self.top);
        if let Some(n) = self.peek {
            for &i in &shown_rows {
                let total = &mut rows[i].total;
                total.peeks = peek::peek(&Traced(&self.recorded), total.tgid, &total.oldest, n);
            }
        }
        self.reports += 1;
        let counts = self.recorded.lost();
        for warning in self.lost.due(&counts, now) {
            eprintln!("{warning}");
        }
        let lost = lost::Lost::from_counts(&counts);

        // Refresh the mappings of the processes shown (dlopen, exec).
        let shown: Vec<u32> = match self.scope {
            Scope::Process(pid, _) => vec![pid],
            Scope::System { top_procs } => {
                let mut seen = HashSet::new();
                rows.iter().map(|r| r.total.tgid).filter(|t| !is_kernel(*t) && seen.insert(*t)).take(top_procs).collect()
            }
        };
        for pid in shown {
            self.symbolizer.refresh(pid);
        }
        let comms = self.comms(&rows);
        // Each thread's name now. With --by-thread, those of the traced
        // process that hold nothing are listed too.
        let idle: Vec<(u32, u32)> = match self.scope {
            Scope::Process(pid, _) if self.by_thread => proc::threads(pid).into_iter().map(|tid| (pid, tid)).collect(),
            _ => vec![],
        };
        let named = rows.iter().flat_map(|r| r.total.threads.iter().map(|t| (r.total.tgid, t.tid)));
        self.names.refresh(named.chain(idle.iter().copied()), &mut |tgid, tid| {
            if is_kernel(tgid) { proc::task_comm(tid) } else { proc::thread_comm(tgid, tid) }
        });
        let by_thread = self.by_thread.then(|| threads::by_thread(&rows, &idle, &self.names));
        let names = &self.names;
        let thread_name = |tgid: u32, tid: u32| names.get(tgid, tid).map(str::to_string);
        let threads_line = |t: &StackTotal| {
            (!t.threads.is_empty()).then(|| threads::line(&threads::groups(&t.threads, &|tid| thread_name(t.tgid, tid))))
        };
        let Self { recorded, symbolizer, ends, .. } = self;
        if let Some(dump) = &mut self.dump {
            let stacks: Vec<dump::Stack> = shown_rows
                .iter()
                .map(|&i| {
                    let total = &rows[i].total;
                    let mut blocks = total.blocks.clone();
                    blocks.sort_unstable_by_key(|b| (b.born_ns, b.addr));
                    dump::Stack {
                        tgid: total.tgid,
                        comm: comms.get(&total.tgid).cloned(),
                        bytes: total.bytes,
                        count: total.count,
                        frames: frames_of(recorded, symbolizer, ends, total).iter().flat_map(json::frame_json).collect(),
                        blocks,
                    }
                })
                .collect();
            let shown = dump.path().display().to_string();
            match dump.write(self.reports, &stacks, &Traced(recorded)) {
                Ok(c) => eprintln!(
                    "memleak: report {} dumped to {shown}: {} blocks ({} bytes), {} over the budget, {} freed since read",
                    self.reports, c.blocks_written, c.bytes_written, c.blocks_over_budget, c.blocks_gone
                ),
                Err(e) => eprintln!("warning: --dump {shown}: report {} not dumped: {e}", self.reports),
            }
        }
        let mut out = Vec::new();
        let mut lines = |t: &StackTotal| frame_lines(recorded, symbolizer, ends, t);
        let mut comm = |tgid: u32| comms.get(&tgid).cloned().unwrap_or_else(|| proc::comm(tgid));
        let clock = clock::clock_now();
        match (self.format, &self.scope) {
            (Format::Text, scope) if let Some(groups) = &by_thread => {
                let top_procs = match scope {
                    Scope::Process(..) => None,
                    Scope::System { top_procs } => Some(*top_procs),
                };
                let (top, show_allocs) = (self.top, self.show_allocs);
                text::write_by_thread(&mut out, &clock, top, top_procs, groups, &lost, show_allocs, &mut comm, &mut lines)?;
            }
            (Format::Text, Scope::Process(..)) => {
                text::write(&mut out, &clock, self.top, &rows, &lost, self.show_allocs, &threads_line, &mut lines)?;
            }
            (Format::Text, Scope::System { top_procs }) => {
                let procs = text::by_process(rows.clone());
                let (top, show_allocs) = (self.top, self.show_allocs);
                text::write_system(&mut out, &clock, top, *top_procs, &procs, &lost, show_allocs, &mut comm, &threads_line, &mut lines)?;
            }
            (Format::Json, _) => {}
        }
        // The report as --format json prints it: stdout's, and /report.json's.
        let json_ctx = json::Context {
            now: SystemTime::now(),
            elapsed_s: now.saturating_sub(self.start_ns) as f64 / 1e9,
            report: self.reports,
            sort: self.sort.name(),
            min_age_ms: (!self.combined_only).then_some(self.min_age_ns / 1_000_000),
            top: self.top,
            show_allocs: self.show_allocs,
            peek: self.peek.is_some(),
            comms: &comms,
            lost,
            thread_name: (!self.combined_only).then_some(&thread_name as &dyn Fn(u32, u32) -> Option<String>),
            by_thread: by_thread.as_deref(),
        };
        let mut json_out = Vec::new();
        let mut frames = |t: &StackTotal| frames_of(recorded, symbolizer, ends, t);
        if self.format == Format::Json {
            json::write(&mut out, &json::interval(&json_ctx, &rows, &mut frames))?;
        }
        if self.feed.is_some() {
            // What blocks hold is shown only where asked, never served.
            let served = json::Context { peek: false, ..json_ctx };
            json::write(&mut json_out, &json::interval(&served, &rows, &mut frames))?;
        }
        if !self.quiet {
            output::write(out)?;
        }
        if let Some(feed) = &mut self.feed {
            let stacks = served_stacks(&rows, &since, |t| frames_of(recorded, symbolizer, ends, t));
            let elapsed_ns = now.saturating_sub(self.start_ns);
            let meta = pprof::Meta {
                time_nanos: self.start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64),
                duration_nanos: elapsed_ns as i64,
                period: self.sample_rate as i64,
            };
            feed.publish(
                &serve::Report {
                    rows: &rows,
                    combined: &combined,
                    live: live.as_ref(),
                    comms: &comms,
                    lost,
                    blocks_read: live.as_ref().map(|l| l.values().sum()),
                    totals_used: entries.len() as u64,
                    stacks_used: entries.iter().map(|(_, k, _)| k.stack_id).collect::<HashSet<_>>().len() as u64,
                    duration_s: monotonic_ns().saturating_sub(now) as f64 / 1e9,
                },
                serve::Views { stacks: &stacks, json: json_out, meta, elapsed_ns },
                &mut |pid, addr| symbolizer.mapping(pid, addr),
            );
        }
        if let Some(live) = &live_slots {
            self.reclaim.set_aside(&self.recorded, &entries, live);
        }
        let r = self.reclaim.stacks(&mut self.recorded);
        // Counting what housekeeping gave back since the last report too.
        self.reclaimed = Reclaimed { entries: given, stacks: std::mem::take(&mut self.housekept) + r.stacks, ..r };
        self.last = rows;
        self.last_ns = now;
        Ok(read)
    }

    /// Of these processes and those holding totals `entries`, the ones
    /// that exited: what they left is dropped, in the kernel maps too.
    fn forget_dead(&mut self, tgids: impl Iterator<Item = u32>, entries: &[Entry]) -> HashSet<u32> {
        let tgids: HashSet<u32> = tgids.chain(entries.iter().map(|(_, k, _)| k.tgid)).collect();
        let dead: HashSet<u32> = tgids
            .into_iter()
            .filter(|&tgid| !is_kernel(tgid) && !proc::exists(tgid))
            .collect();
        if !dead.is_empty() {
            self.recorded.forget_processes(&dead);
            self.reclaim.forget(&dead, entries);
            self.ends.forget(&dead);
        }
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
                self.housekept += self.reclaim.stacks(&mut self.recorded).stacks;
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
            eprintln!("{warning}");
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
            period: self.sample_rate as i64,
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
