//! Aggregation and text output of a report. Pure: it gets map contents and
//! a way to turn a stack into frame lines, and writes what bcc users know.

use std::{
    collections::{HashMap, hash_map::Entry},
    io::Write,
};

use memleak_common::{
    AllocInfo, AllocKey, CombinedKey, KERNEL_PAGES, KERNEL_PERCPU, KERNEL_SLAB, NO_STACK, Stat, is_kernel,
};

use crate::{fasthash::FastMap, maps::totals::CombinedAlloc, report::trend::Row};

/// One outstanding allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Block {
    pub addr: u64,
    pub size: u64,
}

/// Outstanding memory of one call stack of one process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackTotal {
    pub tgid: u32,
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
}

/// Groups allocations at least `min_age_ns` old by (process, stack), one
/// at a time as they are read from the kernel: memory follows the number
/// of stacks, not of allocations (unless their blocks are kept, for `-a`).
/// A block names its stack through its totals entry (`AllocInfo::slot`),
/// so they are grouped by entry, and the entries by stack at the end.
pub struct Aggregator {
    now_ns: u64,
    min_age_ns: u64,
    keep_blocks: bool,
    totals: FastMap<(u32, u64), StackTotal>,
}

impl Aggregator {
    /// `stacks`: how many stacks to make room for at once.
    pub fn new(now_ns: u64, min_age_ns: u64, keep_blocks: bool, stacks: usize) -> Self {
        Self { now_ns, min_age_ns, keep_blocks, totals: FastMap::with_capacity_and_hasher(stacks, Default::default()) }
    }

    pub fn add(&mut self, key: AllocKey, info: AllocInfo) {
        let total = self.totals.entry((key.tgid, info.slot)).or_insert_with(|| StackTotal {
            tgid: key.tgid,
            stack_id: NO_STACK,
            bytes: 0,
            count: 0,
            live: 0,
            blocks: Vec::new(),
            oldest_ns: Some(info.timestamp_ns),
        });
        total.live += 1;
        total.oldest_ns = total.oldest_ns.map(|t| t.min(info.timestamp_ns));
        if self.now_ns.saturating_sub(info.timestamp_ns) < self.min_age_ns {
            return;
        }
        total.bytes += info.size;
        total.count += 1;
        if self.keep_blocks {
            total.blocks.push(Block { addr: key.addr, size: info.size });
        }
    }

    /// Adds what `other` aggregated (another part of the same map).
    pub fn merge(&mut self, other: Aggregator) {
        for (key, theirs) in other.totals {
            match self.totals.entry(key) {
                Entry::Vacant(slot) => {
                    slot.insert(theirs);
                }
                Entry::Occupied(mut slot) => absorb(slot.get_mut(), theirs),
            }
        }
    }

    /// The stacks with blocks old enough, in no order (a report sorts them
    /// by `--sort`), their blocks by address. `stack_of` names the stack of
    /// a totals entry; a block whose entry it does not know (or that had
    /// none, the totals being full) counts as one without a stack.
    pub fn finish(self, stack_of: impl Fn(u64) -> Option<u64>) -> Vec<StackTotal> {
        let mut by_stack: FastMap<(u32, u64), StackTotal> = FastMap::default();
        for ((tgid, slot), mut total) in self.totals {
            total.stack_id = stack_of(slot).unwrap_or(NO_STACK);
            match by_stack.entry((tgid, total.stack_id)) {
                Entry::Vacant(e) => {
                    e.insert(total);
                }
                Entry::Occupied(mut e) => absorb(e.get_mut(), total),
            }
        }
        // Only now: a part with young blocks only still counts in `live`.
        let mut totals: Vec<StackTotal> = by_stack.into_values().filter(|t| t.count > 0).collect();
        for t in &mut totals {
            t.blocks.sort_unstable_by_key(|b| b.addr);
        }
        totals
    }
}

