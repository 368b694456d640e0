//! Which threads allocated a report's outstanding blocks (the kernel
//! records each block's tid): per stack, grouped by thread name (the text
//! `threads:` line; JSON lists each thread), and with `--by-thread` the
//! report itself grouped by thread name. Pure but for [`Names::refresh`]'s
//! reader.
//!
//! A thread's name is the one it has at report time: the kernel keeps
//! only the tid (reading the name at each allocation would cost a helper
//! call and 16 bytes per block). A thread gone by then keeps the name an
//! earlier report saw; one that no report saw alive has none (`[exited]`
//! in text, `null` in JSON, its tid still given).

use std::collections::HashMap;

use super::{aggregate::ThreadTotal, peek, trend::Row};

/// What the text shows for a thread without a name.
pub const EXITED: &str = "[exited]";

/// Thread names shown on a stack's `threads:` line; the rest are summed.
const SHOWN_NAMES: usize = 5;

/// The names of the threads a report names, by (process, tid).
#[derive(Default)]
pub struct Names {
    known: HashMap<(u32, u32), String>,
}

impl Names {
    /// Reads the names of `threads` now with `read` (None: gone); a thread
    /// gone keeps the name it had at the last report that named it.
    /// Threads not asked for are forgotten.
    pub fn refresh(
        &mut self,
        threads: impl IntoIterator<Item = (u32, u32)>,
        read: &mut dyn FnMut(u32, u32) -> Option<String>,
    ) {
        let mut known = HashMap::new();
        for key in threads {
            if known.contains_key(&key) {
                continue;
            }
            if let Some(name) = read(key.0, key.1).or_else(|| self.known.remove(&key)) {
                known.insert(key, name);
            }
        }
        self.known = known;
    }

    pub fn get(&self, tgid: u32, tid: u32) -> Option<&str> {
        self.known.get(&(tgid, tid)).map(String::as_str)
    }
}

/// Threads of one name (None: unknown, see the module's note).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub name: Option<String>,
    /// Distinct threads, ascending.
    pub tids: Vec<u32>,
    pub count: u64,
    pub bytes: u64,
}

impl Group {
    /// As the text shows it: escaped (a thread names itself: its name
    /// reaches the terminal as text, never as a control sequence).
    pub fn label(&self) -> String {
        match &self.name {
            Some(name) => format!("{} x{}", peek::escape(name.as_bytes()), self.tids.len()),
            None => format!("{EXITED} x{}", self.tids.len()),
        }
    }
}

/// `threads` (of one stack, or several of one process) grouped by name,
/// most blocks first (then most bytes, then by name).
pub fn groups(threads: &[ThreadTotal], name: &dyn Fn(u32) -> Option<String>) -> Vec<Group> {
    let mut by_name: HashMap<Option<String>, Group> = HashMap::new();
    for t in threads {
        let name = name(t.tid);
        let g = by_name.entry(name.clone()).or_insert_with(|| Group { name, tids: vec![], count: 0, bytes: 0 });
        g.tids.push(t.tid);
        g.count += t.count;
        g.bytes += t.bytes;
    }
    let mut groups: Vec<Group> = by_name.into_values().collect();
    for g in &mut groups {
        g.tids.sort_unstable();
        g.tids.dedup();
    }
    groups.sort_by(|a, b| (b.count, b.bytes, &a.name).cmp(&(a.count, a.bytes, &b.name)));
    groups
}

/// A stack's `threads:` line: `threads: handler x6 (60 blocks, 7200 B)`,
/// at most [`SHOWN_NAMES`] names, then what the others hold.
pub fn line(groups: &[Group]) -> String {
    let blocks = |n: u64| if n == 1 { "1 block".to_string() } else { format!("{n} blocks") };
    let mut parts: Vec<String> = groups
        .iter()
        .take(SHOWN_NAMES)
        .map(|g| format!("{} ({}, {} B)", g.label(), blocks(g.count), g.bytes))
        .collect();
    let rest = &groups[groups.len().min(SHOWN_NAMES)..];
    if !rest.is_empty() {
        let (count, bytes) = rest.iter().fold((0, 0), |(c, b), g| (c + g.count, b + g.bytes));
        parts.push(format!("{} more names ({}, {bytes} B)", rest.len(), blocks(count)));
    }
    format!("threads: {}", parts.join(", "))
}

/// One thread name's share of a report (`--by-thread`): of one process,
/// its blocks of each stack as rows (the rows' totals cut down to the
/// threads of that name), in the report's order.
#[derive(Debug, Clone)]
pub struct ByThread {
    pub tgid: u32,
    pub group: Group,
    pub rows: Vec<Row>,
    /// The whole of each of `rows`' stacks, all threads: (bytes, count).
    pub whole: Vec<(u64, u64)>,
}

