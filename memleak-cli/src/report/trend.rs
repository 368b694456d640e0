//! Leak or cache? How each stack's outstanding memory moves from report to
//! report: change since the last report, growth rate over the run, age of
//! its oldest block, allocations and frees seen, and whether it rose at
//! every report (`growing`). Pure: it gets totals and times, keeps what the
//! next report needs.

use memleak_common::Kind;

use crate::{fasthash::FastMap, report::aggregate::StackTotal};

/// (process, stack).
/// (process, stack, kind): what a row is.
pub type Key = (u32, u64, Kind);

/// How a stack's outstanding memory moves.
#[derive(Debug, Clone, PartialEq)]
pub struct Trend {
    /// Outstanding bytes now minus at the previous report (0 there if the
    /// stack was not in it).
    pub change_bytes: i64,
    /// Outstanding bytes gained per second over the run: nothing was
    /// outstanding at attach, so bytes now / seconds traced. None before any
    /// time has passed.
    pub rate_bytes_per_s: Option<f64>,
    /// Age of the stack's oldest outstanding block (None with
    /// --combined-only, which reads no block).
    pub oldest_age_ns: Option<u64>,
    /// Blocks this stack allocated since attach, of any age (None if the
    /// kernel's per-stack totals miss it: map full).
    pub allocs: Option<u64>,
    /// How many of those were freed since.
    pub frees: Option<u64>,
    /// Consecutive reports this stack has been in, this one included.
    pub reports: u32,
    /// Its outstanding bytes rose at every report since it appeared, over
    /// at least two reports.
    pub growing: bool,
}

/// One stack of a report, with its trend.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub total: StackTotal,
    pub trend: Trend,
}

struct Seen {
    bytes: u64,
    reports: u32,
    rising: bool,
    /// The report that saw it last (`Tracker::reports`).
    seen_in: u32,
}

/// Remembers each stack's last report.
pub struct Tracker {
    start_ns: u64,
    /// Blocks younger than this are left out of the totals (`-o`): the
    /// totals cover the run up to this long ago.
    lag_ns: u64,
    last: FastMap<Key, Seen>,
    /// Reports made.
    reports: u32,
}

impl Tracker {
    /// `start_ns`: CLOCK_MONOTONIC at attach.
    pub fn new(start_ns: u64, lag_ns: u64) -> Self {
        Self { start_ns, lag_ns, last: FastMap::default(), reports: 0 }
    }

    /// Seconds of the run the totals of a report at `now_ns` cover.
    pub fn span_s(&self, now_ns: u64) -> f64 {
        now_ns.saturating_sub(self.start_ns).saturating_sub(self.lag_ns) as f64 / 1e9
    }

    /// This report's trends, of each stack's total and its allocations
    /// since attach as the kernel counted them (None if its totals missed
    /// them: map full).
    pub fn update(&mut self, totals: impl IntoIterator<Item = (StackTotal, Option<u64>)>, now_ns: u64) -> Vec<Row> {
        let span = self.span_s(now_ns);
        self.reports = self.reports.wrapping_add(1);
        let this = self.reports;
        // Updated in place, not built anew: at 10,000 stacks a new map was
        // 0.5 MiB of new pages at every report.
        let rows = totals
            .into_iter()
            .map(|(total, allocs)| {
                let key = (total.tgid, total.stack_id, total.kind);
                let seen = self.last.entry(key).or_insert(Seen { bytes: 0, reports: 0, rising: false, seen_in: 0 });
                // A stack missing from the last report starts over.
                let (before, reports, rising) = match seen.seen_in == this.wrapping_sub(1) && seen.reports > 0 {
                    true => (seen.bytes, seen.reports + 1, seen.rising && total.bytes > seen.bytes),
                    // Appearing is rising from nothing.
                    false => (0, 1, total.bytes > 0),
                };
                *seen = Seen { bytes: total.bytes, reports, rising, seen_in: this };
                let trend = Trend {
                    change_bytes: total.bytes as i64 - before as i64,
                    rate_bytes_per_s: (span > 0.0).then(|| total.bytes as f64 / span),
                    oldest_age_ns: total.oldest_ns.map(|t| now_ns.saturating_sub(t)),
                    allocs,
                    frees: allocs.map(|a| a.saturating_sub(total.live)),
                    reports,
                    growing: rising && reports >= 2,
                };
                Row { total, trend }
            })
            .collect();
        // A stack missing from this report starts over if it comes back.
        self.last.retain(|_, seen| seen.seen_in == this);
        // Not the size of the busiest report for ever after (system-wide,
        // a build's compilers come and go).
        if self.last.capacity() > 4 * self.last.len().max(1024) {
            self.last.shrink_to_fit();
        }
        rows
    }
}

