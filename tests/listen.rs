//! `--listen`: a real Prometheus server scrapes memleak tracing a real
//! fixture, on 127.0.0.1 only; refusals of what the server does not serve.
//! Run as root (real probes); Prometheus comes from `cargo xtask setup`.

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Shutdown, TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use memleak_tests::{fixture, memleak_bin, scenario::{Waiting, read_lines}};

/// A port free on 127.0.0.1 a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A test's own directory.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("memleak-listen-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A child killed and reaped when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// memleak `-p PID --listen 0 ARGS` (the kernel picks a free port), once
/// it has attached; its stdout and stderr are collected.
struct Served {
    child: Killed,
    port: u16,
    stdout: Option<thread::JoinHandle<String>>,
    stderr: Option<thread::JoinHandle<String>>,
}

impl Served {
    fn start(pid: u32, args: &[&str]) -> Self {
        let mut child = Command::new(memleak_bin())
            .args(["-p", &pid.to_string(), "--listen", "0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start memleak");
        let (tx, rx) = mpsc::channel();
        let stdout = read_lines(child.stdout.take().unwrap(), Some(("Attaching", tx)));
        let (port_tx, port_rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let stderr = thread::spawn(move || {
            let mut all = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(port) = line.strip_prefix("memleak: serving http://127.0.0.1:").and_then(|r| r.strip_suffix("/metrics")) {
                    let _ = port_tx.send(port.parse::<u16>().unwrap());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        let mut served = Self { child: Killed(child), port: 0, stdout: Some(stdout), stderr: Some(stderr) };
        match port_rx.recv_timeout(Duration::from_secs(30)) {
            Ok(port) => served.port = port,
            Err(_) => panic!("memleak said no port: {}", served.output()),
        }
        if rx.recv_timeout(Duration::from_secs(30)).is_err() {
            panic!("memleak did not attach: {}", served.output());
        }
        served
    }

    /// Ends memleak; what it printed.
    fn output(&mut self) -> String {
        let _ = self.child.0.kill();
        let _ = self.child.0.wait();
        let out = self.stdout.take().map(|t| t.join().unwrap()).unwrap_or_default();
        let err = self.stderr.take().map(|t| t.join().unwrap()).unwrap_or_default();
        format!("stdout:\n{out}\nstderr:\n{err}")
    }
}

/// One request on its own connection: (status, head, body).
fn request(port: u16, method: &str, path: &str) -> (u16, String, Vec<u8>) {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    stream.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(stream, "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).expect("a response");
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("a status");
    (status, head, raw[split + 4..].to_vec())
}

fn get(port: u16, path: &str) -> String {
    let (status, head, body) = request(port, "GET", path);
    assert_eq!(status, 200, "GET {path}: {head}");
    String::from_utf8(body).unwrap()
}

/// Debian's Prometheus, unpacked by `cargo xtask setup`.
fn prometheus_bin(name: &str) -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/prometheus/usr/bin").join(name);
    assert!(path.exists(), "{} is missing: run `cargo xtask setup`", path.display());
    path
}

/// A Prometheus server on 127.0.0.1 scraping 127.0.0.1:`target` every second.
struct Prometheus {
    _child: Killed,
    port: u16,
}

impl Prometheus {
    fn start(dir: &std::path::Path, target: u16) -> Self {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\nscrape_configs:\n  - job_name: memleak\n    \
                 static_configs:\n      - targets: ['127.0.0.1:{target}']\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
        let child = Command::new(prometheus_bin("prometheus"))
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start prometheus");
        let prometheus = Self { _child: Killed(child), port };
        let start = Instant::now();
        while request_ok(port, "/-/ready").is_none() {
            assert!(start.elapsed() < Duration::from_secs(60), "prometheus not ready; see {}", dir.display());
            thread::sleep(Duration::from_millis(200));
        }
        prometheus
    }

    /// The samples of `selector` over the last 5 minutes, oldest first.
    fn samples(&self, selector: &str) -> Vec<f64> {
        let query: String = format!("{selector}[5m]")
            .bytes()
            .map(|b| if b.is_ascii_alphanumeric() || b == b'_' { (b as char).to_string() } else { format!("%{b:02X}") })
            .collect();
        let body = get(self.port, &format!("/api/v1/query?query={query}"));
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["status"], "success", "{body}");
        let result = json["data"]["result"].as_array().unwrap();
        assert!(result.len() <= 1, "one series: {body}");
        result
            .first()
            .map(|series| {
                series["values"].as_array().unwrap().iter().map(|v| v[1].as_str().unwrap().parse().unwrap()).collect()
            })
            .unwrap_or_default()
    }

    /// Waits until the series' samples satisfy `done`; returns them.
    fn wait_for(&self, selector: &str, what: &str, done: impl Fn(&[f64]) -> bool) -> Vec<f64> {
        let start = Instant::now();
        loop {
            let samples = self.samples(selector);
            if done(&samples) {
                return samples;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "{selector}: never {what}; samples {samples:?}");
            thread::sleep(Duration::from_millis(300));
        }
    }
}

fn request_ok(port: u16, path: &str) -> Option<()> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).ok()?;
    raw.starts_with(b"HTTP/1.1 200").then_some(())
}

/// The value of the series `name{labels}` in a /metrics text.
fn metric(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(labels)?.strip_prefix(' ')?.parse().ok())
}

#[test]
fn prometheus_scrapes_the_exact_leak_as_it_grows() {
    let dir = scratch("prometheus");
    // 100 blocks of 16..1600 bytes once it is told to go: 16 * (1 + ... + 100).
    let (blocks, leak) = (100u64, 16 * 5050u64);
    let mut app = Waiting::start(&fixture("exact"), &[], &["exact", "100"]);
    let pid = app.pid();
    let mut memleak = Served::start(pid, &["-q", "1"]);
    let port = memleak.port;
    let prometheus = Prometheus::start(&dir, port);
    let selector = format!("memleak_outstanding_bytes{{pid=\"{pid}\"}}");

    // Nothing outstanding yet: the series is there, at 0.
    prometheus.wait_for(&selector, "scraped", |s| !s.is_empty());
    assert!(app.run(Duration::from_secs(20)).is_some(), "the fixture did not finish");
    let samples = prometheus.wait_for(&selector, "at the leak", |s| s.last() == Some(&(leak as f64)));
    assert_eq!(samples[0], 0.0, "{samples:?}");
    assert!(samples.windows(2).all(|w| w[0] <= w[1]), "grows, never shrinks: {samples:?}");
    let comm = format!("memleak_outstanding_bytes{{comm=\"exact\",pid=\"{pid}\",pool=\"\"}}");
    assert!(!prometheus.samples(&comm).is_empty(), "labelled with the process name");

    // What Prometheus read, the format it reads: promtool accepts it.
    let text = get(port, "/metrics");
    let labels = format!("{{comm=\"exact\",pid=\"{pid}\",pool=\"\"}}");
    assert_eq!(metric(&text, "memleak_outstanding_bytes", &labels), Some(leak as f64), "{text}");
    assert_eq!(metric(&text, "memleak_outstanding_allocations", &labels), Some(blocks as f64), "{text}");
    assert_eq!(metric(&text, "memleak_allocations_total", &labels), Some(blocks as f64), "{text}");
    assert_eq!(metric(&text, "memleak_frees_total", &labels), Some(0.0), "{text}");
    assert_eq!(metric(&text, "memleak_lost_events_total", "{reason=\"allocation_map_full\"}"), Some(0.0), "{text}");
    assert!(metric(&text, "memleak_attached_probes", "").is_some_and(|n| n >= 2.0), "{text}");
    assert!(metric(&text, "memleak_report_duration_seconds", "").is_some_and(|s| s > 0.0), "{text}");
    assert!(metric(&text, "memleak_map_fill_ratio", "{map=\"totals\"}").is_some_and(|r| r > 0.0 && r < 1.0), "{text}");
    let mut promtool = Command::new(prometheus_bin("promtool"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let checked = promtool.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&checked.stdout),
        String::from_utf8_lossy(&checked.stderr)
    );
    // -q: no report on stdout.
    let out = memleak.output();
    assert!(!out.contains("Top 10 stacks"), "{out}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn only_get_and_head_on_known_paths() {
    let app = memleak_tests::Running::spawn(fixture("fibonacci"), &["200"]);
    let memleak = Served::start(app.pid(), &["-q", "1"]);
    let port = memleak.port;
    let (status, head, body) = request(port, "GET", "/nothing-here");
    assert_eq!(status, 404, "{head}");
    assert_eq!(body, b"not found\n");
    for method in ["POST", "PUT", "DELETE"] {
        let (status, head, _) = request(port, method, "/metrics");
        assert_eq!(status, 405, "{method}: {head}");
        assert!(head.to_ascii_lowercase().contains("allow: get, head"), "{head}");
    }
    let (status, head, body) = request(port, "HEAD", "/metrics");
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert!(body.is_empty(), "HEAD has no body");
    assert!(get(port, "/metrics").contains("memleak_outstanding_bytes{"));
}

#[test]
fn a_port_in_use_is_one_line_and_exit_2() {
    let taken = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let app = memleak_tests::Running::spawn(fixture("fibonacci"), &["200"]);
    let out = memleak_tests::run_memleak(
        &["-p".into(), app.pid().to_string(), "--listen".into(), port.to_string(), "1".into(), "1".into()],
        Duration::from_secs(30),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.trim(), format!("memleak: --listen 127.0.0.1:{port}: Address already in use (os error 98)"));
    let out = memleak_tests::run_memleak(&["-p".into(), app.pid().to_string(), "--listen".into(), "x:1".into()], Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn slow_clients_hold_at_most_32_connections_and_reports_stay_on_time() {
    let app = memleak_tests::Running::spawn(fixture("fibonacci"), &["200"]);
    let mut memleak = Served::start(app.pid(), &["1"]);
    let port = memleak.port;
    // 40 clients that connect and send nothing.
    let mut clients: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap()).collect();
    thread::sleep(Duration::from_millis(1500));
    let mut closed = 0;
    for c in &mut clients {
        c.set_nonblocking(true).unwrap();
        let mut buf = [0; 1];
        // A connection over the cap is closed at once: EOF (or a reset).
        match c.read(&mut buf) {
            Ok(0) => closed += 1,
            Err(e) if e.kind() != std::io::ErrorKind::WouldBlock => closed += 1,
            _ => {}
        }
    }
    assert_eq!(closed, 8, "32 held, the rest closed");
    // Reports go on meanwhile, one a second.
    thread::sleep(Duration::from_secs(3));
    for c in &clients {
        let _ = c.shutdown(Shutdown::Both);
    }
    drop(clients);
    thread::sleep(Duration::from_millis(300));
    assert!(get(port, "/metrics").contains("memleak_outstanding_bytes{"), "served again once they left");
    let out = memleak.output();
    let reports = out.lines().filter(|l| l.contains("Top 10 stacks with outstanding allocations")).count();
    assert!(reports >= 4, "a report a second while 32 clients held on: {reports}\n{out}");
}

/// Waits until /metrics says `pid` holds `bytes`; the text then.
fn wait_for_bytes(port: u16, pid: u32, comm: &str, bytes: u64) -> String {
    let labels = format!("{{comm=\"{comm}\",pid=\"{pid}\",pool=\"\"}}");
    let start = Instant::now();
    loop {
        let text = get(port, "/metrics");
        if metric(&text, "memleak_outstanding_bytes", &labels) == Some(bytes as f64) {
            return text;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "never {bytes} bytes:\n{text}");
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn heap_profiles_hold_what_was_allocated_and_what_is_outstanding() {
    // One thread allocates 2,000 blocks of 100 bytes, another frees all
    // but 7: alloc 2,000 and 200,000 B, inuse 7 and 700 B, one stack.
    let (n, kept) = (2000u64, 7u64);
    let mut app = Waiting::start(&fixture("exact"), &[], &["handoff", &n.to_string(), &kept.to_string()]);
    let pid = app.pid();
    let memleak = Served::start(pid, &["-q", "1"]);
    let port = memleak.port;
    assert!(app.run(Duration::from_secs(20)).is_some(), "the fixture did not finish");
    let text = wait_for_bytes(port, pid, "exact", 100 * kept);
    let labels = format!("{{comm=\"exact\",pid=\"{pid}\",pool=\"\"}}");
    assert!(metric(&text, "memleak_allocated_bytes_total", &labels).is_some_and(|b| b >= (100 * n) as f64), "{text}");

    for (path, default) in [("/debug/pprof/heap", "inuse_space"), ("/debug/pprof/allocs", "alloc_space")] {
        let (status, head, body) = request(port, "GET", path);
        assert_eq!(status, 200, "{path}: {head}");
        let p = memleak_tests::pprof::decode(&body);
        let types: Vec<(&str, &str)> = p.sample_type.iter().map(|t| (p.string(t.r#type), p.string(t.unit))).collect();
        assert_eq!(
            types,
            [("alloc_objects", "count"), ("alloc_space", "bytes"), ("inuse_objects", "count"), ("inuse_space", "bytes")],
            "{path}: Go's heap profile"
        );
        assert_eq!(p.string(p.default_sample_type), default, "{path}");
        let handoff: Vec<_> = p.sample.iter().filter(|s| p.names(s).starts_with(&["handoff_alloc", "handoff_allocator"])).collect();
        assert_eq!(handoff.len(), 1, "{path}: one sample for the one stack");
        let s = handoff[0];
        assert_eq!(s.value, [n as i64, (100 * n) as i64, kept as i64, (100 * kept) as i64], "{path}");
        let label = |key: &str| s.label.iter().find(|l| p.string(l.key) == key).expect(key);
        assert_eq!(label("pid").num, i64::from(pid));
        assert_eq!(p.string(label("comm").str), "exact");
        for s in &p.sample {
            assert!(s.value[1] >= s.value[3], "{path}: alloc_space >= inuse_space in every sample: {:?}", s.value);
        }
        // Locations in the fixture name its mapping, with its build id.
        let leaf = &p.location[s.location_id[0] as usize - 1];
        let mapping = &p.mapping[leaf.mapping_id as usize - 1];
        assert!(p.string(mapping.filename).ends_with("/exact"), "{}", p.string(mapping.filename));
        assert_eq!(p.string(mapping.build_id).len(), 40, "a hex GNU build id");
    }
}

#[test]
fn the_page_shows_the_leak_in_a_real_browser() {
    let dir = scratch("page");
    let app = memleak_tests::Running::spawn(fixture("fibonacci"), &["100"]);
    let memleak = Served::start(app.pid(), &["-q", "1"]);
    let port = memleak.port;
    // A few reports: the chart has points to draw.
    let start = Instant::now();
    while serde_json::from_slice::<serde_json::Value>(&request(port, "GET", "/history.json").2).unwrap()["elapsed_s"]
        .as_array()
        .unwrap()
        .len()
        < 3
    {
        assert!(start.elapsed() < Duration::from_secs(30), "no reports");
        thread::sleep(Duration::from_millis(200));
    }
    let url = format!("http://127.0.0.1:{port}/");
    let chromium = |what: &[String]| {
        Command::new("chromium")
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--virtual-time-budget=5000"])
            .arg(format!("--user-data-dir={}", dir.join("profile").display()))
            .args(what)
            .arg(&url)
            .output()
            .expect("chromium (installed by `cargo xtask setup`)")
    };
    let out = chromium(&["--dump-dom".into()]);
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Rendered by the page's script from /report.json and /history.json:
    // the leaking function in the table and a line of the chart for it.
    let table = &dom[dom.find("<tbody id=\"stacks\">").expect("the table")..];
    let table = &table[..table.find("</tbody>").unwrap()];
    assert!(table.contains("fibonacci"), "the leaking function in the table:\n{table}");
    assert!(table.contains("<td>calloc</td>"), "the function that made its blocks:\n{table}");
    assert!(table.contains("growing"), "its trend:\n{table}");
    let chart = &dom[dom.find("<svg id=\"chart\"").expect("the chart")..];
    let chart = &chart[..chart.find("</svg>").unwrap()];
    assert!(chart.contains("class=\"series\"") && chart.contains("data-name=\"fibonacci"), "a line for it:\n{chart}");
    assert!(dom.contains("report "), "the status line");
    // For people to look at.
    let shot = std::env::temp_dir().join("memleak-listen-page.png");
    let out = chromium(&[format!("--screenshot={}", shot.display()), "--window-size=1200,1400".into()]);
    assert!(out.status.success() && std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000), "a screenshot");
    eprintln!("screenshot of the page: {}", shot.display());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn report_json_and_flamegraph_are_the_last_report_and_never_what_blocks_hold() {
    let app = memleak_tests::Running::spawn(fixture("fibonacci"), &["100"]);
    let mut memleak = Served::start(app.pid(), &["--peek", "16", "1"]);
    let port = memleak.port;
    let start = Instant::now();
    let report = loop {
        let body = request(port, "GET", "/report.json").2;
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body)
            && v["report"].as_u64() >= Some(2)
        {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "no second report");
        thread::sleep(Duration::from_millis(200));
    };
    let stack = &report["processes"][0]["stacks"][0];
    assert_eq!(stack["frames"][0]["symbol"], "fibonacci", "{report}");
    assert!(stack.get("peek").is_none(), "--peek's bytes are never served: {report}");
    let svg = get(port, "/flamegraph.svg");
    assert!(svg.starts_with("<?xml") && svg.contains("fibonacci"), "{}", &svg[..svg.len().min(500)]);
    // Text reports went on on stdout meanwhile (no -q), with the peek.
    let out = memleak.output();
    assert!(out.contains("fibonacci") && out.contains("peek 0x"), "{out}");
}
