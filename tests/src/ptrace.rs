//! Holds a program at one system call, from outside (ptrace), to make a
//! race that is microseconds wide happen every time: no hook in memleak.
//! x86_64 only, as the tests are.

use std::{
    fs,
    io,
    os::unix::process::CommandExt as _,
    process::{Child, Command},
    ptr,
};

/// Kill the tracee if the tracer dies (a failing test): not in libc 0.2.191.
const PTRACE_O_EXITKILL: libc::c_int = 0x0010_0000;

/// Starts `cmd` traced, runs `at_call` when it enters system call `nr` for
/// the first time (the call not yet made), then lets it go on untraced.
pub fn spawn_stopped_at_syscall(cmd: &mut Command, nr: libc::c_long, at_call: impl FnOnce()) -> Child {
    // SAFETY: ptrace(PTRACE_TRACEME) is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| match libc::ptrace(libc::PTRACE_TRACEME, 0, ptr::null_mut::<libc::c_void>(), 0) {
            -1 => Err(io::Error::last_os_error()),
            _ => Ok(()),
        })
    };
    let child = cmd.spawn().expect("start the traced program");
    let pid = child.id() as libc::pid_t;
    assert_eq!(wait_stop(pid), libc::SIGTRAP, "the exec stop");
    let options = libc::PTRACE_O_TRACESYSGOOD | PTRACE_O_EXITKILL;
    ptrace(libc::PTRACE_SETOPTIONS, pid, options as usize);
    run_to_syscall_entry(pid, nr);
    at_call();
    ptrace(libc::PTRACE_DETACH, pid, 0);
    child
}

fn run_to_syscall_entry(pid: libc::pid_t, nr: libc::c_long) {
    let mut signal = 0;
    loop {
        ptrace(libc::PTRACE_SYSCALL, pid, signal);
        let stop = wait_stop(pid);
        if stop != libc::SIGTRAP | 0x80 {
            signal = stop as usize; // the program's own signal: deliver it
            continue;
        }
        signal = 0;
        // SAFETY: an all-integer struct, filled in by the kernel.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        ptrace(libc::PTRACE_GETREGS, pid, &raw mut regs as usize);
        // At entry, rax holds -ENOSYS; at exit, the result.
        if regs.orig_rax == nr as u64 && regs.rax == (-libc::ENOSYS) as u64 {
            return;
        }
    }
}

fn ptrace(request: libc::c_uint, pid: libc::pid_t, data: usize) {
    // SAFETY: the requests used here take an integer or a pointer to a
    // live struct of the right type as data.
    let r = unsafe { libc::ptrace(request, pid, ptr::null_mut::<libc::c_void>(), data) };
    assert!(r != -1, "ptrace {request} on {pid}: {}", io::Error::last_os_error());
}

/// Waits for the tracee's next stop; its signal.
fn wait_stop(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid: {}", io::Error::last_os_error());
    assert!(libc::WIFSTOPPED(status), "the traced program ended (status {status:#x}) before the system call");
    libc::WSTOPSIG(status)
}

/// Starts `sleep 60` as PID `pid`, which must be free: the kernel gives a
/// new process `ns_last_pid` + 1. Retries when another process was faster.
pub fn spawn_with_pid(pid: u32) -> Child {
    for _ in 0..100 {
        fs::write("/proc/sys/kernel/ns_last_pid", (pid - 1).to_string()).expect("write ns_last_pid (as root)");
        let mut child = Command::new("sleep").arg("60").spawn().expect("start sleep");
        if child.id() == pid {
            return child;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
    panic!("could not start a process with PID {pid}");
}
