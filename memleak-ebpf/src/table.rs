//! The outstanding blocks, by (process, address): an array of buckets of
//! slots, each slot claimed and given back with compare-and-swap (the
//! protocol is on `memleak_common::Bucket`). A hash map insert and delete per
//! block (jhash, bucket lock, an element allocated and freed) was the largest
//! cost of tracing a malloc and free; here it is a few loads and one atomic
//! on lines the last call on that address touched. A block whose bucket is
//! full goes to ALLOCS (see `blocks`), and the bucket counts it.

use memleak_common::{AllocInfo, BUCKET_SLOTS, Bucket, bucket_hash};

use crate::{
    atomic::{self, cas, load, store},
    config,
    maps::ALLOC_TABLE,
};

/// The bucket of (tgid, addr); None without a table.
#[inline(always)]
pub fn bucket(tgid: u32, addr: u64) -> Option<&'static mut Bucket> {
    let shift = config::table_shift();
    if shift == 0 {
        return None;
    }
    let hash = bucket_hash(tgid, addr);
    // SAFETY: an array map's value, alive as long as the map.
    ALLOC_TABLE.get_ptr_mut((hash >> (shift & 63)) as u32).map(|b| unsafe { &mut *b })
}

/// The slot holding (tgid, addr).
#[inline(always)]
fn find(bucket: &Bucket, tgid: u32, addr: u64) -> Option<usize> {
    // Volatile: other CPUs change the slots while this reads them.
    (0..BUCKET_SLOTS).find(|&i| load(&bucket.addrs[i]) == addr && load(&bucket.owners[i]) == u64::from(tgid))
}

/// What `put` did.
pub struct Put {
    /// The bucket held a block at that address (its free was missed),
    /// written to `stale`.
    pub stale: bool,
    /// The new block is in.
    pub placed: bool,
}

/// Records a block in its bucket. The block it replaces goes to `stale`,
/// an out-parameter and not an `Option`: LLVM copies a `None`'s undefined
/// payload, which the verifier rejects.
#[inline(always)]
pub fn put(bucket: &mut Bucket, tgid: u32, addr: u64, info: &AllocInfo, stale: &mut AllocInfo) -> Put {
    if let Some(i) = find(bucket, tgid, addr) {
        *stale = bucket.infos[i];
        store(&mut bucket.infos[i], *info);
        return Put { stale: true, placed: true };
    }
    for i in 0..BUCKET_SLOTS {
        if load(&bucket.addrs[i]) == 0 && cas(&mut bucket.addrs[i], 0, addr) {
            // The owner last: a slot matches only once its info is written.
            store(&mut bucket.infos[i], *info);
            store(&mut bucket.owners[i], u64::from(tgid));
            return Put { stale: false, placed: true };
        }
    }
    Put { stale: false, placed: false }
}

/// Gives slot `i` back if it is still `tgid`'s: only the thread whose
/// compare-and-swap wins does (a double free racing on two threads).
#[inline(always)]
fn release(bucket: &mut Bucket, i: usize, tgid: u32) -> bool {
    let owner = u64::from(tgid);
    if !cas(&mut bucket.owners[i], owner, 0) {
        return false;
    }
    store(&mut bucket.addrs[i], 0);
    true
}

/// Takes (tgid, addr) out of its bucket; None if it is not there (or a
/// double free on another thread took it first).
#[inline(always)]
pub fn take(bucket: &mut Bucket, tgid: u32, addr: u64) -> Option<AllocInfo> {
    let i = find(bucket, tgid, addr)?;
    let info = bucket.infos[i];
    release(bucket, i, tgid).then_some(info)
}

/// Whether blocks of this bucket went to ALLOCS.
#[inline(always)]
pub fn spilled(bucket: &Bucket) -> bool {
    load(&bucket.spilled) != 0
}

/// One more (or, `n` = u64::MAX, one less) block of this bucket in ALLOCS.
#[inline(always)]
pub fn count_spilled(bucket: &mut Bucket, n: u64) {
    atomic::add(&mut bucket.spilled, n);
}
