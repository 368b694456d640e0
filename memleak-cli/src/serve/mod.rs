//! `--listen [ADDR:]PORT`: what the last report found, served over HTTP to
//! the engines a fleet already runs (Prometheus scrapes `/metrics`). Each
//! report publishes a [`Snapshot`], rendered once and swapped in whole;
//! a request only clones the current one, so serving never walks a map
//! nor holds up a report.

mod history;
mod http;
mod metrics;

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
};

use hyper::body::Bytes;

pub use http::Server;
pub use metrics::Capacity;

use crate::{
    export::{flamegraph, folded, pprof},
    fasthash::FastMap,
    symbolize::{MappingInfo, StackProfile},
    maps::totals::CombinedAlloc,
    report::{lost::Lost, trend::Row},
};
use memleak_common::CombinedKey;

/// `--listen`'s value: a bare port binds 127.0.0.1 (only this machine can
/// scrape); `ADDR:PORT` binds where it says (`0.0.0.0:9464`, `[::1]:9464`).
pub fn parse_listen(value: &str) -> Result<SocketAddr, String> {
    if let Ok(port) = value.parse::<u16>() {
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    value.parse::<SocketAddr>().map_err(|_| format!("{value}: expected PORT or ADDR:PORT (e.g. 9464, 0.0.0.0:9464, [::1]:9464)"))
}

/// What the server hands out: one report, rendered in every format.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Prometheus text format 0.0.4.
    pub metrics: Bytes,
    /// Gzipped profile.proto, Go's heap profile shown as `inuse_space`
    /// (`/debug/pprof/heap`) and as `alloc_space` (`/debug/pprof/allocs`).
    pub heap: Bytes,
    pub allocs: Bytes,
    /// The report as `--format json` prints it.
    pub report_json: Bytes,
    /// The flame graph of outstanding memory.
    pub flamegraph: Bytes,
    /// The top stacks' outstanding bytes over the run, for the page's chart.
    pub history: Bytes,
}

/// The report being served, swapped whole after each report.
pub type Shared = Arc<Mutex<Arc<Snapshot>>>;

/// Which processes a report covers, as the metrics name them.
pub enum Coverage {
    /// The traced process (-p, -c), shown even with nothing outstanding.
    Process(u32),
    /// System-wide: the `top_procs` with most outstanding bytes by name,
    /// the rest added up into `pid="other"`.
    System { top_procs: usize },
}

/// One finished report, as the reporter has it.
pub struct Report<'a> {
    pub rows: &'a [Row],
    /// Each (process, stack)'s totals since attach, from the kernel.
    pub combined: &'a [(CombinedKey, CombinedAlloc)],
    /// Blocks each process holds, of any age (the `-o` age aside); None
    /// with --combined-only, where `combined` counts them.
    pub live: Option<&'a FastMap<u32, u64>>,
    pub comms: &'a HashMap<u32, String>,
    pub lost: Lost,
    /// Outstanding blocks read (None with --combined-only, which reads none)
    /// and totals entries in use: how full the maps are.
    pub blocks_read: Option<u64>,
    pub totals_used: u64,
    /// Distinct stacks the totals entries name: how full STACKS is.
    pub stacks_used: u64,
    pub duration_s: f64,
}

/// The same report as people and profilers read it: symbolized stacks
/// (at most a thousand, see the reporter) and the JSON report.
pub struct Views<'a> {
    /// Outstanding and since-attach blocks and bytes, symbolized.
    pub stacks: &'a [StackProfile],
    /// The report as `--format json` prints it.
    pub json: Vec<u8>,
    pub meta: pprof::Meta,
    /// Since attach, at this report.
    pub elapsed_ns: u64,
}

/// The reporter's end: renders each report into a new snapshot.
pub struct Feed {
    shared: Shared,
    coverage: Coverage,
    capacity: Capacity,
    probes: Arc<AtomicUsize>,
    counters: metrics::Counters,
    history: history::History,
}

impl Feed {
    pub fn new(shared: Shared, coverage: Coverage, capacity: Capacity, probes: Arc<AtomicUsize>) -> Self {
        let (counters, history) = Default::default();
        Self { shared, coverage, capacity, probes, counters, history }
    }

    /// Renders `report` in every served form and swaps it in whole.
    /// `mapping` tells which file mapping of a process holds an address.
    pub fn publish(&mut self, report: &Report<'_>, views: Views<'_>, mapping: &mut dyn FnMut(u32, u64) -> Option<MappingInfo>) {
        let probes = self.probes.load(Ordering::Relaxed);
        let text = metrics::render(report, &self.coverage, self.capacity, probes, &mut self.counters);
        let mut comm = |pid: u32| report.comms.get(&pid).cloned();
        let mut profile = |allocated_first| {
            let values = pprof::Values::Heap { allocated_first };
            let profile = pprof::build(views.stacks, values, mapping, &mut comm, views.meta);
            // Into memory: only a failed allocation could fail, and that aborts.
            pprof::encode_gzip(&profile).unwrap_or_default()
        };
        let (heap, allocs) = (profile(false), profile(true));
        let lines = folded::lines(views.stacks);
        let title = format!("{:.1} s after attach", views.elapsed_ns as f64 / 1e9);
        let flamegraph = flamegraph::svg(&lines, &title).unwrap_or_else(|e| {
            eprintln!("memleak: warning: --listen: no flame graph for this report: {e}");
            Vec::new()
        });
        self.history.add(views.elapsed_ns, views.stacks);
        let snapshot = Arc::new(Snapshot {
            metrics: text.into(),
            heap: heap.into(),
            allocs: allocs.into(),
            report_json: views.json.into(),
            flamegraph: flamegraph.into(),
            history: self.history.json().into(),
        });
        *self.shared.lock().unwrap_or_else(|e| e.into_inner()) = snapshot;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses() {
        assert_eq!(parse_listen("9464").unwrap(), "127.0.0.1:9464".parse().unwrap());
        assert_eq!(parse_listen("0.0.0.0:80").unwrap(), "0.0.0.0:80".parse().unwrap());
        assert_eq!(parse_listen("[::1]:9464").unwrap(), "[::1]:9464".parse().unwrap());
        for bad in ["", "x", "70000", "localhost", "1.2.3.4", ":80"] {
            assert!(parse_listen(bad).is_err(), "{bad}");
        }
    }
}
