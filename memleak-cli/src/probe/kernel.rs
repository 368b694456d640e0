//! Kernel allocators: the kmem (and percpu) tracepoints. Their field
//! offsets are read from the running kernel's tracefs format files, so no
//! kernel headers are needed; tracefs is mounted if it is not.

use std::{ffi::CString, fs, path::Path};

use anyhow::Context as _;
use aya::{Ebpf, programs::TracePoint};

use memleak_common::{FIELD_COUNT, Field};

use crate::{
    error::{Kind, user_error},
    probe::multi::Links,
};

const TRACEFS: &str = "/sys/kernel/tracing";

/// (program, category, event): the program is named after its event.
const EVENTS: &[(&str, &str)] = &[
    ("kmem", "kmalloc"),
    ("kmem", "kfree"),
    ("kmem", "kmem_cache_alloc"),
    ("kmem", "kmem_cache_free"),
    ("kmem", "mm_page_alloc"),
    ("kmem", "mm_page_free"),
];
const PERCPU_EVENTS: &[(&str, &str)] = &[("percpu", "percpu_alloc_percpu"), ("percpu", "percpu_free_percpu")];

/// Which field of which event fills a `Field` slot.
fn source(field: Field) -> (&'static str, &'static str) {
    match field {
        Field::KmallocPtr => ("kmem/kmalloc", "ptr"),
        Field::KmallocBytes => ("kmem/kmalloc", "bytes_alloc"),
        Field::KfreePtr => ("kmem/kfree", "ptr"),
        Field::CacheAllocPtr => ("kmem/kmem_cache_alloc", "ptr"),
        Field::CacheAllocBytes => ("kmem/kmem_cache_alloc", "bytes_alloc"),
        Field::CacheFreePtr => ("kmem/kmem_cache_free", "ptr"),
        Field::PageAllocPfn => ("kmem/mm_page_alloc", "pfn"),
        Field::PageAllocOrder => ("kmem/mm_page_alloc", "order"),
        Field::PageFreePfn => ("kmem/mm_page_free", "pfn"),
        Field::PercpuAllocPtr => ("percpu/percpu_alloc_percpu", "ptr"),
        Field::PercpuAllocBytes => ("percpu/percpu_alloc_percpu", "bytes_alloc"),
        Field::PercpuFreePtr => ("percpu/percpu_free_percpu", "ptr"),
        Field::KmallocCallSite => ("kmem/kmalloc", "call_site"),
        Field::CacheAllocCallSite => ("kmem/kmem_cache_alloc", "call_site"),
    }
}

/// Mounts tracefs at /sys/kernel/tracing unless it is there already.
pub fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new(TRACEFS).join("events").exists() {
        return Ok(());
    }
    let target = CString::new(TRACEFS)?;
    let fstype = CString::new("tracefs")?;
    // SAFETY: valid C strings; no mount data.
    let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        return Err(user_error(
            Kind::Attach,
            format!("kernel tracing needs tracefs, and mounting it at {TRACEFS} failed: {err} (or use --user-only)"),
        ));
    }
    Ok(())
}

/// The offsets of the fields memleak reads, from the format files; fields
/// of events this kernel lacks stay 0 (their programs are not attached).
pub fn field_offsets() -> anyhow::Result<[u32; FIELD_COUNT]> {
    let mut offsets = [0; FIELD_COUNT];
    for slot in Field::ALL {
        let (event, field) = source(slot);
        let path = format!("{TRACEFS}/events/{event}/format");
        let Ok(format) = fs::read_to_string(&path) else { continue };
        offsets[slot as usize] = parse_offset(&format, field)
            .with_context(|| format!("{path} has no field {field}: unsupported kernel"))?;
    }
    Ok(offsets)
}

/// The offset of `field` in a tracefs format file.
pub fn parse_offset(format: &str, field: &str) -> Option<u32> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let name = decl.split_whitespace().last()?.trim_start_matches('*');
        let name = name.split('[').next()?;
        if name != field {
            return None;
        }
        rest.split(';').find_map(|part| part.trim().strip_prefix("offset:")?.parse().ok())
    })
}

/// The text range of the BPF map allocator's refill (`alloc_bulk`), from
/// /proc/kallsyms: its slab allocations grow memleak's own maps, and
/// tracing them would feed on itself. [0, 0) when not found.
pub fn bpf_refill_range() -> [u64; 2] {
    let Ok(kallsyms) = fs::read_to_string("/proc/kallsyms") else { return [0; 2] };
    find_function(&kallsyms, "alloc_bulk").unwrap_or([0; 2])
}

