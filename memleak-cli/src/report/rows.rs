//! A report's rows, built from what the kernel recorded: the blocks read
//! and summed per stack (or the per-stack totals with --combined-only),
//! stacks that differ only past where they really end merged, what exited
//! processes left dropped, each stack's trend, sorted; and the losses the
//! kernel counted.

use std::collections::HashSet;

use memleak_common::{CombinedKey, Kind, is_kernel};

use super::{Reporter, Scope, Traced, aggregate::{self, StackTotal}, lost, peek, shown, sort, trend};
use crate::{
    clock::monotonic_ns,
    fasthash::FastMap,
    maps::{
        collect,
        totals::{CombinedAlloc, Entry},
    },
};

/// One report, built and not yet printed.
pub(super) struct Built {
    /// When it was read (CLOCK_MONOTONIC).
    pub now: u64,
    /// Map entries read (for -v).
    pub read: usize,
    /// Every stack, sorted.
    pub rows: Vec<trend::Row>,
    /// The rows the report shows of user processes (see `shown`).
    pub shown_rows: Vec<usize>,
    /// Each (process, stack, part)'s totals since attach.
    pub combined: Vec<(CombinedKey, CombinedAlloc)>,
    /// The totals entries read.
    pub entries: Vec<Entry>,
    /// Blocks read per process (--listen only).
    pub live: Option<FastMap<u32, u64>>,
    /// The totals entries the blocks name (not with --combined-only).
    pub live_slots: Option<HashSet<u32>>,
    /// Blocks and bytes allocated since attach, per (process, stack)
    /// (--listen only).
    pub since: FastMap<trend::Key, (u64, u64)>,
    /// Totals entries given back before reading them.
    pub given: usize,
    pub lost: lost::Lost,
}

/// Each stack's total and its allocations since attach: summed from the
/// blocks read, or the kernel's per-stack totals alone (--combined-only).
enum Stacks {
    Blocks(Vec<StackTotal>, FastMap<trend::Key, u64>),
    Combined(Vec<aggregate::Combined>),
}

impl Stacks {
    fn tgids(&self) -> Box<dyn Iterator<Item = u32> + '_> {
        match self {
            Self::Blocks(totals, _) => Box::new(totals.iter().map(|t| t.tgid)),
            Self::Combined(merged) => Box::new(merged.iter().map(|c| c.tgid)),
        }
    }

    fn retain(&mut self, keep: impl Fn(u32) -> bool) {
        match self {
            Self::Blocks(totals, _) => totals.retain(|t| keep(t.tgid)),
            Self::Combined(merged) => merged.retain(|c| keep(c.tgid)),
        }
    }
}

impl Reporter {
    /// Reads the kernel's maps and builds the report's rows.
    pub(super) fn build(&mut self) -> Built {
        let now = monotonic_ns();
        let mut read = 0;
        let aggregated = (!self.options.combined_only).then(|| {
            // JSON lists blocks with -a too.
            // As many stacks as last time, most likely: no table regrown by doubling.
            // --dump writes every block of the stacks shown.
            let keep_blocks = self.options.show_allocs || self.dump.is_some();
            let (min_age_ns, stacks) = (self.options.min_age_ns, self.last_len);
            let oldest = if self.options.peek.is_some() { peek::BLOCKS } else { 0 };
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
        let combined = collect::add_parts(entries.iter().copied().chain(self.reclaim.carried()));
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
        let mut stacks = match aggregated {
            None => Stacks::Combined(aggregate::merge_combined(&combined, &mut same)),
            Some(all) => {
                if self.feed.is_some() {
                    live = Some(all.live_by_process());
                }
                let stacks: FastMap<u32, (u64, Kind)> = entries
                    .iter()
                    .map(|&(slot, key, _)| (slot, (same(key.tgid, key.stack_id), Kind::from_u8(key.kind))))
                    .collect();
                let totals = all.finish(|slot| stacks.get(&slot).copied());
                let mut allocs: FastMap<trend::Key, u64> = FastMap::with_capacity_and_hasher(combined.len(), Default::default());
                for (k, c) in &combined {
                    *allocs.entry((k.tgid, same(k.tgid, k.stack_id), Kind::from_u8(k.kind))).or_default() += c.allocs;
                }
                Stacks::Blocks(totals, allocs)
            }
        };
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
            let dead = self.forget_dead(stacks.tgids(), &entries);
            if !dead.is_empty() {
                stacks.retain(|tgid| !dead.contains(&tgid));
                since.retain(|(tgid, ..), _| !dead.contains(tgid));
            }
            // Gone too: those that freed all they had, whose files memleak
            // still holds.
            let (procs, files) = self.symbolizer.forget_exited();
            if self.options.verbose && procs > 0 {
                eprintln!("memleak: closed {files} files of {procs} exited processes");
            }
        }
        let mut rows = match stacks {
            Stacks::Combined(merged) => self.trends.update(merged.iter().map(|c| (c.total(), Some(c.allocs))), now),
            Stacks::Blocks(totals, allocs) => self.trends.update(
                totals.into_iter().map(|t| {
                    let allocs = allocs.get(&(t.tgid, t.stack_id, t.kind)).copied();
                    (t, allocs)
                }),
                now,
            ),
        };
        sort::sort(&mut rows, self.options.sort);
        let shown_rows = shown(&rows, self.options.top);
        if let Some(n) = self.options.peek {
            for &i in &shown_rows {
                let total = &mut rows[i].total;
                total.peeks = peek::peek(&Traced(&self.recorded), total.tgid, &total.oldest, n);
            }
        }
        self.reports += 1;
        let counts = self.recorded.lost();
        for warning in self.lost.due(&counts, now) {
            eprintln!("memleak: {warning}");
        }
        let lost = lost::Lost::from_counts(&counts);

        Built { now, read, rows, shown_rows, combined, entries, live, live_slots, since, given, lost }
    }
}
