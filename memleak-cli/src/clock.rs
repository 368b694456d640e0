//! The clocks memleak reads.

/// Local wall-clock time as HH:MM:SS.
pub fn clock_now() -> String {
    // SAFETY: time(NULL) and localtime_r with valid pointers.
    unsafe {
        let t = libc::time(std::ptr::null_mut());
        let mut tm: libc::tm = std::mem::zeroed();
        libc::localtime_r(&t, &mut tm);
        format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
    }
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_is_hh_mm_ss() {
        let c = clock_now();
        assert_eq!(c.len(), 8);
        assert_eq!(c.as_bytes()[2], b':');
    }
}

/// CLOCK_MONOTONIC and the wall clock, read together (a run's start).
pub fn now() -> (u64, std::time::SystemTime) {
    (monotonic_ns(), std::time::SystemTime::now())
}
