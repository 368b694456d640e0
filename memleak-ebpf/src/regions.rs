//! Blocks from direct mmap calls, followed so that munmap can cut any part
//! of them: blocks are recorded by their start, and munmap of its tail or
//! middle names an address inside it. Up to MAX_REGIONS slots per process,
//! scanned by mmap and munmap only (system calls: a few dozen map lookups
//! are small next to them); malloc and free never come here.

use aya_ebpf::bindings::{BPF_EXIST, BPF_NOEXIST};
use memleak_common::{AllocInfo, MAX_REGIONS, Region, RegionKey, Stat};

use crate::{
    config,
    maps::REGIONS,
    blocks::{Origin, Place, get_spilled, take_spilled, track},
    stats::count,
};

const EEXIST: i32 = -17;

/// Follows a block just recorded from a direct mmap.
#[inline(always)]
pub fn follow(tgid: u32, region: Region) {
    for slot in 0..MAX_REGIONS {
        let key = RegionKey { tgid, slot };
        if REGIONS.get_ptr(&key).is_some() {
            continue;
        }
        match REGIONS.insert(&key, &region, BPF_NOEXIST as u64) {
            Ok(()) => return,
            Err(EEXIST) => {} // another thread took the slot just now
            Err(_) => break,
        }
    }
    count(Stat::RegionsFull);
}

/// munmap(addr, len): cuts [addr, addr + len) (whole pages, as the kernel
/// does) out of one followed block it overlaps; false if none does. The
/// probe runs again (a tail call) until none is left, so the verifier
/// walks the cut once, not once per slot. The pieces keep their block's
/// stack and timestamp; a hole in the middle leaves two blocks, the second
/// counted as one more allocation of the stack.
#[inline(always)]
pub fn unmap(tgid: u32, addr: u64, len: u64) -> bool {
    let page = config::page_size();
    let end = addr.saturating_add(len).saturating_add(page - 1) & !(page - 1);
    let Some((key, mut region, info)) = overlapping(tgid, addr, end) else {
        return false;
    };
    let (start, stop) = (region.start, region.start + info.size);
    let _ = take_spilled(tgid, start);
    if addr > start {
        track(tgid, start, AllocInfo { size: addr - start, ..info }, Origin::Back, Place::Spilled);
    }
    if end >= stop {
        if addr <= start {
            let _ = REGIONS.remove(&key);
        }
        return true;
    }
    let rest = AllocInfo { size: stop - end, ..info };
    if addr > start {
        if track(tgid, end, rest, Origin::New, Place::Spilled) {
            follow(tgid, Region { start: end, timestamp_ns: info.timestamp_ns });
        }
    } else if track(tgid, end, rest, Origin::Back, Place::Spilled) {
        // Its head is gone: the block now starts at end.
        region.start = end;
        let _ = REGIONS.insert(&key, &region, BPF_EXIST as u64);
    }
    true
}

/// A followed block that overlaps [addr, end): its slot, its region and
/// what is recorded for it. Frees the slots of blocks gone.
#[inline(always)]
fn overlapping(tgid: u32, addr: u64, end: u64) -> Option<(RegionKey, Region, AllocInfo)> {
    for slot in 0..MAX_REGIONS {
        let key = RegionKey { tgid, slot };
        let Some(region) = REGIONS.get_ptr(&key) else {
            continue;
        };
        // SAFETY: a hash map's value, alive until this program ends.
        let region = unsafe { *region };
        let Some(info) = live(tgid, &region) else {
            // Its block was replaced or forgotten since.
            let _ = REGIONS.remove(&key);
            continue;
        };
        if region.start < end && region.start.saturating_add(info.size) > addr {
            return Some((key, region, info));
        }
    }
    None
}

/// The block a slot names, unless it is gone.
#[inline(always)]
fn live(tgid: u32, region: &Region) -> Option<AllocInfo> {
    let info = get_spilled(tgid, region.start)?;
    (info.timestamp_ns == region.timestamp_ns).then_some(info)
}
