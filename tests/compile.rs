//! How a fixture program is compiled: frame pointers (memleak walks user
//! stacks by them) and debug info (for file:line), unoptimized C so each
//! function keeps its own frame. Shared by `tests/build.rs` and xtask
//! (`demo`, `bench`), which must not depend on the tests crate: its build
//! script needs libraries that `cargo xtask setup` installs first.

use std::{path::Path, process::Command};

#[derive(Clone, Copy)]
pub enum Compiler {
    C,
    Cxx,
    Rust,
}

/// Compiles `source` into `out`, with `flags` after the source (libraries).
pub fn compile(compiler: Compiler, source: &Path, out: &Path, flags: &[&str]) -> Result<(), String> {
    let env_or = |var: &str, default: &str| std::env::var(var).unwrap_or_else(|_| default.into());
    let mut cmd = match compiler {
        Compiler::C | Compiler::Cxx => {
            let cc = match compiler {
                Compiler::C => env_or("CC", "cc"),
                _ => env_or("CXX", "c++"),
            };
            let mut cmd = Command::new(cc);
            cmd.args(["-g", "-O0", "-fno-omit-frame-pointer", "-pthread", "-o"]).arg(out).arg(source);
            cmd
        }
        Compiler::Rust => {
            let mut cmd = Command::new(env_or("RUSTC", "rustc"));
            cmd.args(["-g", "-C", "force-frame-pointers=yes", "-C", "opt-level=1", "--edition", "2021", "-o"])
                .arg(out)
                .arg(source);
            cmd
        }
    };
    cmd.args(flags);
    match cmd.status() {
        Ok(status) if status.success() => Ok(()),
        Ok(status) => Err(format!("{cmd:?} failed ({status})")),
        Err(e) => Err(format!("cannot run {cmd:?}: {e}")),
    }
}
