//! What the kernel side lost: a report's line about it, and warnings as
//! it grows.

use memleak_common::{STAT_COUNT, Stat};

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
    /// Frames walked by frame pointers: their object's unwind table did
    /// not fit (`--unwind-memory`).
    pub frames_without_table: u64,
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
            frames_without_table: at(Stat::UnwindLeftOut),
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
            (self.frames_without_table, "frames walked by frame pointers (unwind table did not fit, raise --unwind-memory)"),
        ]
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, what)| format!("{n} {what}"))
        .collect();
        (!parts.is_empty()).then(|| format!("lost since attach: {}", parts.join(", ")))
    }
}

/// A kind of loss is told again at most this often: a busy system can lose
/// events at every interval, and one line a minute says so as well.
const REPEAT_NS: u64 = 60_000_000_000;

/// What the kernel side lost, told as it grows: the first time at once,
/// then at most once a minute per kind, with what was lost meanwhile.
pub struct LostWarnings {
    /// The counters as last told, and when (CLOCK_MONOTONIC).
    told: Vec<u64>,
    told_ns: Vec<Option<u64>>,
}

impl LostWarnings {
    /// The maps are new: everything counted from now on counts.
    pub fn new() -> Self {
        Self { told: vec![0; STAT_COUNT as usize], told_ns: vec![None; STAT_COUNT as usize] }
    }

    /// The warnings due at `now_ns`, given the counters now.
    pub fn due(&mut self, counts: &[u64], now_ns: u64) -> Vec<String> {
        self.tell(counts, now_ns, |last| now_ns.saturating_sub(last) >= REPEAT_NS)
    }

    /// Every loss not told yet (at exit).
    pub fn rest(&mut self, counts: &[u64], now_ns: u64) -> Vec<String> {
        self.tell(counts, now_ns, |_| true)
    }

    /// One line per counter that grew since told, if `again` allows a
    /// counter told before.
    fn tell(&mut self, counts: &[u64], now_ns: u64, again: impl Fn(u64) -> bool) -> Vec<String> {
        let mut lines = Vec::new();
        for stat in Stat::ALL {
            let (i, n) = (stat as usize, counts.get(stat as usize).copied().unwrap_or(0));
            let grown = n.saturating_sub(self.told[i]);
            if grown == 0 || !self.told_ns[i].is_none_or(&again) {
                continue;
            }
            lines.push(match self.told_ns[i] {
                None => format!("warning: {grown} {}", lost_what(stat)),
                Some(last) => {
                    let s = now_ns.saturating_sub(last).div_ceil(1_000_000_000);
                    format!("warning: in the last {s} s, {grown} more {}", lost_what(stat))
                }
            });
            self.told[i] = n;
            self.told_ns[i] = Some(now_ns);
        }
        lines
    }
}

/// What a STATS counter counts, and what to do about it.
fn lost_what(stat: Stat) -> &'static str {
    match stat {
        Stat::AllocMapFull => "allocations not tracked (allocation map full, raise --max-allocs)",
        Stat::StackLost => "allocations recorded without a stack (stack map full, raise --max-stacks)",
        Stat::CombinedMapFull => {
            "allocations missing from the per-stack totals, and so without a stack (totals full, raise --max-stacks)"
        }
        Stat::UnwindLeftOut => {
            "frames walked by frame pointers, their object's unwind table not fitting (raise --unwind-memory): stacks through them may stop short"
        }
        Stat::RegionsFull => {
            "mmap'd blocks not followed for a partial munmap (more than 32 live mappings in a process): if unmapped past their head, their rest stays counted"
        }
        Stat::PendingMapFull => "allocator calls not followed (no kernel memory to note a thread's call)",
    }
}

#[cfg(test)]
mod tests {
    use memleak_common::MAX_REGIONS;

    use super::*;

    #[test]
    fn warns_only_about_growth() {
        let mut w = LostWarnings::new();
        assert!(w.due(&[0, 0, 0, 0, 0], 1).is_empty());
        assert_eq!(
            w.due(&[1234, 0, 0, 0, 0], 2),
            ["warning: 1234 allocations not tracked (allocation map full, raise --max-allocs)"]
        );
        let lines = w.due(&[1234, 2, 0, 5, 1], 3);
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("warning: 2 allocations recorded without a stack"));
        assert!(lines[2].starts_with("warning: 1 mmap'd blocks not followed for a partial munmap"), "{lines:?}");
        assert!(lines[2].contains(&format!("more than {MAX_REGIONS} live mappings")), "{lines:?}");
    }

    #[test]
    fn a_loss_told_before_is_told_again_at_most_once_a_minute() {
        let s = 1_000_000_000;
        let mut w = LostWarnings::new();
        assert_eq!(w.due(&[0, 0, 0, 0, 7], 10 * s).len(), 1);
        // Every interval of a busy system: held back, and added up.
        for (i, n) in [9, 20, 31].into_iter().enumerate() {
            assert!(w.due(&[0, 0, 0, 0, n], (15 + 5 * i as u64) * s).is_empty());
        }
        // Another kind is told at once all the same.
        assert_eq!(w.due(&[3, 0, 0, 0, 31], 30 * s).len(), 1);
        let again = w.due(&[3, 0, 0, 0, 40], 70 * s);
        assert_eq!(again.len(), 1);
        assert!(again[0].starts_with("warning: in the last 60 s, 33 more mmap'd blocks not followed"), "{again:?}");
        assert!(w.due(&[3, 0, 0, 0, 40], 200 * s).is_empty());
        // At exit, whatever is not told yet.
        assert_eq!(w.rest(&[3, 0, 0, 0, 41], 201 * s).len(), 1);
        assert!(w.rest(&[3, 0, 0, 0, 41], 202 * s).is_empty());
    }
}
