//! Exact numbers: scenarios of the `exact` fixture whose outstanding bytes
//! and blocks are known to the byte, traced from attach to a SIGINT report.

use std::{
    io::{Read as _, Write as _},
    os::unix::process::ExitStatusExt as _,
    process::{Command, Stdio},
    time::Duration,
};

use memleak_tests::{Report, Stack, fixture, parse_reports, scenario::trace_scenario_env};

fn report(args: &[&str], memleak_args: &[&str]) -> (Report, String) {
    report_env(&[], args, memleak_args)
}

fn report_env(env: &[(&str, &str)], args: &[&str], memleak_args: &[&str]) -> (Report, String) {
    let mut all = vec!["-o", "0", "-T", "5000"];
    all.extend_from_slice(memleak_args);
    all.push("600"); // the SIGINT report is the one that counts
    let traced = trace_scenario_env(&fixture("exact"), env, args, &all, Duration::from_secs(180));
    assert!(traced.status.success(), "{:?}\n{}\n{}", traced.status, traced.stdout, traced.stderr);
    let mut reports = parse_reports(&traced.stdout);
    assert_eq!(reports.len(), 1, "{}", traced.stdout);
    (reports.pop().unwrap(), traced.stderr)
}

/// The report's one stack, which starts with `functions`, with no warning.
fn only_stack(env: &[(&str, &str)], args: &[&str], memleak_args: &[&str], functions: &[&str]) -> Stack {
    let (mut report, stderr) = report_env(env, args, memleak_args);
    assert_eq!(report.stacks.len(), 1, "{args:?} {memleak_args:?}: {report:?}\n{stderr}");
    assert!(!stderr.contains("warning"), "{stderr}");
    let stack = report.stacks.pop().unwrap();
    assert!(stack.starts_with(functions), "{stack:?}");
    stack
}

fn in_function<'a>(report: &'a Report, function: &str) -> Vec<&'a Stack> {
    report.stacks.iter().filter(|s| s.starts_with(&[function])).collect()
}

fn totals(stacks: &[&Stack]) -> (u64, u64) {
    (stacks.iter().map(|s| s.bytes).sum(), stacks.iter().map(|s| s.count).sum())
}

#[test]
fn sixteen_threads_of_churn_leave_exactly_nothing() {
    for mode in [&[][..], &["--combined-only"]] {
        let (report, stderr) = report(&["threads", "16", "150000"], mode);
        assert!(report.stacks.is_empty(), "{mode:?}: {report:?}\n{stderr}");
        assert!(!stderr.contains("warning"), "{stderr}");
    }
}

#[test]
fn sixteen_threads_of_churn_then_a_known_leak_per_thread() {
    // The control for the test above: the probes do see every thread.
    for mode in [&[][..], &["--combined-only"]] {
        let (report, _) = report(&["threads", "16", "100000", "3"], mode);
        assert_eq!(report.stacks.len(), 1, "{mode:?}: {report:?}");
        assert!(report.stacks[0].starts_with(&["churn_leak", "churn"]), "{report:?}");
        assert_eq!((report.stacks[0].bytes, report.stacks[0].count), (16 * 3 * 777, 16 * 3));
    }
}

#[test]
fn blocks_freed_on_another_cpu_leave_exact_totals() {
    // The kernel keeps each stack's totals in a part per CPU: the freeing
    // CPU's part goes below zero, and the parts must add up.
    for mode in [&[][..], &["--combined-only"]] {
        let (report, stderr) = report(&["handoff", "20000", "7"], mode);
        assert_eq!(report.stacks.len(), 1, "{mode:?}: {report:?}\n{stderr}");
        let stack = &report.stacks[0];
        assert!(stack.starts_with(&["handoff_alloc", "handoff_allocator"]), "{stack:?}");
        assert_eq!((stack.bytes, stack.count), (7 * 100, 7), "{mode:?}: {stack:?}");
        assert!(stack.trend.contains("20000 allocs/19993 frees"), "{mode:?}: {stack:?}");
        assert!(!stderr.contains("warning"), "{stderr}");
    }
}

