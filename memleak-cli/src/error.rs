//! Errors a user can cause, each with its own exit code, so scripts can tell
//! "no such process" from "not root". Anything else exits 1.

use std::fmt;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Bad option values (clap's own usage errors also exit 2).
    Usage = 2,
    /// The PID does not exist, is a kernel thread, or vanished before attach.
    NoProcess = 3,
    /// Not root, or the kernel refuses BPF.
    Permission = 4,
    /// The allocator library or its symbols cannot be found or probed.
    Attach = 5,
    /// stdout could not be written (a full disk, `/dev/full`).
    Output = 6,
    /// The traced process's unwind tables do not fit `--unwind-memory`.
    UnwindMemory = 7,
}

/// An error whose message is meant for the user as is.
#[derive(Debug)]
pub struct UserError {
    pub kind: Kind,
    pub message: String,
}

impl fmt::Display for UserError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for UserError {}

pub fn user_error(kind: Kind, message: impl Into<String>) -> anyhow::Error {
    UserError {
        kind,
        message: message.into(),
    }
    .into()
}

/// The exit code for an error: the first `UserError` in its chain, else 1.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    err.chain()
        .find_map(|e| e.downcast_ref::<UserError>())
        .map_or(1, |e| e.kind as u8)
}

/// A warning on stderr, with the `memleak: warning:` prefix every warning
/// has, as every error has `memleak:`.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => {
        eprintln!("memleak: warning: {}", format_args!($($arg)*))
    };
}
