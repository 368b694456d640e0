//! `-c COMMAND`: the command is forked but held before exec until the
//! probes are in, so its very first allocation is traced.

use std::{ffi::CString, io, os::fd::RawFd};

use anyhow::Context as _;

use crate::error::{Kind, user_error};

/// A forked child waiting to exec the command.
pub struct Held {
    pub pid: u32,
    go: RawFd,
}

impl Held {
    /// Forks; the child waits on a pipe, then execs `argv` (PATH is searched).
    pub fn spawn(argv: &[String]) -> anyhow::Result<Self> {
        if !runnable(&argv[0]) {
            return Err(user_error(Kind::Usage, format!("-c: no such command: {}", argv[0])));
        }
        let args: Vec<CString> = argv
            .iter()
            .map(|a| CString::new(a.as_str()))
            .collect::<Result<_, _>>()
            .map_err(|_| user_error(Kind::Usage, "-c: the command holds a NUL byte"))?;
        let mut ptrs: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        let mut fds = [0; 2];
        // SAFETY: a valid two-int array.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error()).context("pipe2");
        }
        let [wait, go] = fds;
        // SAFETY: the child only calls async-signal-safe functions (close,
        // read, execvp, _exit) on memory prepared before the fork.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()).context("fork"),
            0 => unsafe {
                libc::close(go);
                let mut byte = 0u8;
                if libc::read(wait, (&raw mut byte).cast(), 1) == 1 {
                    libc::execvp(ptrs[0], ptrs.as_ptr());
                }
                libc::_exit(127)
            },
            pid => {
                // SAFETY: closing our copy of the child's end.
                unsafe { libc::close(wait) };
                Ok(Self { pid: pid as u32, go })
            }
        }
    }

    /// Lets the child exec the command.
    pub fn release(self) -> anyhow::Result<()> {
        // SAFETY: writing one byte to our pipe end, then closing it.
        let n = unsafe { libc::write(self.go, [1u8].as_ptr().cast(), 1) };
        unsafe { libc::close(self.go) };
        if n != 1 {
            return Err(io::Error::last_os_error()).context("starting the command");
        }
        Ok(())
    }
}

/// Whether `program` names an executable file (directly, or through PATH).
fn runnable(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    let executable = |p: &std::path::Path| p.metadata().is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.contains('/') {
        return executable(std::path::Path::new(program));
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
}

/// Reaps an exited child; returns its exit code (128 + signal if killed).
pub fn reap(pid: u32) -> Option<i32> {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    if unsafe { libc::waitpid(pid as i32, &mut status, 0) } != pid as i32 {
        return None;
    }
    if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        Some(128 + libc::WTERMSIG(status))
    } else {
        None
    }
}

/// Waits (up to ~2 s) until `pid` runs a new program with its libraries
/// mapped: the moment to read its mappings for symbolization.
pub fn wait_for_exec(pid: u32, argv0: &str) {
    let me = std::fs::read_link("/proc/self/exe").ok();
    let name = crate::proc::module_name(argv0).to_string();
    for _ in 0..2000 {
        let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
        let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap_or_default();
        if maps.is_empty() {
            return; // exited already
        }
        if exe.is_some() && exe != me && maps.lines().any(|l| l.contains("/libc")) && maps.contains(&name) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
