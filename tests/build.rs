//! Compiles the fixtures in fixtures/ (see compile.rs for how). The
//! allocator fixtures need jemalloc, tcmalloc and mimalloc
//! (`cargo xtask setup` installs them).

#[path = "compile.rs"]
mod compile;

use std::{env, path::PathBuf};

use compile::{Compiler, compile};

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
    // Optimized: gcc splits functions into hot and .cold parts.
    ("frames-split", Compiler::C, "frames.c", &["-O2"]),
    // Without frame pointers: %rbp holds data a walk takes for a frame.
    ("frames-nofp", Compiler::C, "frames.c", &["-O2", "-fomit-frame-pointer", "-DNO_FRAME_POINTER"]),
    ("requests", Compiler::C, "requests.c", &[]),
    ("threads", Compiler::C, "threads.c", &[]),
    // Not position-independent: both programs are at 0x400000, so the old
    // image's return addresses land in the new one's code.
    ("exec-old", Compiler::C, "exec.c", &["-DOLD_IMAGE", "-no-pie"]),
    ("exec-new", Compiler::C, "exec.c", &["-no-pie"]),
    ("exec-new-static", Compiler::C, "exec.c", &["-static"]),
    ("libplugin.so", Compiler::C, "plugin.c", &["-shared", "-fPIC"]),
    ("dlclose", Compiler::C, "dlclose.c", &["-ldl"]),
    ("quick", Compiler::C, "quick.c", &["-ldl"]),
    ("libquick.so", Compiler::C, "quick_lib.c", &["-shared", "-fPIC"]),
    // Its DWARF moved out to fibonacci-split.debug (see `split_debug`).
    ("fibonacci-split", Compiler::C, "fibonacci.c", &[]),
    // Its own malloc: traced alone with -O, whatever else the machine runs;
    // position-independent: each process's stacks are its own (ASLR).
    ("stacks-static", Compiler::C, "stacks.c", &["-static-pie"]),
    // Stripped of everything, its debug file apart and named by nothing
    // but its build id (see `split_debug`).
    ("fibonacci-stripped", Compiler::C, "fibonacci.c", &[]),
    // As most packaged code is built: optimized, no frame pointers.
    ("deep", Compiler::C, "deep.c", &["-O2", "-fomit-frame-pointer"]),
    // Deeper than memleak walks, walked by tables and by frame pointers.
    ("recurse", Compiler::C, "recurse.c", &["-O2", "-fomit-frame-pointer"]),
    ("recurse-fp", Compiler::C, "recurse.c", &["-O2", "-fno-omit-frame-pointer"]),
    // C++ the same way, leaking through libstdc++ (packaged without).
    ("deep-cpp", Compiler::Cxx, "deep.cpp", &["-O2", "-fomit-frame-pointer"]),
    // An unwind table larger than the least --unwind-memory.
    ("bigtable", Compiler::C, "bigtable.c", &[]),
];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-env-changed=CXX");
    println!("cargo:rerun-if-changed=compile.rs");
    for (name, compiler, source, flags) in FIXTURES {
        let source = PathBuf::from("fixtures").join(source);
        println!("cargo:rerun-if-changed={}", source.display());
        if let Err(e) = compile(*compiler, &source, &out.join(name), flags) {
            panic!("{e}: run `cargo xtask setup` (it installs libjemalloc-dev, libgoogle-perftools-dev, libmimalloc-dev)");
        }
    }
    split_debug(&out.join("fibonacci-split"), false);
    split_debug(&out.join("fibonacci-stripped"), true);
    println!("cargo:rustc-env=FIXTURE_DIR={}", out.display());
}

/// Moves `bin`'s DWARF to `bin.debug`, as distributions ship debug info:
/// the binary keeps its symbol table, and names its companion in a
/// `.gnu_debuglink` (its GNU build id names it too). `all`: the symbol
/// table goes too, and no debuglink is added (the build id is all).
fn split_debug(bin: &std::path::Path, all: bool) {
    let debug = bin.with_extension("debug");
    let objcopy = |args: &[&std::ffi::OsStr]| {
        let status = std::process::Command::new("objcopy").args(args).status();
        assert!(status.is_ok_and(|s| s.success()), "objcopy {args:?} failed");
    };
    objcopy(&["--only-keep-debug".as_ref(), bin.as_os_str(), debug.as_os_str()]);
    if all {
        objcopy(&["--strip-all".as_ref(), bin.as_os_str()]);
        return;
    }
    let link = format!("--add-gnu-debuglink={}", debug.display());
    objcopy(&["--strip-debug".as_ref(), link.as_ref(), bin.as_os_str()]);
}
