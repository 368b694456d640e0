//! Compiles the fixtures in fixtures/ as the traced programs need them:
//! frame pointers (memleak walks user stacks by them) and debug info (for
//! file:line), unoptimized so each function keeps its own frame. The
//! allocator fixtures need jemalloc, tcmalloc and mimalloc
//! (`cargo xtask setup` installs them).

use std::{env, path::PathBuf, process::Command};

/// (output name, compiler, source, extra flags)
const FIXTURES: &[(&str, Compiler, &str, &[&str])] = &[
    ("fibonacci", Compiler::C, "fibonacci.c", &[]),
    ("fibonacci-fixed", Compiler::C, "fibonacci.c", &["-DFIX_LEAK"]),
    ("exact", Compiler::C, "exact.c", &[]),
    ("leak-glibc", Compiler::C, "allocators.c", &[]),
    ("leak-jemalloc", Compiler::C, "allocators.c", &["-ljemalloc"]),
    ("leak-tcmalloc", Compiler::C, "allocators.c", &["-ltcmalloc"]),
    ("leak-mimalloc", Compiler::C, "allocators.c", &["-lmimalloc"]),
    ("leak-static", Compiler::C, "allocators.c", &["-static"]),
    ("leak-static-stripped", Compiler::C, "allocators.c", &["-static", "-s"]),
    ("leak-cpp", Compiler::Cxx, "leak.cpp", &[]),
    ("leak-rust", Compiler::Rust, "leak.rs", &[]),
];

#[derive(Clone, Copy)]
enum Compiler {
    C,
    Cxx,
    Rust,
}

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-env-changed=CXX");
    for (name, compiler, source, flags) in FIXTURES {
        let source = PathBuf::from("fixtures").join(source);
        println!("cargo:rerun-if-changed={}", source.display());
        let mut cmd = match compiler {
            Compiler::C | Compiler::Cxx => {
                let cc = match compiler {
                    Compiler::C => env::var("CC").unwrap_or_else(|_| "cc".into()),
                    _ => env::var("CXX").unwrap_or_else(|_| "c++".into()),
                };
                let mut cmd = Command::new(cc);
                cmd.args(["-g", "-O0", "-fno-omit-frame-pointer", "-pthread", "-o"]).arg(out.join(name)).arg(&source);
                cmd
            }
            Compiler::Rust => {
                let mut cmd = Command::new(env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
                cmd.args(["-g", "-C", "force-frame-pointers=yes", "-C", "opt-level=1", "--edition", "2021", "-o"])
                    .arg(out.join(name))
                    .arg(&source);
                cmd
            }
        };
        cmd.args(*flags);
        let status = cmd.status().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        assert!(
            status.success(),
            "{cmd:?} failed: run `cargo xtask setup` (it installs libjemalloc-dev, libgoogle-perftools-dev, libmimalloc-dev)"
        );
    }
    println!("cargo:rustc-env=FIXTURE_DIR={}", out.display());
}
