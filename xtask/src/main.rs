//! Project tasks: `cargo xtask setup | build | demo | test | bench | run -- ARGS`.

mod bench;
mod build_bench;
mod fixtures;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "memleak project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what the build needs (idempotent): nightly rust-src, bpf-linker.
    Setup,
    /// Build the eBPF programs, the memleak CLI (release) and the fixtures.
    Build,
    /// Start the leaky Fibonacci fixture and trace it with `memleak -p PID -a`.
    Demo,
    /// Build, then run every test: unit and integration (needs root).
    Test,
    /// Build, then measure memleak's overhead and report speed (see BENCHMARKS.md).
    Bench(bench::Options),
    /// Build, then run memleak with ARGS.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build => build().map(|_| ()),
        Task::Demo => demo(),
        Task::Test => test(),
        Task::Bench(opts) => bench::run(&build()?, &opts),
        Task::Run { args } => {
            let memleak = build()?;
            let status = Command::new(memleak).args(args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask is in the workspace").to_path_buf()
}

/// Runs a command in the workspace root, failing on a non-zero exit.
pub fn cargo(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(workspace_root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Builds everything; returns the memleak binary.
fn build() -> anyhow::Result<PathBuf> {
    setup::run()?;
    cargo(&["build", "--release", "--package", "memleak-cli"])?;
    let memleak = workspace_root().join("target/release/memleak");
    if !memleak.exists() {
        bail!("{} was not built", memleak.display());
    }
    Ok(memleak)
}

fn demo() -> anyhow::Result<()> {
    let memleak = build()?;
    let fixture = fixtures::build("fibonacci", fixtures::Compiler::C, "fibonacci.c", &[])?;
    // The case study's program, leaking 8 KiB every 200 ms.
    let app = fixtures::Running::spawn(&fixture, &["200"], false)?;
    thread::sleep(Duration::from_millis(300));
    let pid = app.pid().to_string();
    println!("$ {} 200 &   # pid {pid}", fixture.display());
    println!("$ memleak -p {pid} -a 2 3");
    let status = Command::new(memleak).args(["-p", &pid, "-a", "2", "3"]).status()?;
    drop(app);
    if !status.success() {
        bail!("memleak failed ({status})");
    }
    Ok(())
}

fn test() -> anyhow::Result<()> {
    let memleak = build()?;
    // SAFETY: no arguments, cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the integration tests attach real probes: run `cargo xtask test` as root");
    }
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(["test", "--workspace", "--exclude", "memleak-ebpf"])
        .env("MEMLEAK_BIN", &memleak)
        .current_dir(workspace_root())
        .status()?;
    if !status.success() {
        bail!("tests failed ({status})");
    }
    Ok(())
}
