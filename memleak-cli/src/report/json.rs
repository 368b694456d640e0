//! `--format json`: one JSON object per report, on one line of stdout
//! (JSON Lines). The fields are documented in the README; add fields,
//! never rename or remove them.

use std::{
    collections::HashMap,
    io::Write,
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{
    report::{
        aggregate::{Peek, StackTotal},
        lost::Lost,
        peek,
        threads::ByThread,
    },
    symbolize::Frame,
    report::trend::{Row, Trend},
};

#[derive(Debug, Serialize)]
pub struct Interval {
    /// Wall-clock time of the report, RFC 3339, UTC.
    pub timestamp: String,
    /// Seconds since the probes were attached.
    pub elapsed_s: f64,
    /// 1 for the first report.
    pub report: u64,
    /// `--sort`.
    pub sort: &'static str,
    /// `-o`: younger blocks are not counted (null with --combined-only).
    pub min_age_ms: Option<u64>,
    /// What the kernel side could not record since attach (all 0 if nothing).
    pub lost: Lost,
    pub processes: Vec<Process>,
}

#[derive(Debug, Serialize)]
pub struct Process {
    pub pid: u32,
    pub comm: Option<String>,
    /// Outstanding bytes and blocks over all of its stacks.
    pub bytes: u64,
    pub count: u64,
    /// The part of `bytes` and `count` in direct mappings (`kind` mmap).
    pub mapped_bytes: u64,
    pub mapped_count: u64,
    /// Its stacks with outstanding blocks; `stacks` holds the top ones:
    /// the top heap stacks, then the top mappings.
    pub stacks_total: usize,
    pub stacks: Vec<Stack>,
    /// Its outstanding blocks by thread name, with `--by-thread` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub by_thread: Option<Vec<ThreadGroupJson>>,
}

#[derive(Debug, Serialize)]
pub struct Stack {
    pub bytes: u64,
    pub count: u64,
    /// The hooked function that made its blocks (`malloc`, `calloc`,
    /// `new`, `mmap`, `kmalloc`, ...; `unknown` for blocks whose totals
    /// entry the kernel had no room for).
    pub kind: &'static str,
    pub trend: TrendJson,
    /// False when the kernel could not record the stack (`frames` is empty).
    pub stack_recorded: bool,
    /// Innermost first; functions inlined at an address come before the
    /// function they were inlined into, with `inlined: true`.
    pub frames: Vec<FrameJson>,
    /// Why the stack ends after `frames` when the walk went on past its
    /// real end (`next address in heap, not code`; see stack_end), else
    /// null.
    pub end: Option<String>,
    /// The blocks, with `-a` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Vec<BlockJson>>,
    /// The first bytes of its oldest blocks, with `--peek` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peek: Option<Vec<PeekJson>>,
    /// The threads that allocated the blocks counted, most blocks first
    /// (null with --combined-only, which keeps no block).
    pub threads: Option<Vec<ThreadJson>>,
}

#[derive(Debug, Serialize)]
pub struct ThreadJson {
    pub tid: u32,
    /// Its name at report time (see report::threads); null if it exited
    /// before any report saw it.
    pub comm: Option<String>,
    /// Its outstanding blocks (and their bytes) of the stack.
    pub count: u64,
    pub bytes: u64,
}

#[derive(Debug, Serialize)]
pub struct ThreadGroupJson {
    /// The threads' name (null: exited before any report saw them).
    pub comm: Option<String>,
    /// How many threads of that name hold blocks (for a name none does,
    /// how many live), and which.
    pub threads: usize,
    pub tids: Vec<u32>,
    /// Their outstanding bytes and blocks, over all the process's stacks.
    pub bytes: u64,
    pub count: u64,
}

#[derive(Debug, Serialize)]
pub struct TrendJson {
    pub change_bytes: i64,
    pub rate_bytes_per_s: Option<f64>,
    pub oldest_age_ms: Option<u64>,
    pub allocs: Option<u64>,
    pub frees: Option<u64>,
    pub reports: u32,
    pub growing: bool,
}

#[derive(Debug, Serialize)]
pub struct FrameJson {
    /// Return address, hex.
    pub addr: String,
    pub module: Option<String>,
    pub symbol: Option<String>,
    /// Of the return address in the function (null for inlined frames).
    pub offset: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub inlined: bool,
}

#[derive(Debug, Serialize)]
pub struct BlockJson {
    pub addr: String,
    pub size: u64,
}

#[derive(Debug, Serialize)]
pub struct PeekJson {
    /// The block's address, hex.
    pub addr: String,
    /// The block's size (`bytes` holds its first N bytes).
    pub size: u64,
    /// Base64.
    pub bytes: String,
    /// The bytes escaped as the text report shows them.
    pub text: String,
}

/// What a report is about, besides its rows.
pub struct Context<'a> {
    pub now: SystemTime,
    pub elapsed_s: f64,
    pub report: u64,
    pub sort: &'static str,
    pub min_age_ms: Option<u64>,
    pub top: usize,
    pub show_allocs: bool,
    /// `--peek`: stacks carry a `peek` list.
    pub peek: bool,
    pub comms: &'a HashMap<u32, String>,
    pub lost: Lost,
    /// The name of thread (process, tid); None with --combined-only, whose
    /// stacks have no `threads`.
    pub thread_name: Option<&'a dyn Fn(u32, u32) -> Option<String>>,
    /// `--by-thread`: the report grouped by thread name.
    pub by_thread: Option<&'a [ByThread]>,
}

