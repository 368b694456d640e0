//! Turns user stack addresses into frames: `fibonacci+0x1f [app] fibonacci.c:14`.
//!
//! Each file a process maps is opened once (see `file`) and kept open, and
//! addresses are symbolized as file offsets in it. So frames
//! resolve for binaries inside containers (whose paths mean nothing on the
//! host), for files deleted or replaced since the process started, and
//! after the process has exited. Frames are cached across intervals, and
//! only printed stacks are symbolized.

use std::{
    collections::{HashMap, HashSet},
    fmt,
    path::PathBuf,
};

use blazesym::symbolize::{
    Input, Symbolized, Symbolizer as Blaze, evict,
    source::{Elf, Kernel, Source},
};

use memleak_common::TRUNCATED_IP;

use crate::{
    stack_end::{self, CALL_WINDOW, End},
    target::{
        debuginfod::{self, Debuginfod},
        debuglink, dwarf_part,
        file::TargetFile,
        proc::{self, Mapping},
    },
};

/// The frame standing for a return address that a pending return probe
/// replaced (see `Symbolizer::is_trampoline`).
pub const RETURN_PROBED: &str = "[caller hidden by a return probe]";

/// The frame that ends a stack cut at the depth limit (`TRUNCATED_IP`).
pub const TRUNCATED: &str = "[truncated]";

/// One stack's outstanding memory, symbolized.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StackProfile {
    pub tgid: u32,
    /// The hooked function that made its blocks.
    pub kind: memleak_common::Kind,
    /// Outstanding bytes and blocks.
    pub bytes: u64,
    pub count: u64,
    /// Blocks allocated since attach, freed or not, and their bytes (for
    /// the served heap profiles; the `--pprof` file has outstanding only).
    pub allocs: u64,
    pub allocated: u64,
    /// Innermost first; empty when the kernel could not record the stack.
    pub frames: Vec<Frame>,
}

/// The mapping of the file an address is in, as the process maps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingInfo {
    pub start: u64,
    pub limit: u64,
    pub file_offset: u64,
    pub path: String,
    pub build_id: Option<Vec<u8>>,
}

/// One symbolized return address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub addr: u64,
    /// Function name (demangled) and offset of `addr` in it.
    pub symbol: Option<(String, u64)>,
    /// Module file name, e.g. `app` or `libc.so.6`.
    pub module: Option<String>,
    pub source: Option<SourceLine>,
    /// Functions inlined at this address, innermost first.
    pub inlined: Vec<(String, Option<SourceLine>)>,
    /// Set on the one marker frame that closes a stack whose next return
    /// address could not be one: why (see stack_end), and no address.
    pub end: Option<String>,
}

/// A source location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceLine {
    pub file: String,
    pub line: Option<u32>,
}

impl fmt::Display for SourceLine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{}:{line}", self.file),
            None => f.write_str(&self.file),
        }
    }
}

impl Frame {
    /// The marker closing a stack cut at an address that cannot be a
    /// return address.
    pub fn end(why: &End) -> Self {
        Frame { addr: 0, symbol: None, module: None, source: None, inlined: vec![], end: Some(why.to_string()) }
    }

    /// The marker's name, in every format: `[stack ends: next address
    /// unmapped]`; None for a real frame.
    pub fn end_name(&self) -> Option<String> {
        self.end.as_ref().map(|why| format!("[stack ends: {why}]"))
    }

    /// The printed lines of this frame: inlined callees first (a stack is
    /// printed innermost first), then the function itself.
    pub fn lines(&self) -> Vec<String> {
        if let Some(name) = self.end_name() {
            return vec![name];
        }
        let with_source = |text: String, source: &Option<SourceLine>| match source {
            Some(s) => format!("{text} {s}"),
            None => text,
        };
        let module = self.module.as_deref().unwrap_or("unknown");
        let mut lines: Vec<String> = self
            .inlined
            .iter()
            .map(|(name, source)| with_source(format!("{name} [inlined]"), source))
            .collect();
        let main = match &self.symbol {
            // A stand-in for a frame (`[...]`): no offset, no module.
            Some((name, _)) if name.starts_with('[') => name.clone(),
            Some((name, offset)) => format!("{name}+{offset:#x} [{module}]"),
            None => format!("{:#x} [{module}]", self.addr),
        };
        lines.push(with_source(main, &self.source));
        lines
    }
}

