//! One object's unwind table: its `.eh_frame` (or, without one,
//! `.debug_frame`) evaluated with gimli, row by row, into the compact rows
//! the kernel searches (see `memleak_common::UNWIND_CFA_RSP`).

use std::sync::atomic::{AtomicBool, Ordering};

use anyhow::Context as _;
use gimli::{
    BaseAddresses, CfaRule, CieOrFde, DebugFrame, EhFrame, LittleEndian, Register, RegisterRule, UnwindContext,
    UnwindSection, X86_64,
};
use memleak_common::{
    UNWIND_CFA_RBP, UNWIND_CFA_RSP, UNWIND_END, UNWIND_NONE, UNWIND_OFFSET_SHIFT, UNWIND_RBP_SAVED, UNWIND_SLOT_SHIFT,
};
use object::{Object as _, ObjectSection as _, ObjectSegment as _, ReadRef};

/// An object's table, and how its file maps to its addresses.
#[derive(Debug, Default)]
pub struct Table {
    /// Sorted: the address in the top 32 bits, the rule below.
    pub rows: Vec<u64>,
    pub segments: Vec<Segment>,
    /// Bytes of executable code (for -v: table bytes per MiB of text).
    pub text_bytes: u64,
    /// Nearly every function sets up a frame pointer (CFA = rbp + 16, rbp
    /// saved at CFA - 16): at a call in any of them, the frame-pointer step
    /// is exact, and cheaper than a search.
    pub keeps_frame_pointers: bool,
    /// Not built: its rows would be about this many, more than allowed.
    pub too_big: Option<u64>,
}

/// A loadable segment: `filesz` bytes from file offset `offset` at
/// address `vaddr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: u64,
    pub vaddr: u64,
    pub filesz: u64,
}

impl Table {
    /// Address in memory less the object's address, for a mapping of
    /// file offset `offset` at `start`; None if no segment holds it.
    pub fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        let seg = self.segments.iter().find(|s| s.offset & !0xfff <= offset && offset < s.offset + s.filesz)?;
        Some(start.wrapping_sub(offset).wrapping_add(seg.offset).wrapping_sub(seg.vaddr))
    }
}

/// Bytes of `.eh_frame` per row of the table it gives, a little less than
/// measured (libc 5.42, libLLVM 5.36): an estimate that errs high.
const EH_FRAME_BYTES_PER_ROW: u64 = 5;

/// The table of the ELF object `data`. An object without frame info has
/// no rows (it is walked by frame pointers). Gives up once `stop` is set.
/// An object whose table would have more than about `max_rows` rows is not
/// evaluated (`too_big`): libLLVM's took 1.5 to 3.9 s of CPU.
pub fn build<'d>(data: impl ReadRef<'d>, stop: &AtomicBool, max_rows: u64) -> anyhow::Result<Table> {
    let file = object::File::parse(data).context("not an ELF object")?;
    let segments = file
        .segments()
        .filter_map(|s| {
            let (offset, filesz) = s.file_range();
            Some(Segment { offset, vaddr: s.address(), filesz }).filter(|_| filesz > 0)
        })
        .collect();
    let text_bytes = file
        .sections()
        .filter(|s| s.kind() == object::SectionKind::Text)
        .map(|s| s.size())
        .sum();
    let mut bases = BaseAddresses::default();
    if let Some(text) = file.section_by_name(".text") {
        bases = bases.set_text(text.address());
    }
    if let Some(got) = file.section_by_name(".got") {
        bases = bases.set_got(got.address());
    }
    let estimate = [".eh_frame", ".debug_frame"]
        .iter()
        .filter_map(|name| file.section_by_name(name))
        .map(|s| s.size() / EH_FRAME_BYTES_PER_ROW)
        .max()
        .unwrap_or(0);
    if estimate > max_rows {
        return Ok(Table { segments, text_bytes, too_big: Some(estimate), ..Table::default() });
    }
    let mut spans = Spans::default();
    if let Some(section) = file.section_by_name(".eh_frame") {
        let eh = EhFrame::new(section.data()?, LittleEndian);
        let bases = bases.clone().set_eh_frame(section.address());
        spans = evaluate(&eh, &bases, stop).context("reading .eh_frame")?;
    }
    if spans.rows.is_empty()
        && let Some(section) = file.section_by_name(".debug_frame")
    {
        let mut debug = DebugFrame::new(section.data()?, LittleEndian);
        debug.set_address_size(8);
        spans = evaluate(&debug, &bases, stop).context("reading .debug_frame")?;
    }
    // 9 functions in 10, of those that have a frame: in a program built
    // with frame pointers, functions from elsewhere (crt's, the C
    // library's static parts, hand-written assembly) may have none.
    let keeps_frame_pointers = spans.functions > 0 && spans.with_frame_pointer * 10 >= spans.functions * 9;
    Ok(Table { rows: compact(spans.rows), segments, text_bytes, keeps_frame_pointers, too_big: None })
}

