//! `--listen [ADDR:]PORT`: what the last report found, served over HTTP to
//! the engines a fleet already runs (Prometheus scrapes `/metrics`). Each
//! report publishes a [`Snapshot`], rendered once and swapped in whole;
//! a request only clones the current one, so serving never walks a map
//! nor holds up a report.

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
    fasthash::FastMap,
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
    pub duration_s: f64,
}

/// The reporter's end: renders each report into a new snapshot.
pub struct Feed {
    shared: Shared,
    coverage: Coverage,
    capacity: Capacity,
    probes: Arc<AtomicUsize>,
    counters: metrics::Counters,
}

impl Feed {
    pub fn new(shared: Shared, coverage: Coverage, capacity: Capacity, probes: Arc<AtomicUsize>) -> Self {
        Self { shared, coverage, capacity, probes, counters: metrics::Counters::default() }
    }

    pub fn publish(&mut self, report: &Report<'_>) {
        let probes = self.probes.load(Ordering::Relaxed);
        let text = metrics::render(report, &self.coverage, self.capacity, probes, &mut self.counters);
        let snapshot = Arc::new(Snapshot { metrics: text.into() });
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