/// File mappings kept per process after they are gone (see `refresh`): a
/// program that loads and unloads plugins at new addresses all day must
/// not grow memleak without bound.
const MAX_GONE: usize = 256;

/// A mapped file, held open so it stays readable whatever happens to its path.
struct Module {
    file: TargetFile,
    /// The name printed in frames: `app`, `libc.so.6`.
    name: String,
    /// Its debug info is in a companion file (see `debuglink`).
    split: Option<debuglink::Split>,
}

impl Module {
    fn fd_path(&self) -> PathBuf {
        self.file.path()
    }
}

/// Symbolizes the user stacks of processes, remembering what it resolved.
pub struct Symbolizer {
    blaze: Blaze,
    cache: HashMap<(u32, u64), Frame>,
    /// Each process's mappings, with the module behind file mappings.
    views: HashMap<u32, Vec<(Mapping, Option<usize>)>>,
    /// None: closed (`forget_exited`), the slot free for the next file.
    modules: Vec<Option<Module>>,
    free_slots: Vec<usize>,
    /// (device, inode, path) -> index in `modules`: two containers' /app
    /// may have the same inode number on different file systems.
    opened: HashMap<(String, u64, String), usize>,
    /// GNU build ids of `modules`, read when first asked for.
    build_ids: HashMap<usize, Option<Vec<u8>>>,
    warned: HashSet<String>,
    /// Whether each (pid, address) can be a return address (see
    /// stack_end); an unmapped one is not kept: a later mapping may hold it.
    verdicts: HashMap<(u32, u64), Result<(), End>>,
    /// Processes whose mappings were read since the last `next_report`.
    fresh: HashSet<u32>,
    /// Frames in `cache` of addresses in no mapping known then: dropped
    /// when the process's mappings are read again (a library loaded since).
    unmapped: HashSet<(u32, u64)>,
    /// Debug files of stripped binaries from debuginfod servers.
    debuginfod: Option<Debuginfod>,
    /// Files (`modules` indexes) blazesym read for the frames of this
    /// report, let go of after it (see `let_go`).
    read: HashSet<usize>,
    /// Times `cache` was emptied for holding over [`MAX_FRAMES`].
    pub cache_resets: u64,
    /// Lines and inlined functions wanted (not `--no-source`). Without
    /// them no DWARF is read, only symbol tables: the names are the same
    /// (a debug file keeps the full symbol table), and glibc's compressed
    /// DWARF is not inflated into memory (about 20 MiB of RSS while it is
    /// read; see `let_go`).
    source_lines: bool,
}

/// Frames kept across reports. A frame is about 200 bytes with its
/// names; past this many (about 3 MiB), the cache starts over at the next
/// report. A report symbolizes only the stacks it prints (and, with
/// `--listen`, up to 1,000 stacks), so this holds them many times over.
pub const MAX_FRAMES: usize = 16_384;

impl Symbolizer {
    /// `servers`: debuginfod servers to ask for debug files not installed.
    pub fn new(source_lines: bool, servers: Option<debuginfod::Servers>) -> Self {
        let blaze = Blaze::builder()
            .enable_code_info(source_lines)
            .enable_inlined_fns(source_lines)
            .enable_demangling(true)
            .build();
        Self {
            blaze,
            cache: HashMap::new(),
            views: HashMap::new(),
            modules: Vec::new(),
            free_slots: Vec::new(),
            opened: HashMap::new(),
            build_ids: HashMap::new(),
            warned: HashSet::new(),
            verdicts: HashMap::new(),
            fresh: HashSet::new(),
            unmapped: HashSet::new(),
            debuginfod: servers.map(Debuginfod::start),
            read: HashSet::new(),
            cache_resets: 0,
            source_lines,
        }
    }

