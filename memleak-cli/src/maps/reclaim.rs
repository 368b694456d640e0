//! Giving back what no outstanding block needs, so that the kernel's
//! tables hold what is live, not everything ever seen: system-wide during
//! a C build (`make -j2`), the 16,384 stacks were all taken within 5 s and
//! millions of allocations went without one.
//!
//! - A totals entry that no block names, and that counted no allocation
//!   for a whole interval, is set aside: its owner becomes `TOTALS_BUSY`,
//!   which the kernel neither uses nor claims (an allocation of its stack
//!   takes another entry). At the next report it is given back if still no
//!   block names it, else restored: a block allocated through it in the
//!   moment it was set aside is in the table by then. Its counts since
//!   attach are carried here, so trends and counters never go back.
//! - A stack that no entry names any more is deleted from STACKS. The
//!   kernel takes an entry's stack to be there, so an entry claimed for it
//!   in the moment it was deleted gets it back: checked at once and again
//!   at the next pass, its frames kept until then.
//!
//! Not with --combined-only: there the entries are the only record of the
//! blocks, and a part of a stack's totals may be below zero (freed on
//! another CPU), which only the sum of all parts makes right.

use std::collections::HashSet;

use memleak_common::{CombinedKey, NO_STACK, TOTALS_BUSY, is_kernel, totals_owner};

use crate::{
    fasthash::FastMap,
    maps::{collect::Recorded, totals::{CombinedAlloc, Entry}},
    target::proc,
};

#[derive(Default)]
pub struct Reclaim {
    /// Each entry in use at the last report: slot -> (owner, stack, allocs).
    seen: FastMap<u32, (u64, u64, u64)>,
    /// Entries set aside at the last report: slot -> (key, sums then).
    aside: FastMap<u32, (CombinedKey, CombinedAlloc)>,
    /// Counts since attach of the entries given back, by (process, stack,
    /// kind).
    carried: FastMap<(u32, u64, u8), CombinedAlloc>,
    /// Stacks deleted at the last pass, their frames: put back if an entry
    /// names one.
    deleted: FastMap<u64, Vec<u64>>,
    /// Stacks whose last entry was given back since the last pass.
    freed: HashSet<u64>,
}

/// What a pass did, for `-v`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reclaimed {
    pub entries: usize,
    pub stacks: usize,
    /// Stacks entries name now: how full STACKS is.
    pub stacks_in_use: usize,
}

impl Reclaim {
    /// Gives back (or restores) the entries set aside at the last report.
    /// `live`: the entries the blocks just read name, of any age. Before
    /// the totals are read for the report.
    pub fn settle(&mut self, recorded: &Recorded, live: &HashSet<u32>) -> usize {
        let mut swaps = FastMap::default();
        for (&slot, (key, _)) in &self.aside {
            let owner = totals_owner(key.tgid, key.shard.into(), key.kind);
            let to = if live.contains(&slot) { owner } else { 0 };
            swaps.insert(slot, (TOTALS_BUSY, to));
        }
        let swapped: HashSet<u32> = recorded.swap_totals(&swaps).into_iter().collect();
        // Counts of a process that exited meanwhile are not carried: with
        // all its entries given back, nothing would tell to forget them.
        let mut alive: FastMap<u32, bool> = FastMap::default();
        let mut given = 0;
        for (slot, (key, sums)) in self.aside.drain() {
            if swaps[&slot].1 == 0 && swapped.contains(&slot) {
                given += 1;
                self.freed.insert(key.stack_id);
                if *alive.entry(key.tgid).or_insert_with(|| proc::exists(key.tgid)) {
                    let c = self.carried.entry((key.tgid, key.stack_id, key.kind)).or_default();
                    c.allocs += sums.allocs;
                    c.allocated += sums.allocated;
                }
            }
        }
        given
    }