/// Adds `theirs` into `ours`: the same stack, read in another part.
fn absorb(ours: &mut StackTotal, theirs: StackTotal) {
    ours.bytes += theirs.bytes;
    ours.count += theirs.count;
    ours.live += theirs.live;
    ours.oldest_ns = match (ours.oldest_ns, theirs.oldest_ns) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    ours.blocks.extend(theirs.blocks);
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
    let mut aggregator = Aggregator::new(now_ns, min_age_ns, keep_blocks, 0);
    allocs.into_iter().for_each(|(key, info)| aggregator.add(key, info));
    let mut totals = aggregator.finish(Some);
    sort(&mut totals);
    totals
}

/// The kernel's per-stack totals (--combined-only), in no order.
pub fn from_combined(entries: impl IntoIterator<Item = (CombinedKey, CombinedAlloc)>) -> Vec<StackTotal> {
    entries
        .into_iter()
        .filter(|(_, c)| c.count != 0)
        .map(|(k, c)| StackTotal {
            tgid: k.tgid,
            stack_id: k.stack_id,
            bytes: c.total_size,
            count: c.count,
            live: c.count,
            blocks: Vec::new(),
            oldest_ns: None,
        })
        .collect()
}

/// What the kernel side could not record since attach (the `STATS`
/// counters over all CPUs): the report says so, so that numbers short of
/// the truth never look whole.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Lost {
    /// Allocations not tracked: the allocation map was full (`--max-allocs`).
    pub allocations_untracked: u64,
    /// Allocations tracked without their stack: the stack map was full (`--max-stacks`).
    pub stacks_unrecorded: u64,
    /// Allocations missing from the per-stack totals, and so without a stack (`--max-stacks`).
    pub totals_missed: u64,
    /// Allocator calls not followed (no kernel memory to note a call).
    pub calls_unfollowed: u64,
    /// mmap'd blocks not followed for a partial munmap (over 32 in a process).
    pub mappings_unfollowed: u64,
}

impl Lost {
    pub fn from_counts(counts: &[u64]) -> Self {
        let at = |stat: Stat| counts.get(stat as usize).copied().unwrap_or(0);
        Self {
            allocations_untracked: at(Stat::AllocMapFull),
            stacks_unrecorded: at(Stat::StackLost),
            totals_missed: at(Stat::CombinedMapFull),
            calls_unfollowed: at(Stat::PendingMapFull),
            mappings_unfollowed: at(Stat::RegionsFull),
        }
    }

