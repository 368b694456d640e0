//! Reads what the kernel side recorded: outstanding allocations, per-stack
//! totals, stacks, and the counters of what it could not record.

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    io,
    mem::size_of,
    os::fd::AsFd as _,
};

use anyhow::Context as _;
use aya::{
    Ebpf,
    maps::{Array, HashMap, IterableMap as _, MapData, PerCpuArray},
};
use crate::{
    maps::batch::{self, BatchReader},
    maps::table,
    maps::totals::{self, CombinedAlloc},
};
use memleak_common::{
    AllocInfo, AllocKey, BUCKET_SLOTS, Bucket, CombinedKey, MAX_STACK_DEPTH, NO_SLOT, Region, RegionKey,
    STAT_COUNT, Stack, Totals, bucket_hash, maps,
};

/// Maps of at least this many buckets are read on every CPU at once.
const SPLIT_BUCKETS: u32 = 1 << 16;

pub struct Recorded {
    /// The blocks' table, and its buckets (0: none, all in `allocs`).
    table: Array<MapData, Bucket>,
    table_buckets: u32,
    /// The blocks the table had no room for.
    allocs: HashMap<MapData, AllocKey, AllocInfo>,
    totals: Array<MapData, Totals>,
    stacks: HashMap<MapData, u64, Stack>,
    stats: PerCpuArray<MapData, u64>,
    regions: HashMap<MapData, RegionKey, Region>,
    allocs_reader: BatchReader,
    /// Buckets of the allocation map.
    allocs_buckets: u32,
}

impl Recorded {
    pub fn take(ebpf: &mut Ebpf, table_buckets: u32) -> anyhow::Result<Self> {
        let mut take = |name: &str| ebpf.take_map(name).with_context(|| format!("map {name} missing"));
        let allocs: HashMap<MapData, AllocKey, AllocInfo> = HashMap::try_from(take(maps::ALLOCS)?)?;
        // The kernel gives a hash map a power of two of buckets.
        let allocs_buckets = allocs.map().info()?.max_entries().next_power_of_two();
        let table: Array<MapData, Bucket> = Array::try_from(take(maps::ALLOC_TABLE)?)?;
        Ok(Self {
            table,
            table_buckets,
            allocs,
            allocs_buckets,
            totals: Array::try_from(take(maps::TOTALS)?)?,
            stacks: HashMap::try_from(take(maps::STACKS)?)?,
            stats: PerCpuArray::try_from(take(maps::STATS)?)?,
            regions: HashMap::try_from(take(maps::REGIONS)?)?,
            allocs_reader: BatchReader::new(size_of::<AllocKey>(), size_of::<AllocInfo>()),
        })
    }

    /// Puts each outstanding allocation into a sink made by `make`, one
    /// sink per thread: the table is read on every CPU, in ranges of
    /// buckets, and so is the hash map when it is big enough (see
    /// `batch::read_split`). Nothing is collected on the way: a million
    /// allocations would cost 40 MB.
    pub fn allocations_into<S: Send>(
        &mut self,
        make: impl Fn() -> S + Sync,
        add: impl Fn(&mut S, AllocKey, AllocInfo) + Sync,
    ) -> Vec<S> {
        let parts = std::thread::available_parallelism().map_or(1, |n| n.get().min(4)) as u32;
        let mut sinks = self.spilled_into(parts, &make, &add);
        if self.table_buckets == 0 {
            return sinks;
        }
        let ranges = table::LAYOUT.split(self.table_buckets, parts);
        sinks.resize_with(sinks.len().max(ranges.len()), &make);
        let fd = self.table.map().fd().as_fd();
        let failed = std::thread::scope(|scope| {
            let threads: Vec<_> = sinks
                .iter_mut()
                .zip(ranges)
                .map(|(sink, range)| {
                    let add = &add;
                    scope.spawn(move || table::for_each(fd, range, |k, v| add(sink, k, v)))
                })
                .collect();
            threads.into_iter().find_map(|t| t.join().expect("table reader thread panicked").err())
        });
        if let Some(e) = failed {
            crate::warn!("reading the allocation table: {e}");
        }
        sinks
    }