/// One report: the traced processes (those in `comms`, by pid, even with
/// nothing outstanding), then any other in order of its first row; each
/// with its `top` first rows (as the text report shows them: `-T` stacks
/// per process).
pub fn interval(ctx: &Context<'_>, rows: &[Row], frames: &mut dyn FnMut(&StackTotal) -> Vec<Frame>) -> Interval {
    let process = |pid: u32| Process {
        pid,
        comm: ctx.comms.get(&pid).cloned(),
        bytes: 0,
        count: 0,
        mapped_bytes: 0,
        mapped_count: 0,
        stacks_total: 0,
        stacks: vec![],
        by_thread: ctx.by_thread.map(|groups| {
            groups
                .iter()
                .filter(|g| g.tgid == pid)
                .map(|g| ThreadGroupJson {
                    comm: g.group.name.clone(),
                    threads: g.group.tids.len(),
                    tids: g.group.tids.clone(),
                    bytes: g.group.bytes,
                    count: g.group.count,
                })
                .collect()
        }),
    };
    let mut traced: Vec<u32> = ctx.comms.keys().copied().collect();
    traced.sort_unstable();
    let mut processes: Vec<Process> = traced.iter().map(|&pid| process(pid)).collect();
    let mut index: HashMap<u32, usize> = traced.iter().enumerate().map(|(i, &pid)| (pid, i)).collect();
    // Stacks listed of each process's heap and mappings.
    let mut listed: HashMap<(usize, bool), usize> = HashMap::new();
    for Row { total, trend } in rows {
        let p = *index.entry(total.tgid).or_insert_with(|| {
            processes.push(process(total.tgid));
            processes.len() - 1
        });
        let process = &mut processes[p];
        process.bytes += total.bytes;
        process.count += total.count;
        process.stacks_total += 1;
        let mapping = total.kind.is_mapping();
        if mapping {
            process.mapped_bytes += total.bytes;
            process.mapped_count += total.count;
        }
        let n = listed.entry((p, mapping)).or_default();
        if *n >= ctx.top {
            continue;
        }
        *n += 1;
        let recorded = total.stack_id != memleak_common::NO_STACK;
        let frames = if recorded { frames(total) } else { vec![] };
        process.stacks.push(Stack {
            bytes: total.bytes,
            count: total.count,
            kind: total.kind.name(),
            trend: trend_json(trend),
            stack_recorded: recorded,
            end: frames.iter().find_map(|f| f.end.clone()),
            frames: frames.iter().filter(|f| f.end.is_none()).flat_map(frame_json).collect(),
            blocks: ctx.show_allocs.then(|| {
                total.blocks.iter().map(|b| BlockJson { addr: format!("{:#x}", b.addr), size: b.size }).collect()
            }),
            peek: ctx.peek.then(|| total.peeks.iter().map(peek_json).collect()),
            threads: ctx.thread_name.map(|name| threads_json(total, name)),
        });
    }
    Interval {
        timestamp: rfc3339(ctx.now),
        elapsed_s: (ctx.elapsed_s * 1000.0).round() / 1000.0,
        report: ctx.report,
        sort: ctx.sort,
        min_age_ms: ctx.min_age_ms,
        lost: ctx.lost,
        processes,
    }
}

