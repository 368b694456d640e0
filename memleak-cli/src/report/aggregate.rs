//! Aggregation of a report: the outstanding allocations read from the
//! kernel, grouped by (process, stack). Pure: it gets map contents.

use std::collections::hash_map::Entry;

use memleak_common::{AllocInfo, AllocKey, CombinedKey, Kind, NO_STACK};

use crate::{fasthash::FastMap, maps::totals::CombinedAlloc};

/// One outstanding allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub addr: u64,
    pub size: u64,
    /// When it was allocated (CLOCK_MONOTONIC ns): with its size, what
    /// tells it from a block allocated at its address later.
    pub born_ns: u64,
}

/// The first bytes of one outstanding block, read at report time
/// (`--peek`: see `peek`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peek {
    pub addr: u64,
    pub size: u64,
    pub bytes: Vec<u8>,
}

/// What one thread allocated of a stack's outstanding blocks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThreadTotal {
    pub tid: u32,
    pub count: u64,
    pub bytes: u64,
}

/// Outstanding memory of one call stack of one process, made by one
/// hooked function.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackTotal {
    pub tgid: u32,
    /// The function that made its blocks (malloc, mmap, ...): in the 4
    /// bytes after `tgid`, so the row stays 152 bytes.
    pub kind: Kind,
    pub stack_id: u64,
    pub bytes: u64,
    pub count: u64,
    /// Its outstanding blocks of any age (`-o` leaves the young ones out of
    /// `count`): the frees since attach are its allocations less these.
    pub live: u64,
    /// The blocks, by address (empty in --combined-only mode).
    pub blocks: Vec<Block>,
    /// When its oldest block was allocated (CLOCK_MONOTONIC ns; None in
    /// --combined-only mode).
    pub oldest_ns: Option<u64>,
    /// Its oldest blocks old enough to count, oldest first, as many as
    /// the aggregator was asked for (`--peek`).
    pub oldest: Vec<Block>,
    /// What `oldest` held at report time, those still outstanding.
    pub peeks: Vec<Peek>,
    /// The threads that allocated the blocks counted, by tid (empty in
    /// --combined-only mode).
    pub threads: Vec<ThreadTotal>,
}

/// Groups allocations at least `min_age_ns` old by (process, stack), one
/// at a time as they are read from the kernel: memory follows the number
/// of stacks, not of allocations (unless their blocks are kept, for `-a`).
/// A block names its stack through its totals entry (`AllocInfo::slot`),
/// so they are grouped by entry and thread (one lookup per block, as
/// before threads were counted), and by stack at the end.
pub struct Aggregator {
    now_ns: u64,
    min_age_ns: u64,
    keep_blocks: bool,
    /// How many of each stack's oldest blocks to keep.
    oldest: usize,
    /// By (process, totals entry, thread).
    parts: FastMap<(u32, u32, u32), Part>,
}

/// The blocks of one (process, totals entry, thread): what the aggregator
/// keeps per entry, less than a [`StackTotal`] (80 bytes, not 152): the
/// entries outnumber the stacks (one per CPU part and thread), and a hash
/// map holds room for up to twice as many as it has (peak RSS, 1,000,000
/// blocks from 10,000 stacks: 2 MiB more with StackTotal than before
/// threads were counted).
#[derive(Debug, Default)]
struct Part {
    bytes: u64,
    count: u64,
    /// Blocks of any age.
    live: u64,
    /// When its oldest block, of any age, was allocated.
    oldest_ns: u64,
    blocks: Vec<Block>,
    oldest: Vec<Block>,
}

impl Part {
    /// Adds `theirs` into this one: the same stack, read in another part
    /// of the map or counted in another entry; keeps the `oldest` oldest
    /// blocks of both.
    fn absorb(&mut self, theirs: Part, oldest: usize) {
        self.bytes += theirs.bytes;
        self.count += theirs.count;
        self.live += theirs.live;
        self.oldest_ns = self.oldest_ns.min(theirs.oldest_ns);
        self.blocks.extend(theirs.blocks);
        for block in theirs.oldest {
            keep_oldest(&mut self.oldest, block, oldest);
        }
    }
}

impl Aggregator {
    /// `keep_blocks`: every block of each stack; `oldest`: that many of
    /// its oldest. `stacks`: how many stacks to make room for at once.
    pub fn new(now_ns: u64, min_age_ns: u64, keep_blocks: bool, oldest: usize, stacks: usize) -> Self {
        let parts = FastMap::with_capacity_and_hasher(stacks, Default::default());
        Self { now_ns, min_age_ns, keep_blocks, oldest, parts }
    }

