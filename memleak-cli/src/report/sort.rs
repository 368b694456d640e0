//! `--sort`: the order of the stacks in a report (and so which are the top N).

use std::cmp::Ordering;

use crate::report::trend::Row;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum SortKey {
    /// Most outstanding bytes first (bcc's order).
    #[default]
    Size,
    /// Most outstanding allocations first.
    Count,
    /// Biggest rise since the previous report first.
    Growth,
    /// Oldest outstanding allocation first.
    Age,
}

impl SortKey {
    pub fn name(self) -> &'static str {
        match self {
            Self::Size => "size",
            Self::Count => "count",
            Self::Growth => "growth",
            Self::Age => "age",
        }
    }
}

/// Sorts `rows` by `key`, biggest first, the heap before direct mappings
/// (a program's mapped files and thread stacks are not what a leak hunt
/// looks for first: see the README); ties go to the bigger stack, then to
/// the lower (process, stack id), so the order is stable across reports.
pub fn sort(rows: &mut [Row], key: SortKey) {
    let size = |r: &Row| (r.total.bytes, r.total.count);
    rows.sort_unstable_by(|a, b| {
        let part = a.total.kind.is_mapping().cmp(&b.total.kind.is_mapping());
        let first = match key {
            SortKey::Size => Ordering::Equal,
            SortKey::Count => b.total.count.cmp(&a.total.count),
            SortKey::Growth => b.trend.change_bytes.cmp(&a.trend.change_bytes),
            // Unknown ages (--combined-only) last.
            SortKey::Age => b.trend.oldest_age_ns.cmp(&a.trend.oldest_age_ns),
        };
        part.then(first)
            .then_with(|| size(b).cmp(&size(a)))
            .then_with(|| (a.total.tgid, a.total.stack_id, a.total.kind).cmp(&(b.total.tgid, b.total.stack_id, b.total.kind)))
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{report::aggregate::StackTotal, report::trend::Trend};

    fn row(stack_id: u64, bytes: u64, count: u64, change: i64, age: Option<u64>) -> Row {
        Row {
            total: StackTotal { tgid: 1, stack_id, bytes, count, live: count, ..Default::default() },
            trend: Trend {
                change_bytes: change,
                rate_bytes_per_s: None,
                oldest_age_ns: age,
                allocs: None,
                frees: None,
                reports: 1,
                growing: false,
            },
        }
    }

    fn order(key: SortKey) -> Vec<u64> {
        let mut rows = vec![
            row(1, 100, 1, 0, Some(50)),
            row(2, 300, 3, 10, Some(10)),
            row(3, 200, 20, 200, None),
            row(4, 200, 20, 200, Some(90)),
            row(5, 50, 2, -40, Some(10)),
        ];
        sort(&mut rows, key);
        rows.iter().map(|r| r.total.stack_id).collect()
    }

    #[test]
    fn each_key_orders_biggest_first_with_stable_ties() {
        assert_eq!(order(SortKey::Size), [2, 3, 4, 1, 5]);
        assert_eq!(order(SortKey::Count), [3, 4, 2, 5, 1]);
        assert_eq!(order(SortKey::Growth), [3, 4, 2, 1, 5]);
        assert_eq!(order(SortKey::Age), [4, 1, 2, 5, 3]);
    }

    #[test]
    fn default_is_size() {
        assert_eq!(SortKey::default(), SortKey::Size);
        assert_eq!(SortKey::Growth.name(), "growth");
    }
}