/// Writes `interval` as one line.
pub fn write(out: &mut impl Write, interval: &Interval) -> std::io::Result<()> {
    serde_json::to_writer(&mut *out, interval)?;
    writeln!(out)
}

/// A stack's threads, most blocks first (then most bytes, lowest tid).
fn threads_json(total: &StackTotal, name: &dyn Fn(u32, u32) -> Option<String>) -> Vec<ThreadJson> {
    let mut threads: Vec<ThreadJson> = total
        .threads
        .iter()
        .map(|t| ThreadJson { tid: t.tid, comm: name(total.tgid, t.tid), count: t.count, bytes: t.bytes })
        .collect();
    threads.sort_by(|a, b| (b.count, b.bytes, a.tid).cmp(&(a.count, a.bytes, b.tid)));
    threads
}

fn peek_json(p: &Peek) -> PeekJson {
    PeekJson { addr: format!("{:#x}", p.addr), size: p.size, bytes: peek::base64(&p.bytes), text: peek::escape(&p.bytes) }
}

fn trend_json(t: &Trend) -> TrendJson {
    TrendJson {
        change_bytes: t.change_bytes,
        rate_bytes_per_s: t.rate_bytes_per_s.map(|r| (r * 10.0).round() / 10.0),
        oldest_age_ms: t.oldest_age_ns.map(|ns| ns / 1_000_000),
        allocs: t.allocs,
        frees: t.frees,
        reports: t.reports,
        growing: t.growing,
    }
}

pub fn frame_json(f: &Frame) -> Vec<FrameJson> {
    let addr = format!("{:#x}", f.addr);
    let mut out: Vec<FrameJson> = f
        .inlined
        .iter()
        .map(|(name, source)| FrameJson {
            addr: addr.clone(),
            module: f.module.clone(),
            symbol: Some(name.clone()),
            offset: None,
            file: source.as_ref().map(|s| s.file.clone()),
            line: source.as_ref().and_then(|s| s.line),
            inlined: true,
        })
        .collect();
    out.push(FrameJson {
        addr,
        module: f.module.clone(),
        symbol: f.symbol.as_ref().map(|(name, _)| name.clone()),
        offset: f.symbol.as_ref().map(|(_, offset)| *offset),
        file: f.source.as_ref().map(|s| s.file.clone()),
        line: f.source.as_ref().and_then(|s| s.line),
        inlined: false,
    });
    out
}