/// What the FDEs say.
#[derive(Default)]
struct Spans {
    /// (start, end, rule) of every row of every FDE.
    rows: Vec<(u64, u64, u32)>,
    /// Functions with a frame that a frame-pointer walk could pass: not
    /// those whose return address stays at the CFA rsp + 8 throughout
    /// (nothing for a walk to miss), nor those with a row the walk
    /// cannot follow or the outermost (`_start`, PLT stubs, signal
    /// trampolines: what they are does not depend on the build).
    functions: usize,
    /// Of those, the ones with a row of the frame-pointer rule.
    with_frame_pointer: usize,
}

fn evaluate<'a, S: UnwindSection<gimli::EndianSlice<'a, LittleEndian>>>(
    section: &S,
    bases: &BaseAddresses,
    stop: &AtomicBool,
) -> anyhow::Result<Spans> {
    const FRAME_POINTER: u32 = UNWIND_CFA_RBP | UNWIND_RBP_SAVED | 2 << UNWIND_SLOT_SHIFT | 16 << UNWIND_OFFSET_SHIFT;
    const NO_FRAME: u32 = UNWIND_CFA_RSP | 8 << UNWIND_OFFSET_SHIFT;
    let mut spans = Spans::default();
    let mut ctx = Box::new(UnwindContext::new());
    let mut entries = section.entries(bases);
    let mut read = 0u32;
    while let Some(entry) = entries.next()? {
        // Every 1024 entries: libLLVM's take seconds in all, a check is
        // nothing next to 1024 of them.
        read = read.wrapping_add(1);
        if read % 1024 == 0 && stop.load(Ordering::Relaxed) {
            anyhow::bail!("memleak is ending");
        }
        let CieOrFde::Fde(partial) = entry else { continue };
        // A broken FDE costs its function a table, not the object.
        let Ok(fde) = partial.parse(S::cie_from_offset) else { continue };
        let Ok(mut rows) = fde.rows(section, bases, &mut ctx) else { continue };
        let (mut frame_pointer, mut framed, mut followable) = (false, false, true);
        while let Ok(Some(row)) = rows.next_row() {
            let rule = rule(row.cfa(), |r| row.register(r));
            frame_pointer |= rule == FRAME_POINTER;
            framed |= rule != NO_FRAME;
            followable &= rule & 3 != UNWIND_END && rule & 3 != UNWIND_NONE;
            spans.rows.push((row.start_address(), row.end_address(), rule));
        }
        if framed && followable {
            spans.functions += 1;
            spans.with_frame_pointer += usize::from(frame_pointer);
        }
    }
    Ok(spans)
}

