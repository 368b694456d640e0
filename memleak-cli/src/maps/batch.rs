//! Reads a BPF hash map many entries per syscall (`BPF_MAP_LOOKUP_BATCH`,
//! Linux 5.6), and deletes many keys per syscall (`BPF_MAP_DELETE_BATCH`),
//! which aya 0.14 does not offer. Walking a map with aya's iterator costs
//! two syscalls per entry (next key, then lookup): 2 million syscalls at a
//! million outstanding allocations.
//!
//! Even batched, the kernel's walk of a million-bucket table is most of a
//! report (a cache miss or two and two small copies per bucket), so a big
//! map is read on every CPU at once, each thread a range of its buckets
//! (`read_split`).

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;
const BPF_MAP_LOOKUP_AND_DELETE_ELEM: libc::c_long = 21;
/// The kernel's own "not supported" (include/linux/errno.h), which libc
/// does not name: what a kernel returns for a command a map type lacks
/// (batch operations before 5.6, lookup-and-delete of a hash map before
/// 5.14). libc's ENOTSUP is EOPNOTSUPP on Linux.
const ENOTSUPP: i32 = 524;

/// `union bpf_attr`'s element member (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct ElemAttr {
    map_fd: u32,
    _pad: u32,
    key: u64,
    value: u64,
    flags: u64,
}

/// `union bpf_attr`'s `batch` member (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Entries per syscall: large enough that the syscalls cost little, small
/// enough that the buffers stay a few hundred KiB.
const CHUNK: usize = 8192;

/// What one batch call read: `n` entries from buckets `[from, next)`.
struct Call {
    n: usize,
    next: u32,
    /// The walk reached the end of the table.
    done: bool,
}

/// Buffers for one map, kept across reads so a report allocates nothing
/// per entry (nor per interval, once grown).
pub struct BatchReader {
    key_size: usize,
    value_size: usize,
    /// Entries per syscall; doubled when a hash bucket holds more.
    chunk: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
}

impl BatchReader {
    pub fn new(key_size: usize, value_size: usize) -> Self {
        Self { key_size, value_size, chunk: CHUNK, keys: Vec::new(), values: Vec::new() }
    }

    /// Calls `f(key, value)` on every entry of the hash map behind `fd`;
    /// returns how many. Entries added or removed while it reads may or may
    /// not be seen; none is seen twice (the kernel reads bucket by bucket).
    /// `Err` with `ErrorKind::Unsupported` when the kernel lacks batch ops.
    pub fn for_each(&mut self, fd: BorrowedFd<'_>, mut f: impl FnMut(&[u8], &[u8])) -> io::Result<usize> {
        let mut from = 0;
        let mut total = 0;
        loop {
            let call = self.call(fd, from)?;
            self.entries(call.n).for_each(|(k, v)| f(k, v));
            total += call.n;
            if call.done {
                return Ok(total);
            }
            from = call.next;
        }
    }

    /// One batch read from bucket `from` (the batch token of a hash map is
    /// a bucket index); the entries are in the buffers.
    fn call(&mut self, fd: BorrowedFd<'_>, from: u32) -> io::Result<Call> {
        let token_in = from;
        let mut token_out = 0u32;
        loop {
            self.keys.resize(self.chunk * self.key_size, 0);
            self.values.resize(self.chunk * self.value_size, 0);
            let mut attr = BatchAttr {
                in_batch: &token_in as *const u32 as u64,
                out_batch: &mut token_out as *mut u32 as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: self.chunk as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..Default::default()
            };
            // SAFETY: attr points at buffers of `count` keys and values and
            // at u32 tokens (a hash map's token is a u32); all outlive the call.
            let ret = unsafe {
                libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
            };
            let err = (ret < 0).then(io::Error::last_os_error);
            let done = match err.as_ref().and_then(io::Error::raw_os_error) {
                None => false,
                Some(libc::ENOENT) => true,
                // One bucket holds more entries than the buffer: grow it.
                Some(libc::ENOSPC) if self.chunk < (1 << 24) => {
                    self.chunk *= 2;
                    continue;
                }
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if from == 0 => {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, err.unwrap()));
                }
                Some(_) => return Err(err.unwrap()),
            };
            return Ok(Call { n: attr.count as usize, next: if done { u32::MAX } else { token_out }, done });
        }
    }

    fn entries(&self, n: usize) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.keys.chunks_exact(self.key_size).zip(self.values.chunks_exact(self.value_size)).take(n)
    }
}

/// Deletes `keys` (back to back, `key_size` bytes each) from the hash map
/// behind `fd`, thousands per syscall; a key not there (its block freed
/// meanwhile) is skipped. Returns how many were deleted. `Err` with
/// `ErrorKind::Unsupported` when the kernel lacks batch ops (nothing was
/// deleted then).
pub fn delete(fd: BorrowedFd<'_>, key_size: usize, keys: &[u8]) -> io::Result<usize> {
    let mut rest = keys;
    let mut deleted = 0;
    let mut first = true;
    while !rest.is_empty() {
        let n = (rest.len() / key_size).min(CHUNK);
        let mut attr = BatchAttr {
            keys: rest.as_ptr() as u64,
            count: n as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: attr points at `count` keys of the map's key size, alive
        // for the call; the kernel only reads them.
        let ret = unsafe {
            libc::syscall(libc::SYS_bpf, BPF_MAP_DELETE_BATCH, &mut attr as *mut BatchAttr, size_of::<BatchAttr>())
        };
        // The kernel deletes in order and stops at the first key it cannot:
        // `count` says how many went.
        let done = attr.count as usize;
        deleted += done;
        if ret < 0 {
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                // That key went meanwhile: on past it.
                Some(libc::ENOENT) => {
                    rest = &rest[(done + 1).min(n) * key_size..];
                    first = false;
                    continue;
                }
                Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) if first && done == 0 => {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, err));
                }
                _ => return Err(err),
            }
        }
        rest = &rest[n * key_size..];
        first = false;
    }
    Ok(deleted)
}