    /// The header's line, if anything was lost:
    /// `lost since attach: 27 allocations not tracked (allocation map full, raise --max-allocs)`.
    pub fn line(&self) -> Option<String> {
        let parts: Vec<String> = [
            (self.allocations_untracked, "allocations not tracked (allocation map full, raise --max-allocs)"),
            (self.stacks_unrecorded, "allocations without a stack (stack map full, raise --max-stacks)"),
            (self.totals_missed, "allocations missing from the per-stack totals (raise --max-stacks)"),
            (self.calls_unfollowed, "allocator calls not followed"),
            (self.mappings_unfollowed, "mmap'd blocks not followed for a partial munmap"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        (!parts.is_empty()).then(|| format!("lost since attach: {}", parts.join(", ")))
    }
}

/// Biggest first (tests; reports sort by `--sort`).
#[cfg(test)]
fn sort(totals: &mut [StackTotal]) {
    totals.sort_unstable_by(|a, b| {
        (b.bytes, b.count).cmp(&(a.bytes, a.count)).then((a.tgid, a.stack_id).cmp(&(b.tgid, b.stack_id)))
    });
}

/// Outstanding memory of one process (or kernel allocator), its stacks
/// in the report's order.
#[derive(Debug, Clone, PartialEq)]
pub struct ProcessTotal {
    pub tgid: u32,
    pub bytes: u64,
    pub count: u64,
    pub rows: Vec<Row>,
}

/// Groups a report's rows by process, keeping their order within each:
/// user processes biggest first, then the kernel's allocators.
pub fn by_process(rows: Vec<Row>) -> Vec<ProcessTotal> {
    let mut procs: Vec<ProcessTotal> = Vec::new();
    let mut index: HashMap<u32, usize> = HashMap::new();
    for row in rows {
        let tgid = row.total.tgid;
        let i = *index.entry(tgid).or_insert_with(|| {
            procs.push(ProcessTotal { tgid, bytes: 0, count: 0, rows: Vec::new() });
            procs.len() - 1
        });
        procs[i].bytes += row.total.bytes;
        procs[i].count += row.total.count;
        procs[i].rows.push(row);
    }
    procs.sort_by(|a, b| (is_kernel(a.tgid), b.bytes, a.tgid).cmp(&(is_kernel(b.tgid), a.bytes, b.tgid)));
    procs
}

/// Writes one interval's report for one process: the header (and what was
/// lost, if anything), then up to `top` stacks, each with its blocks (if
/// `show_allocs`), bcc's line with the trend after it, and its frames from
/// `frames`.
pub fn write(
    out: &mut impl Write,
    clock: &str,
    top: usize,
    rows: &[Row],
    lost: &Lost,
    show_allocs: bool,
    frames: &mut dyn FnMut(&StackTotal) -> Vec<String>,
) -> std::io::Result<()> {
    writeln!(out, "[{clock}] Top {top} stacks with outstanding allocations:")?;
    write_lost(out, lost)?;
    write_stacks(out, top, rows, show_allocs, frames)
}

fn write_lost(out: &mut impl Write, lost: &Lost) -> std::io::Result<()> {
    match lost.line() {
        Some(line) => writeln!(out, "{line}"),
        None => Ok(()),
    }
}

/// Writes a system-wide report: each process (at most `top_procs`, biggest
/// first) with its top stacks, then the kernel's allocators.
#[allow(clippy::too_many_arguments)]
pub fn write_system(
    out: &mut impl Write,
    clock: &str,
    top: usize,
    top_procs: usize,
    procs: &[ProcessTotal],
    lost: &Lost,
    show_allocs: bool,
    comm: &mut dyn FnMut(u32) -> String,
    frames: &mut dyn FnMut(&StackTotal) -> Vec<String>,
) -> std::io::Result<()> {
    writeln!(out, "[{clock}] Top {top} stacks with outstanding allocations, by process:")?;
    write_lost(out, lost)?;
    let user = procs.iter().filter(|p| !is_kernel(p.tgid)).take(top_procs);
    for p in user.chain(procs.iter().filter(|p| is_kernel(p.tgid))) {
        writeln!(out, "{}: {} bytes in {} {}", process_name(p.tgid, comm), p.bytes, p.count, plural(p.count))?;
        write_stacks(out, top, &p.rows, show_allocs, frames)?;
    }
    Ok(())
}

/// "PID COMM", or the kernel allocator's name.
pub fn process_name(tgid: u32, comm: &mut dyn FnMut(u32) -> String) -> String {
    match tgid {
        KERNEL_SLAB => "kernel slab".to_string(),
        KERNEL_PAGES => "kernel pages".to_string(),
        KERNEL_PERCPU => "kernel percpu".to_string(),
        tgid => format!("{tgid} {}", comm(tgid)),
    }
}

fn plural(count: u64) -> &'static str {
    if count == 1 { "allocation" } else { "allocations" }
}

fn write_stacks(
    out: &mut impl Write,
    top: usize,
    rows: &[Row],
    show_allocs: bool,
    frames: &mut dyn FnMut(&StackTotal) -> Vec<String>,
) -> std::io::Result<()> {
    for Row { total, trend } in rows.iter().take(top) {
        if show_allocs {
            for b in &total.blocks {
                writeln!(out, "    addr = {:x} size = {}", b.addr, b.size)?;
            }
        }
        writeln!(
            out,
            "    {} bytes in {} {} from stack  {}",
            total.bytes,
            total.count,
            plural(total.count),
            trend.summary()
        )?;
        if total.stack_id == NO_STACK {
            writeln!(out, "        [stack not recorded: stack map full, raise --max-stacks]")?;
            continue;
        }
        for line in frames(total) {
            writeln!(out, "        {line}")?;
        }
    }
    Ok(())
}

/// Local wall-clock time as HH:MM:SS.
pub fn clock_now() -> String {
    // SAFETY: time(NULL) and localtime_r with valid pointers.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    }
}

#[cfg(test)]
mod tests {
    use memleak_common::NO_SLOT;