    /// The blocks in the hash map, into sinks as `allocations_into` says.
    fn spilled_into<S: Send>(
        &mut self,
        parts: u32,
        make: &(impl Fn() -> S + Sync),
        add: &(impl Fn(&mut S, AllocKey, AllocInfo) + Sync),
    ) -> Vec<S> {
        let what = "the allocation map";
        if parts > 1 && self.allocs_buckets >= SPLIT_BUCKETS {
            let fd = self.allocs.map().fd().as_fd();
            let (key_size, value_size) = (size_of::<AllocKey>(), size_of::<AllocInfo>());
            let add_bytes = |s: &mut S, k: &[u8], v: &[u8]| add(s, batch::read(k), batch::read(v));
            match batch::read_split(fd, key_size, value_size, self.allocs_buckets, parts, make, add_bytes) {
                Ok(Some(sinks)) => return sinks,
                // Ranges that could not be joined exactly: read it in one pass.
                Ok(None) => {}
                Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
                Err(e) => {
                    crate::warn!("reading {what}: {e}");
                    return vec![make()];
                }
            }
        }
        let mut sink = make();
        for_each(&self.allocs, &mut self.allocs_reader, what, |k, v| add(&mut sink, k, v));
        vec![sink]
    }

    /// Removes everything recorded for these processes (they exited); a
    /// later process with the same PID starts with free REGIONS slots.
    pub fn forget_processes(&mut self, tgids: &std::collections::HashSet<u32>) {
        if self.table_buckets > 0
            && let Err(e) = table::forget(self.table.map().fd().as_fd(), self.table_buckets, tgids)
        {
            crate::warn!("forgetting exited processes' blocks: {e}");
        }
        // Read and deleted in batches: key by key, system-wide during a C
        // build (a call every second, the map holding 700,000 blocks), the
        // walk and the deletes were 37% of memleak's CPU time.
        let mut keys = Vec::new();
        for_each(&self.allocs, &mut self.allocs_reader, "the allocation map", |key, _| {
            if tgids.contains(&key.tgid) {
                keys.push(key);
            }
        });
        remove_all(&mut self.allocs, &keys);
        let regions = of_processes(self.regions.keys(), |k| k.tgid, tgids);
        remove_all(&mut self.regions, &regions);
        // Last: no block names their totals any more.
        if let Err(e) = totals::forget(self.totals.map().fd().as_fd(), self.totals.len(), tgids) {
            crate::warn!("forgetting exited processes' totals: {e}");
        }
    }

    /// Forgets the blocks of old images, those `old` says are (None: of
    /// a process that did not exec): they died with the old address space.
    /// Their totals entries go too, but only those no other block names
    /// (a free subtracts from the entry its block names: one given back
    /// and claimed by another stack would be wrong), so a stack the new
    /// image shares with the old one, address for address, keeps its
    /// counts. `tgids`: the processes that exec'd.
    pub fn forget_images(&mut self, tgids: &HashSet<u32>, old: impl Fn(AllocKey, &AllocInfo) -> Option<bool>) {
        let (mut gone, mut kept) = (HashSet::new(), HashSet::new());
        if self.table_buckets > 0
            && let Err(e) = table::forget_old(self.table.map().fd().as_fd(), self.table_buckets, &old, &mut gone, &mut kept)
        {
            crate::warn!("forgetting the blocks of programs replaced by exec: {e}");
        }
        let mut spilled = Vec::new();
        for_each(&self.allocs, &mut self.allocs_reader, "the allocation map", |key, info| {
            let Some(is_old) = old(key, &info) else { return };
            let named = (info.slot != NO_SLOT).then_some(info.slot);
            if is_old {
                spilled.push(key);
                gone.extend(named);
            } else {
                kept.extend(named);
            }
        });
        remove_all(&mut self.allocs, &spilled);
        // A followed mapping whose block is gone is a stale slot (see
        // `Region`): free it for the new image.
        let regions: Vec<RegionKey> = of_processes(self.regions.keys(), |k| k.tgid, tgids)
            .into_iter()
            .filter(|k| self.regions.get(k, 0).is_ok_and(|r| self.outstanding(k.tgid, r.start).is_none_or(|i| i.timestamp_ns != r.timestamp_ns)))
            .collect();
        for key in regions {
            let _ = self.regions.remove(&key);
        }
        let slots: HashSet<u32> = gone.difference(&kept).copied().collect();
        if let Err(e) = totals::forget_slots(self.totals.map().fd().as_fd(), self.totals.len(), &slots, tgids) {
            crate::warn!("forgetting the totals of programs replaced by exec: {e}");
        }
    }

    /// The kernel's running totals, each entry (a part of a (process,
    /// stack)'s) with its index. Read after the blocks, it has every entry
    /// they name (entries are given back only for processes gone).
    pub fn totals(&self) -> Vec<totals::Entry> {
        totals::read(self.totals.map().fd().as_fd(), self.totals.len()).unwrap_or_else(|e| {
            crate::warn!("reading the per-stack totals: {e}");
            Vec::new()
        })
    }