/// Reads the value under `key` into `value` (the map's value size) and
/// deletes it, one syscall where a lookup and a delete took two; false if
/// there was none. `Err` with `ErrorKind::Unsupported` on kernels before
/// 5.14, whose hash maps lack it.
pub fn take(fd: BorrowedFd<'_>, key: &[u8], value: &mut [u8]) -> io::Result<bool> {
    let mut attr = ElemAttr {
        map_fd: fd.as_raw_fd() as u32,
        key: key.as_ptr() as u64,
        value: value.as_mut_ptr() as u64,
        ..Default::default()
    };
    // SAFETY: attr points at a key and a value buffer of the map's sizes,
    // alive for the call.
    let ret = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_LOOKUP_AND_DELETE_ELEM, &mut attr as *mut ElemAttr, size_of::<ElemAttr>())
    };
    if ret == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENOENT) => Ok(false),
        Some(libc::EINVAL | libc::EOPNOTSUPP | ENOTSUPP) => Err(io::Error::new(io::ErrorKind::Unsupported, err)),
        _ => Err(err),
    }
}

/// Reads a hash map of `n_buckets` buckets in `parts` bucket ranges, one
/// thread each; `add` puts an entry into its thread's sink (from `make`).
/// Returns the sinks, or `None` when the ranges could not be joined
/// exactly (the caller then reads the map in one pass).
///
/// A batch call returns whole buckets, so a range's last call may run into
/// the next range. That call's entries are held back, and the next range
/// remembers the keys of its first two calls: held entries it also read are
/// dropped. Were the overlap wider than those two calls (only if thousands
/// of blocks were added there in between), no sink is returned: an entry is
/// never counted twice.
pub fn read_split<S: Send>(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    n_buckets: u32,
    parts: u32,
    make: impl Fn() -> S + Sync,
    add: impl Fn(&mut S, &[u8], &[u8]) + Sync,
) -> io::Result<Option<Vec<S>>> {
    let bounds: Vec<u32> = (0..=parts).map(|i| (n_buckets as u64 * i as u64 / parts as u64) as u32).collect();
    let ranges: Vec<io::Result<Range<S>>> = std::thread::scope(|scope| {
        let threads: Vec<_> = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let (make, add) = (&make, &add);
                let last = i + 1 == parts as usize;
                scope.spawn(move || read_range(fd, key_size, value_size, w[0], (!last).then_some(w[1]), i > 0, make(), add))
            })
            .collect();
        threads.into_iter().map(|t| t.join().expect("map reader thread panicked")).collect()
    });
    let mut ranges = ranges.into_iter().collect::<io::Result<Vec<_>>>()?;
    for i in 0..ranges.len() - 1 {
        let Some(held) = ranges[i].held.take() else { continue };
        let (this, next) = ranges.split_at_mut(i + 1);
        let next = &next[0];
        if held.next > next.covered {
            return Ok(None);
        }
        let seen: Vec<&[u8]> = next.first_keys.chunks_exact(key_size).collect();
        for (k, v) in held.keys.chunks_exact(key_size).zip(held.values.chunks_exact(value_size)) {
            if seen.binary_search(&k).is_err() {
                add(&mut this[i].sink, k, v);
            }
        }
    }
    Ok(Some(ranges.into_iter().map(|r| r.sink).collect()))
}

/// What one thread of `read_split` read.
struct Range<S> {
    sink: S,
    /// The call that ran past the range's end, not yet added.
    held: Option<Held>,
    /// Keys read by the first two calls (ranges after the first), sorted
    /// and back to back, and the bucket those calls reached.
    first_keys: Vec<u8>,
    covered: u32,
}

struct Held {
    keys: Vec<u8>,
    values: Vec<u8>,
    next: u32,
}

#[allow(clippy::too_many_arguments)]
fn read_range<S>(
    fd: BorrowedFd<'_>,
    key_size: usize,
    value_size: usize,
    start: u32,
    end: Option<u32>,
    remember_first: bool,
    mut sink: S,
    add: &(impl Fn(&mut S, &[u8], &[u8]) + Sync),
) -> io::Result<Range<S>> {
    let mut reader = BatchReader::new(key_size, value_size);
    let (mut held, mut first_keys, mut covered) = (None, Vec::new(), start);
    let mut from = start;
    for calls in 0.. {
        let call = reader.call(fd, from)?;
        if remember_first && calls < 2 {
            first_keys.extend_from_slice(&reader.keys[..call.n * key_size]);
            covered = call.next;
        }
        if end.is_some_and(|end| call.next > end) {
            let n = call.n;
            held = Some(Held {
                keys: reader.keys[..n * key_size].to_vec(),
                values: reader.values[..n * value_size].to_vec(),
                next: call.next,
            });
            break;
        }
        reader.entries(call.n).for_each(|(k, v)| add(&mut sink, k, v));
        if call.done || Some(call.next) == end {
            break;
        }
        from = call.next;
    }
    let mut keys: Vec<&[u8]> = first_keys.chunks_exact(key_size).collect();
    keys.sort_unstable();
    let first_keys = keys.concat();
    Ok(Range { sink, held, first_keys, covered })
}

/// A `#[repr(C)]` plain-data value read from map bytes.
pub fn read<T: aya::Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: T is Pod (any bit pattern is valid) and the slice is long enough.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}
