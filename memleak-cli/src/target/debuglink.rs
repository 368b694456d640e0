//! Debug info kept apart from the code (distributions strip it into
//! companion files): a file that names one (`.gnu_debuglink`,
//! `.gnu_debugaltlink`, `.debug_sup`) has its companion looked for only by
//! its GNU build id, at `/usr/lib/debug/.build-id/xx/rest.debug` inside the
//! traced process's own root (see `TargetFile::in_root`), and taken only if
//! its build id is the same. blazesym would instead follow the link by name,
//! from the host path it makes of `/proc/self/fd/N` and host debug
//! directories: for a container, files the container does not own.

use object::{Object as _, ObjectSegment as _, read::ReadCache};

use crate::target::file::TargetFile;

/// Sections through which a file names separate debug info.
const LINKS: [&str; 3] = [".gnu_debuglink", ".gnu_debugaltlink", ".debug_sup"];

/// A file whose debug info is apart, and its companion if one was found.
pub struct Split {
    /// (file offset, size, virtual address) of each loadable segment: the
    /// companion's symbols are at the file's virtual addresses.
    segments: Vec<(u64, u64, u64)>,
    /// The file's GNU build id.
    pub build_id: Option<Vec<u8>>,
    pub companion: Option<Companion>,
}

/// The companion file, checked to hold the debug info of the same build.
pub struct Companion {
    pub file: TargetFile,
    /// It names more debug info itself (dwz's common file): that is not
    /// followed, and only its symbol table is used.
    pub links_further: bool,
}

/// What `file` (mapped by process `pid`) says of separate debug info; None
/// if it names none and is not stripped (its own symbols and DWARF, if
/// any, serve) or cannot be read.
pub fn split(file: &TargetFile, pid: u32) -> Option<Split> {
    let cache = ReadCache::new(file.file());
    let elf = object::File::parse(&cache).ok()?;
    if !names_companion(&elf) && !stripped(&elf) {
        return None;
    }
    let segments = elf
        .segments()
        .map(|s| {
            let (offset, size) = s.file_range();
            (offset, size, s.address())
        })
        .collect();
    let build_id = elf.build_id().ok().flatten().map(<[u8]>::to_vec);
    let companion = build_id.as_deref().and_then(|id| companion(pid, id));
    Some(Split { segments, build_id, companion })
}

impl Split {
    /// The virtual address of file offset `offset`, if it is in a loadable
    /// segment.
    pub fn address(&self, offset: u64) -> Option<u64> {
        self.segments.iter().find(|(start, size, _)| *start <= offset && offset < start + size).map(|(start, _, vaddr)| offset - start + vaddr)
    }
}

fn names_companion<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>) -> bool {
    LINKS.iter().any(|name| elf.section_by_name(name).is_some())
}

/// Whether a file has neither a symbol table nor DWARF (`strip --strip-all`
/// with no link added): its build id alone may name its debug file.
fn stripped<'d, R: object::ReadRef<'d>>(elf: &object::File<'d, R>) -> bool {
    elf.section_by_name(".symtab").is_none() && elf.section_by_name(".debug_info").is_none()
}

/// The companion of build `id` inside process `pid`'s root.
fn companion(pid: u32, id: &[u8]) -> Option<Companion> {
    let (first, rest) = id.split_first()?;
    // Shorter ids are bogus (GNU ones are 20 bytes).
    if rest.len() < 7 {
        return None;
    }
    let rest: String = rest.iter().map(|b| format!("{b:02x}")).collect();
    let file = TargetFile::in_root(pid, &format!("usr/lib/debug/.build-id/{first:02x}/{rest}.debug")).ok()?;
    checked(file, id)
}

/// `file`, if it holds the debug info of build `id`.
pub fn checked(file: TargetFile, id: &[u8]) -> Option<Companion> {
    let links_further = {
        let cache = ReadCache::new(file.file());
        let elf = object::File::parse(&cache).ok()?;
        (elf.build_id().ok().flatten() == Some(id)).then(|| names_companion(&elf))?
    };
    Some(Companion { file, links_further })
}