    /// Reads `pid`'s mappings and opens the files not open yet. Call it
    /// while the process lives (at attach, each interval): what it opened
    /// still symbolizes after the process exits.
    pub fn refresh(&mut self, pid: u32) {
        self.fresh.insert(pid);
        let Ok(text) = proc::maps_text(pid) else { return };
        let maps = proc::parse_maps(&text);
        if maps.is_empty() {
            return; // exited: keep what we had
        }
        let mut view: Vec<(Mapping, Option<usize>)> = maps
            .into_iter()
            .map(|m| {
                let module = if m.is_file() { self.open(pid, &m) } else { None };
                (m, module)
            })
            .collect();
        // File mappings gone since (a library closed with dlclose) stay, at
        // the end, where no mapping has taken their place: blocks allocated
        // there before are still outstanding, and their frames still
        // resolve from the file held open.
        if let Some(before) = self.views.remove(&pid) {
            let gone: Vec<_> = before
                .into_iter()
                .filter(|(m, module)| {
                    module.is_some() && !view.iter().any(|(n, _)| n.start < m.end && m.start < n.end)
                })
                .take(MAX_GONE)
                .collect();
            view.extend(gone);
        }
        self.views.insert(pid, view);
        let cache = &mut self.cache;
        self.unmapped.retain(|key| key.0 != pid || cache.remove(key).is_none());
    }

    fn open(&mut self, pid: u32, m: &Mapping) -> Option<usize> {
        let key = (m.dev.clone(), m.inode, m.path.clone());
        if let Some(&i) = self.opened.get(&key) {
            return Some(i);
        }
        let file = match TargetFile::mapped(pid, m) {
            Ok(file) => file,
            Err(e) => {
                if self.warned.insert(m.path.clone()) {
                    crate::warn!("cannot open {} of process {pid} ({e}): its frames show as addresses", m.path);
                }
                return None;
            }
        };
        // Now, while the process lives: its root leads to the companion.
        let mut split = debuglink::split(&file, pid);
        if let Some(split) = &mut split {
            self.ask_debuginfod(split);
        }
        let module = Some(Module { file, name: m.module_name().to_string(), split });
        let i = match self.free_slots.pop() {
            Some(i) => {
                self.modules[i] = module;
                i
            }
            None => {
                self.modules.push(module);
                self.modules.len() - 1
            }
        };
        self.opened.insert(key, i);
        Some(i)
    }

    /// Lets go of what processes that exited held: their mappings and
    /// frames, and every file no other process's mappings name. System-wide,
    /// processes come and go: kept, their descriptors grow without bound (230
    /// after 10 minutes in the run, keeping deleted files alive).
    /// Returns how many processes and files it let go of.
    pub fn forget_exited(&mut self) -> (usize, usize) {
        let dead: HashSet<u32> =
            self.views.keys().copied().filter(|pid| !proc::exists(*pid)).collect();
        if dead.is_empty() {
            return (0, 0);
        }
        self.views.retain(|pid, _| !dead.contains(pid));
        self.fresh.retain(|pid| !dead.contains(pid));
        self.cache.retain(|(pid, _), _| !dead.contains(pid));
        self.verdicts.retain(|(pid, _), _| !dead.contains(pid));
        self.unmapped.retain(|(pid, _)| !dead.contains(pid));
        let used: HashSet<usize> = self.views.values().flatten().filter_map(|(_, module)| *module).collect();
        let mut closed = 0;
        for (i, module) in self.modules.iter_mut().enumerate() {
            if let Some(m) = module
                && !used.contains(&i)
            {
                // blazesym holds a descriptor of its own for each file it
                // read (found by its /proc/self/fd path, while it is open).
                let _ = self.blaze.evict(&evict::Elf::new(m.fd_path()).into());
                if let Some(companion) = m.split.as_ref().and_then(|s| s.companion.as_ref()) {
                    let _ = self.blaze.evict(&evict::Elf::new(companion.file.path()).into());
                }
                *module = None;
                self.build_ids.remove(&i);
                self.free_slots.push(i);
                closed += 1;
            }
        }
        self.opened.retain(|_, i| used.contains(i));
        (dead.len(), closed)
    }

    /// Reads process `pid`'s mappings afresh, forgetting its frames: it
    /// runs another program (exec). Does nothing to one whose mappings
    /// were never read. The files stay open (another process may map them).
    pub fn forget(&mut self, pid: u32) {
        if self.views.remove(&pid).is_none() {
            return;
        }
        self.cache.retain(|(p, _), _| *p != pid);
        self.verdicts.retain(|(p, _), _| *p != pid);
        self.fresh.remove(&pid);
        // Now, while it runs: its frames must resolve if it exits before
        // the next report.
        self.refresh(pid);
    }