    /// What the kernel holds for the block of `tgid` at `addr` now, if it
    /// is still outstanding: a report that read a block's memory checks
    /// after the read that it was not freed meanwhile. A bucket read
    /// through the system call may be torn by a CPU changing it: the block
    /// is then not found, never found wrongly (a slot's info is written
    /// before its owner, and the caller compares the info).
    pub fn outstanding(&self, tgid: u32, addr: u64) -> Option<AllocInfo> {
        if self.table_buckets > 0 {
            let index = (bucket_hash(tgid, addr) >> (64 - self.table_buckets.ilog2())) as u32;
            if let Ok(bucket) = self.table.get(&index, 0)
                && let Some(i) = (0..BUCKET_SLOTS)
                    .find(|&i| bucket.addrs[i] == addr && bucket.owners[i] == u64::from(tgid))
            {
                return Some(bucket.infos[i]);
            }
        }
        self.allocs.get(&AllocKey { addr, tgid, _pad: 0 }, 0).ok()
    }

    /// Swaps owners of totals entries (see `totals::swap`); the slots swapped.
    pub fn swap_totals(&self, swaps: &crate::fasthash::FastMap<u32, (u64, u64)>) -> Vec<u32> {
        totals::swap(self.totals.map().fd().as_fd(), self.totals.len(), swaps).unwrap_or_else(|e| {
            crate::warn!("giving back per-stack totals: {e}");
            Vec::new()
        })
    }

    /// Most stacks STACKS holds.
    pub fn stacks_capacity(&self) -> u32 {
        self.stacks.map().info().map_or(0, |i| i.max_entries())
    }

    /// Deletes a stack; its return addresses, if it was there.
    pub fn take_stack(&mut self, stack_id: u64) -> Option<Vec<u64>> {
        // One syscall, not a lookup and a delete: a C build gives back up
        // to 52,000 stacks at a report.
        let mut stack = Stack { len: 0, ips: [0; MAX_STACK_DEPTH] };
        // SAFETY: `Stack` is plain data (a length and addresses, no
        // padding): any bytes written into it are a value.
        let bytes = unsafe { std::slice::from_raw_parts_mut((&raw mut stack).cast::<u8>(), size_of::<Stack>()) };
        match batch::take(self.stacks.map().fd().as_fd(), &stack_id.to_ne_bytes(), bytes) {
            Ok(taken) => taken.then(|| return_addresses(&stack)),
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {
                let ips = self.stack(stack_id);
                (!ips.is_empty() && self.stacks.remove(&stack_id).is_ok()).then_some(ips)
            }
            Err(e) => {
                crate::warn!("giving back a stack: {e}");
                None
            }
        }
    }

    /// Puts a stack deleted by `take_stack` back, unless the kernel did.
    pub fn put_stack(&mut self, stack_id: u64, ips: &[u64]) {
        let mut stack = Stack { len: ips.len() as u64, ips: [0; MAX_STACK_DEPTH] };
        stack.ips[..ips.len()].copy_from_slice(ips);
        // BPF_NOEXIST (linux/bpf.h): the kernel may have put it back first.
        let _ = self.stacks.insert(stack_id, stack, 1);
    }