/// `1.5s`, `4m05s`, `2h03m`.
pub fn duration(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match s {
        0..60 => format!("{:.1}s", ns as f64 / 1e9),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

impl Trend {
    /// The compact form on a text report's stack line:
    /// `(+16384 B since last, 8192 B/s, oldest 2.1s, 5 allocs/0 frees, growing)`.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!("{:+} B since last", self.change_bytes)];
        if let Some(rate) = self.rate_bytes_per_s {
            parts.push(format!("{rate:.0} B/s"));
        }
        if let Some(age) = self.oldest_age_ns {
            parts.push(format!("oldest {}", duration(age)));
        }
        if let (Some(allocs), Some(frees)) = (self.allocs, self.frees) {
            parts.push(format!("{allocs} allocs/{frees} frees"));
        }
        if self.growing {
            parts.push("growing".into());
        }
        format!("({})", parts.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn total(stack_id: u64, bytes: u64, oldest_ns: Option<u64>) -> StackTotal {
        StackTotal { tgid: 7, stack_id, bytes, count: bytes / 8192, live: bytes / 8192 + 2, oldest_ns, ..Default::default() }
    }

    fn growing_at_each_report(series: &[&[(u64, u64)]]) -> Vec<Vec<(u64, bool)>> {
        let mut tracker = Tracker::new(0, 0);
        series
            .iter()
            .enumerate()
            .map(|(i, report)| {
                let totals = report.iter().map(|&(id, b)| (total(id, b, None), None));
                let rows = tracker.update(totals, (i as u64 + 1) * S);
                rows.iter().map(|r| (r.total.stack_id, r.trend.growing)).collect()
            })
            .collect()
    }

    #[test]
    fn change_rate_age_and_counts() {
        let mut tracker = Tracker::new(10 * S, S / 2);
        // 3 blocks old enough, 2 younger: 4 of 9 freed.
        let rows = tracker.update([(total(1, 24576, Some(11 * S)), Some(9))], 12 * S);
        let t = &rows[0].trend;
        assert_eq!(t.change_bytes, 24576);
        // 1.5 s of the run covered (2 s traced, the last 0.5 s left out).
        assert_eq!(t.rate_bytes_per_s, Some(16384.0));
        assert_eq!(t.oldest_age_ns, Some(S));
        assert_eq!((t.allocs, t.frees), (Some(9), Some(4)));
        assert_eq!((t.reports, t.growing), (1, false));

        let rows = tracker.update([(total(1, 16384, Some(11 * S)), None)], 13 * S);
        let t = &rows[0].trend;
        assert_eq!(t.change_bytes, -8192);
        assert_eq!((t.allocs, t.frees), (None, None), "not in the kernel's totals: unknown, not 0");
        assert_eq!(t.reports, 2);
    }

    #[test]
    fn no_rate_before_time_has_passed() {
        let mut tracker = Tracker::new(5 * S, S);
        let rows = tracker.update([(total(1, 10, None), None)], 5 * S + S / 2);
        assert_eq!(rows[0].trend.rate_bytes_per_s, None);
    }

    #[test]
    fn growing_means_rising_at_every_report_since_it_appeared() {
        let g = growing_at_each_report(&[
            &[(1, 8192), (2, 8192)],
            &[(1, 16384), (2, 8192), (3, 100)],
            &[(1, 24576), (2, 16384), (3, 200)],
            &[(1, 32768), (3, 300)],
            &[(1, 40960), (2, 24576), (3, 300)],
        ]);
        assert_eq!(g[0], [(1, false), (2, false)], "one report is no trend");
        assert_eq!(g[1], [(1, true), (2, false), (3, false)]);
        assert_eq!(g[2], [(1, true), (2, false), (3, true)], "a stack that appeared later counts from then");
        assert_eq!(g[3], [(1, true), (3, true)]);
        assert_eq!(g[4], [(1, true), (2, false), (3, false)], "gone and back starts over; flat is not rising");
    }

    #[test]
    fn a_cache_that_fills_then_holds_is_not_growing() {
        let g = growing_at_each_report(&[&[(1, 4096)], &[(1, 8192)], &[(1, 8192)], &[(1, 12288)]]);
        assert_eq!(g.iter().map(|r| r[0].1).collect::<Vec<_>>(), [false, true, false, false]);
    }

    #[test]
    fn the_last_reports_map_shrinks_when_its_stacks_go() {
        let mut tracker = Tracker::new(0, 0);
        tracker.update((0..20_000).map(|id| (total(id, 8192, None), None)), S);
        assert!(tracker.last.capacity() >= 20_000);
        let rows = tracker.update([(total(7, 16384, None), None)], 2 * S);
        assert_eq!((rows[0].trend.reports, rows[0].trend.change_bytes), (2, 8192));
        assert_eq!(tracker.last.len(), 1);
        assert!(tracker.last.capacity() < 4096, "{}", tracker.last.capacity());
    }

    #[test]
    fn summaries() {
        let t = Trend {
            change_bytes: 16384,
            rate_bytes_per_s: Some(8191.6),
            oldest_age_ns: Some(2_100_000_000),
            allocs: Some(5),
            frees: Some(0),
            reports: 3,
            growing: true,
        };
        assert_eq!(t.summary(), "(+16384 B since last, 8192 B/s, oldest 2.1s, 5 allocs/0 frees, growing)");
        let t = Trend { change_bytes: -8192, rate_bytes_per_s: None, oldest_age_ns: None, allocs: None,
                        frees: None, reports: 1, growing: false };
        assert_eq!(t.summary(), "(-8192 B since last)");
        let t = Trend { change_bytes: 0, ..t };
        assert_eq!(t.summary(), "(+0 B since last)");
    }

    #[test]
    fn durations() {
        assert_eq!(duration(0), "0.0s");
        assert_eq!(duration(2_149_000_000), "2.1s");
        assert_eq!(duration(245 * S), "4m05s");
        assert_eq!(duration(7380 * S), "2h03m");
    }
}