    /// A new report: mappings read before may be stale.
    pub fn next_report(&mut self) {
        self.fresh.clear();
        if self.cache.len() > MAX_FRAMES {
            self.cache.clear();
            self.unmapped.clear();
            self.cache_resets += 1;
        }
        // Debug files fetched since: the frames of their binaries are
        // resolved again (all frames: this happens once per file).
        if self.debuginfod.as_ref().is_some_and(Debuginfod::arrived) {
            let mut modules = std::mem::take(&mut self.modules);
            for split in modules.iter_mut().flatten().filter_map(|m| m.split.as_mut()) {
                self.ask_debuginfod(split);
            }
            self.modules = modules;
            self.cache.clear();
            self.unmapped.clear();
        }
    }

    /// A split binary without its debug file in the process's root: the
    /// one in debuginfod's cache, or asked for.
    fn ask_debuginfod(&mut self, split: &mut debuglink::Split) {
        let (Some(debuginfod), None, Some(id)) = (&mut self.debuginfod, &split.companion, &split.build_id) else { return };
        let Some(path) = debuginfod.get(id) else { return };
        split.companion = TargetFile::host(&path).ok().and_then(|file| debuglink::checked(file, id));
    }

    /// Frames cached now.
    pub fn frames_cached(&self) -> usize {
        self.cache.len()
    }

    /// After a report: blazesym's parsed copies of the files it read for
    /// it (symbol tables, and DWARF decompressed into memory) are dropped,
    /// and their mappings unmapped; the frames stay in `cache`. A report
    /// needs them again only for a return address it has not symbolized
    /// yet. glibc's separate debug file alone (libc6-dbg) held 11 MiB of
    /// heap (its 4 MiB of compressed DWARF, decompressed, and the units
    /// parsed) and 3.7 MiB of mapped file, from the first frame in libc
    /// to the end of the run. Returns how many files were let go.
    pub fn let_go(&mut self) -> usize {
        let read = std::mem::take(&mut self.read);
        for &i in &read {
            let Some(m) = &self.modules[i] else { continue };
            let _ = self.blaze.evict(&evict::Elf::new(m.fd_path()).into());
            if let Some(companion) = m.split.as_ref().and_then(|s| s.companion.as_ref()) {
                let _ = self.blaze.evict(&evict::Elf::new(companion.file.path()).into());
            }
        }
        read.len()
    }

    /// How many of `addrs` (a user stack of `pid`, innermost first) can be
    /// return addresses, and why the stack ends there if not all of them
    /// (see stack_end). An address in no mapping known has the process's
    /// mappings read again first, once a report: it may be in a library
    /// loaded since.
    pub fn stack_end(&mut self, pid: u32, addrs: &[u64]) -> (usize, Option<End>) {
        if !self.views.contains_key(&pid) {
            self.refresh(pid);
        }
        if !self.views.contains_key(&pid) {
            return (addrs.len(), None); // its mappings were never read: nothing to judge by
        }
        stack_end::kept(addrs, |addr| {
            // The kernel's mark of a walk cut at the depth limit: it ends
            // the stack as `[truncated]`, not as garbage.
            if addr == TRUNCATED_IP {
                return Ok(());
            }
            if let Some(verdict) = self.verdicts.get(&(pid, addr)) {
                return verdict.clone();
            }
            let mut verdict = self.judge(pid, addr);
            if verdict == Err(End::Unmapped) && !self.fresh.contains(&pid) {
                self.refresh(pid);
                verdict = self.judge(pid, addr);
            }
            if verdict == Err(End::Unmapped) && self.is_trampoline(pid, addr) {
                return Ok(());
            }
            if verdict != Err(End::Unmapped) {
                self.verdicts.insert((pid, addr), verdict.clone());
            }
            verdict
        })
    }

    /// Whether `addr` is the kernel's return probe trampoline, the start
    /// of the process's `[uprobes]` mapping: a function with a return
    /// probe (memleak's own on dlopen, any tracer's) returns there, its
    /// real return address kept by the kernel. The walk still went on
    /// right (by the frame's table, or its frame pointer): only that one
    /// caller is unknown. A frame-pointer walk too reads it there.
    fn is_trampoline(&self, pid: u32, addr: u64) -> bool {
        self.views.get(&pid).is_some_and(|v| v.iter().any(|(m, _)| m.start == addr && m.path == "[uprobes]"))
    }