    use super::*;
    use crate::report::trend::Tracker;

    /// Rows of a first report, 2 s after attach.
    fn rows(totals: Vec<StackTotal>) -> Vec<Row> {
        Tracker::new(0, 0).update(totals, 2_000_000_000, &Default::default())
    }

    fn alloc(addr: u64, size: u64, ts: u64, stack_id: u64) -> (AllocKey, AllocInfo) {
        (AllocKey { addr, tgid: 7, _pad: 0 }, AllocInfo { size, timestamp_ns: ts, slot: stack_id })
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
        assert_eq!(totals[0].blocks, [Block { addr: 0x10, size: 8192 }, Block { addr: 0x30, size: 8192 }]);
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
        let mut aggregator = Aggregator::new(10, 5, true, 0);
        for (addr, slot) in [(0x10, 4), (0x20, 5), (0x30, 6), (0x40, NO_SLOT)] {
            let (key, info) = alloc(addr, 8, 1, slot);
            aggregator.add(key, info);
        }
        // Too young to list, but one of stack 40's live blocks (its part
        // on a third CPU has no other).
        let (key, info) = alloc(0x50, 8, 10, 3);
        aggregator.add(key, info);
        let mut totals = aggregator.finish(|slot| [3, 4, 5].contains(&slot).then_some(40));
        totals.sort_by_key(|t| t.stack_id);
        assert_eq!(totals.iter().map(|t| (t.stack_id, t.count, t.live)).collect::<Vec<_>>(), [(NO_STACK, 2, 2), (40, 2, 3)]);
        assert_eq!(totals[1].blocks, [Block { addr: 0x10, size: 8 }, Block { addr: 0x20, size: 8 }]);
    }

    #[test]
    fn combined_drops_empty_stacks() {
        let k = |s| CombinedKey { tgid: 1, shard: 0, stack_id: s };
        let mut totals = from_combined([
            (k(1), CombinedAlloc { total_size: 10, count: 1, allocs: 1 }),
            (k(2), CombinedAlloc { total_size: 0, count: 0, allocs: 4 }),
            (k(3), CombinedAlloc { total_size: 30, count: 3, allocs: 3 }),
        ]);
        sort(&mut totals);
        assert_eq!(totals.iter().map(|t| t.stack_id).collect::<Vec<_>>(), [3, 1]);
    }

    #[test]
    fn writes_bcc_format() {
        let totals = by_stack([alloc(0x7f8f70863220, 8192, 0, 4), alloc(0x7f8f70861210, 8192, 0, 4)], 1, 0, true);
        let mut out = Vec::new();
        let mut frames = |_: &StackTotal| vec!["fibonacci+0x1f [app]".to_string(), "child+0x4f [app]".to_string()];
        write(&mut out, "03:00:41", 10, &rows(totals), &Lost::default(), true, &mut frames).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[03:00:41] Top 10 stacks with outstanding allocations:\n\
             \x20   addr = 7f8f70861210 size = 8192\n\
             \x20   addr = 7f8f70863220 size = 8192\n\
             \x20   16384 bytes in 2 allocations from stack  (+16384 B since last, 8192 B/s, oldest 2.0s)\n\
             \x20       fibonacci+0x1f [app]\n\
             \x20       child+0x4f [app]\n"
        );
    }

