//! A copy of a large debug file that holds only the compilation units a
//! report's addresses are in, for blazesym to read instead of the file.
//!
//! blazesym inflates every DWARF section of a file whole and walks the
//! header of every unit. On the `hold` fixture (1,000,000 blocks, 10,000
//! stacks, `memleak -p PID -v 1`), the first report with a glibc frame read
//! glibc's separate debug file (libc6-dbg: 4 MiB of zlib-compressed DWARF,
//! 9.5 MiB inflated): memleak's peak RSS 35.0 MiB; 30.1 with that file
//! decompressed beforehand (`objcopy --decompress-debug-sections`: every
//! page of `.debug_info` was still touched); 20.6 reading no DWARF at all
//! (`--no-source`); 21.7 with this. Here the sections are inflated as
//! streams into a memory file (`memfd`) with holes where nothing is needed
//! (never read, so never resident): of `.debug_info` only the units wanted,
//! each gap before one covered by a type unit's header (which readers skip
//! whole), the section ending with the last; of `.debug_abbrev` and
//! `.debug_line` only those units' tables and line programs; no location
//! lists; the small sections whole (glibc's: 0.5 MiB of strings, ranges and
//! symbols). Building one and reading it took 18 ms on average (71 of them
//! for addresses all over glibc in the unit test below, 1.3 s), most of
//! it inflating `.debug_info` up to the last unit wanted; blazesym no
//! longer inflates it all.
//! The units are those `.debug_aranges` names for the addresses; a file
//! without, an address it does not cover, or a unit that refers into
//! another unit (`DW_FORM_ref_addr`) has the file read whole as before
//! (`part` gives None).

use std::{
    collections::{BTreeMap, BTreeSet},
    fs::File,
    io::{self, Read},
    os::unix::fs::FileExt as _,
    path::PathBuf,
};

use object::{
    Endianness,
    elf::{self, FileHeader64, SectionHeader64},
    read::elf::{FileHeader as _, SectionHeader as _},
};

use crate::target::file::TargetFile;

/// Files with less DWARF than this are read whole: the copy would not pay.
const WORTH: u64 = 1 << 20;
/// Bytes of `.debug_abbrev` kept from where a unit's table starts; glibc's
/// average 550 (0.9 MiB for 1,700 units). A table longer than this fails
/// to parse, and the file is read whole.
const ABBREV_WINDOW: u64 = 64 << 10;
/// Bytes of a DWARF 5 type unit's header (32-bit format): the filler.
const FILLER_HEADER: u64 = 24;

/// The copy; its memory file closes when it is dropped.
pub struct Part {
    file: File,
}