    fn judge(&self, pid: u32, ret: u64) -> Result<(), End> {
        let found = self.views.get(&pid).and_then(|v| v.iter().find(|(m, _)| m.contains(ret.wrapping_sub(1))));
        let Some((m, module)) = found else { return Err(End::Unmapped) };
        let file = module.and_then(|i| self.modules[i].as_ref()).map(|m| &m.file);
        stack_end::check(ret, Some(m), |m, ret, buf| code_before(pid, m, file, ret, buf))
    }

    /// Frames of a kernel stack (return addresses, innermost first), from
    /// /proc/kallsyms.
    pub fn kernel_frames(&mut self, addrs: &[u64]) -> Vec<Frame> {
        const KERNEL: u32 = u32::MAX;
        let missing: Vec<u64> = addrs.iter().copied().filter(|a| !self.cache.contains_key(&(KERNEL, *a))).collect();
        if !missing.is_empty() {
            let lookups: Vec<u64> = missing.iter().map(|a| a.saturating_sub(1)).collect();
            let src = Source::Kernel(Kernel::default());
            let frames: Vec<Option<Frame>> = match self.blaze.symbolize(&src, Input::AbsAddr(&lookups)) {
                Ok(results) => results.into_iter().zip(&missing).map(|(s, a)| to_frame(*a, "kernel", s)).collect(),
                Err(_) => vec![None; missing.len()],
            };
            for (&addr, frame) in missing.iter().zip(frames) {
                let frame = frame.unwrap_or(Frame {
                    addr,
                    symbol: None,
                    module: Some("kernel".into()),
                    source: None,
                    inlined: vec![],
                    end: None,
                });
                self.cache.insert((KERNEL, addr), frame);
            }
        }
        addrs.iter().map(|a| self.cache[&(KERNEL, *a)].clone()).collect()
    }

    /// The file mapping of process `pid` that holds the call before return
    /// address `addr`, with the file's build id (for pprof's mappings).
    pub fn mapping(&mut self, pid: u32, addr: u64) -> Option<MappingInfo> {
        let call = addr.saturating_sub(1);
        let (m, module) = self.views.get(&pid)?.iter().find(|(m, _)| m.contains(call))?;
        let module = (*module)?;
        let (start, limit, file_offset, path) = (m.start, m.end, m.offset, m.path.clone());
        let fd_path = self.modules[module].as_ref()?.fd_path();
        let build_id = self
            .build_ids
            .entry(module)
            .or_insert_with(|| blazesym::helper::read_elf_build_id(&fd_path).ok().flatten().map(|b| b.to_vec()))
            .clone();
        Some(MappingInfo { start, limit, file_offset, path, build_id })
    }

    /// Frames for `addrs` (return addresses, innermost first) of process `pid`.
    pub fn frames(&mut self, pid: u32, addrs: &[u64]) -> Vec<Frame> {
        let missing: Vec<u64> = addrs
            .iter()
            .copied()
            .filter(|a| !self.cache.contains_key(&(pid, *a)))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        if !missing.is_empty() {
            if !self.views.contains_key(&pid) {
                self.refresh(pid);
            }
            self.resolve(pid, &missing);
        }
        addrs.iter().map(|a| self.cache[&(pid, *a)].clone()).collect()
    }