    #[test]
    fn top_limits_stacks_and_lost_stacks_say_why() {
        let totals = by_stack([alloc(1, 30, 0, NO_STACK), alloc(2, 20, 0, 1), alloc(3, 10, 0, 2)], 1, 0, false);
        let mut out = Vec::new();
        let lost = Lost::from_counts(&[27, 0, 0, 0, 3]);
        write(&mut out, "00:00:00", 2, &rows(totals), &lost, false, &mut |_| vec!["f+0x1 [m]".into()]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text.lines().nth(1),
            Some("lost since attach: 27 allocations not tracked (allocation map full, raise --max-allocs), 3 mmap'd blocks not followed for a partial munmap"),
            "{text}"
        );
        assert!(text.contains("30 bytes in 1 allocation from stack  (+30 B since last, 15 B/s, oldest 2.0s)\n        [stack not recorded"), "{text}");
        assert!(text.contains("20 bytes in 1 allocation"));
        assert!(!text.contains("10 bytes"), "{text}");
    }

    #[test]
    fn system_report_groups_by_process_then_kernel() {
        let mut allocs = vec![alloc(0x10, 100, 0, 1), alloc(0x20, 50, 0, 2)];
        let mut other = alloc(0x10, 500, 0, 1);
        other.0.tgid = 9;
        allocs.push(other);
        let mut slab = alloc(0xffff0000, 64, 0, 3);
        slab.0.tgid = KERNEL_SLAB;
        allocs.push(slab);
        let procs = by_process(rows(by_stack(allocs, 1, 0, false)));
        assert_eq!(procs.iter().map(|p| (p.tgid, p.bytes)).collect::<Vec<_>>(), [(9, 500), (7, 150), (KERNEL_SLAB, 64)]);
        let mut out = Vec::new();
        let mut comm = |tgid: u32| format!("app{tgid}");
        let mut frames = |_: &StackTotal| vec!["f+0x1 [m]".to_string()];
        write_system(&mut out, "01:02:03", 1, 1, &procs, &Lost::default(), false, &mut comm, &mut frames).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[01:02:03] Top 1 stacks with outstanding allocations, by process:\n\
             9 app9: 500 bytes in 1 allocation\n\
             \x20   500 bytes in 1 allocation from stack  (+500 B since last, 250 B/s, oldest 2.0s)\n\
             \x20       f+0x1 [m]\n\
             kernel slab: 64 bytes in 1 allocation\n\
             \x20   64 bytes in 1 allocation from stack  (+64 B since last, 32 B/s, oldest 2.0s)\n\
             \x20       f+0x1 [m]\n"
        );
    }

    #[test]
    fn clock_is_hh_mm_ss() {
        let c = clock_now();
        assert_eq!(c.len(), 8);
        assert_eq!(c.as_bytes()[2], b':');
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
            (any::<u64>(), 1u32..4, 0u64..1 << 40, 0u64..2000, 0u64..8), 0..200), min_age in 0u64..1500) {
            let mut unique = std::collections::HashMap::new();
            for (addr, tgid, size, ts, stack) in allocs {
                unique.insert(AllocKey { addr, tgid, _pad: 0 }, AllocInfo { size, timestamp_ns: ts, slot: stack });
            }
            let now = 2000;
            let totals = by_stack(unique.clone(), now, min_age, true);
            // Read in two parts (as on two CPUs) and merged: the same totals.
            let mut halves = [Aggregator::new(now, min_age, true, 0), Aggregator::new(now, min_age, true, 4)];
            for (i, (key, info)) in unique.iter().enumerate() {
                halves[i % 2].add(*key, *info);
            }
            let [mut merged, second] = halves;
            merged.merge(second);
            let mut merged = merged.finish(Some);
            sort(&mut merged);
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
        }
    }
}