    /// Return addresses of a stack, innermost first (empty if it is gone).
    pub fn stack(&self, stack_id: u64) -> Vec<u64> {
        self.stacks
            .get(&stack_id, 0)
            .map(|s| return_addresses(&s))
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

/// Each (process, stack)'s totals: the sum of its parts (one per CPU, see
/// `CombinedKey`, and now and then two for one), in wrapping arithmetic,
/// as some parts are below zero. A sum below zero (frees of blocks the
/// totals missed when the map was full, which was warned about) counts as
/// none.
pub fn add_parts(entries: impl IntoIterator<Item = totals::Entry>) -> Vec<(CombinedKey, CombinedAlloc)> {
    // Summed in place: one vector, not three (0.5 MiB each at 10,000
    // stacks, new pages at every report).
    let mut totals: Vec<(CombinedKey, CombinedAlloc)> =
        entries.into_iter().map(|(_, k, v)| (CombinedKey { shard: 0, ..k }, v)).collect();
    totals.sort_unstable_by_key(|(k, _)| (k.tgid, k.stack_id, k.kind));
    totals.dedup_by(|(key, part), (k, sum)| {
        if (k.tgid, k.stack_id, k.kind) != (key.tgid, key.stack_id, key.kind) {
            return false;
        }
        sum.total_size = sum.total_size.wrapping_add(part.total_size);
        sum.count = sum.count.wrapping_add(part.count);
        sum.allocs = sum.allocs.wrapping_add(part.allocs);
        sum.allocated = sum.allocated.wrapping_add(part.allocated);
        true
    });
    let at_least_zero = |n: u64| if (n as i64) < 0 { 0 } else { n };
    for (_, sum) in &mut totals {
        sum.total_size = at_least_zero(sum.total_size);
        sum.count = at_least_zero(sum.count);
    }
    totals
}

/// Calls `f` on every entry of a hash map, read thousands per syscall
/// (`BPF_MAP_LOOKUP_BATCH`); on kernels without batch operations, one entry
/// at a time through aya.
fn for_each<K, V>(map: &HashMap<MapData, K, V>, reader: &mut BatchReader, what: &str, mut f: impl FnMut(K, V))
where
    K: aya::Pod + Eq + std::hash::Hash,
    V: aya::Pod,
{
    match reader.for_each(map.map().fd().as_fd(), |k, v| f(batch::read(k), batch::read(v))) {
        Ok(_) => return,
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
        Err(e) => {
            crate::warn!("reading {what}: {e}");
            return;
        }
    }
    // The kernel changes the map while we walk it, and a walk that loses
    // its place starts over: keep each key once.
    let mut seen: StdHashMap<K, V> = StdHashMap::new();
    for (key, value) in map.iter().filter_map(Result::ok) {
        seen.insert(key, value);
    }
    seen.into_iter().for_each(|(k, v)| f(k, v));
}

/// A stack's return addresses, innermost first (a length past the array,
/// which the kernel never writes, is cut to it).
fn return_addresses(stack: &Stack) -> Vec<u64> {
    stack.ips[..(stack.len as usize).min(MAX_STACK_DEPTH)].to_vec()
}

/// Deletes `keys` from a hash map, thousands per syscall; one at a time on
/// kernels without batch operations. A key not there is skipped.
fn remove_all<K: aya::Pod, V: aya::Pod>(map: &mut HashMap<MapData, K, V>, keys: &[K]) {
    if keys.is_empty() {
        return;
    }
    // SAFETY: `K` is plain data (`Pod`: no padding left uninitialized), so
    // its values are `size_of_val` initialized bytes.
    let bytes = unsafe { std::slice::from_raw_parts(keys.as_ptr().cast::<u8>(), size_of_val(keys)) };
    match batch::delete(map.map().fd().as_fd(), size_of::<K>(), bytes) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::Unsupported => {
            for key in keys {
                let _ = map.remove(key);
            }
        }
        Err(e) => crate::warn!("deleting from a map: {e}"),
    }
}

/// The keys of a map that belong to these processes.
fn of_processes<K>(
    keys: impl Iterator<Item = Result<K, aya::maps::MapError>>,
    tgid: impl Fn(&K) -> u32,
    tgids: &std::collections::HashSet<u32>,
) -> Vec<K> {
    keys.filter_map(Result::ok).filter(|k| tgids.contains(&tgid(k))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_of_a_stack_add_up_even_below_zero() {
        let key = |tgid, shard, stack_id| CombinedKey { tgid, shard, stack_id, ..Default::default() };
        let part = |bytes: i64, count: i64, allocs| CombinedAlloc {
            total_size: bytes as u64,
            count: count as u64,
            allocs,
            allocated: allocs * 10,
        };
        let totals = add_parts([
            // 5 blocks of 10 bytes allocated on CPU 0, 3 freed on CPU 1.
            (3, key(7, 1, 40), part(-30, -3, 0)),
            (0, key(9, 0, 40), part(8, 1, 1)),
            (1, key(7, 0, 40), part(40, 4, 4)),
            // A second entry of the same part (the key's first was given
            // back and claimed again in front of it).
            (9, key(7, 0, 40), part(10, 1, 1)),
            // Freed on CPU 1 only: its allocation was missed (map full).
            (5, key(7, 1, 41), part(-16, -1, 0)),
        ]);
        assert_eq!(
            totals,
            [
                (key(7, 0, 40), part(20, 2, 5)),
                (key(7, 0, 41), part(0, 0, 0)),
                (key(9, 0, 40), part(8, 1, 1)),
            ]
        );
    }
}
