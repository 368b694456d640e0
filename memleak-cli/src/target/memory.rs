//! Reads a traced process's memory (`--peek`, `--dump`): the bytes of its
//! outstanding blocks, at report time.

use std::io;

/// `len` bytes at `addr` in process `pid`, all or none: a block whose
/// pages are gone (a munmap since the maps were read) or a process gone
/// gives an error, never a short read. `process_vm_readv` copies in one
/// system call without stopping the process (no ptrace attach), and works
/// into containers (root may read any process).
pub fn read(pid: u32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: len };
    let remote = libc::iovec { iov_base: addr as *mut libc::c_void, iov_len: len };
    // SAFETY: one local iovec over `buf`, which outlives the call; the
    // remote one is only read by the kernel, which checks it.
    let n = unsafe { libc::process_vm_readv(pid as libc::pid_t, &local, 1, &remote, 1, 0) };
    match n {
        n if n < 0 => Err(io::Error::last_os_error()),
        n if n as usize == len => Ok(buf),
        n => Err(io::Error::new(io::ErrorKind::UnexpectedEof, format!("read {n} of {len} bytes at {addr:#x}"))),
    }
}

/// Fills `buf` from `addr` in process `pid`, through `/proc/PID/mem`
/// (code without a file: JIT code, the vDSO; see `symbolize`).
pub fn read_exact_at(pid: u32, buf: &mut [u8], addr: u64) -> io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(&std::fs::File::open(format!("/proc/{pid}/mem"))?, buf, addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory_exactly_and_refuses_unmapped() {
        let data = b"channelid=4099 application/x-www-form-urlencoded\0\x01".to_vec();
        let got = read(std::process::id(), data.as_ptr() as u64, data.len()).unwrap();
        assert_eq!(got, data);
        assert!(read(std::process::id(), 8, 16).is_err());
        assert_eq!(read(std::process::id(), 8, 0).unwrap(), Vec::<u8>::new());
    }
}
