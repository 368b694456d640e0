//! The page's chart: the outstanding bytes of the top stacks at each
//! report, for the last [`POINTS`] reports. Bounded whatever the run's
//! length: at most `POINTS * KEPT` numbers and their names.

use std::{
    collections::{HashMap, VecDeque},
    hash::{Hash as _, Hasher as _},
};

use crate::{export::folded, symbolize::StackProfile};

/// Reports kept: an hour at the default 5 s interval.
const POINTS: usize = 720;
/// Stacks kept per report, by outstanding bytes.
const KEPT: usize = 20;
/// Stacks charted: the top of the last report.
const CHARTED: usize = 8;

/// A stack: its process and frames, hashed (a collision would only join
/// two lines of a chart).
type Key = u64;

#[derive(Default)]
pub struct History {
    /// Seconds since attach, and the kept stacks' bytes, per report.
    points: VecDeque<(f64, Vec<(Key, u64)>)>,
    /// Each kept stack's process and name, while a point holds it.
    names: HashMap<Key, (u32, String)>,
}

impl History {
    pub fn add(&mut self, elapsed_ns: u64, stacks: &[StackProfile]) {
        let mut top: Vec<&StackProfile> = stacks.iter().filter(|s| s.bytes > 0).collect();
        top.sort_unstable_by_key(|s| std::cmp::Reverse(s.bytes));
        top.truncate(KEPT);
        let mut kept = Vec::with_capacity(top.len());
        for stack in top {
            let key = key(stack);
            self.names.entry(key).or_insert_with(|| (stack.tgid, name(stack)));
            kept.push((key, stack.bytes));
        }
        self.points.push_back((elapsed_ns as f64 / 1e9, kept));
        if self.points.len() > POINTS {
            self.points.pop_front();
            let held: std::collections::HashSet<Key> = self.points.iter().flat_map(|(_, p)| p.iter().map(|(k, _)| *k)).collect();
            self.names.retain(|k, _| held.contains(k));
        }
    }

    /// `{"elapsed_s": [..], "series": [{"pid", "name", "bytes": [.. or null]}]}`:
    /// the last report's top stacks, each over every report kept (null
    /// where it was not among a report's top).
    pub fn json(&self) -> Vec<u8> {
        let elapsed: Vec<f64> = self.points.iter().map(|(t, _)| *t).collect();
        let last = self.points.back().map(|(_, p)| p.as_slice()).unwrap_or_default();
        let series: Vec<serde_json::Value> = last
            .iter()
            .take(CHARTED)
            .map(|(key, _)| {
                let bytes: Vec<Option<u64>> =
                    self.points.iter().map(|(_, p)| p.iter().find(|(k, _)| k == key).map(|(_, b)| *b)).collect();
                let (pid, name) = self.names.get(key).cloned().unwrap_or_default();
                serde_json::json!({ "pid": pid, "name": name, "bytes": bytes })
            })
            .collect();
        serde_json::to_vec(&serde_json::json!({ "elapsed_s": elapsed, "series": series })).unwrap_or_default()
    }
}

fn key(stack: &StackProfile) -> Key {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    stack.tgid.hash(&mut h);
    for f in &stack.frames {
        (f.addr, &f.end).hash(&mut h);
    }
    h.finish()
}

/// The innermost three functions, innermost first: `leak <- handle <- main`.
fn name(stack: &StackProfile) -> String {
    let names = folded::names(&stack.frames);
    names.iter().rev().take(3).cloned().collect::<Vec<_>>().join(" <- ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::symbolize::Frame;

    fn stack(tgid: u32, bytes: u64, leaf: &str, addr: u64) -> StackProfile {
        let frame = |addr, name: &str| Frame {
            addr,
            symbol: Some((name.into(), 0)),
            module: None,
            source: None,
            inlined: vec![],
            end: None,
        };
        StackProfile { tgid, bytes, count: 1, frames: vec![frame(addr, leaf), frame(9, "main")], ..Default::default() }
    }

    #[test]
    fn each_top_stack_over_the_reports_kept() {
        let mut h = History::default();
        h.add(1_000_000_000, &[stack(7, 100, "grow", 1), stack(7, 50, "flat", 2)]);
        h.add(2_000_000_000, &[stack(7, 50, "flat", 2)]);
        h.add(3_000_000_000, &[stack(7, 300, "grow", 1), stack(7, 50, "flat", 2), stack(7, 0, "freed", 3)]);
        let v: serde_json::Value = serde_json::from_slice(&h.json()).unwrap();
        assert_eq!(v["elapsed_s"], serde_json::json!([1.0, 2.0, 3.0]));
        assert_eq!(v["series"][0], serde_json::json!({"pid": 7, "name": "grow <- main", "bytes": [100, null, 300]}));
        assert_eq!(v["series"][1]["bytes"], serde_json::json!([50, 50, 50]));
        assert_eq!(v["series"].as_array().unwrap().len(), 2, "no series for a stack holding nothing");
    }

    #[test]
    fn bounded_in_reports_and_names() {
        let mut h = History::default();
        for i in 0..(POINTS as u64 + 50) {
            h.add(i, &[stack(1, 10, "a", 1000 + i)]);
        }
        assert_eq!(h.points.len(), POINTS);
        assert_eq!(h.names.len(), POINTS, "names of stacks no point holds are let go");
    }
}