    pub fn add(&mut self, key: AllocKey, info: AllocInfo) {
        let total = self
            .parts
            .entry((key.tgid, info.slot, info.tid))
            .or_insert_with(|| Part { oldest_ns: info.timestamp_ns, ..Default::default() });
        total.live += 1;
        total.oldest_ns = total.oldest_ns.min(info.timestamp_ns);
        if self.now_ns.saturating_sub(info.timestamp_ns) < self.min_age_ns {
            return;
        }
        total.bytes += info.size;
        total.count += 1;
        let block = Block { addr: key.addr, size: info.size, born_ns: info.timestamp_ns };
        if self.keep_blocks {
            total.blocks.push(block);
        }
        if self.oldest > 0 {
            keep_oldest(&mut total.oldest, block, self.oldest);
        }
    }

    /// The totals entries the blocks name, of any age.
    pub fn slots(&self) -> std::collections::HashSet<u32> {
        self.parts.keys().map(|&(_, slot, _)| slot).collect()
    }

    /// Outstanding bytes (of blocks old enough) by process.
    pub fn process_bytes(&self) -> FastMap<u32, u64> {
        self.by_process(|t| t.bytes)
    }

    /// Blocks of each process, of any age.
    pub fn live_by_process(&self) -> FastMap<u32, u64> {
        self.by_process(|t| t.live)
    }

    fn by_process(&self, value: impl Fn(&Part) -> u64) -> FastMap<u32, u64> {
        let mut sums: FastMap<u32, u64> = FastMap::default();
        for ((tgid, ..), total) in &self.parts {
            *sums.entry(*tgid).or_default() += value(total);
        }
        sums
    }

    /// Adds what `other` aggregated (another part of the same map).
    pub fn merge(&mut self, other: Aggregator) {
        for (key, theirs) in other.parts {
            match self.parts.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(theirs);
                }
                Entry::Occupied(mut slot) => slot.get_mut().absorb(theirs, self.oldest),
            }
        }
    }

    /// The stacks with blocks old enough, in no order (a report sorts them
    /// by `--sort`), their blocks by address. `stack_of` names the stack
    /// and kind of a totals entry; a block whose entry it does not know (or
    /// that had none, the totals being full) counts as one without a stack,
    /// of no known kind.
    pub fn finish(self, stack_of: impl Fn(u32) -> Option<(u64, Kind)>) -> Vec<StackTotal> {
        let mut by_stack: FastMap<(u32, u64, Kind), (Part, Vec<ThreadTotal>)> = FastMap::default();
        for ((tgid, slot, tid), part) in self.parts {
            let thread = (part.count > 0).then_some(ThreadTotal { tid, count: part.count, bytes: part.bytes });
            let (stack_id, kind) = stack_of(slot).unwrap_or((NO_STACK, Kind::Unknown));
            match by_stack.entry((tgid, stack_id, kind)) {
                Entry::Vacant(e) => {
                    e.insert((part, thread.into_iter().collect()));
                }
                Entry::Occupied(mut e) => {
                    let (ours, threads) = e.get_mut();
                    ours.absorb(part, self.oldest);
                    threads.extend(thread);
                }
            }
        }
        // Only now: a part with young blocks only still counts in `live`.
        by_stack
            .into_iter()
            .filter(|(_, (part, _))| part.count > 0)
            .map(|((tgid, stack_id, kind), (mut part, threads))| {
                part.blocks.sort_unstable_by_key(|b| b.addr);
                part.oldest.sort_unstable_by_key(|b| (b.born_ns, b.addr));
                StackTotal {
                    tgid,
                    kind,
                    stack_id,
                    bytes: part.bytes,
                    count: part.count,
                    live: part.live,
                    blocks: part.blocks,
                    oldest_ns: Some(part.oldest_ns),
                    oldest: part.oldest,
                    peeks: vec![],
                    threads: by_tid(threads),
                }
            })
            .collect()
    }
}

/// One entry per thread (a thread's blocks of one stack may be counted
/// in several entries: one per CPU part), by tid.
fn by_tid(mut threads: Vec<ThreadTotal>) -> Vec<ThreadTotal> {
    threads.sort_unstable_by_key(|t| t.tid);
    threads.dedup_by(|next, kept| {
        if next.tid != kept.tid {
            return false;
        }
        kept.count += next.count;
        kept.bytes += next.bytes;
        true
    });
    threads
}

