//! `/metrics`: a report as Prometheus series, in the classic text format
//! (0.0.4) that Prometheus scrapes and `promtool check metrics` reads.
//! Series are per process, never per stack: a stack as a label would make
//! one series per call path, without bound.

use std::collections::HashMap;

use memleak_common::{KERNEL_PAGES, KERNEL_PERCPU, KERNEL_SLAB, is_kernel};
use prometheus::{Encoder as _, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

use super::{Coverage, Report};
use crate::fasthash::FastMap;

/// How big the kernel maps are, for their fill ratios.
#[derive(Debug, Clone, Copy)]
pub struct Capacity {
    /// `--max-allocs`.
    pub blocks: u64,
    /// Entries of the per-stack totals.
    pub totals: u64,
    /// `--max-stacks`.
    pub stacks: u64,
}

/// The counters last published per process: a counter must never go down
/// (Prometheus takes a drop for a restart), and frees are allocations less
/// the blocks still live, read a moment apart from them.
#[derive(Default)]
pub struct Counters {
    /// Allocations, frees, allocated bytes.
    last: FastMap<u32, (u64, u64, u64)>,
}

/// The labels of a process's series: `pid`, `comm`, and the kernel's
/// allocator as `pool` (`comm="kernel"`).
fn labels(tgid: u32, comms: &HashMap<u32, String>) -> [String; 3] {
    let pool = match tgid {
        KERNEL_SLAB => "slab",
        KERNEL_PAGES => "pages",
        KERNEL_PERCPU => "percpu",
        _ => "",
    };
    if is_kernel(tgid) {
        return [String::new(), "kernel".into(), pool.into()];
    }
    [tgid.to_string(), comms.get(&tgid).cloned().unwrap_or_default(), String::new()]
}

fn gauge(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("a valid metric name");
    registry.register(Box::new(vec.clone())).expect("registered once");
    vec
}

fn counter(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("a valid metric name");
    registry.register(Box::new(vec.clone())).expect("registered once");
    vec
}

/// The text of `/metrics` for `report`; `probes`: probes attached now.
pub fn render(report: &Report<'_>, coverage: &Coverage, capacity: Capacity, probes: usize, counters: &mut Counters) -> String {
    const PROC: &[&str] = &["pid", "comm", "pool"];
    let registry = Registry::new();
    let bytes = gauge(&registry, "memleak_outstanding_bytes", "Bytes allocated and not freed, in blocks older than -o.", PROC);
    let blocks = gauge(&registry, "memleak_outstanding_allocations", "Blocks allocated and not freed, older than -o.", PROC);
    let allocs = counter(&registry, "memleak_allocations_total", "Allocations recorded since attach.", PROC);
    let frees = counter(&registry, "memleak_frees_total", "Frees of recorded allocations since attach.", PROC);
    let allocated = counter(&registry, "memleak_allocated_bytes_total", "Bytes of the allocations recorded since attach.", PROC);

    let mut outstanding: FastMap<u32, (u64, u64)> = FastMap::default();
    for row in report.rows {
        let o = outstanding.entry(row.total.tgid).or_default();
        o.0 += row.total.bytes;
        o.1 += row.total.count;
    }
    let named: Vec<u32> = match *coverage {
        Coverage::Process(pid) => vec![pid],
        Coverage::System { top_procs } => {
            let mut users: Vec<(u32, u64)> =
                outstanding.iter().filter(|(t, _)| !is_kernel(**t)).map(|(&t, &(b, _))| (t, b)).collect();
            users.sort_unstable_by_key(|&(t, b)| (std::cmp::Reverse(b), t));
            let mut named: Vec<u32> = users.iter().take(top_procs).map(|&(t, _)| t).collect();
            named.extend([KERNEL_SLAB, KERNEL_PAGES, KERNEL_PERCPU].into_iter().filter(|t| outstanding.contains_key(t)));
            named
        }
    };
    for &tgid in &named {
        let (b, n) = outstanding.get(&tgid).copied().unwrap_or_default();
        let l = labels(tgid, report.comms);
        let l: Vec<&str> = l.iter().map(String::as_str).collect();
        bytes.with_label_values(&l).set(b as i64);
        blocks.with_label_values(&l).set(n as i64);
    }
    if let Coverage::System { .. } = coverage {
        // Everything else in one series each, so the count of series stays
        // at --top-procs + 4 however many processes allocate.
        let (b, n) = outstanding
            .iter()
            .filter(|(t, _)| !named.contains(t))
            .fold((0, 0), |(b, n), (_, &(b2, n2))| (b + b2, n + n2));
        bytes.with_label_values(&["other", "", ""]).set(b as i64);
        blocks.with_label_values(&["other", "", ""]).set(n as i64);
    }

    // Since attach, per named process: the kernel's per-stack counts added
    // up. (Not for "other": a sum over whichever processes are not named
    // this time is no counter.)
    let mut since: FastMap<u32, (u64, u64, u64)> = FastMap::default();
    for (key, c) in report.combined {
        let s = since.entry(key.tgid).or_default();
        s.0 += c.allocs;
        s.1 += c.count;
        s.2 += c.allocated;
    }
    let mut last = FastMap::default();
    for &tgid in &named {
        let Some(&(total, counted, bytes)) = since.get(&tgid) else { continue };
        // Without --combined-only the kernel counts no frees: a block
        // allocated and not freed is live, so frees are allocations less
        // live blocks.
        let live = report.live.map_or(counted, |live| live.get(&tgid).copied().unwrap_or(0));
        let before = counters.last.get(&tgid).copied().unwrap_or_default();
        let now = (total.max(before.0), total.saturating_sub(live).max(before.1), bytes.max(before.2));
        let l = labels(tgid, report.comms);
        let l: Vec<&str> = l.iter().map(String::as_str).collect();
        allocs.with_label_values(&l).inc_by(now.0);
        frees.with_label_values(&l).inc_by(now.1);
        allocated.with_label_values(&l).inc_by(now.2);
        last.insert(tgid, now);
    }
    // Processes not named this time keep theirs, while the kernel has them.
    for (tgid, values) in counters.last.drain() {
        if since.contains_key(&tgid) {
            last.entry(tgid).or_insert(values);
        }
    }
    counters.last = last;

    let lost = counter(&registry, "memleak_lost_events_total", "What the kernel side could not record since attach.", &["reason"]);
    let l = &report.lost;
    for (reason, n) in [
        ("allocation_map_full", l.allocations_untracked),
        ("stack_map_full", l.stacks_unrecorded),
        ("totals_map_full", l.totals_missed),
        ("call_not_followed", l.calls_unfollowed),
        ("mapping_not_followed", l.mappings_unfollowed),
        ("unwind_table_left_out", l.frames_without_table),
    ] {
        lost.with_label_values(&[reason]).inc_by(n);
    }
    let fill = prometheus::GaugeVec::new(
        Opts::new("memleak_map_fill_ratio", "How full each kernel map was at the last report (1: full, events lost)."),
        &["map"],
    )
    .expect("a valid metric name");
    registry.register(Box::new(fill.clone())).expect("registered once");
    if let Some(read) = report.blocks_read {
        fill.with_label_values(&["allocations"]).set(read as f64 / capacity.blocks.max(1) as f64);
    }
    fill.with_label_values(&["totals"]).set(report.totals_used as f64 / capacity.totals.max(1) as f64);
    fill.with_label_values(&["stacks"]).set(report.stacks_used as f64 / capacity.stacks.max(1) as f64);
    let duration = prometheus::Gauge::new("memleak_report_duration_seconds", "How long the last report took.")
        .expect("a valid metric name");
    registry.register(Box::new(duration.clone())).expect("registered once");
    duration.set(report.duration_s);
    let attached = prometheus::IntGauge::new("memleak_attached_probes", "Probes attached now.").expect("a valid metric name");
    registry.register(Box::new(attached.clone())).expect("registered once");
    attached.set(probes as i64);

    let mut out = Vec::new();
    TextEncoder::new().encode(&registry.gather(), &mut out).expect("metrics encode to memory");
    String::from_utf8(out).expect("the text format is UTF-8")
}

#[cfg(test)]
mod tests {
    use memleak_common::CombinedKey;

    use super::*;
    use crate::{
        maps::totals::CombinedAlloc,
        report::{
            aggregate::StackTotal,
            lost::Lost,
            trend::{Row, Trend},
        },
    };

    fn row(tgid: u32, bytes: u64, count: u64) -> Row {
        let total = StackTotal { tgid, stack_id: 1, bytes, count, live: count, ..Default::default() };
        let trend = Trend { change_bytes: 0, rate_bytes_per_s: None, oldest_age_ns: None, allocs: None, frees: None,
                            reports: 1, growing: false };
        Row { total, trend }
    }

    fn combined(tgid: u32, allocs: u64) -> (CombinedKey, CombinedAlloc) {
        (CombinedKey { tgid, stack_id: 1, ..Default::default() }, CombinedAlloc { total_size: 0, count: allocs, allocs, allocated: allocs * 100 })
    }

    fn system(rows: &[Row], combined: &[(CombinedKey, CombinedAlloc)], live: &FastMap<u32, u64>, counters: &mut Counters) -> String {
        let comms = HashMap::from([(10, "big".to_string()), (20, "small".to_string()), (30, "tiny".to_string())]);
        let report = Report {
            rows,
            combined,
            live: Some(live),
            comms: &comms,
            lost: Lost { allocations_untracked: 3, ..Lost::default() },
            blocks_read: Some(50),
            totals_used: 25,
            stacks_used: 10,
            duration_s: 0.5,
        };
        render(&report, &Coverage::System { top_procs: 2 }, Capacity { blocks: 100, totals: 100, stacks: 40 }, 7, counters)
    }

    #[test]
    fn top_processes_by_name_the_rest_as_other_the_kernel_by_pool() {
        let rows = [row(10, 5000, 5), row(20, 300, 3), row(30, 20, 2), row(40, 10, 1), row(KERNEL_SLAB, 64, 1)];
        let live = FastMap::from_iter([(10, 6), (20, 3), (30, 2), (40, 1), (KERNEL_SLAB, 1)]);
        let text = system(&rows, &[combined(10, 9), combined(30, 2)], &live, &mut Counters::default());
        for line in [
            "memleak_outstanding_bytes{comm=\"big\",pid=\"10\",pool=\"\"} 5000",
            "memleak_outstanding_bytes{comm=\"small\",pid=\"20\",pool=\"\"} 300",
            "memleak_outstanding_bytes{comm=\"\",pid=\"other\",pool=\"\"} 30",
            "memleak_outstanding_allocations{comm=\"\",pid=\"other\",pool=\"\"} 3",
            "memleak_outstanding_bytes{comm=\"kernel\",pid=\"\",pool=\"slab\"} 64",
            "memleak_allocations_total{comm=\"big\",pid=\"10\",pool=\"\"} 9",
            "memleak_frees_total{comm=\"big\",pid=\"10\",pool=\"\"} 3",
            "memleak_allocated_bytes_total{comm=\"big\",pid=\"10\",pool=\"\"} 900",
            "memleak_lost_events_total{reason=\"allocation_map_full\"} 3",
            "memleak_map_fill_ratio{map=\"allocations\"} 0.5",
            "memleak_map_fill_ratio{map=\"totals\"} 0.25",
            "memleak_map_fill_ratio{map=\"stacks\"} 0.25",
            "memleak_attached_probes 7",
            "memleak_report_duration_seconds 0.5",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }
        assert!(!text.contains("tiny"), "not in the top 2: in other only");
        assert!(text.contains("# TYPE memleak_allocations_total counter"));
    }

    #[test]
    fn counters_never_go_down() {
        let mut counters = Counters::default();
        let rows = [row(10, 5000, 5)];
        system(&rows, &[combined(10, 9)], &FastMap::from_iter([(10, 6)]), &mut counters);
        // A block allocated after the blocks were read, before the totals:
        // live lags, frees would read 9 - 5 = 4, then 3.
        system(&rows, &[combined(10, 10)], &FastMap::from_iter([(10, 5)]), &mut counters);
        let text = system(&rows, &[combined(10, 10)], &FastMap::from_iter([(10, 7)]), &mut counters);
        assert!(text.contains("memleak_frees_total{comm=\"big\",pid=\"10\",pool=\"\"} 5\n"), "{text}");
    }
}
