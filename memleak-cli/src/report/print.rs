//! A report, printed: the mappings of the processes shown read again, the
//! names of their threads, then `--dump`'s files, the text or JSON on
//! stdout, and what `--listen` serves.

use std::{
    collections::HashSet,
    time::{SystemTime, UNIX_EPOCH},
};

use memleak_common::is_kernel;

use super::{
    Format, Reporter, Scope, Traced, aggregate::StackTotal, dump, frame_lines, frames_of, json, rows::Built,
    served_stacks, text, threads,
};
use crate::{clock, clock::monotonic_ns, export::pprof, output, serve, target::proc};

impl Reporter {
    /// Prints the report `built`, and publishes it to the server.
    pub(super) fn print(&mut self, built: &Built) -> anyhow::Result<()> {
        let Built { now, rows, shown_rows, combined, entries, live, since, lost, .. } = built;
        let (now, lost) = (*now, *lost);
        // Refresh the mappings of the processes shown (dlopen, exec).
        let shown: Vec<u32> = match self.scope {
            Scope::Process(pid, _) => vec![pid],
            Scope::System { top_procs } => {
                let mut seen = HashSet::new();
                rows.iter().map(|r| r.total.tgid).filter(|t| !is_kernel(*t) && seen.insert(*t)).take(top_procs).collect()
            }
        };
        for pid in shown {
            self.symbolizer.refresh(pid);
        }
        let comms = self.comms(&rows);
        // Each thread's name now. With --by-thread, those of the traced
        // process that hold nothing are listed too.
        let idle: Vec<(u32, u32)> = match self.scope {
            Scope::Process(pid, _) if self.options.by_thread => proc::threads(pid).into_iter().map(|tid| (pid, tid)).collect(),
            _ => vec![],
        };
        let named = rows.iter().flat_map(|r| r.total.threads.iter().map(|t| (r.total.tgid, t.tid)));
        self.names.refresh(named.chain(idle.iter().copied()), &mut |tgid, tid| {
            if is_kernel(tgid) { proc::task_comm(tid) } else { proc::thread_comm(tgid, tid) }
        });
        let by_thread = self.options.by_thread.then(|| threads::by_thread(&rows, &idle, &self.names));
        let names = &self.names;
        let thread_name = |tgid: u32, tid: u32| names.get(tgid, tid).map(str::to_string);
        let threads_line = |t: &StackTotal| {
            (!t.threads.is_empty()).then(|| threads::line(&threads::groups(&t.threads, &|tid| thread_name(t.tgid, tid))))
        };
        let Self { recorded, symbolizer, ends, .. } = self;
        if let Some(dump) = &mut self.dump {
            let stacks: Vec<dump::Stack> = shown_rows
                .iter()
                .map(|&i| {
                    let total = &rows[i].total;
                    let mut blocks = total.blocks.clone();
                    blocks.sort_unstable_by_key(|b| (b.born_ns, b.addr));
                    dump::Stack {
                        tgid: total.tgid,
                        comm: comms.get(&total.tgid).cloned(),
                        kind: total.kind,
                        bytes: total.bytes,
                        count: total.count,
                        frames: frames_of(recorded, symbolizer, ends, total).iter().flat_map(json::frame_json).collect(),
                        blocks,
                    }
                })
                .collect();
            let shown = dump.path().display().to_string();
            match dump.write(self.reports, &stacks, &Traced(recorded)) {
                Ok(c) => eprintln!(
                    "memleak: report {} dumped to {shown}: {} blocks ({} bytes), {} over the budget, {} freed since read",
                    self.reports, c.blocks_written, c.bytes_written, c.blocks_over_budget, c.blocks_gone
                ),
                Err(e) => crate::warn!("--dump {shown}: report {} not dumped: {e}", self.reports),
            }
        }
        let mut out = Vec::new();
        let mut lines = |t: &StackTotal| frame_lines(recorded, symbolizer, ends, t);
        let mut comm = |tgid: u32| comms.get(&tgid).cloned().unwrap_or_else(|| proc::comm(tgid));
        let clock = clock::clock_now();
        match (self.options.format, &self.scope) {
            (Format::Text, scope) if let Some(groups) = &by_thread => {
                let top_procs = match scope {
                    Scope::Process(..) => None,
                    Scope::System { top_procs } => Some(*top_procs),
                };
                let (top, show_allocs) = (self.options.top, self.options.show_allocs);
                text::write_by_thread(&mut out, &clock, top, top_procs, groups, &lost, show_allocs, &mut comm, &mut lines)?;
            }
            (Format::Text, Scope::Process(..)) => {
                text::write(&mut out, &clock, self.options.top, &rows, &lost, self.options.show_allocs, &threads_line, &mut lines)?;
            }
            (Format::Text, Scope::System { top_procs }) => {
                let procs = text::by_process(rows.clone());
                let (top, show_allocs) = (self.options.top, self.options.show_allocs);
                text::write_system(&mut out, &clock, top, *top_procs, &procs, &lost, show_allocs, &mut comm, &threads_line, &mut lines)?;
            }
            (Format::Json, _) => {}
        }
        // The report as --format json prints it: stdout's, and /report.json's.
        let json_ctx = json::Context {
            now: SystemTime::now(),
            elapsed_s: now.saturating_sub(self.start_ns) as f64 / 1e9,
            report: self.reports,
            sort: self.options.sort.name(),
            min_age_ms: (!self.options.combined_only).then_some(self.options.min_age_ns / 1_000_000),
            top: self.options.top,
            show_allocs: self.options.show_allocs,
            peek: self.options.peek.is_some(),
            comms: &comms,
            lost,
            thread_name: (!self.options.combined_only).then_some(&thread_name as &dyn Fn(u32, u32) -> Option<String>),
            by_thread: by_thread.as_deref(),
        };
        let mut json_out = Vec::new();
        let mut frames = |t: &StackTotal| frames_of(recorded, symbolizer, ends, t);
        if self.options.format == Format::Json {
            json::write(&mut out, &json::interval(&json_ctx, &rows, &mut frames))?;
        }
        if self.feed.is_some() {
            // What blocks hold is shown only where asked, never served.
            let served = json::Context { peek: false, ..json_ctx };
            json::write(&mut json_out, &json::interval(&served, &rows, &mut frames))?;
        }
        if !self.options.quiet {
            output::write(out)?;
        }
        if let Some(feed) = &mut self.feed {
            let stacks = served_stacks(&rows, &since, |t| frames_of(recorded, symbolizer, ends, t));
            let elapsed_ns = now.saturating_sub(self.start_ns);
            let meta = pprof::Meta {
                time_nanos: self.start.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as i64),
                duration_nanos: elapsed_ns as i64,
                period: self.options.sample_rate as i64,
            };
            feed.publish(
                &serve::Report {
                    rows: &rows,
                    combined: &combined,
                    live: live.as_ref(),
                    comms: &comms,
                    lost,
                    blocks_read: live.as_ref().map(|l| l.values().sum()),
                    totals_used: entries.len() as u64,
                    stacks_used: entries.iter().map(|(_, k, _)| k.stack_id).collect::<HashSet<_>>().len() as u64,
                    duration_s: monotonic_ns().saturating_sub(now) as f64 / 1e9,
                },
                serve::Views { stacks: &stacks, json: json_out, meta, elapsed_ns },
                &mut |pid, addr| symbolizer.mapping(pid, addr),
            );
        }
        Ok(())
    }
}
