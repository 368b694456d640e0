//! Reads what the kernel side recorded: outstanding allocations, per-stack
//! totals, stacks, and the counters of what it could not record.

use std::{collections::HashMap as StdHashMap, io, mem::size_of, os::fd::AsFd as _};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{HashMap, IterableMap as _, MapData, PerCpuArray},
};
use crate::batch::{self, BatchReader};
use memleak_common::{
    AllocInfo, AllocKey, CombinedAlloc, CombinedKey, MAX_STACK_DEPTH, Region, RegionKey, STAT_COUNT,
    Stack, Stat, maps,
};

pub struct Recorded {
    allocs: HashMap<MapData, AllocKey, AllocInfo>,
    combined: HashMap<MapData, CombinedKey, CombinedAlloc>,
    stacks: HashMap<MapData, u64, Stack>,
    stats: PerCpuArray<MapData, u64>,
    regions: HashMap<MapData, RegionKey, Region>,
    allocs_reader: BatchReader,
    combined_reader: BatchReader,
}

impl Recorded {
    pub fn take(ebpf: &mut Ebpf) -> anyhow::Result<Self> {
        let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("map {name} missing"));
        Ok(Self {
            allocs: HashMap::try_from(take(maps::ALLOCS)?)?,
            combined: HashMap::try_from(take(maps::COMBINED)?)?,
            stacks: HashMap::try_from(take(maps::STACKS)?)?,
            stats: PerCpuArray::try_from(take(maps::STATS)?)?,
            regions: HashMap::try_from(take(maps::REGIONS)?)?,
            allocs_reader: BatchReader::new(size_of::<AllocKey>(), size_of::<AllocInfo>()),
            combined_reader: BatchReader::new(size_of::<CombinedKey>(), size_of::<CombinedAlloc>()),
        })
    }

    /// Outstanding allocations.
    pub fn allocations(&mut self) -> Vec<(AllocKey, AllocInfo)> {
        read_all(&self.allocs, &mut self.allocs_reader, "the allocation map")
    }

    /// Removes everything recorded for these processes (they exited); a
    /// later process with the same PID starts with free REGIONS slots.
    pub fn forget_processes(&mut self, tgids: &std::collections::HashSet<u32>) {
        remove_where(&mut self.allocs, |k| tgids.contains(&k.tgid));
        remove_where(&mut self.combined, |k| tgids.contains(&k.tgid));
        remove_where(&mut self.regions, |k| tgids.contains(&k.tgid));
    }

    /// The kernel's running totals per (process, stack).
    pub fn combined(&mut self) -> Vec<(CombinedKey, CombinedAlloc)> {
        read_all(&self.combined, &mut self.combined_reader, "the per-stack totals")
    }

    /// Return addresses of a stack, innermost first (empty if it is gone).
    pub fn stack(&self, stack_id: u64) -> Vec<u64> {
        self.stacks
            .get(&stack_id, 0)
            .map(|s| s.ips[..(s.len as usize).min(MAX_STACK_DEPTH)].to_vec())
            .unwrap_or_default()
    }

    /// Totals over all CPUs of the `Stat` counters.
    pub fn lost(&self) -> [u64; STAT_COUNT as usize] {
        let mut totals = [0; STAT_COUNT as usize];
        for (i, total) in totals.iter_mut().enumerate() {
            if let Ok(values) = self.stats.get(&(i as u32), 0) {
                *total = values.iter().sum();
            }
        }
        totals
    }
}

/// Every entry of a hash map, read thousands per syscall
/// (`BPF_MAP_LOOKUP_BATCH`); on kernels without batch operations, one entry
/// at a time through aya.
fn read_all<K, V>(map: &HashMap<MapData, K, V>, reader: &mut BatchReader, what: &str) -> Vec<(K, V)>
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    let mut all = Vec::new();
    match reader.for_each(map.map().fd().as_fd(), |k, v| all.push((batch::read(k), batch::read(v)))) {
        Ok(_) => return all,
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
        Err(e) => eprintln!("warning: reading {what}: {e}"),
    }
    // The kernel changes the map while we walk it, and a walk that loses
    // its place starts over: keep each key once.
    let mut seen: StdHashMap<K, V> = StdHashMap::new();
    for (key, value) in map.iter().filter_map(Result::ok) {
        seen.insert(key, value);
    }
    seen.into_iter().collect()
}

fn remove_where<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, doomed: impl Fn(&K) -> bool) {
    let keys: Vec<K> = map.keys().filter_map(Result::ok).filter(|k| doomed(k)).collect();
    for key in keys {
        let _ = map.remove(&key);
    }
}

/// One warning line per counter that grew since `before`.
pub fn lost_warnings(before: &[u64], now: &[u64]) -> Vec<String> {
    let what = |i: usize| match i {
        i if i == Stat::AllocMapFull as usize => "allocations not tracked (allocation map full, raise --max-allocs)",
        i if i == Stat::StackLost as usize => {
            "allocations recorded without a stack (stack map full, raise --max-stacks)"
        }
        i if i == Stat::CombinedMapFull as usize => {
            "allocations missing from the per-stack totals (combined map full, raise --max-stacks)"
        }
        i if i == Stat::RegionsFull as usize => {
            "mmap'd blocks not followed for a partial munmap (more than 32 live mappings in a process): if unmapped past their head, their rest stays counted"
        }
        _ => "allocator calls not followed (too many threads inside the allocator at once)",
    };
    now.iter()
        .zip(before)
        .enumerate()
        .filter(|(_, (n, b))| n > b)
        .map(|(i, (n, b))| format!("warning: {} {}", n - b, what(i)))
        .collect()
}

#[cfg(test)]
mod tests {
    use memleak_common::MAX_REGIONS;

    use super::*;

    #[test]
    fn warns_only_about_growth() {
        assert!(lost_warnings(&[0, 0, 0, 0, 0], &[0, 0, 0, 0, 0]).is_empty());
        assert_eq!(
            lost_warnings(&[10, 0, 0, 0, 0], &[1244, 0, 0, 0, 0]),
            ["warning: 1234 allocations not tracked (allocation map full, raise --max-allocs)"]
        );
        let w = lost_warnings(&[0, 1, 0, 0, 0], &[0, 3, 0, 5, 1]);
        assert_eq!(w.len(), 3);
        assert!(w[0].starts_with("warning: 2 allocations recorded without a stack"));
        assert!(w[2].starts_with("warning: 1 mmap'd blocks not followed for a partial munmap"), "{w:?}");
        assert!(w[2].contains(&format!("more than {MAX_REGIONS} live mappings")), "{w:?}");
    }
}
