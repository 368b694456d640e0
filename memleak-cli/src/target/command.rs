//! `-c COMMAND`: the command is forked but held before exec until the
//! probes are in, so its very first allocation is traced.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::Context as _;

use crate::{
    error::{Kind, user_error},
    target::proc,
};

/// A forked child waiting to exec the command, then the command: killed
/// and reaped if memleak lets go of it (an error, a signal during attach),
/// and killed by the kernel if memleak dies (`PR_SET_PDEATHSIG`).
pub struct Held {
    pub pid: u32,
    /// Our end of the pipe the child waits on; `None` once released.
    go: Option<OwnedFd>,
    /// Its exit code, once reaped (`Some(None)`: reaped, code unknown).
    reaped: Option<Option<i32>>,
    /// Asked at each SIGSTOP whether it is memleak's own, then dropped
    /// (see `on_own_stop`).
    own_stop: Option<Box<dyn FnMut() -> bool + Send>>,
}

/// How long a command has to exit after SIGTERM before SIGKILL.
pub const GRACE: Duration = Duration::from_secs(1);

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
        // SAFETY: getpid cannot fail.
        let parent = unsafe { libc::getpid() };
        let last_signal = libc::SIGRTMAX();
        // SAFETY: the child only calls async-signal-safe functions (signal,
        // sigprocmask, prctl, getppid, close, read, execvp, _exit) on memory
        // prepared before the fork.
        match unsafe { libc::fork() } {
            -1 => Err(io::Error::last_os_error()).context("fork"),
            0 => unsafe {
                // memleak's handlers (tokio's, which swallowed a Ctrl-C
                // meant for the command) and its blocked signals are not
                // the command's: the defaults, as a shell gives them.
                for signal in 1..=last_signal {
                    if signal != libc::SIGKILL && signal != libc::SIGSTOP {
                        libc::signal(signal, libc::SIG_DFL);
                    }
                }
                let mut none: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut none);
                libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
                // Never outlive memleak, even killed (kept across exec).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent {
                    libc::_exit(127);
                }
                libc::close(go);
                let mut byte = 0u8;
                if libc::read(wait, (&raw mut byte).cast(), 1) == 1 {
                    libc::execvp(ptrs[0], ptrs.as_ptr());
                }
                libc::_exit(127)
            },
            pid => {
                // SAFETY: closing our copy of the child's end; `go` is ours.
                unsafe { libc::close(wait) };
                Ok(Self { pid: pid as u32, go: Some(unsafe { OwnedFd::from_raw_fd(go) }), reaped: None, own_stop: None })
            }
        }
    }

    /// Lets the child exec the command.
    pub fn release(&mut self) -> anyhow::Result<()> {
        let go = self.go.take().context("the command was released already")?;
        // SAFETY: writing one byte to our pipe end.
        let n = unsafe { libc::write(go.as_raw_fd(), [1u8].as_ptr().cast(), 1) };
        if n != 1 {
            return Err(io::Error::last_os_error()).context("starting the command");
        }
        Ok(())
    }

    /// Holds the command at its exit, before its address space goes
    /// (ptrace, `PTRACE_O_TRACEEXIT`; the child is ours and still waits on
    /// the pipe): a command done within milliseconds, or one that loaded
    /// libraries since memleak last read its mappings, is still there to
    /// have them read. Nothing else stops: no exec or clone event is asked
    /// for, and the signals it gets are passed on (`pass_stops`).
    pub fn hold_at_exit(&mut self) -> io::Result<()> {
        let options = libc::PTRACE_O_TRACEEXIT as usize;
        // SAFETY: seizing our own child; no memory is passed.
        if unsafe { libc::ptrace(libc::PTRACE_SEIZE, self.pid as libc::pid_t, 0usize, options) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Held at its exit (`hold_at_exit`), a SIGSTOP of the command may be
    /// memleak's own (the kernel's, at its first allocation and at the
    /// first after each exec: see memleak-ebpf's `unwind::hold`): `then`
    /// runs while it is stopped and says whether it was; if so, the
    /// signal is not delivered.
    pub fn on_own_stop(&mut self, then: Box<dyn FnMut() -> bool + Send>) {
        self.own_stop = Some(then);
    }

    /// Whether the command waits in a stop memleak has not seen yet (its
    /// exit, or a signal), without taking it.
    pub fn stopped(&self) -> bool {
        // SAFETY: a zeroed siginfo for waitid to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WSTOPPED | libc::WNOHANG | libc::WNOWAIT | libc::__WALL;
        // SAFETY: waiting for our own child; `info` is valid.
        let got = unsafe { libc::waitid(libc::P_PID, self.pid, &mut info, flags) };
        got == 0 && unsafe { info.si_pid() } == self.pid as libc::pid_t
    }

    /// Lets the command go on from every stop that waits: its exit stop
    /// after `at_exit` (its mappings still readable), a signal passed on as
    /// it came, a group stop (SIGSTOP, SIGTSTP) kept as one. `block`: waits
    /// until it has exited. Returns its exit code (as `reap`) once it has
    /// exited, reaping it; `None` while it runs.
    pub fn pass_stops(&mut self, block: bool, at_exit: &mut dyn FnMut()) -> Option<Option<i32>> {
        if let Some(code) = self.reaped {
            return Some(code);
        }
        let pid = self.pid as libc::pid_t;
        loop {
            let mut status = 0;
            let flags = libc::__WALL | if block { 0 } else { libc::WNOHANG };
            // SAFETY: waiting for our own child.
            let got = unsafe { libc::waitpid(pid, &mut status, flags) };
            if got == 0 {
                return None;
            }
            if got != pid {
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                    continue;
                }
                self.reaped = Some(None);
                return self.reaped;
            }
            if !libc::WIFSTOPPED(status) {
                self.reaped = Some(if libc::WIFEXITED(status) {
                    Some(libc::WEXITSTATUS(status))
                } else if libc::WIFSIGNALED(status) {
                    Some(128 + libc::WTERMSIG(status))
                } else {
                    None
                });
                return self.reaped;
            }
            let signal = libc::WSTOPSIG(status);
            let (request, data) = match status >> 16 {
                libc::PTRACE_EVENT_EXIT => {
                    at_exit();
                    (libc::PTRACE_CONT, 0)
                }
                // A group stop, as SEIZE reports it: stays stopped until SIGCONT.
                libc::PTRACE_EVENT_STOP
                    if matches!(signal, libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU) =>
                {
                    (libc::PTRACE_LISTEN, 0)
                }
                libc::PTRACE_EVENT_STOP => (libc::PTRACE_CONT, 0),
                // memleak's own stop (`on_own_stop`): not the command's.
                0 if signal == libc::SIGSTOP && self.own_stop.as_mut().is_some_and(|ours| ours()) => (libc::PTRACE_CONT, 0),
                // A signal on its way: delivered as if nobody traced it.
                _ => (libc::PTRACE_CONT, signal as usize),
            };
            // SAFETY: resuming our own tracee; no memory is passed. If it
            // died in between, there is nothing to resume.
            unsafe { libc::ptrace(request, pid, 0usize, data) };
        }
    }

    /// Reaps the command, exited; returns its exit code (128 + signal if
    /// killed).
    pub fn reap(&mut self) -> Option<i32> {
        self.pass_stops(true, &mut || {}).flatten()
    }

    /// Ends the command: SIGTERM, then SIGKILL if it is still running
    /// after `grace`; reaps it and returns its exit status as `reap`.
    pub fn end(&mut self, grace: Duration) -> Option<i32> {
        if self.reaped.is_some() {
            return None;
        }
        let pid = self.pid as i32;
        // SAFETY: signalling our own child, not reaped yet (its PID is ours).
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(code) = self.pass_stops(false, &mut || {}) {
                return code;
            }
            if start.elapsed() >= grace {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        self.reap()
    }
}

impl Drop for Held {
    /// A command memleak lets go of dies with it: never left running, or
    /// started, untraced.
    fn drop(&mut self) {
        if self.reaped.is_none() {
            // SAFETY: our own child, not reaped yet.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
            self.reap();
        }
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

/// Waits (up to ~2 s) until the command runs a new program with its
/// libraries mapped, or stops (at its exit): the moment to read its
/// mappings for symbolization. Its executable's name is not looked for:
/// the command may have exec'd another program by then.
pub fn wait_for_exec(held: &Held) {
    let pid = held.pid;
    let me = proc::own_exe();
    for _ in 0..2000 {
        if held.stopped() {
            return;
        }
        let exe = proc::exe(pid);
        let maps = proc::maps_text(pid).unwrap_or_default();
        if maps.is_empty() {
            return; // exited already
        }
        if exe.is_some() && exe != me && maps.lines().any(|l| l.contains("/libc")) {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}
