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
    // The workspace's release profile optimizes for size (Cargo.toml says
    // why); the kernel programs run at every allocation and are built for
    // speed. aya-build's cargo inherits this process's environment.
    // SAFETY: the build script has no other threads.
    unsafe { std::env::set_var("CARGO_PROFILE_RELEASE_OPT_LEVEL", "3") };
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
    )?;
    let out = std::path::Path::new(&std::env::var("OUT_DIR")?).join("memleak");
    strip_dwarf(&out).with_context(|| format!("stripping the DWARF from {}", out.display()))
}

/// Drops the DWARF sections and their relocations from the kernel object,
/// as libbpf-tools does with `llvm-strip -g`. bpf-linker needs the DWARF to
/// make BTF, but the loader reads only .BTF and .BTF.ext. The DWARF was
/// 1.08 MB of the 1.33 MB object embedded in memleak, and parsing the
/// object at startup touched its pages: idle RSS on the hold fixture
/// 7,856 -> 7,528 KiB without it.
fn strip_dwarf(path: &std::path::Path) -> anyhow::Result<()> {
    let data = std::fs::read(path)?;
    let mut elf = object::build::elf::Builder::read(&*data)?;
    let mut dwarf = Vec::new();
    for section in elf.sections.iter_mut() {
        if section.name.starts_with(b".debug_") {
            section.delete = true;
            dwarf.push(section.id());
        }
    }
    for section in elf.sections.iter_mut() {
        if section.sh_info_section.is_some_and(|target| dwarf.contains(&target)) {
            section.delete = true;
        }
    }
    elf.delete_orphans();
    // LLVM names the sections in the symbols' string table, which the
    // writer keeps for the symbols: the section names get their own.
    let names = elf.sections.add();
    names.name = b".shstrtab"[..].into();
    names.sh_type = object::elf::SHT_STRTAB;
    names.sh_addralign = 1;
    names.data = object::build::elf::SectionData::SectionString;
    let mut stripped = Vec::new();
    elf.write(&mut stripped)?;
    std::fs::write(path, stripped)?;
    Ok(())
}