    fn resolve(&mut self, pid: u32, addrs: &[u64]) {
        // The end of a stack cut at the depth limit: no frame's, named as
        // a function so that every format shows it (JSON's symbol, the
        // folded and pprof function).
        if addrs.contains(&TRUNCATED_IP) {
            let symbol = Some((TRUNCATED.to_string(), 0));
            let frame = Frame { addr: TRUNCATED_IP, symbol, module: None, source: None, inlined: vec![], end: None };
            self.cache.insert((pid, TRUNCATED_IP), frame);
        }
        let addrs: Vec<u64> = addrs.iter().copied().filter(|&a| a != TRUNCATED_IP).collect();
        let addrs = addrs.as_slice();
        // Every address is a return address: look up the call instruction
        // before it, so the function and line are the caller's even when
        // the call is the last instruction of a function.
        let mut by_module: HashMap<usize, Vec<(u64, u64)>> = HashMap::new();
        for &addr in addrs {
            let call = addr.saturating_sub(1);
            let found = self.views.get(&pid).and_then(|v| v.iter().find(|(m, _)| m.contains(call)));
            let unmapped = found.is_none();
            match found {
                Some((m, Some(module))) => {
                    by_module.entry(*module).or_default().push((addr, call - m.start + m.offset));
                }
                _ if self.is_trampoline(pid, addr) => {
                    let symbol = Some((RETURN_PROBED.to_string(), 0));
                    let frame = Frame { addr, symbol, module: None, source: None, inlined: vec![], end: None };
                    self.cache.insert((pid, addr), frame);
                }
                _ => {
                    let frame = self.unresolved(pid, addr);
                    if unmapped {
                        self.unmapped.insert((pid, addr));
                    }
                    self.cache.insert((pid, addr), frame);
                }
            }
        }
        for (module, wanted) in by_module {
            self.read.insert(module);
            let offsets: Vec<u64> = wanted.iter().map(|(_, off)| *off).collect();
            // Views name only modules not closed (`forget_exited`).
            let Some((path, name)) = self.modules[module].as_ref().map(|m| (m.fd_path(), m.name.clone())) else {
                for (addr, _) in &wanted {
                    let frame = self.unresolved(pid, *addr);
                    self.cache.insert((pid, *addr), frame);
                }
                continue;
            };
            let name = &name;
            let mut split = Vec::new();
            // A file whose debug info is apart: its symbol table here, the
            // rest from its companion (below), never from a link followed
            // by name.
            let mut src = Elf::new(&path);
            src.debug_syms = self.source_lines && self.modules[module].as_ref().is_some_and(|m| m.split.is_none());
            let mut frames: Vec<Option<Frame>> =
                match self.blaze.symbolize(&Source::Elf(src), Input::FileOffset(&offsets)) {
                    Ok(results) => results
                        .into_iter()
                        .zip(&wanted)
                        .enumerate()
                        .map(|(i, (s, (addr, _)))| {
                            // No size: a function of several ranges (below).
                            if matches!(&s, Symbolized::Sym(sym) if sym.size.is_none()) {
                                split.push(i);
                            }
                            to_frame(*addr, name, s)
                        })
                        .collect(),
                    Err(_) => vec![None; wanted.len()],
                };
            self.from_companion(module, &wanted, &mut split, &mut frames);
            self.split_offsets(path, &offsets, &split, &mut frames);
            for ((addr, _), frame) in wanted.iter().zip(frames) {
                let frame = frame.unwrap_or_else(|| self.unresolved(pid, *addr));
                self.cache.insert((pid, *addr), frame);
            }
        }
    }

    /// Frames of `module` found in its companion file instead (see
    /// `debuglink`), at the addresses its file offsets have: where it
    /// has a symbol for the address, its frame (with lines and inlined
    /// functions) replaces the one from the symbol table. `split` as in
    /// `split_offsets`, kept in step.
    fn from_companion(&mut self, module: usize, wanted: &[(u64, u64)], split: &mut Vec<usize>, frames: &mut [Option<Frame>]) {
        let Some(Module { name, split: Some(layout @ debuglink::Split { companion: Some(companion), .. }), .. }) =
            &self.modules[module]
        else {
            return;
        };
        let (at, addrs): (Vec<usize>, Vec<u64>) =
            wanted.iter().enumerate().filter_map(|(i, (_, off))| Some((i, layout.address(*off)?))).unzip();
        let debug_syms = self.source_lines && !companion.links_further;
        // A large companion's DWARF: only the units of these addresses
        // (see dwarf_part), read once and let go at once.
        let part = if debug_syms { dwarf_part::part(&companion.file, &addrs) } else { None };
        let path = part.as_ref().map_or_else(|| companion.file.path(), dwarf_part::Part::path);
        let mut src = Elf::new(&path);
        src.debug_syms = debug_syms;
        if let Ok(results) = self.blaze.symbolize(&Source::Elf(src), Input::VirtOffset(&addrs)) {
            for (i, result) in at.into_iter().zip(results) {
                if let Symbolized::Sym(sym) = &result {
                    let sized = sym.size.is_some();
                    frames[i] = to_frame(wanted[i].0, name, result);
                    split.retain(|&j| j != i);
                    if !sized {
                        split.push(i);
                    }
                }
            }
        }
        if part.is_some() {
            let _ = self.blaze.evict(&evict::Elf::new(&path).into());
        }
    }

