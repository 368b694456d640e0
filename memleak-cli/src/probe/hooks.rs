//! Which functions are probed, and with which kernel programs: the C
//! allocator API in each allocator's naming (glibc, jemalloc, tcmalloc,
//! mimalloc) and C++ operator new/delete. Calls of one shape (same
//! arguments, same result) share a pair of programs.

use memleak_common::Kind;

/// The arguments and result of an allocator call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// (size, ...) -> block
    Malloc,
    /// (nmemb, size) -> block
    Calloc,
    /// (ptr, size, ...) -> block
    Realloc,
    /// (ptr, nmemb, size) -> block
    ReallocArray,
    /// (align, size) -> block
    Memalign,
    /// (&block, align, size) -> 0
    PosixMemalign,
    /// (ptr, ...)
    Free,
    /// (addr, len, ...) -> mapping
    Mmap,
    /// (addr, len)
    Munmap,
}

impl Shape {
    /// The kernel programs at the function's entry and return.
    pub fn programs(self) -> (&'static str, Option<&'static str>) {
        match self {
            Shape::Malloc => ("malloc_enter", Some("alloc_exit")),
            Shape::Calloc => ("calloc_enter", Some("alloc_exit")),
            Shape::Realloc => ("realloc_enter", Some("alloc_exit")),
            Shape::ReallocArray => ("reallocarray_enter", Some("alloc_exit")),
            Shape::Memalign => ("memalign_enter", Some("alloc_exit")),
            Shape::PosixMemalign => ("posix_memalign_enter", Some("alloc_exit")),
            Shape::Free => ("free_enter", None),
            Shape::Mmap => ("mmap_enter", Some("alloc_exit")),
            Shape::Munmap => ("munmap_enter", None),
        }
    }
}

use Shape::*;

/// The kind of block a hooked function makes, as reports name it: the C
/// function it stands for (je_malloc, mallocx and tc_malloc are malloc;
/// operator new is `new`). Given to the entry probe as its cookie. glibc's
/// memalign is aligned_alloc (one function, probed once under the first
/// name: see `attach::plan`).
pub fn kind(function: &str, shape: Shape) -> Kind {
    match function {
        "valloc" | "je_valloc" | "tc_valloc" => Kind::Valloc,
        "pvalloc" | "tc_pvalloc" => Kind::Pvalloc,
        "aligned_alloc" | "je_aligned_alloc" | "mi_malloc_aligned" => Kind::AlignedAlloc,
        f if f.starts_with("_Znw") || f == "tc_new" || f == "tc_new_nothrow" => Kind::New,
        f if f.starts_with("_Zna") || f == "tc_newarray" || f == "tc_newarray_nothrow" => Kind::NewArray,
        _ => match shape {
            Malloc => Kind::Malloc,
            Calloc => Kind::Calloc,
            Realloc => Kind::Realloc,
            ReallocArray => Kind::Reallocarray,
            Memalign => Kind::Memalign,
            PosixMemalign => Kind::PosixMemalign,
            Mmap => Kind::Mmap,
            Free | Munmap => Kind::Unknown,
        },
    }
}

/// The C allocator API. Allocators that override malloc export these names
/// too; prefixed builds (je_, tc_, mi_) and extended APIs come after.
pub const C_API: &[(&str, Shape)] = &[
    ("malloc", Malloc),
    ("free", Free),
    ("calloc", Calloc),
    ("realloc", Realloc),
    ("reallocarray", ReallocArray),
    ("posix_memalign", PosixMemalign),
    ("aligned_alloc", Memalign),
    ("memalign", Memalign),
    ("valloc", Malloc),
    ("pvalloc", Malloc),
    ("mmap", Mmap),
    ("munmap", Munmap),
    // jemalloc: prefixed builds and the extended API.
    ("je_malloc", Malloc),
    ("je_free", Free),
    ("je_calloc", Calloc),
    ("je_realloc", Realloc),
    ("je_posix_memalign", PosixMemalign),
    ("je_aligned_alloc", Memalign),
    ("je_memalign", Memalign),
    ("je_valloc", Malloc),
    ("mallocx", Malloc),
    ("je_mallocx", Malloc),
    ("rallocx", Realloc),
    ("je_rallocx", Realloc),
    ("dallocx", Free),
    ("je_dallocx", Free),
    ("sdallocx", Free),
    ("je_sdallocx", Free),
    // tcmalloc.
    ("tc_malloc", Malloc),
    ("tc_free", Free),
    ("tc_free_sized", Free),
    ("tc_calloc", Calloc),
    ("tc_realloc", Realloc),
    ("tc_memalign", Memalign),
    ("tc_posix_memalign", PosixMemalign),
    ("tc_valloc", Malloc),
    ("tc_pvalloc", Malloc),
    // mimalloc.
    ("mi_malloc", Malloc),
    ("mi_zalloc", Malloc),
    ("mi_malloc_aligned", Malloc),
    ("mi_free", Free),
    ("mi_free_size", Free),
    ("mi_free_aligned", Free),
    ("mi_calloc", Calloc),
    ("mi_realloc", Realloc),
];