    /// The counts of entries given back, as more parts of their stacks'.
    pub fn carried(&self) -> impl Iterator<Item = Entry> + '_ {
        self.carried
            .iter()
            .map(|(&(tgid, stack_id, kind), &c)| (u32::MAX, CombinedKey { tgid, kind, stack_id, ..Default::default() }, c))
    }

    /// Sets aside the entries (`entries`, just read) that no block names
    /// and that counted nothing since the last report.
    pub fn set_aside(&mut self, recorded: &Recorded, entries: &[Entry], live: &HashSet<u32>) {
        let mut swaps = FastMap::default();
        let mut seen = FastMap::with_capacity_and_hasher(entries.len(), Default::default());
        for &(slot, key, sums) in entries {
            let owner = totals_owner(key.tgid, key.shard.into(), key.kind);
            seen.insert(slot, (owner, key.stack_id, sums.allocs));
            if !live.contains(&slot) && self.seen.get(&slot) == Some(&(owner, key.stack_id, sums.allocs)) {
                swaps.insert(slot, (owner, TOTALS_BUSY));
            }
        }
        let by_slot: FastMap<u32, (CombinedKey, CombinedAlloc)> = entries.iter().map(|&(s, k, c)| (s, (k, c))).collect();
        for slot in recorded.swap_totals(&swaps) {
            self.aside.insert(slot, by_slot[&slot]);
            seen.remove(&slot);
        }
        self.seen = seen;
    }

    /// Of these processes and those holding totals `entries`, the ones
    /// that exited: what they left is dropped from the kernel maps, and
    /// forgotten here (see `forget`).
    pub fn forget_dead(&mut self, recorded: &mut Recorded, tgids: impl Iterator<Item = u32>, entries: &[Entry]) -> HashSet<u32> {
        let tgids: HashSet<u32> = tgids.chain(entries.iter().map(|(_, k, _)| k.tgid)).collect();
        let dead: HashSet<u32> = tgids.into_iter().filter(|&tgid| !is_kernel(tgid) && !proc::exists(tgid)).collect();
        if !dead.is_empty() {
            recorded.forget_processes(&dead);
            self.forget(&dead, entries);
        }
        dead
    }

    /// These processes exited and their entries were given back: forgets
    /// what is carried for them, and their stacks become free to delete.
    pub fn forget(&mut self, dead: &HashSet<u32>, entries: &[Entry]) {
        self.carried.retain(|(tgid, ..), _| !dead.contains(tgid));
        self.freed.extend(entries.iter().filter(|(_, k, _)| dead.contains(&k.tgid)).map(|(_, k, _)| k.stack_id));
    }

    /// Deletes the stacks no entry names any more; puts back those deleted
    /// that an entry names. `entries`: the entries in use, read since the
    /// last change to them here (what STACKS holds is counted from them
    /// when there is nothing to delete or put back).
    pub fn stacks(&mut self, recorded: &mut Recorded, entries: &[Entry]) -> Reclaimed {
        let named = |entries: &[Entry], aside: &FastMap<u32, (CombinedKey, CombinedAlloc)>| -> HashSet<u64> {
            let mut ids: HashSet<u64> = entries.iter().map(|(_, k, _)| k.stack_id).collect();
            ids.extend(aside.values().map(|(k, _)| k.stack_id));
            ids
        };
        if self.freed.is_empty() && self.deleted.is_empty() {
            // Reading the totals again only to count took 1.2 to 2.9 ms of
            // a 17 ms --combined-only report at 10,000 stacks.
            return Reclaimed { entries: 0, stacks: 0, stacks_in_use: named(entries, &self.aside).len() };
        }
        let now = named(&recorded.totals(), &self.aside);
        for (id, ips) in std::mem::take(&mut self.deleted) {
            if now.contains(&id) {
                recorded.put_stack(id, &ips);
            }
        }
        let mut stacks = 0;
        for id in std::mem::take(&mut self.freed) {
            if id != NO_STACK && !now.contains(&id) && let Some(ips) = recorded.take_stack(id) {
                self.deleted.insert(id, ips);
                stacks += 1;
            }
        }
        if !self.deleted.is_empty() {
            let again = named(&recorded.totals(), &self.aside);
            self.deleted.retain(|id, ips| {
                if again.contains(id) {
                    recorded.put_stack(*id, ips);
                    stacks -= 1;
                    return false;
                }
                true
            });
        }
        Reclaimed { entries: 0, stacks, stacks_in_use: now.len() }
    }
}