/// Keeps in `oldest` (at most `n`, in no order) the oldest blocks seen.
fn keep_oldest(oldest: &mut Vec<Block>, block: Block, n: usize) {
    if oldest.len() < n {
        oldest.push(block);
        return;
    }
    if let Some(youngest) = oldest.iter_mut().max_by_key(|b| (b.born_ns, b.addr))
        && (block.born_ns, block.addr) < (youngest.born_ns, youngest.addr)
    {
        *youngest = block;
    }
}

/// One (process, stack, kind) of the kernel's per-stack totals
/// (--combined-only), with the stacks that differ from it only past
/// where they really end (see stack_end) summed in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Combined {
    pub tgid: u32,
    pub kind: Kind,
    pub stack_id: u64,
    /// Outstanding bytes and blocks.
    pub bytes: u64,
    pub count: u64,
    /// Blocks allocated since attach.
    pub allocs: u64,
}

impl Combined {
    /// Its row's total: the kernel's sums only, no blocks, ages or threads.
    pub fn total(&self) -> StackTotal {
        let Self { tgid, kind, stack_id, bytes, count, .. } = *self;
        StackTotal { tgid, kind, stack_id, bytes, count, live: count, ..Default::default() }
    }
}

/// The kernel's per-stack totals (--combined-only, each key once), the
/// stacks that `same` maps to one summed into it, those with no block
/// outstanding left out. In a list sorted as it is, not a map of whole
/// [`StackTotal`]s: at 10,000 stacks that map and the vectors around it
/// touched 7 MiB of new pages at every report, 8 ms of a 17 ms report.
pub fn merge_combined(totals: &[(CombinedKey, CombinedAlloc)], mut same: impl FnMut(u32, u64) -> u64) -> Vec<Combined> {
    let mut merged: Vec<Combined> = totals
        .iter()
        .map(|(k, c)| Combined {
            tgid: k.tgid,
            kind: Kind::from_u8(k.kind),
            stack_id: same(k.tgid, k.stack_id),
            // A part with nothing outstanding counts its allocations only.
            bytes: if c.count == 0 { 0 } else { c.total_size },
            count: c.count,
            allocs: c.allocs,
        })
        .collect();
    // Sorted already unless a stack stands for another (a sorted run costs
    // one pass).
    merged.sort_unstable_by_key(|c| (c.tgid, c.stack_id, c.kind));
    merged.dedup_by(|next, kept| {
        if (next.tgid, next.stack_id, next.kind) != (kept.tgid, kept.stack_id, kept.kind) {
            return false;
        }
        kept.bytes += next.bytes;
        kept.count += next.count;
        kept.allocs += next.allocs;
        true
    });
    merged.retain(|c| c.count != 0);
    merged
}

/// [`Aggregator`] over a collection of allocations whose totals entry is
/// their stack.
#[cfg(test)]
pub fn by_stack(
    allocs: impl IntoIterator<Item = (AllocKey, AllocInfo)>,
    now_ns: u64,
    min_age_ns: u64,
    keep_blocks: bool,
) -> Vec<StackTotal> {
    let mut aggregator = Aggregator::new(now_ns, min_age_ns, keep_blocks, 0, 0);
    allocs.into_iter().for_each(|(key, info)| aggregator.add(key, info));
    let mut totals = aggregator.finish(|slot| Some((u64::from(slot), Kind::Malloc)));
    sort(&mut totals);
    totals
}

/// Biggest first (tests; reports sort by `--sort`).
#[cfg(test)]
fn sort(totals: &mut [StackTotal]) {
    totals.sort_unstable_by(|a, b| {
        (b.bytes, b.count).cmp(&(a.bytes, a.count)).then((a.tgid, a.stack_id).cmp(&(b.tgid, b.stack_id)))
    });
}

#[cfg(test)]
pub mod tests {
    use memleak_common::NO_SLOT;

    use super::*;

    pub fn alloc(addr: u64, size: u64, ts: u64, stack_id: u64) -> (AllocKey, AllocInfo) {
        (AllocKey { addr, tgid: 7, _pad: 0 }, AllocInfo { size, timestamp_ns: ts, slot: stack_id as u32, tid: 7 })
    }

