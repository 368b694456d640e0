//! memleak: trace outstanding memory allocations with eBPF.

mod cli;
mod clock;
mod error;
mod export;
mod fasthash;
mod heap;
mod maps;
mod output;
mod probe;
mod report;
mod serve;
mod stack_end;
mod symbolize;
mod target;
mod trace;
mod unwind;

use std::process::ExitCode;

use clap::Parser as _;

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`memleak ... | head`), as C tools do;
    // the kernel then detaches the probes.
    // SAFETY: restoring the default disposition of SIGPIPE.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    let result = cli::Args::parse().settings().and_then(|settings| {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(trace::run(settings))
    });
    // What is queued for stdout goes out before memleak's last word.
    let drained = output::finish(output::DRAIN);
    let result = result.and_then(|code| drained.map(|()| code));
    match result {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("memleak: {err:#}");
            ExitCode::from(error::exit_code(&err))
        }
    }
}
