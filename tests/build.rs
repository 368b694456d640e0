//! Compiles the C fixtures in fixtures/ as the traced programs need them:
//! frame pointers (memleak walks user stacks by them) and debug info (for
//! file:line), unoptimized so each function keeps its own frame.

use std::{env, path::PathBuf, process::Command};

/// (output name, source, extra flags)
const FIXTURES: &[(&str, &str, &[&str])] = &[
    ("fibonacci", "fibonacci.c", &[]),
    ("fibonacci-fixed", "fibonacci.c", &["-DFIX_LEAK"]),
    ("exact", "exact.c", &[]),
];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    println!("cargo:rerun-if-env-changed=CC");
    for (name, source, flags) in FIXTURES {
        let source = PathBuf::from("fixtures").join(source);
        println!("cargo:rerun-if-changed={}", source.display());
        let status = Command::new(&cc)
            .args(["-g", "-O0", "-fno-omit-frame-pointer", "-pthread", "-o"])
            .arg(out.join(name))
            .arg(&source)
            .args(*flags)
            .status()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {cc}: {e}"));
        assert!(status.success(), "{cc} failed on {}", source.display());
    }
    println!("cargo:rustc-env=FIXTURE_DIR={}", out.display());
}