    #[test]
    fn groups_by_stack_biggest_first_and_skips_young() {
        let allocs = [
            alloc(0x30, 8192, 100, 1),
            alloc(0x10, 8192, 200, 1),
            alloc(0x20, 100, 100, 2),
            alloc(0x40, 50_000, 950, 3), // younger than 100 ns at now=1000
            alloc(0x50, 10, 990, 1),     // young too, but still live
        ];
        let totals = by_stack(allocs, 1000, 100, true);
        assert_eq!(totals.len(), 2);
        assert_eq!((totals[0].stack_id, totals[0].bytes, totals[0].count), (1, 16384, 2));
        assert_eq!(totals[0].blocks, [Block { addr: 0x10, size: 8192, born_ns: 200 }, Block { addr: 0x30, size: 8192, born_ns: 100 }]);
        assert_eq!((totals[1].stack_id, totals[1].bytes, totals[1].count), (2, 100, 1));
        assert_eq!((totals[0].oldest_ns, totals[1].oldest_ns), (Some(100), Some(100)));
        // Every block of a stack counts for its frees, young or not.
        assert_eq!((totals[0].live, totals[1].live), (3, 1));
    }

    #[test]
    fn same_stack_in_two_processes_stays_apart() {
        let mut other = alloc(0x10, 5, 0, 1);
        other.0.tgid = 8;
        let totals = by_stack([alloc(0x10, 5, 0, 1), other], 10, 0, false);
        assert_eq!(totals.len(), 2);
    }

    #[test]
    fn entries_of_one_stack_are_one_stack_and_unknown_ones_have_none() {
        // Entries 4 and 5 are stack 40's parts on two CPUs; 6 is gone, and
        // 7 was never (the totals were full: NO_SLOT).
        let mut aggregator = Aggregator::new(10, 5, true, 0, 0);
        for (addr, slot) in [(0x10, 4), (0x20, 5), (0x30, 6), (0x40, NO_SLOT)] {
            let (key, info) = alloc(addr, 8, 1, u64::from(slot));
            aggregator.add(key, info);
        }
        // Too young to list, but one of stack 40's live blocks (its part
        // on a third CPU has no other).
        let (key, info) = alloc(0x50, 8, 10, 3);
        aggregator.add(key, info);
        let mut totals = aggregator.finish(|slot| [3, 4, 5].contains(&slot).then_some((40, Kind::Malloc)));
        totals.sort_by_key(|t| t.stack_id);
        assert_eq!(totals.iter().map(|t| (t.stack_id, t.count, t.live)).collect::<Vec<_>>(), [(NO_STACK, 2, 2), (40, 2, 3)]);
        assert_eq!(totals[1].blocks, [Block { addr: 0x10, size: 8, born_ns: 1 }, Block { addr: 0x20, size: 8, born_ns: 1 }]);
    }

    #[test]
    fn each_stack_counts_its_threads_blocks_across_entries_old_enough_only() {
        // Stack 40's parts on two CPUs (entries 4 and 5); thread 2 has
        // blocks in both, and a young one that does not count.
        let mut aggregator = Aggregator::new(10, 5, false, 0, 0);
        for (addr, slot, tid, ts) in [(0x10, 4, 1, 1), (0x20, 4, 2, 1), (0x30, 5, 2, 1), (0x40, 5, 2, 9), (0x50, 5, 3, 9)] {
            let (key, mut info) = alloc(addr, 8, ts, slot);
            info.tid = tid;
            aggregator.add(key, info);
        }
        let totals = aggregator.finish(|_| Some((40, Kind::Malloc)));
        assert_eq!(totals.len(), 1);
        assert_eq!((totals[0].count, totals[0].live), (3, 5));
        assert_eq!(totals[0].threads, [ThreadTotal { tid: 1, count: 1, bytes: 8 }, ThreadTotal { tid: 2, count: 2, bytes: 16 }]);
    }

    #[test]
    fn an_entry_is_smaller_than_a_stack() {
        assert_eq!((size_of::<Part>(), size_of::<StackTotal>()), (80, 152));
    }

    #[test]
    fn combined_drops_empty_stacks() {
        let k = |s| CombinedKey { tgid: 1, stack_id: s, ..Default::default() };
        let totals = merge_combined(
            &[
                (k(1), CombinedAlloc { total_size: 10, count: 1, allocs: 1, allocated: 0 }),
                (k(2), CombinedAlloc { total_size: 0, count: 0, allocs: 4, allocated: 0 }),
                (k(3), CombinedAlloc { total_size: 30, count: 3, allocs: 3, allocated: 0 }),
            ],
            |_, s| s,
        );
        assert_eq!(totals.iter().map(|t| t.stack_id).collect::<Vec<_>>(), [1, 3]);
    }

