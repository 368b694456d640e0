//! Each interval's report: read the maps, aggregate, symbolize what is
//! printed, write it, and warn about anything the kernel side lost.

use std::{collections::HashSet, io::Write as _};

use memleak_common::is_kernel;

use crate::{
    cli::Args,
    collect::{self, Recorded},
    proc,
    report::{self, StackTotal},
    symbolize::Symbolizer,
};

/// What a report covers.
pub enum Scope {
    /// One process (-p, -c).
    Process(u32),
    /// Every process and the kernel, grouped by process.
    System { top_procs: usize },
}

pub struct Reporter {
    scope: Scope,
    recorded: Recorded,
    symbolizer: Symbolizer,
    lost: Vec<u64>,
    top: usize,
    min_age_ns: u64,
    show_allocs: bool,
    combined_only: bool,
}

impl Reporter {
    pub fn new(args: &Args, recorded: Recorded, scope: Scope) -> Self {
        let mut symbolizer = Symbolizer::new(true);
        if let Scope::Process(pid) = scope {
            // Open the target's files now: its frames must still resolve if
            // it exits before the first report.
            symbolizer.refresh(pid);
        }
        Self {
            scope,
            // The maps are new: everything counted so far counts.
            lost: vec![0; memleak_common::STAT_COUNT as usize],
            recorded,
            symbolizer,
            top: args.top,
            min_age_ns: args.older.saturating_mul(1_000_000),
            show_allocs: args.show_allocs,
            combined_only: args.combined_only,
        }
    }

    pub fn report(&mut self) -> anyhow::Result<()> {
        let mut totals = if self.combined_only {
            report::from_combined(self.recorded.combined())
        } else {
            report::by_stack(self.recorded.allocations(), monotonic_ns(), self.min_age_ns)
        };
        let lost = self.recorded.lost();
        for warning in collect::lost_warnings(&self.lost, &lost) {
            eprintln!("{warning}");
        }
        self.lost = lost.to_vec();
        let clock = report::clock_now();
        let mut out = std::io::stdout().lock();
        match self.scope {
            Scope::Process(pid) => {
                self.symbolizer.refresh(pid);
                let Self { recorded, symbolizer, .. } = self;
                let mut frames = |t: &StackTotal| frame_lines(recorded, symbolizer, t);
                report::write(&mut out, &clock, self.top, &totals, self.show_allocs, &mut frames)?;
            }
            Scope::System { top_procs } => {
                // A process that exited without freeing is not leaking any
                // more: drop what it left, in the kernel maps too.
                let dead: HashSet<u32> = totals
                    .iter()
                    .map(|t| t.tgid)
                    .filter(|&tgid| !is_kernel(tgid) && !std::path::Path::new(&format!("/proc/{tgid}")).exists())
                    .collect();
                if !dead.is_empty() {
                    self.recorded.forget_processes(&dead);
                    totals.retain(|t| !dead.contains(&t.tgid));
                }
                let procs = report::by_process(totals);
                for p in procs.iter().filter(|p| !is_kernel(p.tgid)).take(top_procs) {
                    self.symbolizer.refresh(p.tgid);
                }
                let Self { recorded, symbolizer, .. } = self;
                let mut frames = |t: &StackTotal| frame_lines(recorded, symbolizer, t);
                let mut comm = proc::comm;
                report::write_system(
                    &mut out,
                    &clock,
                    self.top,
                    top_procs,
                    &procs,
                    self.show_allocs,
                    &mut comm,
                    &mut frames,
                )?;
            }
        }
        out.flush()?;
        Ok(())
    }
}

fn frame_lines(recorded: &Recorded, symbolizer: &mut Symbolizer, total: &StackTotal) -> Vec<String> {
    let addrs = recorded.stack(total.stack_id);
    let frames = if is_kernel(total.tgid) {
        symbolizer.kernel_frames(&addrs)
    } else {
        symbolizer.frames(total.tgid, &addrs)
    };
    frames.iter().flat_map(|f| f.lines()).collect()
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: a valid timespec pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