impl Part {
    /// A path that opens the copy (this process's fd).
    pub fn path(&self) -> PathBuf {
        use std::os::fd::AsRawFd as _;
        PathBuf::from(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
    }
}

/// One section of the original file.
struct Section {
    header: SectionHeader64<Endianness>,
    name: Vec<u8>,
    /// Where its bytes are in the file, and whether they are zlib-compressed
    /// (`SHF_COMPRESSED`; then `size` is the inflated size).
    offset: u64,
    stored: u64,
    compressed: bool,
    size: u64,
    align: u64,
}

/// The copy of `file` (a debug file: its addresses as in `addrs`) with
/// the units of `addrs`; None where it would not help or cannot be made.
pub fn part(file: &TargetFile, addrs: &[u64]) -> Option<Part> {
    let data = object::read::ReadCache::new(file.file());
    let header = FileHeader64::<Endianness>::parse(&data).ok()?;
    let endian = header.endian().ok()?;
    if endian != Endianness::Little {
        return None;
    }
    let table = header.sections(endian, &data).ok()?;
    let mut sections = Vec::new();
    for h in table.iter() {
        let name = table.section_name(endian, h).ok()?.to_vec();
        let (offset, stored) = (h.sh_offset(endian), h.sh_size(endian));
        let compressed = h.sh_flags(endian) & u64::from(elf::SHF_COMPRESSED) != 0;
        let (size, align) = if compressed {
            let mut chdr = [0u8; 24];
            file.read_exact_at(&mut chdr, offset).ok()?;
            if u32::from_le_bytes(chdr[..4].try_into().ok()?) != elf::ELFCOMPRESS_ZLIB {
                return None;
            }
            (u64::from_le_bytes(chdr[8..16].try_into().ok()?), u64::from_le_bytes(chdr[16..24].try_into().ok()?))
        } else {
            (stored, h.sh_addralign(endian))
        };
        sections.push(Section { header: *h, name, offset, stored, compressed, size, align });
    }
    let index = |name: &[u8]| sections.iter().position(|s| s.name == name);
    let (info, abbrev, line, aranges) =
        (index(b".debug_info")?, index(b".debug_abbrev")?, index(b".debug_line"), index(b".debug_aranges")?);
    if sections[info].size < WORTH {
        return None;
    }
    let units = units_of(&read_whole(file, &sections[aranges])?, addrs)?;

    // The units themselves, and from their headers and first entries the
    // abbreviation tables and line programs they use.
    let unit_bytes = pieces(file, &sections[info], units.iter().map(|&u| (u, None)))?;
    let abbrev_offsets: BTreeSet<u64> = unit_bytes.values().map(|u| abbrev_offset(u)).collect::<Option<_>>()?;
    let abbrev_bytes = pieces(file, &sections[abbrev], abbrev_offsets.iter().map(|&a| (a, Some(ABBREV_WINDOW))))?;
    let mut lines = BTreeSet::new();
    for unit in unit_bytes.values() {
        let table = &abbrev_bytes[&abbrev_offset(unit)?];
        match line_program(unit, table)? {
            Some(offset) => lines.insert(offset),
            None => false,
        };
    }
    let line_bytes = match line {
        Some(line) => pieces(file, &sections[line], lines.iter().map(|&l| (l, None)))?,
        None => BTreeMap::new(),
    };

    let out = memfd()?;
    let mut at = 64 + u64::from(header.e_phnum(endian)) * 56;
    // The program headers as they were (the addresses' layout).
    let phoff = header.e_phoff(endian);
    if header.e_phnum(endian) > 0 {
        let mut ph = vec![0u8; usize::from(header.e_phnum(endian)) * 56];
        file.read_exact_at(&mut ph, phoff).ok()?;
        out.write_all_at(&ph, 64).ok()?;
    }
    let mut headers = Vec::with_capacity(sections.len());
    for (i, s) in sections.iter().enumerate() {
        let mut h = s.header;
        let kind = h.sh_type(endian);
        let mut size = s.size;
        if kind != elf::SHT_NOBITS && kind != elf::SHT_NULL {
            at = at.next_multiple_of(s.align.max(1));
            if i == info {
                // Ends with the last unit wanted: a reader walks every
                // unit's header to the section's end.
                size = write_units(&out, at, &unit_bytes)?;
            } else if i == abbrev {
                write_pieces(&out, at, &abbrev_bytes)?;
            } else if Some(i) == line {
                write_pieces(&out, at, &line_bytes)?;
            } else if s.name == b".debug_loclists" || s.name == b".debug_loc" {
                // Where variables live: never read for frames.
                size = 0;
            } else {
                copy_whole(file, s, &out, at)?;
            }
            h.sh_offset = object::U64::new(endian, at);
            at += size;
        }
        h.sh_size = object::U64::new(endian, size);
        h.sh_addralign = object::U64::new(endian, s.align);
        h.sh_flags = object::U64::new(endian, h.sh_flags(endian) & !u64::from(elf::SHF_COMPRESSED));
        headers.push(h);
    }
    let shoff = at.next_multiple_of(8);
    let mut table = Vec::with_capacity(headers.len() * 64);
    for h in &headers {
        table.extend_from_slice(object::bytes_of(h));
    }
    out.write_all_at(&table, shoff).ok()?;
    let mut fh = *header;
    fh.e_phoff = object::U64::new(endian, if header.e_phnum(endian) > 0 { 64 } else { 0 });
    fh.e_shoff = object::U64::new(endian, shoff);
    out.write_all_at(object::bytes_of(&fh), 0).ok()?;
    Some(Part { file: out })
}

/// The offsets in `.debug_info` of the units that `.debug_aranges` says
/// hold `addrs`; None if one is in none.
fn units_of(aranges: &[u8], addrs: &[u64]) -> Option<BTreeSet<u64>> {
    let aranges = gimli::DebugAranges::new(aranges, gimli::LittleEndian);
    let mut ranges = Vec::new();
    let mut headers = aranges.headers();
    while let Some(h) = headers.next().ok()? {
        let mut entries = h.entries();
        while let Some(e) = entries.next().ok()? {
            ranges.push((e.range(), h.debug_info_offset().0 as u64));
        }
    }
    addrs
        .iter()
        .map(|&a| ranges.iter().find(|(r, _)| r.begin <= a && a < r.end).map(|(_, unit)| *unit))
        .collect()
}

/// The unit's `debug_abbrev_offset` (32-bit DWARF 2 to 5).
fn abbrev_offset(unit: &[u8]) -> Option<u64> {
    let version = u16::from_le_bytes(unit.get(4..6)?.try_into().ok()?);
    let at = if version >= 5 { 8 } else { 6 };
    Some(u64::from(u32::from_le_bytes(unit.get(at..at + 4)?.try_into().ok()?)))
}

/// The offset of the unit's line program (`DW_AT_stmt_list` of its first
/// entry), if it has one; None (give up) if the unit cannot be parsed or
/// one of its entries refers into another unit (every entry is read).
fn line_program(unit: &[u8], abbrevs: &[u8]) -> Option<Option<u64>> {
    let le = gimli::LittleEndian;
    let header = gimli::DebugInfo::new(unit, le).units().next().ok()??;
    let abbrevs = gimli::DebugAbbrev::new(abbrevs, le).abbreviations(gimli::DebugAbbrevOffset(0)).ok()?;
    let mut entries = header.entries_raw(&abbrevs, None).ok()?;
    let mut stmt_list = None;
    let mut first = true;
    while !entries.is_empty() {
        let Some(abbrev) = entries.read_abbreviation().ok()? else { continue };
        for spec in abbrev.attributes() {
            let attr = entries.read_attribute(*spec).ok()?;
            match attr.value() {
                gimli::AttributeValue::DebugInfoRef(_) | gimli::AttributeValue::DebugInfoRefSup(_) => return None,
                gimli::AttributeValue::DebugLineRef(offset) if first && attr.name() == gimli::DW_AT_stmt_list => {
                    stmt_list = Some(offset.0 as u64);
                }
                _ => {}
            }
        }
        first = false;
    }
    Some(stmt_list)
}

/// Reads the parts of section `s` that start at the given offsets: `Some(n)`
/// bytes (fewer at the section's end), or None for a whole DWARF unit (its
/// length first). One pass over the inflated stream.
fn pieces(file: &TargetFile, s: &Section, wanted: impl Iterator<Item = (u64, Option<u64>)>) -> Option<BTreeMap<u64, Vec<u8>>> {
    let wanted: BTreeMap<u64, Option<u64>> = wanted.collect();
    let mut stream = open(file, s);
    let mut pos = 0;
    let mut out = BTreeMap::new();
    for (&start, &len) in &wanted {
        // A window starting inside the one before (units never overlap):
        // its tail, then more of the stream.
        if start < pos {
            let n = len?.min(s.size.checked_sub(start)?);
            let (&prev, bytes): (&u64, &Vec<u8>) = out.range(..=start).next_back()?;
            let mut piece = bytes.get((start - prev) as usize..)?.to_vec();
            if start + n > pos {
                let more = (start + n - pos) as usize;
                piece.resize(piece.len() + more, 0);
                let tail = piece.len() - more;
                stream.read_exact(&mut piece[tail..]).ok()?;
                pos += more as u64;
            }
            out.insert(start, piece);
            continue;
        }
        io::copy(&mut (&mut stream).take(start - pos), &mut io::sink()).ok()?;
        let bytes = match len {
            Some(n) => {
                let n = n.min(s.size.checked_sub(start)?);
                let mut bytes = vec![0; n as usize];
                stream.read_exact(&mut bytes).ok()?;
                bytes
            }
            None => {
                let mut length = [0u8; 4];
                stream.read_exact(&mut length).ok()?;
                let n = u32::from_le_bytes(length);
                // 64-bit DWARF and reserved lengths: not handled.
                if n >= 0xffff_fff0 {
                    return None;
                }
                // Grown as the stream gives bytes, not allocated from the
                // length first: a file's length field alone (a container's
                // file, up to 4 GiB) never sizes a buffer.
                let mut bytes = length.to_vec();
                (&mut stream).take(u64::from(n)).read_to_end(&mut bytes).ok()?;
                if bytes.len() != 4 + n as usize {
                    return None;
                }
                bytes
            }
        };
        pos = start + bytes.len() as u64;
        out.insert(start, bytes);
    }
    Some(out)
}

/// The units at their offsets in the section written at `at`, each gap
/// before one covered by a type unit's header, which readers skip by its
/// length (a gap too short for one: None, it never is, units are longer).
/// Returns where the last one ends.
fn write_units(out: &File, at: u64, units: &BTreeMap<u64, Vec<u8>>) -> Option<u64> {
    let mut pos = 0;
    for (&start, bytes) in units {
        if start > pos {
            let gap = start - pos;
            if gap <= FILLER_HEADER || gap - 4 > u64::from(u32::MAX >> 4) {
                return None;
            }
            let mut filler = Vec::with_capacity(FILLER_HEADER as usize + 1);
            filler.extend_from_slice(&((gap - 4) as u32).to_le_bytes());
            filler.extend_from_slice(&5u16.to_le_bytes());
            filler.push(gimli::DW_UT_type.0);
            filler.push(8);
            filler.extend_from_slice(&0u32.to_le_bytes()); // abbreviations
            filler.extend_from_slice(&0u64.to_le_bytes()); // type signature
            filler.extend_from_slice(&(FILLER_HEADER as u32).to_le_bytes()); // type offset
            filler.push(0); // no entries
            out.write_all_at(&filler, at + pos).ok()?;
        }
        out.write_all_at(bytes, at + start).ok()?;
        pos = start + bytes.len() as u64;
    }
    Some(pos)
}

fn write_pieces(out: &File, at: u64, pieces: &BTreeMap<u64, Vec<u8>>) -> Option<()> {
    pieces.iter().try_for_each(|(&start, bytes)| out.write_all_at(bytes, at + start).ok())
}

fn copy_whole(file: &TargetFile, s: &Section, out: &File, at: u64) -> Option<()> {
    let mut stream = open(file, s);
    let mut buf = vec![0u8; 64 << 10];
    let mut pos = 0;
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => return None,
        };
        out.write_all_at(&buf[..n], at + pos).ok()?;
        pos += n as u64;
    }
    (pos == s.size).then_some(())
}

