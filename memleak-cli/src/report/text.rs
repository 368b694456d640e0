//! The text report: what bcc users know. Pure: it gets a report's rows and
//! a way to turn a stack into frame lines.

use std::{collections::HashMap, io::Write};

use memleak_common::{KERNEL_PAGES, KERNEL_PERCPU, KERNEL_SLAB, Kind, NO_STACK, is_kernel};

use super::{aggregate::StackTotal, lost::Lost, peek, threads::ByThread, trend::Row};

/// A stack's `threads:` line (None: none to show, as with --combined-only).
pub type ThreadsLine<'a> = dyn Fn(&StackTotal) -> Option<String> + 'a;

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
    threads: &ThreadsLine<'_>,
    frames: &mut dyn FnMut(&StackTotal) -> Vec<String>,
) -> std::io::Result<()> {
    writeln!(out, "[{clock}] Top {top} stacks with outstanding allocations:")?;
    write_lost(out, lost)?;
    write_stacks(out, top, rows, show_allocs, threads, frames)
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
    threads: &ThreadsLine<'_>,
    frames: &mut dyn FnMut(&StackTotal) -> Vec<String>,
) -> std::io::Result<()> {
    writeln!(out, "[{clock}] Top {top} stacks with outstanding allocations, by process:")?;
    write_lost(out, lost)?;
    let user = procs.iter().filter(|p| !is_kernel(p.tgid)).take(top_procs);
    for p in user.chain(procs.iter().filter(|p| is_kernel(p.tgid))) {
        writeln!(out, "{}: {} bytes in {} {}", process_name(p.tgid, comm), p.bytes, p.count, plural(p.count))?;
        write_stacks(out, top, &p.rows, show_allocs, threads, frames)?;
    }
    Ok(())
}