#[test]
fn blocks_past_a_full_table_bucket_are_tracked_and_freed_exactly() {
    // --max-allocs 65536 has the smallest table, 16384 slots: 60000 blocks
    // fill every bucket, and most go to the hash map beside it. Freed on
    // another CPU, each must be found wherever it went.
    for mode in [&["--max-allocs", "65536"][..], &["--max-allocs", "65536", "--combined-only"]] {
        let (report, stderr) = report(&["handoff", "60000", "7"], mode);
        assert_eq!(report.stacks.len(), 1, "{mode:?}: {report:?}\n{stderr}");
        let stack = &report.stacks[0];
        assert_eq!((stack.bytes, stack.count), (7 * 100, 7), "{mode:?}: {stack:?}");
        assert!(stack.trend.contains("60000 allocs/59993 frees"), "{mode:?}: {stack:?}");
        assert!(!stderr.contains("warning"), "{stderr}");
    }
}

#[test]
fn verbose_says_what_each_program_cost_when_the_kernel_counts_it() {
    const STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";
    /// Puts the setting back, even if the run panics.
    struct Restore(String);
    impl Drop for Restore {
        fn drop(&mut self) {
            let _ = std::fs::write(STATS, self.0.trim());
        }
    }
    let _restore = Restore(std::fs::read_to_string(STATS).expect("bpf_stats_enabled"));
    std::fs::write(STATS, "1").expect("enabling BPF stats");
    let (report, stderr) = report(&["exact", "37"], &["-v"]);
    assert_eq!(report.stacks.len(), 1, "{report:?}");
    let runs = |program: &str| -> u64 {
        let prefix = format!("memleak: program {program} ran ");
        let line = stderr.lines().find_map(|l| l.strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {program}:\n{stderr}"));
        line.split_whitespace().next().and_then(|n| n.parse().ok()).expect("runs")
    };
    // The fixture's 37 blocks, at least (its start-up allocates too).
    assert!(runs("malloc_enter") >= 37 && runs("alloc_exit") >= 37, "{stderr}");
    assert!(stderr.lines().any(|l| l.starts_with("memleak: program ") && l.ends_with(" ns each)")), "{stderr}");
}

#[test]
fn exact_bytes_and_blocks_from_a_known_stack() {
    for mode in [&[][..], &["--combined-only"]] {
        let (report, _) = report(&["exact", "37"], mode);
        assert_eq!(report.stacks.len(), 1, "{mode:?}: {report:?}");
        let stack = &report.stacks[0];
        assert!(stack.starts_with(&["leak_exact", "main"]), "{stack:?}");
        assert_eq!((stack.bytes, stack.count), (8 * 37 * 38, 37));
    }
}

#[test]
fn realloc_chain_null_zero_and_failure() {
    let (report, _) = report(&["realloc"], &["-a"]);
    let stacks = in_function(&report, "realloc_chain");
    assert_eq!(stacks.len(), report.stacks.len(), "{report:?}");
    let mut sizes: Vec<u64> = stacks.iter().flat_map(|s| s.blocks.iter().map(|b| b.1)).collect();
    sizes.sort();
    // realloc -> 64; realloc(NULL, 128); realloc(q, 0) frees; a failed
    // realloc leaves its 1000-byte block, a failed reallocarray (a jump
    // to realloc in glibc) its 2000-byte one.
    assert_eq!(sizes, [64, 128, 1000, 2000], "{report:?}");
}

#[test]
fn aligned_allocators_record_requested_sizes() {
    let (report, _) = report(&["aligned"], &["-a"]);
    let stacks = in_function(&report, "aligned");
    assert_eq!(stacks.len(), report.stacks.len(), "{report:?}");
    let mut sizes: Vec<u64> = stacks.iter().flat_map(|s| s.blocks.iter().map(|b| b.1)).collect();
    sizes.sort();
    assert_eq!(sizes, [100, 100, 1000, 5000, 8192], "{report:?}");
}

#[test]
fn calloc_overflow_and_free_null_record_nothing() {
    let (report, _) = report(&["edge"], &[]);
    assert!(report.stacks.is_empty(), "{report:?}");
}

#[test]
fn a_threads_first_call_free_makes_no_phantom_arena() {
    // glibc 2.36 sets up a new thread's cache inside its first free, which
    // mmaps a new arena's 64 MiB heap (alloc_new_heap): that mapping is
    // free's, not a block of the program's. An mmap made just after a free
    // returned, from a deeper frame, is the program's.
    for mode in [&[][..], &["--combined-only"]] {
        let (report, stderr) = report(&["freefirst"], mode);
        assert_eq!(report.stacks.len(), 2, "{mode:?}: {report:?}\n{stderr}");
        let heap = in_function(&report, "leak_after_free");
        let mapped = in_function(&report, "map_pages");
        assert!(heap.len() == 1 && heap[0].starts_with(&["leak_after_free", "free_first"]), "{report:?}");
        assert_eq!(totals(&heap), (3333, 1), "{mode:?}");
        assert!(mapped.len() == 1 && mapped[0].starts_with(&["map_pages", "map_after_free"]), "{report:?}");
        assert_eq!(totals(&mapped), (8192, 1), "{mode:?}");
    }
}

#[test]
fn malloc_served_by_mmap_counts_once() {
    let (report, _) = report(&["big"], &[]);
    assert_eq!(report.stacks.len(), 1, "{report:?}");
    assert!(report.stacks[0].starts_with(&["big"]), "{report:?}");
    assert_eq!((report.stacks[0].bytes, report.stacks[0].count), (1 << 20, 1));
}

#[test]
fn munmap_of_a_head_keeps_the_tail() {
    let (report, _) = report(&["munmap"], &["-a"]);
    assert_eq!(report.stacks.len(), 1, "{report:?}");
    let stack = &report.stacks[0];
    assert!(stack.starts_with(&["unmap_head"]), "{stack:?}");
    assert_eq!((stack.bytes, stack.count), (3 * PAGE, 1));
}

const PAGE: u64 = 4096; // x86_64

#[test]
fn munmap_of_a_tail_keeps_the_head() {
    for mode in [&["-a"][..], &["--combined-only"]] {
        let stack = only_stack(&[], &["munmap_tail"], mode, &["map_pages", "unmap_tail", "main"]);
        assert_eq!((stack.bytes, stack.count), (3 * PAGE, 1), "{mode:?}");
        assert!(stack.trend.contains("1 allocs/0 frees"), "{mode:?}: {stack:?}");
    }
}

#[test]
fn munmap_of_a_middle_leaves_two_blocks() {
    for mode in [&["-a"][..], &["--combined-only"]] {
        let stack = only_stack(&[], &["munmap_middle"], mode, &["map_pages", "unmap_middle", "main"]);
        // Pages 0-1 and 4-6 of 8: the hole split the block (one more
        // allocation), then the second piece lost its last page.
        assert_eq!((stack.bytes, stack.count), (5 * PAGE, 2), "{mode:?}");
        assert!(stack.trend.contains("2 allocs/0 frees"), "{mode:?}: {stack:?}");
        if mode == ["-a"] {
            let mut blocks = stack.blocks.clone();
            blocks.sort();
            assert_eq!(blocks[1].0 - blocks[0].0, 4 * PAGE, "{blocks:x?}");
            assert_eq!((blocks[0].1, blocks[1].1), (2 * PAGE, 3 * PAGE), "{blocks:x?}");
        }
    }
}

#[test]
fn munmap_across_two_mappings_cuts_both() {
    for mode in [&["-a"][..], &["--combined-only"]] {
        let (report, stderr) = report(&["munmap_span"], mode);
        // One stack per mmap call site: the first mapping keeps its first
        // page, the second its last.
        let spans = in_function(&report, "map_pages");
        assert_eq!(spans.len(), report.stacks.len(), "{mode:?}: {report:?}\n{stderr}");
        assert_eq!(spans.len(), 2, "{mode:?}: {report:?}");
        for stack in &spans {
            assert!(stack.starts_with(&["map_pages", "unmap_span", "main"]), "{stack:?}");
            assert_eq!((stack.bytes, stack.count), (PAGE, 1), "{mode:?}: {stack:?}");
            assert!(stack.trend.contains("1 allocs/0 frees"), "{mode:?}: {stack:?}");
        }
        if mode == ["-a"] {
            let mut blocks: Vec<(u64, u64)> = spans.iter().flat_map(|s| s.blocks.clone()).collect();
            blocks.sort();
            assert_eq!(blocks[1].0 - blocks[0].0, 6 * PAGE, "{blocks:x?}");
        }
        assert!(!stderr.contains("warning"), "{stderr}");
    }
}

#[test]
fn munmap_of_tails_past_the_followed_mappings_is_counted() {
    // 33 blocks of 2 pages lose their second page; memleak follows 32
    // mappings per process, so one block keeps both pages, and says so.
    let (report, stderr) = report(&["munmap_many", "33"], &[]);
    assert!(
        stderr.contains("warning: 1 mmap'd blocks not followed for a partial munmap (more than 32 live mappings in a process)"),
        "{stderr}"
    );
    assert_eq!(report.stacks.len(), 1, "{report:?}");
    let stack = &report.stacks[0];
    assert!(stack.starts_with(&["map_pages", "unmap_many", "main"]), "{stack:?}");
    assert_eq!((stack.bytes, stack.count), (32 * PAGE + 2 * PAGE, 33));
}

/// Without tcache, glibc's fastbins only check the top of the bin, so
/// `free(a); free(b); free(a)` goes through (see exact.c).
const NO_TCACHE: (&str, &str) = ("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0");

#[test]
fn double_free_glibc_misses_subtracts_once() {
    for mode in [&[][..], &["--combined-only"]] {
        // The harness waits for the fixture's "done": glibc did not abort.
        // One stack: nothing negative, nothing wrapped around.
        let marker = only_stack(&[NO_TCACHE], &["doublefree"], mode, &["leak_marker", "double_free", "main"]);
        assert_eq!((marker.bytes, marker.count), (4321, 1), "{mode:?}");
        assert!(marker.trend.contains("1 allocs/0 frees"), "{mode:?}: {marker:?}");
    }
}

#[test]
fn double_free_scenario_is_a_real_double_free() {
    // The control for the test above: with tcache, glibc catches it.
    let run = |env: &[(&str, &str)]| {
        let mut app = Command::new(fixture("exact"))
            .arg("doublefree")
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        app.stdin.take().unwrap().write_all(b"go\n").unwrap();
        let mut first = String::new();
        app.stdout.take().unwrap().take(5).read_to_string(&mut first).unwrap();
        let _ = app.kill();
        let out = app.wait_with_output().unwrap();
        (first, out.status, String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let (stdout, status, stderr) = run(&[]);
    assert_eq!(stdout, "", "{status:?} {stderr}");
    assert_eq!(status.signal(), Some(libc::SIGABRT), "{stderr}");
    assert!(stderr.contains("double free"), "{stderr}");
    let (stdout, _, stderr) = run(&[NO_TCACHE]);
    assert_eq!(stdout, "done\n", "{stderr}");
}

#[test]
fn half_a_million_blocks_from_a_thousand_stacks_all_reported() {
    for mode in [&[][..], &["--combined-only"]] {
        let (report, stderr) = report(&["stacks", "1000", "500"], mode);
        let walks = in_function(&report, "walk");
        assert_eq!(walks.len(), 1000, "{mode:?}: distinct stacks\n{stderr}");
        assert!(walks.iter().all(|s| (s.bytes, s.count) == (500 * 16, 500)), "{mode:?}");
        assert_eq!(totals(&walks), (500_000 * 16, 500_000));
        assert!(!stderr.contains("warning"), "{stderr}");
    }
}

#[test]
fn full_allocation_map_is_counted_and_the_rest_stays_exact() {
    let (report, stderr) = report(&["exact", "37"], &["--max-allocs", "10"]);
    assert!(
        stderr.contains("warning: 27 allocations not tracked (allocation map full, raise --max-allocs)"),
        "{stderr}\n{report:?}"
    );
    assert_eq!(report.stacks.len(), 1, "{report:?}");
    // The first ten blocks: 16 * (1 + ... + 10).
    assert_eq!((report.stacks[0].bytes, report.stacks[0].count), (16 * 55, 10));
}

#[test]
fn full_stack_map_is_counted_and_never_mixed_into_other_stacks() {
    // 5 distinct stacks of 4 blocks; room for 2 stacks.
    let (report, stderr) = report(&["stacks", "5", "4"], &["--max-stacks", "2"]);
    assert!(
        stderr.contains("warning: 12 allocations recorded without a stack (stack map full, raise --max-stacks)"),
        "{stderr}\n{report:?}"
    );
    let walks = in_function(&report, "walk");
    assert_eq!(walks.len(), 2, "{report:?}");
    assert!(walks.iter().all(|s| (s.bytes, s.count) == (64, 4)), "{report:?}");
    let lost: Vec<&Stack> = report.stacks.iter().filter(|s| s.frames.iter().any(|f| f.starts_with("[stack not recorded"))).collect();
    assert_eq!(lost.len(), 1, "{report:?}");
    assert_eq!((lost[0].bytes, lost[0].count), (12 * 16, 12));
}
