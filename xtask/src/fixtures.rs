//! Fixture programs for `demo` and `bench`, compiled into target/xtask as
//! the tests compile theirs (tests/compile.rs), and a guard that kills one.

// xtask's fixtures are all C.
#[allow(dead_code)]
#[path = "../../tests/compile.rs"]
mod compile;

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
};

use anyhow::Context as _;
pub use compile::Compiler;

/// Compiles tests/fixtures/SOURCE into target/xtask/NAME.
pub fn build(name: &str, compiler: Compiler, source: &str, flags: &[&str]) -> anyhow::Result<PathBuf> {
    let root = crate::workspace_root();
    let dir = root.join("target/xtask");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let out = dir.join(name);
    compile::compile(compiler, &root.join("tests/fixtures").join(source), &out, flags).map_err(anyhow::Error::msg)?;
    Ok(out)
}

/// A running program, killed (SIGKILL) and reaped when dropped.
pub struct Running(pub Child);

impl Running {
    /// Starts `program`; `piped`: its stdin and stdout are pipes to talk
    /// through, else it reads nothing and writes to /dev/null.
    pub fn spawn(program: &PathBuf, args: &[&str], piped: bool) -> anyhow::Result<Self> {
        let io = || if piped { Stdio::piped() } else { Stdio::null() };
        let child = Command::new(program)
            .args(args)
            .stdin(io())
            .stdout(io())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self(child))
    }

    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