/// Writes a `--by-thread` report: each thread name (`handler x6`: how
/// many threads of that name hold blocks, or for a name none does, how
/// many live) with its outstanding bytes and blocks, then its top stacks,
/// each with its part of the stack (the whole stack in the parenthesis when
/// other threads hold some too). System-wide (`comm` given), each name
/// after its process, of the first `top_procs` processes.
#[allow(clippy::too_many_arguments)]
pub fn write_by_thread(
    out: &mut impl Write,
    clock: &str,
    top: usize,
    top_procs: Option<usize>,
    groups: &[ByThread],
    lost: &Lost,
    show_allocs: bool,
    comm: &mut dyn FnMut(u32) -> String,
    frames: &mut dyn FnMut(&StackTotal) -> Vec<String>,
) -> std::io::Result<()> {
    writeln!(out, "[{clock}] Top {top} stacks with outstanding allocations, by thread:")?;
    write_lost(out, lost)?;
    // System-wide: the processes with the most bytes, as by process.
    let mut shown: Vec<u32> = Vec::new();
    if let Some(n) = top_procs {
        let mut bytes: Vec<(u32, u64)> = Vec::new();
        for g in groups.iter().filter(|g| !is_kernel(g.tgid)) {
            match bytes.iter_mut().find(|(tgid, _)| *tgid == g.tgid) {
                Some((_, b)) => *b += g.group.bytes,
                None => bytes.push((g.tgid, g.group.bytes)),
            }
        }
        bytes.sort_by(|a, b| (b.1, a.0).cmp(&(a.1, b.0)));
        shown = bytes.into_iter().take(n).map(|(tgid, _)| tgid).collect();
    }
    for g in groups.iter().filter(|g| top_procs.is_none() || is_kernel(g.tgid) || shown.contains(&g.tgid)) {
        let process = match top_procs {
            Some(_) => format!("{}: ", process_name(g.tgid, comm)),
            None => String::new(),
        };
        writeln!(out, "{process}{}: {} bytes in {} {}", g.group.label(), g.group.bytes, g.group.count, plural(g.group.count))?;
        write_parts(out, top, &g.rows, |out, i| {
            let (Row { total, trend }, (bytes, count)) = (&g.rows[i], g.whole[i]);
            let summary = trend.summary();
            let summary = if (bytes, count) == (total.bytes, total.count) {
                summary
            } else {
                format!("(of its {bytes} bytes in {count} {}; {}", plural(count), &summary[1..])
            };
            write_stack(out, total, &summary, show_allocs, &|_| None, frames)
        })?;
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
    threads: &ThreadsLine<'_>,
    frames: &mut dyn FnMut(&StackTotal) -> Vec<String>,
) -> std::io::Result<()> {
    write_parts(out, top, rows, |out, i| write_stack(out, &rows[i].total, &rows[i].trend.summary(), show_allocs, threads, frames))
}

/// The heap's first `top` rows, then, under a line of their own, the
/// first `top` direct mappings (rows come sorted heap first); `one`
/// writes the row at an index.
fn write_parts<W: Write>(
    out: &mut W,
    top: usize,
    rows: &[Row],
    mut one: impl FnMut(&mut W, usize) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let heap = rows.iter().take_while(|r| !r.total.kind.is_mapping()).count();
    for i in 0..heap.min(top) {
        one(out, i)?;
    }
    let mappings = &rows[heap..];
    if !mappings.is_empty() {
        let (bytes, count) = mappings.iter().fold((0, 0), |(b, c), r| (b + r.total.bytes, c + r.total.count));
        writeln!(out, "    direct mappings (mmap): {bytes} bytes in {count} {}", plural(count))?;
        for i in heap..rows.len().min(heap + top) {
            one(out, i)?;
        }
    }
    Ok(())
}

/// One stack: its blocks (`-a`), bcc's line with `summary` after it, its
/// frames, its threads, the peeks at its blocks.
fn write_stack(
    out: &mut impl Write,
    total: &StackTotal,
    summary: &str,
    show_allocs: bool,
    threads: &ThreadsLine<'_>,
    frames: &mut dyn FnMut(&StackTotal) -> Vec<String>,
) -> std::io::Result<()> {
    if show_allocs {
        for b in &total.blocks {
            writeln!(out, "    addr = {:x} size = {}", b.addr, b.size)?;
        }
    }
    // The function that made the blocks, after bcc's "from stack": what
    // reads bcc's line up to there still does. Blocks whose totals entry
    // the kernel had no room for have no known function and say none.
    let via = match total.kind {
        Kind::Unknown => String::new(),
        kind => format!(" via {}", kind.name()),
    };
    writeln!(out, "    {} bytes in {} {} from stack{via}  {summary}", total.bytes, total.count, plural(total.count))?;
    if total.stack_id == NO_STACK {
        writeln!(out, "        [stack not recorded: stack map full, raise --max-stacks]")?;
    } else {
        for line in frames(total) {
            writeln!(out, "        {line}")?;
        }
    }
    if let Some(line) = threads(total) {
        writeln!(out, "        {line}")?;
    }
    for p in &total.peeks {
        writeln!(out, "        peek {:#x} ({} B): \"{}\"", p.addr, p.size, peek::escape(&p.bytes))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{
        aggregate::{Aggregator, Block, Peek, by_stack, tests::alloc},
        threads,
        trend::Tracker,
    };

    /// Rows of a first report, 2 s after attach.
    fn rows(totals: Vec<StackTotal>) -> Vec<Row> {
        Tracker::new(0, 0).update(totals.into_iter().map(|t| (t, None)), 2_000_000_000)
    }

    #[test]
    fn keeps_the_oldest_blocks_of_old_enough_ones_and_shows_their_bytes_escaped() {
        let mut aggregator = Aggregator::new(1000, 100, false, 2, 0);
        for (addr, ts) in [(0x10, 500), (0x20, 100), (0x30, 300), (0x40, 950), (0x50, 100)] {
            let (key, info) = alloc(addr, 16, ts, 4);
            aggregator.add(key, info);
        }
        let mut totals = aggregator.finish(|slot| Some((u64::from(slot), memleak_common::Kind::Malloc)));
        // 0x40 is too young to count; of the others, the two oldest.
        let born = |addr, born_ns| Block { addr, size: 16, born_ns };
        assert_eq!(totals[0].oldest, [born(0x20, 100), born(0x50, 100)]);
        assert!(totals[0].blocks.is_empty());
        totals[0].peeks = vec![Peek { addr: 0x20, size: 16, bytes: b"id=4099\0\n\x1b".to_vec() }];
        let mut out = Vec::new();
        write(&mut out, "00:00:00", 10, &rows(totals), &Lost::default(), false, &|_| None, &mut |_| vec!["f+0x1 [m]".into()]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("        f+0x1 [m]\n        peek 0x20 (16 B): \"id=4099\\0\\n\\x1b\"\n"), "{text}");
    }

    #[test]
    fn writes_bcc_format() {
        let totals = by_stack([alloc(0x7f8f70863220, 8192, 0, 4), alloc(0x7f8f70861210, 8192, 0, 4)], 1, 0, true);
        let mut out = Vec::new();
        let mut frames = |_: &StackTotal| vec!["fibonacci+0x1f [app]".to_string(), "child+0x4f [app]".to_string()];
        write(&mut out, "03:00:41", 10, &rows(totals), &Lost::default(), true, &|_| None, &mut frames).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[03:00:41] Top 10 stacks with outstanding allocations:\n\
             \x20   addr = 7f8f70861210 size = 8192\n\
             \x20   addr = 7f8f70863220 size = 8192\n\
             \x20   16384 bytes in 2 allocations from stack via malloc  (+16384 B since last, 8192 B/s, oldest 2.0s)\n\
             \x20       fibonacci+0x1f [app]\n\
             \x20       child+0x4f [app]\n"
        );
    }

    #[test]
    fn top_limits_stacks_and_lost_stacks_say_why() {
        let totals = by_stack([alloc(1, 30, 0, NO_STACK), alloc(2, 20, 0, 1), alloc(3, 10, 0, 2)], 1, 0, false);
        let mut out = Vec::new();
        let lost = Lost::from_counts(&[27, 0, 0, 0, 3]);
        write(&mut out, "00:00:00", 2, &rows(totals), &lost, false, &|_| None, &mut |_| vec!["f+0x1 [m]".into()]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(
            text.lines().nth(1),
            Some("lost since attach: 27 allocations not tracked (allocation map full, raise --max-allocs), 3 mmap'd blocks not followed for a partial munmap"),
            "{text}"
        );
        assert!(text.contains("30 bytes in 1 allocation from stack via malloc  (+30 B since last, 15 B/s, oldest 2.0s)\n        [stack not recorded"), "{text}");
        assert!(text.contains("20 bytes in 1 allocation"));
        assert!(!text.contains("10 bytes"), "{text}");
    }

    #[test]
    fn each_stack_says_its_function_and_mappings_come_after_the_heap() {
        let mut totals = by_stack([alloc(0x10, 100, 0, 1), alloc(0x20, 40000, 0, 2), alloc(0x30, 8192, 0, 3), alloc(0x40, 30, 0, 4)], 1, 0, false);
        for t in &mut totals {
            t.kind = match t.stack_id {
                1 => Kind::Calloc,
                2 | 3 => Kind::Mmap,
                _ => Kind::Unknown,
            };
        }
        let mut rows = rows(totals);
        crate::report::sort::sort(&mut rows, crate::report::sort::SortKey::Size);
        let mut out = Vec::new();
        let mut frames = |t: &StackTotal| vec![format!("f{}+0x1 [m]", t.stack_id)];
        write(&mut out, "00:00:00", 1, &rows, &Lost::default(), false, &|_| None, &mut frames).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[00:00:00] Top 1 stacks with outstanding allocations:\n\
             \x20   100 bytes in 1 allocation from stack via calloc  (+100 B since last, 50 B/s, oldest 2.0s)\n\
             \x20       f1+0x1 [m]\n\
             \x20   direct mappings (mmap): 48192 bytes in 2 allocations\n\
             \x20   40000 bytes in 1 allocation from stack via mmap  (+40000 B since last, 20000 B/s, oldest 2.0s)\n\
             \x20       f2+0x1 [m]\n"
        );
    }

    #[test]
    fn by_thread_lists_each_names_mappings_after_its_heap() {
        let mut totals = by_stack([alloc(0x10, 100, 0, 1), alloc(0x20, 50, 0, 2), alloc(0x30, 8192, 0, 3)], 1, 0, false);
        for t in &mut totals {
            t.kind = if t.stack_id == 3 { Kind::Mmap } else { Kind::Malloc };
        }
        let mut rows = rows(totals);
        crate::report::sort::sort(&mut rows, crate::report::sort::SortKey::Size);
        let mut names = threads::Names::default();
        names.refresh([(7, 7)], &mut |_, _| Some("main".to_string()));
        let groups = threads::by_thread(&rows, &[], &names);
        let mut out = Vec::new();
        let mut frames = |t: &StackTotal| vec![format!("f{}+0x1 [m]", t.stack_id)];
        write_by_thread(&mut out, "01:02:03", 1, None, &groups, &Lost::default(), false, &mut |_| unreachable!(), &mut frames).unwrap();
        let text = String::from_utf8(out).unwrap();
        let heads: Vec<&str> = text.lines().filter(|l| l.starts_with("    ") && !l.starts_with("        ")).collect();
        assert_eq!(heads.len(), 3, "{text}");
        assert!(heads[0].starts_with("    100 bytes in 1 allocation from stack via malloc  ("), "{text}");
        assert_eq!(heads[1], "    direct mappings (mmap): 8192 bytes in 1 allocation", "{text}");
        assert!(heads[2].starts_with("    8192 bytes in 1 allocation from stack via mmap  ("), "{text}");
    }

    #[test]
    fn the_threads_line_comes_after_the_frames() {
        let mut totals = by_stack([alloc(0x10, 8, 0, 1)], 1, 0, false);
        totals[0].peeks = vec![Peek { addr: 0x10, size: 8, bytes: b"x".to_vec() }];
        let mut out = Vec::new();
        let threads = |t: &StackTotal| Some(format!("threads: app x{}", t.threads.len()));
        write(&mut out, "00:00:00", 10, &rows(totals), &Lost::default(), false, &threads, &mut |_| vec!["f+0x1 [m]".into()]).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with("        f+0x1 [m]\n        threads: app x1\n        peek 0x10 (8 B): \"x\"\n"), "{text}");
    }

    #[test]
    fn by_thread_shows_each_name_its_part_of_each_stack_and_idle_names() {
        // Stack 1: thread 10 (handler) 2 blocks, thread 20 (io) 1; stack 2:
        // thread 10 only. Thread 30 (main) holds nothing.
        let mut allocs = vec![alloc(0x10, 100, 0, 1), alloc(0x20, 100, 0, 1), alloc(0x30, 100, 0, 1), alloc(0x40, 50, 0, 2)];
        allocs[2].1.tid = 20;
        for a in [0, 1, 3] {
            allocs[a].1.tid = 10;
        }
        let rows = rows(by_stack(allocs, 1, 0, false));
        let mut names = threads::Names::default();
        let known = HashMap::from([(10, "handler"), (20, "io"), (30, "main")]);
        names.refresh([(7, 10), (7, 20), (7, 30)], &mut |_, tid| known.get(&tid).map(|s| s.to_string()));
        let groups = threads::by_thread(&rows, &[(7, 10), (7, 20), (7, 30)], &names);
        let mut out = Vec::new();
        let mut frames = |t: &StackTotal| vec![format!("f{}+0x1 [m]", t.stack_id)];
        write_by_thread(&mut out, "01:02:03", 10, None, &groups, &Lost::default(), false, &mut |_| unreachable!(), &mut frames).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[01:02:03] Top 10 stacks with outstanding allocations, by thread:\n\
             handler x1: 250 bytes in 3 allocations\n\
             \x20   200 bytes in 2 allocations from stack via malloc  (of its 300 bytes in 3 allocations; +300 B since last, 150 B/s, oldest 2.0s)\n\
             \x20       f1+0x1 [m]\n\
             \x20   50 bytes in 1 allocation from stack via malloc  (+50 B since last, 25 B/s, oldest 2.0s)\n\
             \x20       f2+0x1 [m]\n\
             io x1: 100 bytes in 1 allocation\n\
             \x20   100 bytes in 1 allocation from stack via malloc  (of its 300 bytes in 3 allocations; +300 B since last, 150 B/s, oldest 2.0s)\n\
             \x20       f1+0x1 [m]\n\
             main x1: 0 bytes in 0 allocations\n"
        );
        // System-wide, each name after its process.
        let mut out = Vec::new();
        let mut comm = |tgid: u32| format!("app{tgid}");
        write_by_thread(&mut out, "01:02:03", 1, Some(1), &groups, &Lost::default(), false, &mut comm, &mut frames).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("\n7 app7: io x1: 100 bytes in 1 allocation\n"));
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
        write_system(&mut out, "01:02:03", 1, 1, &procs, &Lost::default(), false, &mut comm, &|_| None, &mut frames).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "[01:02:03] Top 1 stacks with outstanding allocations, by process:\n\
             9 app9: 500 bytes in 1 allocation\n\
             \x20   500 bytes in 1 allocation from stack via malloc  (+500 B since last, 250 B/s, oldest 2.0s)\n\
             \x20       f+0x1 [m]\n\
             kernel slab: 64 bytes in 1 allocation\n\
             \x20   64 bytes in 1 allocation from stack via malloc  (+64 B since last, 32 B/s, oldest 2.0s)\n\
             \x20       f+0x1 [m]\n"
        );
    }

}