    #[test]
    fn stacks_that_stand_for_one_are_summed() {
        let k = |tgid, s| CombinedKey { tgid, stack_id: s, ..Default::default() };
        let c = |n| CombinedAlloc { total_size: 10 * n, count: n, allocs: n + 1, allocated: 0 };
        let empty = CombinedAlloc { total_size: 0, count: 0, allocs: 5, allocated: 0 };
        let totals = [(k(1, 1), c(1)), (k(1, 2), c(2)), (k(1, 3), c(4)), (k(1, 4), empty), (k(2, 2), c(8))];
        // Process 1's stack 2 is its stack 4 cut short: summed into it,
        // after stack 3; stack 4 has nothing outstanding of its own but
        // counts its allocations.
        let same = |tgid, s| if (tgid, s) == (1, 2) { 4 } else { s };
        let got: Vec<_> = merge_combined(&totals, same).iter().map(|t| (t.tgid, t.stack_id, t.bytes, t.count, t.allocs)).collect();
        assert_eq!(got, [(1, 1, 10, 1, 2), (1, 3, 40, 4, 5), (1, 4, 20, 2, 8), (2, 2, 80, 8, 9)]);
        let total = merge_combined(&totals, same)[2].total();
        assert_eq!((total.stack_id, total.bytes, total.count, total.live, total.oldest_ns), (4, 20, 2, 2, None));
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Aggregation keeps every byte and block of the old-enough
        /// allocations, and orders stacks biggest first.
        #[test]
        fn aggregation_conserves_bytes(allocs in prop::collection::vec(
            (any::<u64>(), 1u32..4, 0u64..1 << 40, 0u64..2000, 0u32..8, 0u32..4), 0..200), min_age in 0u64..1500) {
            let mut unique = std::collections::HashMap::new();
            for (addr, tgid, size, ts, stack, tid) in allocs {
                unique.insert(AllocKey { addr, tgid, _pad: 0 }, AllocInfo { size, timestamp_ns: ts, slot: stack, tid });
            }
            let now = 2000;
            let totals = by_stack(unique.clone(), now, min_age, true);
            // Read in two parts (as on two CPUs) and merged: the same totals.
            let mut halves = [Aggregator::new(now, min_age, true, 3, 0), Aggregator::new(now, min_age, true, 3, 4)];
            for (i, (key, info)) in unique.iter().enumerate() {
                halves[i % 2].add(*key, *info);
            }
            let [mut merged, second] = halves;
            merged.merge(second);
            let mut merged = merged.finish(|slot| Some((u64::from(slot), Kind::Malloc)));
            sort(&mut merged);
            // Each stack's three oldest blocks, whichever part read them.
            for t in &mut merged {
                let mut all = t.blocks.clone();
                all.sort_unstable_by_key(|b| (b.born_ns, b.addr));
                all.truncate(3);
                prop_assert_eq!(std::mem::take(&mut t.oldest), all);
            }
            prop_assert_eq!(merged, totals.clone());
            let lean = by_stack(unique.clone(), now, min_age, false);
            prop_assert!(lean.iter().all(|t| t.blocks.is_empty()));
            prop_assert_eq!(lean.iter().map(|t| (t.tgid, t.stack_id, t.bytes, t.count)).collect::<Vec<_>>(),
                totals.iter().map(|t| (t.tgid, t.stack_id, t.bytes, t.count)).collect::<Vec<_>>());
            let old: Vec<&AllocInfo> = unique.values().filter(|i| now - i.timestamp_ns >= min_age).collect();
            prop_assert_eq!(totals.iter().map(|t| t.bytes).sum::<u64>(), old.iter().map(|i| i.size).sum::<u64>());
            prop_assert_eq!(totals.iter().map(|t| t.count).sum::<u64>(), old.len() as u64);
            prop_assert!(totals.windows(2).all(|w| w[0].bytes >= w[1].bytes));
            prop_assert!(totals.iter().all(|t| t.blocks.len() as u64 == t.count));
            // Its threads hold all of each stack, each thread once.
            prop_assert!(totals.iter().all(|t| t.threads.iter().map(|x| (x.count, x.bytes)).fold((0, 0), |a, x| (a.0 + x.0, a.1 + x.1)) == (t.count, t.bytes)));
            prop_assert!(totals.iter().all(|t| t.threads.windows(2).all(|w| w[0].tid < w[1].tid)));
        }
    }
}