    /// Offsets in functions whose code is split (gcc's hot part and `.cold`
    /// part): DWARF gives such a function `DW_AT_ranges` and no start, and
    /// blazesym then reports its offset from address 0, the file address
    /// (`make_node+0x127d` for gdb's `make_node+0xd`). The ELF symbol
    /// table has one symbol per part, so the offset is taken from the part
    /// that holds the address, named as the symbol table names it when
    /// that is the function's own part (`make_node.cold`), as gdb does.
    /// `split`: the indices in `offsets` and `frames` of such functions.
    fn split_offsets(&mut self, path: PathBuf, offsets: &[u64], split: &[usize], frames: &mut [Option<Frame>]) {
        if split.is_empty() {
            return;
        }
        let lookups: Vec<u64> = split.iter().map(|&i| offsets[i]).collect();
        let mut src = Elf::new(path);
        src.debug_syms = false;
        let Ok(results) = self.blaze.symbolize(&Source::Elf(src), Input::FileOffset(&lookups)) else { return };
        for (&i, result) in split.iter().zip(results) {
            let (Some(frame), Symbolized::Sym(part)) = (&mut frames[i], result) else { continue };
            let Some((name, offset)) = &mut frame.symbol else { continue };
            if part.name.strip_prefix(name.as_str()).is_some_and(|rest| rest.starts_with('.')) {
                *name = part.name.to_string();
            }
            *offset = part.offset as u64 + 1;
        }
    }

    /// A frame no symbol was found for: its address and module, and one
    /// warning per module without symbols.
    fn unresolved(&mut self, pid: u32, addr: u64) -> Frame {
        let found = self.views.get(&pid).and_then(|v| v.iter().find(|(m, _)| m.contains(addr.saturating_sub(1))));
        let module = match found {
            Some((m, _)) if m.path.is_empty() => "anon".to_string(),
            Some((m, _)) => m.module_name().to_string(),
            None => "unmapped".to_string(),
        };
        if let Some((m, Some(_))) = found
            && self.warned.insert(m.path.clone())
        {
            crate::warn!("no symbols for some frames in {} of process {pid} (stripped?)", m.path);
        }
        Frame { addr, symbol: None, module: Some(module), source: None, inlined: vec![], end: None }
    }
}

/// The bytes just before `ret` in mapping `m`, at the end of `buf`; how
/// many (0 if unreadable). From the mapped file when there is one (it
/// still reads after the process exits), else from the process's memory
/// (JIT code, the vDSO).
fn code_before(pid: u32, m: &Mapping, file: Option<&TargetFile>, ret: u64, buf: &mut [u8; CALL_WINDOW]) -> usize {
    let n = (ret - m.start).min(CALL_WINDOW as u64);
    let dst = &mut buf[CALL_WINDOW - n as usize..];
    let read = match file {
        Some(f) => f.read_exact_at(dst, m.offset + (ret - m.start) - n),
        None => crate::target::memory::read_exact_at(pid, dst, ret - n),
    };
    if read.is_ok() { n as usize } else { 0 }
}

fn to_frame(addr: u64, module: &str, symbolized: Symbolized<'_>) -> Option<Frame> {
    let Symbolized::Sym(sym) = symbolized else { return None };
    let source = |info: Option<&blazesym::symbolize::CodeInfo<'_>>| {
        info.map(|c| SourceLine { file: short_path(&c.to_path().to_string_lossy()), line: c.line })
    };
    Some(Frame {
        addr,
        // +1: the lookup was at the call instruction, the offset printed is
        // the return address's (as bcc prints it).
        symbol: Some((sym.name.to_string(), sym.offset as u64 + 1)),
        module: Some(module.to_string()),
        source: source(sym.code_info.as_deref()),
        inlined: sym.inlined.iter().rev().map(|f| (f.name.to_string(), source(f.code_info.as_ref()))).collect(),
        end: None,
    })
}