fn read_whole(file: &TargetFile, s: &Section) -> Option<Vec<u8>> {
    let mut bytes = Vec::with_capacity(s.size as usize);
    open(file, s).read_to_end(&mut bytes).ok()?;
    (bytes.len() as u64 == s.size).then_some(bytes)
}

/// The section's bytes as a stream, inflated if compressed.
fn open<'a>(file: &'a TargetFile, s: &Section) -> Box<dyn Read + 'a> {
    if s.compressed {
        let raw = At { file, pos: s.offset + 24, end: s.offset + s.stored };
        Box::new(flate2::read::ZlibDecoder::new(io::BufReader::with_capacity(32 << 10, raw)))
    } else {
        Box::new(At { file, pos: s.offset, end: s.offset + s.stored })
    }
}

/// A range of the file, read in order.
struct At<'a> {
    file: &'a TargetFile,
    pos: u64,
    end: u64,
}

impl Read for At<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min((self.end - self.pos) as usize);
        let n = self.file.file().read_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        Ok(n)
    }
}

fn memfd() -> Option<File> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: a C string literal; the fd returned is ours.
    let fd = unsafe { libc::memfd_create(c"memleak-dwarf".as_ptr(), libc::MFD_CLOEXEC) };
    // SAFETY: a new fd nobody else owns.
    (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use blazesym::symbolize::{Input, Symbolized, Symbolizer, source::{Elf, Source}};

    /// What blazesym finds at `addrs` in the file at `path`: name, offset,
    /// size, source line and inlined functions, as text.
    fn symbolize(path: &std::path::Path, addrs: &[u64]) -> Vec<String> {
        let blaze = Symbolizer::new();
        let src = Source::Elf(Elf::new(path));
        blaze
            .symbolize(&src, Input::VirtOffset(addrs))
            .unwrap()
            .into_iter()
            .map(|s| match s {
                Symbolized::Sym(s) => format!(
                    "{}+{:#x} {:?} {:?} {:?}",
                    s.name,
                    s.offset,
                    s.size,
                    s.code_info.map(|c| (c.to_path().into_owned(), c.line)),
                    s.inlined.iter().map(|f| (f.name.to_string(), f.code_info.as_ref().map(|c| (c.to_path().into_owned(), c.line)))).collect::<Vec<_>>()
                ),
                Symbolized::Unknown(why) => format!("unknown: {why:?}"),
            })
            .collect()
    }

    /// glibc's separate debug file (libc6-dbg, which `cargo xtask setup`
    /// installs), found by the build id of the libc this test runs on.
    fn glibc_debug_file() -> std::path::PathBuf {
        use object::Object as _;
        let libc = std::fs::read("/lib/x86_64-linux-gnu/libc.so.6").unwrap();
        let id = object::File::parse(&*libc).unwrap().build_id().unwrap().unwrap().to_vec();
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        format!("/usr/lib/debug/.build-id/{}/{}.debug", &hex[..2], &hex[2..]).into()
    }

    /// Addresses in functions all over glibc, alone and together: blazesym
    /// finds in the part what it finds in the whole file (names, offsets,
    /// sizes, lines, inlined functions), and the part leaves out most of it.
    #[test]
    fn a_part_symbolizes_as_the_whole_file() {
        use object::{Object as _, ObjectSymbol as _};
        let path = glibc_debug_file();
        let data = std::fs::read(&path).unwrap();
        let elf = object::File::parse(&*data).unwrap();
        let mut addrs: Vec<u64> = elf
            .symbols()
            .filter(|s| s.kind() == object::SymbolKind::Text && s.size() > 0)
            .map(|s| s.address() + s.size() / 2)
            .collect();
        addrs.sort_unstable();
        let addrs: Vec<u64> = addrs.into_iter().step_by(97).collect();
        assert!(addrs.len() > 20, "{} functions", addrs.len());
        let file = TargetFile::host(&path).unwrap();
        let whole = symbolize(&path, &addrs);
        let mut parts = 0;
        for (addr, expected) in addrs.iter().zip(&whole) {
            if let Some(part) = part(&file, &[*addr]) {
                assert_eq!(&symbolize(&part.path(), &[*addr])[0], expected, "{addr:#x}");
                parts += 1;
            }
        }
        eprintln!("a part for {parts} of {} addresses", addrs.len());
        assert!(parts * 10 >= addrs.len() * 9, "a part for {parts} of {} addresses", addrs.len());
        let part = part(&file, &addrs).expect("a part for them all");
        assert_eq!(symbolize(&part.path(), &addrs), whole);
    }
}
