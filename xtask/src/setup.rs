//! `cargo xtask setup`: what building the eBPF programs needs, installed
//! only where missing, so a fresh machine needs nothing by hand.
//! - the nightly toolchain with rust-src (for `-Z build-std=core`);
//! - bpf-linker, linked against the LLVM inside the Rust toolchain (same
//!   LLVM major as rustc, no system LLVM needed);
//! - the allocator libraries the test fixtures link against, gdb and
//!   chromium (Debian packages);
//! - Prometheus, unpacked into target/prometheus for tests/listen.rs;
//!   elfutils' debuginfod, unpacked into target/debuginfod for
//!   tests/debuginfod.rs (with its libraries installed);
//! - GNU awk's source (Debian's source package, a deb-src entry added for
//!   it), in target/gawk-src for `cargo xtask bench --part build`.

use std::{fs, os::unix::fs::symlink, path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::cargo;

pub fn run() -> anyhow::Result<()> {
    nightly_rust_src()?;
    bpf_linker()?;
    fixture_libraries()?;
    unpack("prometheus", &["usr/bin/prometheus", "usr/bin/promtool"])?;
    unpack("debuginfod", &["usr/bin/debuginfod"])?;
    // Only `cargo xtask bench --part build` needs it: a source mirror that
    // cannot be reached must not stop the tests.
    if let Err(e) = build_bench_source() {
        eprintln!("setup: warning: {e:#} (only `cargo xtask bench --part build` needs GNU awk's source)");
    }
    Ok(())
}

/// GNU awk's source, for the bench's system-wide build: a real C project
/// Debian ships as source, fetched with `apt-get source` (apt is then
/// given a deb-src entry like its first deb entry, if it has none).
fn build_bench_source() -> anyhow::Result<()> {
    let dir = crate::workspace_root().join("target/gawk-src");
    let unpacked = fs::read_dir(&dir).is_ok_and(|d| d.filter_map(Result::ok).any(|e| e.path().join("configure").exists()));
    if unpacked {
        return Ok(());
    }
    let sources = ["/etc/apt/sources.list", "/etc/apt/sources.list.d/debian.sources"];
    let text: Vec<String> = sources.iter().map(|p| fs::read_to_string(p).unwrap_or_default()).collect();
    let has_src = |t: &String| t.lines().any(|l| l.starts_with("deb-src ") || (l.starts_with("Types:") && l.contains("deb-src")));
    if !text.iter().any(has_src) {
        let entry = if text[1].contains("Types: deb") {
            text[1].replace("Types: deb", "Types: deb-src")
        } else {
            text[0].lines().filter(|l| l.starts_with("deb ")).map(|l| format!("deb-src {}\n", &l[4..])).collect()
        };
        let file = "/etc/apt/sources.list.d/memleak-deb-src.sources";
        let file = if text[1].contains("Types: deb") { file.to_string() } else { file.replace(".sources", ".list") };
        eprintln!("setup: adding Debian's source packages to apt ({file})");
        fs::write(&file, entry).with_context(|| format!("writing {file} (needs root)"))?;
        output("apt-get", &["update", "-qq"])?;
    }
    eprintln!("setup: fetching GNU awk's source into {}", dir.display());
    fs::create_dir_all(&dir)?;
    let status = Command::new("apt-get").args(["source", "-qq", "gawk"]).current_dir(&dir).stdout(std::process::Stdio::null()).status()?;
    if !status.success() {
        bail!("apt-get source gawk failed");
    }
    Ok(())
}

/// A Debian package's files, downloaded and unpacked into target/NAME,
/// not installed: the install scripts of Prometheus and debuginfod start
/// daemons (Prometheus's bound to every address). Prometheus and promtool
/// serve tests/listen.rs, debuginfod tests/debuginfod.rs.
fn unpack(package: &str, files: &[&str]) -> anyhow::Result<()> {
    let dir = crate::workspace_root().join("target").join(package);
    if files.iter().all(|f| dir.join(f).exists()) {
        return Ok(());
    }
    eprintln!("setup: unpacking Debian's {package} into {}", dir.display());
    let download = crate::workspace_root().join(format!("target/{package}-deb"));
    fs::create_dir_all(&download)?;
    let fetch = || Command::new("apt-get").args(["download", "-qq", package]).current_dir(&download).status();
    if !fetch().is_ok_and(|s| s.success()) {
        output("apt-get", &["update", "-qq"])?;
        if !fetch().with_context(|| format!("running apt-get download {package}"))?.success() {
            bail!("apt-get download {package} failed");
        }
    }
    let deb = fs::read_dir(&download)?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    output("dpkg", &["-x", &deb.to_string_lossy(), &dir.to_string_lossy()])?;
    fs::remove_dir_all(&download)?;
    Ok(())
}

/// The fixtures' allocators, gdb (tests/frames.rs compares memleak's
/// offsets with its, tests/unwind.rs memleak's stacks with its `bt`),
/// strace (tests/hostile.rs lists every file memleak opens),
/// chromium (tests/listen.rs loads `--listen`'s page in it, headless) and
/// the libraries the unpacked debuginfod needs (libraries: no daemon).
const PACKAGES: &[&str] = &[
    "libjemalloc-dev",
    "libgoogle-perftools-dev",
    "libmimalloc-dev",
    "gdb",
    "strace",
    "chromium",
    "libdebuginfod1",
    "libarchive13",
    "libdw1",
    "libelf1",
    "libmicrohttpd12",
    "libsqlite3-0",
    // `apt-get source` (the bench's build) unpacks with dpkg-source.
    "dpkg-dev",
];

fn fixture_libraries() -> anyhow::Result<()> {
    let installed = |p: &&str| {
        Command::new("dpkg-query")
            .args(["-W", "-f=${Status}", p])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
    };
    let missing: Vec<&str> = PACKAGES.iter().filter(|p| !installed(p)).copied().collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: installing {}", missing.join(" "));
    output("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq"];
    args.extend(&missing);
    output("apt-get", &args).context("installing the fixtures' libraries, gdb and chromium (needs root and apt)")?;
    Ok(())
}

fn output(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !out.status.success() {
        bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nightly_rust_src() -> anyhow::Result<()> {
    let toolchains = output("rustup", &["toolchain", "list"])?;
    if !toolchains.lines().any(|l| l.starts_with("nightly")) {
        eprintln!("setup: installing the nightly toolchain");
        output("rustup", &["toolchain", "install", "nightly", "--profile", "minimal"])?;
    }
    let installed = output("rustup", &["component", "list", "--toolchain", "nightly", "--installed"])?;
    if !installed.lines().any(|l| l.starts_with("rust-src")) {
        eprintln!("setup: adding rust-src to nightly");
        output("rustup", &["component", "add", "rust-src", "--toolchain", "nightly"])?;
    }
    Ok(())
}

fn bpf_linker() -> anyhow::Result<()> {
    if Command::new("bpf-linker").arg("--version").output().is_ok_and(|o| o.status.success()) {
        return Ok(());
    }
    // The stable toolchain ships libLLVM.so.<major>.<minor>-rust-<version>:
    // build bpf-linker against it through a prefix of two symlinks.
    let sysroot = PathBuf::from(output("rustc", &["--print", "sysroot"])?.trim());
    let lib = sysroot.join("lib");
    let llvm = fs::read_dir(&lib)
        .with_context(|| format!("reading {}", lib.display()))?
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|name| name.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}: install the rustc toolchain with rustup", lib.display()))?;
    let major = llvm
        .trim_start_matches("libLLVM.so.")
        .split('.')
        .next()
        .filter(|m| m.chars().all(|c| c.is_ascii_digit()))
        .with_context(|| format!("cannot read the LLVM version from {llvm}"))?
        .to_string();
    let prefix = crate::workspace_root().join("target/llvm-prefix");
    let prefix_lib = prefix.join("lib");
    fs::create_dir_all(&prefix_lib)?;
    for name in ["libLLVM.so", llvm.as_str()] {
        let link = prefix_lib.join(name);
        let _ = fs::remove_file(&link);
        symlink(lib.join(&llvm), &link).with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!("setup: building bpf-linker against {llvm} (about 2 minutes, once)");
    // SAFETY: single-threaded here, before any other thread reads the environment.
    unsafe { std::env::set_var("LLVM_PREFIX", &prefix) };
    let feature = format!("llvm-{major}");
    cargo(&["install", "bpf-linker", "--version", "~0.13", "--no-default-features", "--features", &feature])
}