/// Source paths keep their last two components: enough to find the file,
/// short enough to read.
pub fn short_path(path: &str) -> String {
    let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
    match parts.len() {
        0 => path.to_string(),
        1 => parts[0].to_string(),
        n => format!("{}/{}", parts[n - 2], parts[n - 1]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(symbol: Option<(&str, u64)>, module: &str, source: Option<(&str, u32)>) -> Frame {
        Frame {
            addr: 0x401136,
            symbol: symbol.map(|(n, o)| (n.to_string(), o)),
            module: Some(module.to_string()),
            source: source.map(|(f, l)| SourceLine { file: f.to_string(), line: Some(l) }),
            inlined: vec![],
            end: None,
        }
    }

    #[test]
    fn frames_print_like_bcc_plus_source() {
        assert_eq!(frame(Some(("fibonacci", 0x1f)), "app", None).lines(), ["fibonacci+0x1f [app]"]);
        assert_eq!(
            frame(Some(("child", 0x4f)), "app", Some(("fixtures/fibonacci.c", 30))).lines(),
            ["child+0x4f [app] fixtures/fibonacci.c:30"]
        );
        assert_eq!(frame(None, "libfoo.so", None).lines(), ["0x401136 [libfoo.so]"]);
    }

    #[test]
    fn inlined_callees_come_first() {
        let mut f = frame(Some(("outer", 0x10)), "app", Some(("a.c", 5)));
        f.inlined = vec![("inner".into(), Some(SourceLine { file: "a.c".into(), line: Some(9) }))];
        assert_eq!(f.lines(), ["inner [inlined] a.c:9", "outer+0x10 [app] a.c:5"]);
    }

    #[test]
    fn short_paths() {
        assert_eq!(short_path("/home/u/src/memleak/tests/fixtures/fibonacci.c"), "fixtures/fibonacci.c");
        assert_eq!(short_path("fibonacci.c"), "fibonacci.c");
        assert_eq!(short_path("./x/y.c"), "x/y.c");
    }

    #[inline(never)]
    fn probe_target() -> u64 {
        std::hint::black_box(7)
    }

    #[test]
    fn symbolizes_this_process_and_caches() {
        let pid = std::process::id();
        let addr = probe_target as *const () as u64 + 1; // a "return address" inside it
        let mut s = Symbolizer::new(true, None);
        let frames = s.frames(pid, &[addr, addr]);
        let (name, offset) = frames[0].symbol.clone().expect("symbol found");
        assert!(name.contains("probe_target"), "{name}");
        assert_eq!(offset, 1);
        assert!(frames[0].module.as_deref().unwrap().starts_with("memleak"), "{:?}", frames[0].module);
        assert_eq!(frames[0], frames[1]);
        assert_eq!(s.cache.len(), 1);
        // A second symbolizer that only refreshed once still resolves
        // after the maps it read are gone from /proc (the process exited).
        let mut later = Symbolizer::new(false, None);
        later.refresh(pid);
        assert!(later.frames(pid, &[addr])[0].symbol.is_some());
        // The mapping of this test binary, with its build id if it has one.
        let m = later.mapping(pid, addr).expect("mapped");
        assert!(m.start < addr && addr <= m.limit, "{m:?}");
        assert!(m.path.contains("memleak"), "{m:?}");
        assert_eq!(later.mapping(pid, 0x10), None);
    }

    #[test]
    fn data_and_code_not_after_a_call_end_a_stack() {
        let pid = std::process::id();
        let mut s = Symbolizer::new(false, None);
        let heap = Box::new([0u64; 64]);
        let data = &*heap as *const _ as u64 + 8;
        let code = probe_target as *const () as u64 + 1; // its first instruction is no call
        assert_eq!(s.stack_end(pid, &[]), (0, None));
        let (kept, end) = s.stack_end(pid, &[code, data]);
        assert_eq!(kept, 0, "{end:?}");
        assert!(matches!(end, Some(End::NoCall(ref m)) if m.starts_with("memleak")), "{end:?}");
        assert!(matches!(s.stack_end(pid, &[data]).1, Some(End::NotCode(_))));
        assert_eq!(s.stack_end(pid, &[0x10]), (0, Some(End::Unmapped)));
        // A process whose mappings were never read: nothing to judge by.
        assert_eq!(s.stack_end(u32::MAX - 1, &[0x10]), (1, None));
    }

    #[test]
    fn unmapped_address_keeps_a_module_label() {
        let mut s = Symbolizer::new(false, None);
        let frames = s.frames(std::process::id(), &[0x10]);
        assert_eq!(frames[0].symbol, None);
        assert!(frames[0].lines()[0].starts_with("0x10 ["), "{:?}", frames[0].lines());
    }
}