/// `2025-06-01T12:00:00.123Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (year, month, day) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        s / 3600,
        s % 3600 / 60,
        s % 60,
        d.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{
        report::aggregate::Block,
        symbolize::SourceLine,
    };

    fn row(tgid: u32, stack_id: u64, bytes: u64) -> Row {
        Row {
            total: StackTotal {
                tgid,
                stack_id,
                bytes,
                count: bytes / 8192,
                live: bytes / 8192,
                blocks: vec![Block { addr: 0x7f00, size: 8192, born_ns: 0 }],
                oldest_ns: Some(0),
                peeks: vec![Peek { addr: 0x7f00, size: 8192, bytes: b"id=4099\0\xff".to_vec() }],
                ..Default::default()
            },
            trend: Trend {
                change_bytes: 16384,
                rate_bytes_per_s: Some(8192.04),
                oldest_age_ns: Some(2_100_000_000),
                allocs: Some(7),
                frees: Some(2),
                reports: 3,
                growing: true,
            },
        }
    }

    fn frames(_: &StackTotal) -> Vec<Frame> {
        vec![
            Frame {
                addr: 0x401136,
                symbol: Some(("fibonacci".into(), 0x1f)),
                module: Some("app".into()),
                source: Some(SourceLine { file: "fixtures/fibonacci.c".into(), line: Some(20) }),
                inlined: vec![("helper".into(), None)],
                end: None,
            },
            Frame { addr: 0x9, symbol: None, module: Some("libc.so.6".into()), source: None, inlined: vec![], end: None },
        ]
    }

    fn encode(rows: &[Row], top: usize, show_allocs: bool) -> serde_json::Value {
        encode_peek(rows, top, show_allocs, false)
    }

    fn encode_peek(rows: &[Row], top: usize, show_allocs: bool, peek: bool) -> serde_json::Value {
        let comms = HashMap::from([(42, "app".to_string())]);
        let ctx = Context {
            now: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            elapsed_s: 3.00049,
            report: 3,
            sort: "size",
            min_age_ms: Some(500),
            top,
            show_allocs,
            peek,
            comms: &comms,
            lost: Lost { allocations_untracked: 27, ..Lost::default() },
            thread_name: None,
            by_thread: None,
        };
        let mut out = Vec::new();
        write(&mut out, &interval(&ctx, rows, &mut frames)).unwrap();
        let text = String::from_utf8(out).unwrap();
        assert_eq!(text.matches('\n').count(), 1, "one line per report: {text}");
        serde_json::from_str(&text).unwrap()
    }

    #[test]
    fn one_object_per_report_with_stacks_trends_and_frames() {
        let v = encode(&[row(42, 1, 40960), row(42, 2, 8192)], 10, false);
        assert_eq!(v["timestamp"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["elapsed_s"], 3.0);
        assert_eq!((v["report"].as_u64(), v["sort"].as_str(), v["min_age_ms"].as_u64()), (Some(3), Some("size"), Some(500)));
        assert_eq!(
            v["lost"],
            serde_json::json!({"allocations_untracked": 27, "stacks_unrecorded": 0, "totals_missed": 0,
                               "calls_unfollowed": 0, "mappings_unfollowed": 0, "frames_without_table": 0})
        );
        let p = &v["processes"][0];
        assert_eq!((p["pid"].as_u64(), p["comm"].as_str()), (Some(42), Some("app")));
        assert_eq!((p["bytes"].as_u64(), p["count"].as_u64(), p["stacks_total"].as_u64()), (Some(49152), Some(6), Some(2)));
        let s = &p["stacks"][0];
        assert_eq!((s["bytes"].as_u64(), s["count"].as_u64()), (Some(40960), Some(5)));
        assert_eq!(
            s["trend"],
            serde_json::json!({"change_bytes": 16384, "rate_bytes_per_s": 8192.0, "oldest_age_ms": 2100,
                               "allocs": 7, "frees": 2, "reports": 3, "growing": true})
        );
        assert_eq!(s["stack_recorded"], true);
        assert!(s.get("blocks").is_none(), "blocks only with -a");
        assert!(s.get("peek").is_none(), "peek only with --peek");
        assert_eq!(
            s["frames"],
            serde_json::json!([
                {"addr": "0x401136", "module": "app", "symbol": "helper", "offset": null, "file": null, "line": null, "inlined": true},
                {"addr": "0x401136", "module": "app", "symbol": "fibonacci", "offset": 31, "file": "fixtures/fibonacci.c", "line": 20, "inlined": false},
                {"addr": "0x9", "module": "libc.so.6", "symbol": null, "offset": null, "file": null, "line": null, "inlined": false},
            ])
        );
    }

    #[test]
    fn top_limits_stacks_not_totals_and_processes_stay_apart() {
        let mut lost = row(42, memleak_common::NO_STACK, 8192);
        lost.trend.allocs = None;
        let v = encode(&[row(7, 1, 16384), lost, row(7, 2, 8192), row(7, 3, 100)], 2, true);
        let ps = v["processes"].as_array().unwrap();
        assert_eq!(ps.len(), 2);
        assert_eq!((ps[1]["pid"].as_u64(), ps[1]["stacks_total"].as_u64(), ps[1]["bytes"].as_u64()), (Some(7), Some(3), Some(24676)));
        // -T per process, as in the text report: its first two, though
        // another process's row came between them.
        let bytes: Vec<u64> = ps[1]["stacks"].as_array().unwrap().iter().map(|s| s["bytes"].as_u64().unwrap()).collect();
        assert_eq!(bytes, [16384, 8192]);
        assert_eq!(ps[1]["comm"], serde_json::Value::Null);
        assert_eq!(ps[1]["stacks"][0]["blocks"], serde_json::json!([{"addr": "0x7f00", "size": 8192}]));
        let s = &ps[0]["stacks"][0];
        assert_eq!((s["stack_recorded"].as_bool(), s["frames"].as_array().unwrap().len()), (Some(false), 0));
        assert_eq!(s["trend"]["allocs"], serde_json::Value::Null);
    }

    #[test]
    fn peek_gives_bytes_in_base64_and_as_escaped_text() {
        let v = encode_peek(&[row(42, 1, 8192)], 10, false, true);
        assert_eq!(
            v["processes"][0]["stacks"][0]["peek"],
            serde_json::json!([{"addr": "0x7f00", "size": 8192, "bytes": "aWQ9NDA5OQD/", "text": "id=4099\\0\\xff"}])
        );
    }

    #[test]
    fn threads_most_blocks_first_and_by_thread_per_process() {
        use crate::report::{aggregate::ThreadTotal, threads::{self, Names}};
        let mut r = row(42, 1, 8192 * 4);
        r.total.threads = vec![
            ThreadTotal { tid: 5, count: 1, bytes: 8192 },
            ThreadTotal { tid: 6, count: 3, bytes: 3 * 8192 },
        ];
        let rows = [r];
        let mut names = Names::default();
        names.refresh([(42, 5), (42, 6), (42, 9)], &mut |_, tid| (tid != 5).then(|| format!("w{}", tid % 2)));
        let groups = threads::by_thread(&rows, &[(42, 9)], &names);
        let comms = HashMap::from([(42, "app".to_string())]);
        let name = |tgid: u32, tid: u32| names.get(tgid, tid).map(str::to_string);
        let ctx = Context {
            now: UNIX_EPOCH,
            elapsed_s: 1.0,
            report: 1,
            sort: "size",
            min_age_ms: Some(0),
            top: 10,
            show_allocs: false,
            peek: false,
            comms: &comms,
            lost: Lost::default(),
            thread_name: Some(&name),
            by_thread: Some(&groups),
        };
        let v = serde_json::to_value(interval(&ctx, &rows, &mut frames)).unwrap();
        let p = &v["processes"][0];
        assert_eq!(
            p["stacks"][0]["threads"],
            serde_json::json!([{"tid": 6, "comm": "w0", "count": 3, "bytes": 24576}, {"tid": 5, "comm": null, "count": 1, "bytes": 8192}])
        );
        assert_eq!(
            p["by_thread"],
            serde_json::json!([
                {"comm": "w0", "threads": 1, "tids": [6], "bytes": 24576, "count": 3},
                {"comm": null, "threads": 1, "tids": [5], "bytes": 8192, "count": 1},
                {"comm": "w1", "threads": 1, "tids": [9], "bytes": 0, "count": 0},
            ])
        );
        // --combined-only: no threads to tell.
        let plain = encode(&rows, 10, false);
        assert_eq!(plain["processes"][0]["stacks"][0]["threads"], serde_json::Value::Null);
        assert!(plain["processes"][0].get("by_thread").is_none());
    }

    #[test]
    fn a_traced_process_with_nothing_outstanding_is_listed_empty() {
        let v = encode(&[], 10, false);
        assert_eq!(
            v["processes"],
            serde_json::json!([{"pid": 42, "comm": "app", "bytes": 0, "count": 0, "mapped_bytes": 0, "mapped_count": 0,
                                "stacks_total": 0, "stacks": []}])
        );
    }

    #[test]
    fn each_stack_has_its_kind_and_mappings_have_their_own_top() {
        use memleak_common::Kind;
        let mut rows = vec![row(42, 1, 8192 * 3), row(42, 2, 8192 * 2), row(42, 3, 8192 * 8), row(42, 4, 8192)];
        let kinds = [Kind::Malloc, Kind::Calloc, Kind::Mmap, Kind::Mmap];
        for (r, k) in rows.iter_mut().zip(kinds) {
            r.total.kind = k;
        }
        crate::report::sort::sort(&mut rows, crate::report::sort::SortKey::Size);
        let v = encode(&rows, 1, false);
        let p = &v["processes"][0];
        assert_eq!((p["bytes"].as_u64(), p["mapped_bytes"].as_u64(), p["mapped_count"].as_u64()), (Some(8192 * 14), Some(8192 * 9), Some(9)));
        // The heap's top one, then the mappings' top one, though the
        // biggest stack is a mapping.
        let listed: Vec<(&str, u64)> =
            p["stacks"].as_array().unwrap().iter().map(|s| (s["kind"].as_str().unwrap(), s["bytes"].as_u64().unwrap())).collect();
        assert_eq!(listed, [("malloc", 8192 * 3), ("mmap", 8192 * 8)]);
        assert_eq!(p["stacks_total"], 4);
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(UNIX_EPOCH + Duration::from_secs(4_107_542_399)), "2100-02-28T23:59:59.000Z");
    }
}