/// C++ operator new and delete (Itanium ABI names): plain, array,
/// nothrow, sized and aligned; and tcmalloc's own names for them.
pub const CXX_API: &[(&str, Shape)] = &[
    ("_Znwm", Malloc),
    ("_Znam", Malloc),
    ("_ZnwmRKSt9nothrow_t", Malloc),
    ("_ZnamRKSt9nothrow_t", Malloc),
    ("_ZnwmSt11align_val_t", Malloc),
    ("_ZnamSt11align_val_t", Malloc),
    ("_ZnwmSt11align_val_tRKSt9nothrow_t", Malloc),
    ("_ZnamSt11align_val_tRKSt9nothrow_t", Malloc),
    ("_ZdlPv", Free),
    ("_ZdaPv", Free),
    ("_ZdlPvm", Free),
    ("_ZdaPvm", Free),
    ("_ZdlPvRKSt9nothrow_t", Free),
    ("_ZdaPvRKSt9nothrow_t", Free),
    ("_ZdlPvSt11align_val_t", Free),
    ("_ZdaPvSt11align_val_t", Free),
    ("_ZdlPvmSt11align_val_t", Free),
    ("_ZdaPvmSt11align_val_t", Free),
    ("_ZdlPvSt11align_val_tRKSt9nothrow_t", Free),
    ("_ZdaPvSt11align_val_tRKSt9nothrow_t", Free),
    ("tc_new", Malloc),
    ("tc_newarray", Malloc),
    ("tc_new_nothrow", Malloc),
    ("tc_newarray_nothrow", Malloc),
    ("tc_delete", Free),
    ("tc_deletearray", Free),
    ("tc_delete_sized", Free),
    ("tc_deletearray_sized", Free),
    ("tc_delete_nothrow", Free),
    ("tc_deletearray_nothrow", Free),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_allocating_function_has_its_kind_and_free_none() {
        for &(f, shape) in C_API.iter().chain(CXX_API) {
            let k = kind(f, shape);
            assert_eq!(k == Kind::Unknown, matches!(shape, Free | Munmap), "{f}: {k:?}");
        }
        assert_eq!(kind("_ZnamSt11align_val_t", Malloc), Kind::NewArray);
        assert_eq!(kind("tc_new_nothrow", Malloc), Kind::New);
        assert_eq!(kind("pvalloc", Malloc), Kind::Pvalloc);
        assert_eq!(kind("je_mallocx", Malloc), Kind::Malloc);
    }

    #[test]
    fn names_are_unique_and_programs_exist_in_the_object() {
        let mut names: Vec<&str> = C_API.iter().chain(CXX_API).map(|(n, _)| *n).collect();
        let all = names.len();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), all, "a function is listed twice");
        // Every program named here is in the BPF object.
        let object = aya_obj_programs();
        for (_, shape) in C_API.iter().chain(CXX_API) {
            let (entry, exit) = shape.programs();
            for p in std::iter::once(entry).chain(exit) {
                assert!(object.contains(&p.to_string()), "{p} is not a program of memleak-ebpf");
            }
        }
    }

    fn aya_obj_programs() -> Vec<String> {
        use object::{Object as _, ObjectSymbol as _};
        let bytes = crate::probe::loader::PROGRAMS;
        let file = object::File::parse(bytes).unwrap();
        file.symbols().filter_map(|s| s.name().ok().map(String::from)).collect()
    }
}