/// The report's rows grouped by (process, thread name): most bytes first,
/// within user processes, then the kernel's allocators. `idle`: threads
/// that hold nothing and are listed anyway (those of the traced process,
/// which --by-thread shows all of), as (process, tid).
pub fn by_thread(rows: &[Row], idle: &[(u32, u32)], names: &Names) -> Vec<ByThread> {
    let mut index: HashMap<(u32, Option<String>), usize> = HashMap::new();
    let mut out: Vec<ByThread> = Vec::new();
    let mut at = |tgid: u32, name: Option<String>, out: &mut Vec<ByThread>| {
        *index.entry((tgid, name.clone())).or_insert_with(|| {
            out.push(ByThread {
                tgid,
                group: Group { name, tids: vec![], count: 0, bytes: 0 },
                rows: vec![],
                whole: vec![],
            });
            out.len() - 1
        })
    };
    for row in rows {
        let tgid = row.total.tgid;
        let name = |tid| names.get(tgid, tid).map(str::to_string);
        for g in groups(&row.total.threads, &name) {
            let i = at(tgid, g.name.clone(), &mut out);
            let b = &mut out[i];
            b.group.tids.extend(&g.tids);
            b.group.count += g.count;
            b.group.bytes += g.bytes;
            let mut part = row.clone();
            part.total.threads.retain(|t| g.tids.binary_search(&t.tid).is_ok());
            part.total.bytes = g.bytes;
            part.total.count = g.count;
            b.rows.push(part);
            b.whole.push((row.total.bytes, row.total.count));
        }
    }
    for &(tgid, tid) in idle {
        let i = at(tgid, names.get(tgid, tid).map(str::to_string), &mut out);
        if out[i].group.count == 0 {
            out[i].group.tids.push(tid);
        }
    }
    for b in &mut out {
        b.group.tids.sort_unstable();
        b.group.tids.dedup();
    }
    out.sort_by(|a, b| {
        let key = |x: &ByThread| (memleak_common::is_kernel(x.tgid), std::cmp::Reverse(x.group.bytes), x.tgid);
        key(a).cmp(&key(b)).then_with(|| a.group.name.cmp(&b.group.name))
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{aggregate::StackTotal, trend::Tracker};

    fn t(tid: u32, count: u64) -> ThreadTotal {
        ThreadTotal { tid, count, bytes: count * 120 }
    }

    fn names(known: &[(u32, &str)]) -> Names {
        let mut n = Names::default();
        let map: HashMap<u32, String> = known.iter().map(|&(tid, s)| (tid, s.to_string())).collect();
        n.refresh(known.iter().map(|&(tid, _)| (7, tid)), &mut |_, tid| map.get(&tid).cloned());
        n
    }

    #[test]
    fn groups_by_name_most_blocks_first_and_counts_distinct_threads() {
        let threads = [t(10, 10), t(11, 10), t(12, 5), t(20, 30), t(30, 1)];
        let name = |tid: u32| match tid {
            10..=12 => Some("handler".to_string()),
            20 => Some("main".to_string()),
            _ => None,
        };
        let g = groups(&threads, &name);
        assert_eq!(g.iter().map(|g| (g.label(), g.count)).collect::<Vec<_>>(),
            [("main x1".to_string(), 30), ("handler x3".to_string(), 25), ("[exited] x1".to_string(), 1)]);
        assert_eq!(line(&g), "threads: main x1 (30 blocks, 3600 B), handler x3 (25 blocks, 3000 B), [exited] x1 (1 block, 120 B)");
    }

    #[test]
    fn a_long_line_sums_the_names_past_five_and_names_are_escaped() {
        let threads: Vec<ThreadTotal> = (1..=7).map(|tid| t(tid, 8 - u64::from(tid))).collect();
        let name = |tid: u32| Some(if tid == 1 { "bad\x1b[2J".to_string() } else { format!("w{tid}") });
        assert_eq!(
            line(&groups(&threads, &name)),
            "threads: bad\\x1b[2J x1 (7 blocks, 840 B), w2 x1 (6 blocks, 720 B), w3 x1 (5 blocks, 600 B), \
             w4 x1 (4 blocks, 480 B), w5 x1 (3 blocks, 360 B), 2 more names (3 blocks, 360 B)"
        );
    }

    #[test]
    fn a_thread_gone_keeps_the_name_a_report_saw_and_one_never_seen_has_none() {
        let mut n = Names::default();
        n.refresh([(7, 1), (7, 2)], &mut |_, tid| (tid == 1).then(|| "handler".to_string()));
        assert_eq!((n.get(7, 1), n.get(7, 2)), (Some("handler"), None));
        // Thread 1 exited since; thread 3 was born and died between reports.
        n.refresh([(7, 1), (7, 3)], &mut |_, _| None);
        assert_eq!((n.get(7, 1), n.get(7, 3)), (Some("handler"), None));
        // Not named by this report: forgotten.
        n.refresh([(7, 3)], &mut |_, _| None);
        assert_eq!(n.get(7, 1), None);
    }

    #[test]
    fn by_thread_splits_each_stack_between_names_and_lists_idle_ones() {
        let total = |stack_id, threads: Vec<ThreadTotal>| StackTotal {
            tgid: 7,
            stack_id,
            bytes: threads.iter().map(|t| t.bytes).sum(),
            count: threads.iter().map(|t| t.count).sum(),
            threads,
            ..Default::default()
        };
        let rows = Tracker::new(0, 0).update(
            [(total(1, vec![t(10, 10), t(11, 10)]), None), (total(2, vec![t(10, 1), t(20, 2)]), None)],
            1_000_000_000,
        );
        let names = names(&[(10, "handler"), (11, "handler"), (20, "main"), (30, "io"), (31, "io")]);
        let groups = by_thread(&rows, &[(7, 10), (7, 30), (7, 31)], &names);
        let got: Vec<_> = groups.iter().map(|b| (b.group.label(), b.group.count, b.rows.len())).collect();
        assert_eq!(got, [("handler x2".to_string(), 21, 2), ("main x1".to_string(), 2, 1), ("io x2".to_string(), 0, 0)]);
        // handler's part of stack 2: thread 10's one block, of the stack's three.
        let handler = &groups[0];
        assert_eq!((handler.rows[1].total.stack_id, handler.rows[1].total.count, handler.whole[1]), (2, 1, (360, 3)));
        assert_eq!(handler.rows[1].total.threads, [t(10, 1)]);
    }
}
