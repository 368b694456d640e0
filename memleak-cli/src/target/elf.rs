//! Finds where functions live in an ELF file, as file offsets (what the
//! kernel's uprobes take), with their machine code (to place probes past
//! prologues the kernel would single-step), reading the file once for all.

use std::collections::HashMap;

use anyhow::Context as _;
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, SymbolKind};

use super::file::TargetFile;

/// Larger functions keep only their first bytes: enough to decode a
/// prologue and the branches near it.
const MAX_CODE: u64 = 64 * 1024;

/// A function as the file holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Function {
    /// File offset of its first instruction.
    pub offset: u64,
    /// Its machine code (the symbol's size, at most [`MAX_CODE`] bytes;
    /// empty if the symbol has no size).
    pub code: Vec<u8>,
}

/// The named functions defined in `file` (dynamic symbols first, then the
/// full symbol table); names not defined are absent.
pub fn functions(file: &TargetFile, names: &[&str]) -> anyhow::Result<HashMap<String, Function>> {
    let data = file.read().context("reading it")?;
    let file = object::File::parse(&*data).context("not an ELF file")?;
    // Virtual address -> file offset, through the loadable segments.
    let segments: Vec<(u64, u64, u64)> = file
        .segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (s.address(), size, offset)
        })
        .collect();
    let to_offset = |addr: u64| {
        segments
            .iter()
            .find(|(vaddr, size, _)| *vaddr <= addr && addr < vaddr + size)
            .map(|(vaddr, _, offset)| addr - vaddr + offset)
    };
    let mut found = HashMap::new();
    for symbol in file.dynamic_symbols().chain(file.symbols()) {
        if symbol.kind() != SymbolKind::Text || symbol.is_undefined() || symbol.address() == 0 {
            continue;
        }
        let Ok(name) = symbol.name() else { continue };
        // Versioned names in .symtab look like "malloc@@GLIBC_2.2.5".
        let name = name.split('@').next().unwrap_or(name);
        if found.contains_key(name) || !names.contains(&name) {
            continue;
        }
        if let Some(offset) = to_offset(symbol.address()) {
            let size = symbol.size().min(MAX_CODE) as usize;
            let code = data.get(offset as usize..).map(|rest| &rest[..size.min(rest.len())]).unwrap_or_default();
            found.insert(name.to_string(), Function { offset, code: code.to_vec() });
        }
    }
    Ok(found)
}

/// File offsets of the named functions defined in `file`.
pub fn function_offsets(file: &TargetFile, names: &[&str]) -> anyhow::Result<HashMap<String, u64>> {
    Ok(functions(file, names)?.into_iter().map(|(k, f)| (k, f.offset)).collect())
}

/// Whether `file` lacks a full symbol table (.symtab): a stripped binary.
pub fn is_stripped(file: &TargetFile) -> anyhow::Result<bool> {
    let data = file.read()?;
    let file = object::File::parse(&*data)?;
    Ok(file.symbols().next().is_none())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The libc this test binary runs on.
    pub(crate) fn own_libc() -> TargetFile {
        let maps = crate::target::proc::parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
        let libc = maps.iter().find(|m| m.path.contains("/libc.so") || m.path.contains("/libc-")).unwrap();
        TargetFile::mapped(std::process::id(), libc).unwrap()
    }

    #[test]
    fn finds_allocator_in_real_libc() {
        let offsets = function_offsets(&own_libc(), &["malloc", "free", "calloc", "no_such_fn"]).unwrap();
        assert!(offsets["malloc"] > 0 && offsets["free"] > 0 && offsets["calloc"] > 0);
        assert_ne!(offsets["malloc"], offsets["free"]);
        assert!(!offsets.contains_key("no_such_fn"));
    }

    #[test]
    fn offsets_point_at_the_function_bytes() {
        // The offset of malloc read from the file must equal the address
        // of malloc in this process minus its mapping, plus the mapping's offset.
        let libc = own_libc();
        let offset = function_offsets(&libc, &["malloc"]).unwrap()["malloc"];
        let addr = libc::malloc as *const () as u64;
        let maps = crate::target::proc::parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
        let m = maps.iter().find(|m| m.contains(addr)).unwrap();
        assert_eq!(addr - m.start + m.offset, offset);
    }

    #[test]
    fn code_is_the_function_bytes() {
        let libc = own_libc();
        let f = &functions(&libc, &["free"]).unwrap()["free"];
        assert!(!f.code.is_empty());
        // SAFETY: reading the first bytes of libc's own free, mapped executable.
        let live = unsafe { std::slice::from_raw_parts(libc::free as *const u8, f.code.len().min(16)) };
        // A uprobe on free (another tracer, or a system-wide memleak beside
        // the tests) shows in the live bytes as an int3 (0xcc).
        for (i, (&file, &mapped)) in f.code.iter().zip(live).enumerate() {
            assert!(file == mapped || mapped == 0xcc, "byte {i}: {file:#04x} in the file, {mapped:#04x} mapped");
        }
    }

    #[test]
    fn non_elf_is_an_error() {
        let status = TargetFile::host(std::path::Path::new("/proc/self/status")).unwrap();
        let err = function_offsets(&status, &["malloc"]).unwrap_err();
        assert!(format!("{err:#}").contains("not an ELF"), "{err:#}");
    }
}
