//! Reads a BPF hash map many entries per syscall (`BPF_MAP_LOOKUP_BATCH`,
//! Linux 5.6), which aya 0.14 does not offer. Walking a map with aya's
//! iterator costs two syscalls per entry (next key, then lookup): 2 million
//! syscalls at a million outstanding allocations.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd as _, BorrowedFd},
};

const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;

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

/// Buffers for one map, kept across reads so a report allocates nothing
/// per entry (nor per interval, once grown).
pub struct BatchReader {
    key_size: usize,
    /// Bytes per entry's value: the value size, or for a per-CPU map the
    /// value size rounded up to 8 times the number of possible CPUs.
    value_size: usize,
    /// Entries per syscall; doubled when a hash bucket holds more.
    chunk: usize,
    keys: Vec<u8>,
    values: Vec<u8>,
}

/// Entries per syscall: large enough that the syscalls cost little, small
/// enough that the buffers stay a few hundred KiB.
const CHUNK: usize = 8192;

impl BatchReader {
    pub fn new(key_size: usize, value_size: usize) -> Self {
        Self { key_size, value_size, chunk: CHUNK, keys: Vec::new(), values: Vec::new() }
    }

    /// Calls `f(key, value)` on every entry of the hash map behind `fd`;
    /// returns how many. Entries added or removed while it reads may or may
    /// not be seen; none is seen twice (the kernel reads bucket by bucket).
    /// `Err` with `ErrorKind::Unsupported` when the kernel lacks batch ops.
    pub fn for_each(&mut self, fd: BorrowedFd<'_>, mut f: impl FnMut(&[u8], &[u8])) -> io::Result<usize> {
        // The batch token of a hash map is a bucket index (u32); the kernel
        // copies key_size bytes when the key is larger.
        let mut token_in = [0u8; 64];
        let mut token_out = [0u8; 64];
        let mut first = true;
        let mut total = 0;
        loop {
            self.keys.resize(self.chunk * self.key_size, 0);
            self.values.resize(self.chunk * self.value_size, 0);
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
                out_batch: token_out.as_mut_ptr() as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: self.chunk as u32,
                map_fd: fd.as_raw_fd() as u32,
                ..Default::default()
            };
            // SAFETY: attr points at buffers of `count` keys and values and
            // at tokens larger than any key; all outlive the call.
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
                Some(libc::EINVAL | libc::ENOTSUP | libc::EOPNOTSUPP) if first => {
                    return Err(io::Error::new(io::ErrorKind::Unsupported, err.unwrap()));
                }
                Some(_) => return Err(err.unwrap()),
            };
            let n = attr.count as usize;
            for i in 0..n {
                f(
                    &self.keys[i * self.key_size..(i + 1) * self.key_size],
                    &self.values[i * self.value_size..(i + 1) * self.value_size],
                );
            }
            total += n;
            if done {
                return Ok(total);
            }
            token_in = token_out;
            first = false;
        }
    }
}

/// A `#[repr(C)]` plain-data value read from map bytes.
pub fn read<T: aya::Pod>(bytes: &[u8]) -> T {
    assert!(bytes.len() >= size_of::<T>());
    // SAFETY: T is Pod (any bit pattern is valid) and the slice is long enough.
    unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) }
}