/// [start, end) of `name` (or a compiler clone such as `name.isra.0`): the
/// end is the next higher symbol address.
pub fn find_function(kallsyms: &str, name: &str) -> Option<[u64; 2]> {
    let addr = |line: &str| u64::from_str_radix(line.split_whitespace().next()?, 16).ok();
    let start = kallsyms.lines().find_map(|line| {
        let sym = line.split_whitespace().nth(2)?;
        (sym == name || sym.strip_prefix(name)?.starts_with('.')).then(|| addr(line))?
    })?;
    let end = kallsyms.lines().filter_map(addr).filter(|&a| a > start).min()?;
    Some([start, end])
}

/// Attaches the kernel allocator tracepoints; returns the events attached.
/// Their links go to `links`, to be detached with the uprobes, at once
/// (each waits for RCU grace periods: 0.93 s for six, one after the other).
pub fn attach(ebpf: &mut Ebpf, links: &Links, percpu: bool) -> anyhow::Result<Vec<String>> {
    let mut attached = Vec::new();
    let events = EVENTS.iter().chain(if percpu { PERCPU_EVENTS } else { &[] });
    for &(category, event) in events {
        if !Path::new(&format!("{TRACEFS}/events/{category}/{event}")).exists() {
            continue;
        }
        let program: &mut TracePoint = ebpf
            .program_mut(event)
            .with_context(|| format!("program {event} missing from the BPF object"))?
            .try_into()?;
        program.load().with_context(|| format!("loading program {event}"))?;
        let link = program
            .attach(category, event)
            .map_err(|e| user_error(Kind::Attach, format!("cannot attach to tracepoint {category}:{event}: {e:#}")))?;
        links.keep(program.take_link(link)?);
        attached.push(format!("{category}:{event}"));
    }
    if attached.is_empty() {
        return Err(user_error(Kind::Attach, "this kernel has no kmem tracepoints: use --user-only"));
    }
    Ok(attached)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KMALLOC: &str = "name: kmalloc
ID: 512
format:
	field:unsigned short common_type;	offset:0;	size:2;	signed:0;
	field:unsigned long call_site;	offset:8;	size:8;	signed:0;
	field:const void * ptr;	offset:16;	size:8;	signed:0;
	field:size_t bytes_req;	offset:24;	size:8;	signed:0;
	field:size_t bytes_alloc;	offset:32;	size:8;	signed:0;
	field:__data_loc char[] name;	offset:40;	size:4;	signed:0;
";

    #[test]
    fn parses_field_offsets() {
        assert_eq!(parse_offset(KMALLOC, "ptr"), Some(16));
        assert_eq!(parse_offset(KMALLOC, "bytes_alloc"), Some(32));
        assert_eq!(parse_offset(KMALLOC, "name"), Some(40));
        assert_eq!(parse_offset(KMALLOC, "bytes"), None);
        assert_eq!(parse_offset("garbage;;:", "ptr"), None);
    }

    #[test]
    fn finds_function_ranges_in_kallsyms() {
        let kallsyms = "ffffffff81544f70 t alloc_bulk\nffffffff81545170 t __pfx_check_leaked_objs\nffffffff81540000 T other\n";
        assert_eq!(find_function(kallsyms, "alloc_bulk"), Some([0xffffffff81544f70, 0xffffffff81545170]));
        let clone = "10 t alloc_bulk.isra.0\n20 t next\n";
        assert_eq!(find_function(clone, "alloc_bulk"), Some([0x10, 0x20]));
        assert_eq!(find_function("10 t alloc_bulky\n20 t x\n", "alloc_bulk"), None);
        assert_ne!(bpf_refill_range(), [0, 0], "this kernel's BPF allocator refill is in kallsyms");
    }

    #[test]
    fn reads_this_kernels_formats() {
        ensure_tracefs().unwrap();
        let offsets = field_offsets().unwrap();
        // Every kmem field exists on any kernel with the kmem events, and
        // nothing sits in the common header (offsets 0..8).
        assert!(offsets[..Field::PercpuAllocPtr as usize].iter().all(|&o| o >= 8), "{offsets:?}");
    }
}
