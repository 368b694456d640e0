//! Builds the kernel programs (memleak-ebpf: nightly, bpfel-unknown-none,
//! bpf-linker) into OUT_DIR, where `src/probe/loader.rs` embeds them.
//! `cargo xtask setup` installs what this needs.

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../memleak-ebpf");
    // aya-build watches the program's own crate only: a layout changed in
    // memleak-common alone would leave the embedded object stale.
    println!("cargo:rerun-if-changed={}", concat!(env!("CARGO_MANIFEST_DIR"), "/../memleak-common"));
    aya_build::build_ebpf(
        [Package {
            name: "memleak-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        Toolchain::Nightly,
    )
    .context(
        "building memleak-ebpf failed: run `cargo xtask setup` once \
         (it installs the nightly rust-src component and bpf-linker)",
    )
}