/// A row's rule, packed; UNWIND_NONE for what the kernel cannot follow.
fn rule<T: gimli::ReaderOffset>(cfa: &CfaRule<T>, register: impl Fn(Register) -> Option<RegisterRule<T>>) -> u32 {
    match register(X86_64::RA) {
        None | Some(RegisterRule::Undefined) => return UNWIND_END,
        Some(RegisterRule::Offset(-8)) => {}
        Some(_) => return UNWIND_NONE,
    }
    let (kind, offset) = match *cfa {
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RSP => (UNWIND_CFA_RSP, offset),
        CfaRule::RegisterAndOffset { register, offset } if register == X86_64::RBP => (UNWIND_CFA_RBP, offset),
        _ => return UNWIND_NONE,
    };
    if !(8..1 << (32 - UNWIND_OFFSET_SHIFT)).contains(&offset) {
        return UNWIND_NONE;
    }
    let mut packed = kind | (offset as u32) << UNWIND_OFFSET_SHIFT;
    match register(X86_64::RBP) {
        None | Some(RegisterRule::SameValue) => {}
        Some(RegisterRule::Offset(at)) if at < 0 && at % 8 == 0 && -at / 8 <= 0xff => {
            packed |= UNWIND_RBP_SAVED | ((-at / 8) as u32) << UNWIND_SLOT_SHIFT;
        }
        Some(_) => return UNWIND_NONE,
    }
    packed
}

/// Sorted rows from FDE spans: a row where the rule changes, and an
/// UNWIND_NONE row where a gap between functions starts, so no address
/// outside an FDE takes a neighbour's rule. Addresses past 4 GiB are left
/// out (walked by frame pointers).
fn compact(mut spans: Vec<(u64, u64, u32)>) -> Vec<u64> {
    spans.sort_by_key(|&(start, ..)| start);
    let mut rows: Vec<u64> = Vec::with_capacity(spans.len());
    let push = |rows: &mut Vec<u64>, at: u64, rule: u32| {
        let row = at << 32 | u64::from(rule);
        match rows.last_mut() {
            Some(last) if *last >> 32 == at => *last = row,
            Some(last) if *last as u32 == rule => {}
            Some(last) if *last >> 32 > at => {} // overlapping FDEs: the first wins
            _ => rows.push(row),
        }
    };
    let mut covered = 0;
    for (start, end, rule) in spans {
        if end > u64::from(u32::MAX) || start >= end {
            continue;
        }
        if !rows.is_empty() && covered < start {
            push(&mut rows, covered, UNWIND_NONE);
        }
        push(&mut rows, start, rule);
        covered = covered.max(end);
    }
    if !rows.is_empty() {
        push(&mut rows, covered, UNWIND_NONE);
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    const RSP8: u32 = UNWIND_CFA_RSP | 8 << UNWIND_OFFSET_SHIFT;
    const RSP16: u32 = UNWIND_CFA_RSP | 16 << UNWIND_OFFSET_SHIFT;

    #[test]
    fn gaps_between_functions_have_no_rule_and_equal_rules_merge() {
        let rows = compact(vec![(0x20, 0x30, RSP8), (0x10, 0x18, RSP8), (0x18, 0x20, RSP16), (0x30, 0x40, RSP16)]);
        let row = |at: u64, rule: u32| at << 32 | u64::from(rule);
        assert_eq!(rows, [row(0x10, RSP8), row(0x18, RSP16), row(0x20, RSP8), row(0x30, RSP16), row(0x40, UNWIND_NONE)]);
        let rows = compact(vec![(0x10, 0x18, RSP8), (0x28, 0x30, RSP8)]);
        assert_eq!(rows, [row(0x10, RSP8), row(0x18, UNWIND_NONE), row(0x28, RSP8), row(0x30, UNWIND_NONE)]);
    }

    #[test]
    fn rules_the_kernel_can_follow() {
        let rsp = |offset| CfaRule::<usize>::RegisterAndOffset { register: X86_64::RSP, offset };
        let rbp = |offset| CfaRule::<usize>::RegisterAndOffset { register: X86_64::RBP, offset };
        let regs = |ra: Option<RegisterRule<usize>>, bp: Option<RegisterRule<usize>>| {
            move |r: Register| if r == X86_64::RA { ra.clone() } else if r == X86_64::RBP { bp.clone() } else { None }
        };
        let ra = Some(RegisterRule::Offset(-8));
        assert_eq!(rule(&rsp(8), regs(ra.clone(), None)), RSP8);
        assert_eq!(
            rule(&rbp(16), regs(ra.clone(), Some(RegisterRule::Offset(-16)))),
            UNWIND_CFA_RBP | UNWIND_RBP_SAVED | 2 << UNWIND_SLOT_SHIFT | 16 << UNWIND_OFFSET_SHIFT
        );
        // _start and clone3: the return address is undefined.
        assert_eq!(rule(&rsp(8), regs(Some(RegisterRule::Undefined), None)), UNWIND_END);
        assert_eq!(rule(&rsp(8), regs(None, None)), UNWIND_END);
        // A register rule the kernel has no code for, an offset too big.
        assert_eq!(rule(&rsp(8), regs(ra.clone(), Some(RegisterRule::Register(X86_64::RBX)))), UNWIND_NONE);
        assert_eq!(rule(&rsp(1 << 22), regs(ra, None)), UNWIND_NONE);
    }

    #[test]
    fn libc_has_a_table_of_followable_rows() {
        let Some(libc) = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6"]
            .iter()
            .find_map(|p| std::fs::read(p).ok())
        else {
            eprintln!("skipped: no glibc");
            return;
        };
        let table = build(libc.as_slice(), &AtomicBool::new(false), u64::MAX).unwrap();
        assert!(table.rows.len() > 1000, "{} rows", table.rows.len());
        assert!(table.rows.windows(2).all(|w| w[0] >> 32 < w[1] >> 32), "rows sorted, one per address");
        let none = table.rows.iter().filter(|r| **r as u32 == UNWIND_NONE).count();
        // Gaps between functions and the few rules it cannot follow.
        assert!(none * 5 < table.rows.len(), "{none} of {} rows without a rule", table.rows.len());
        assert!(table.text_bytes > 1 << 20);
        // Debian builds it without frame pointers.
        assert!(!table.keeps_frame_pointers);
        // Over a limit: not evaluated, an estimate that errs high instead.
        let small = build(libc.as_slice(), &AtomicBool::new(false), 1000).unwrap();
        assert!(small.rows.is_empty());
        assert!(small.too_big.is_some_and(|rows| rows >= table.rows.len() as u64), "{:?}", small.too_big);
        assert_eq!(table.too_big, None);
    }

    #[test]
    fn a_program_built_with_frame_pointers_keeps_them() {
        let dir = std::env::temp_dir().join(format!("memleak-fp-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("f.c");
        // Functions that need a frame at -O2 (a buffer another function
        // fills), and crt's, which have none or are outermost (_start).
        let program = "#include <string.h>\n\
            __attribute__((noinline)) void fill(char *b, int n) { memset(b, n, n); }\n\
            __attribute__((noinline)) int leaf(char *b) { char own[64]; fill(own, 64); return own[b[0] & 63]; }\n\
            __attribute__((noinline)) int middle(int n) { char b[64]; fill(b, n & 63); return leaf(b) + b[1]; }\n\
            __attribute__((noinline)) int outer(int n) { char b[32]; fill(b, 32); return middle(n + b[2]) * 3; }\n\
            int main(int c, char **v) { char b[16]; fill(b, 16); return outer(c + b[3]) + middle(c); }\n";
        std::fs::write(&source, program).unwrap();
        let keeps = |flags: &[&str]| {
            let out = dir.join("f");
            let ok = std::process::Command::new("cc").args(flags).arg("-o").arg(&out).arg(&source).status().unwrap().success();
            assert!(ok, "cc {flags:?}");
            let table = build(std::fs::read(&out).unwrap().as_slice(), &AtomicBool::new(false), u64::MAX).unwrap();
            (table.keeps_frame_pointers, table.rows.len())
        };
        // The same optimization, only the frame pointer differs.
        let (with, with_rows) = keeps(&["-O2", "-fno-omit-frame-pointer"]);
        let (without, without_rows) = keeps(&["-O2", "-fomit-frame-pointer"]);
        let _ = std::fs::remove_dir_all(&dir);
        // Both have tables: the verdict is the rule's, not a missing table's.
        assert!(with_rows > 5 && without_rows > 5, "{with_rows} and {without_rows} rows");
        assert!(with, "built with frame pointers: walked by them");
        assert!(!without, "built without: walked by its table");
    }
}
