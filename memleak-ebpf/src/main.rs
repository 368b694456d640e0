//! Kernel side of memleak: one probe per allocator hook. Entry probes note
//! the request per thread; return probes record the block under its address
//! with the caller's user stack (taken at return, where the frame-pointer
//! walk starts in the caller); free and munmap forget it.
#![no_std]
#![no_main]
// atomic_xadd and atomic_cxchg: see atomic.
#![feature(core_intrinsics)]
#![allow(internal_features)]

// What the probes do, by job: `calls` (each hooked call), `blocks` (the
// outstanding blocks and their totals), `stacks`, `regions` (direct
// mappings, for munmap), `stats` (what could not be recorded).
mod atomic;
mod blocks;
mod calls;
mod config;
mod dlopen;
mod exec;
mod floor;
mod kernel;
mod maps;
mod regions;
mod stacks;
mod stats;
mod table;
mod totals;
mod task_storage;
mod unwind;

use aya_ebpf::{
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};

use memleak_common::PENDING_MMAP;

use crate::{
    maps::UNMAP_AGAIN,
    calls::{enter, exit, forget, note_free, thread_id, unmap},
};

// One program per shape of allocator call, named after the libc function
// of that shape; jemalloc, tcmalloc, mimalloc and C++ operator new/delete
// variants with the same arguments reuse them (see memleak-cli/src/probe/hooks.rs).

/// malloc(size), and every call that takes the size first.
#[uprobe]
pub fn malloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, ctx.arg(0).unwrap_or(0), 0, 0, 0);
    0
}

/// The return of every hooked call that yields a block (the entry probe
/// noted which kind it was).
#[uretprobe]
pub fn alloc_exit(ctx: RetProbeContext) -> u32 {
    exit(&ctx);
    0
}

/// Not attached: the walk by unwind tables that `alloc_exit` hands a
/// block to, a few frames per run (see `maps::UNWIND_STEP`).
#[uprobe]
pub fn unwind_step(ctx: ProbeContext) -> u32 {
    calls::unwind_step(&ctx);
    0
}

/// calloc(nmemb, size). An overflowing product makes calloc return NULL, so
/// the wrapped size is never recorded (BPF has no 128-bit multiply).
#[uprobe]
pub fn calloc_enter(ctx: ProbeContext) -> u32 {
    let nmemb: u64 = ctx.arg(0).unwrap_or(0);
    let size: u64 = ctx.arg(1).unwrap_or(0);
    enter(&ctx, nmemb.wrapping_mul(size), 0, 0, 0);
    0
}

/// realloc(ptr, size): frees ptr (restored if realloc fails) and allocates size.
#[uprobe]
pub fn realloc_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, ctx.arg(1).unwrap_or(0), 0, ctx.arg(0).unwrap_or(0), 0);
    0
}

/// reallocarray(ptr, nmemb, size).
#[uprobe]
pub fn reallocarray_enter(ctx: ProbeContext) -> u32 {
    let nmemb: u64 = ctx.arg(1).unwrap_or(0);
    let size: u64 = ctx.arg(2).unwrap_or(0);
    enter(&ctx, nmemb.wrapping_mul(size), 0, ctx.arg(0).unwrap_or(0), 0);
    0
}

/// memalign(align, size), aligned_alloc(align, size).
#[uprobe]
pub fn memalign_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, ctx.arg(1).unwrap_or(0), 0, 0, 0);
    0
}

/// posix_memalign(memptr, align, size): the block comes back through memptr.
#[uprobe]
pub fn posix_memalign_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, ctx.arg(2).unwrap_or(0), ctx.arg(0).unwrap_or(0), 0, 0);
    0
}

/// free(ptr), and every call that takes the block first.
#[uprobe]
pub fn free_enter(ctx: ProbeContext) -> u32 {
    let addr: u64 = ctx.arg(0).unwrap_or(0);
    let pid_tgid = thread_id();
    note_free(&ctx, pid_tgid);
    if addr != 0 {
        forget(pid_tgid >> 32, addr);
    }
    0
}

/// mmap(addr, length, ...). Inside an allocator call it is that call's
/// (counted once, by the outermost call).
#[uprobe]
pub fn mmap_enter(ctx: ProbeContext) -> u32 {
    enter(&ctx, ctx.arg(1).unwrap_or(0), 0, 0, PENDING_MMAP);
    0
}

/// munmap(addr, length).
#[uprobe]
pub fn munmap_enter(ctx: ProbeContext) -> u32 {
    if unmap(thread_id() >> 32, ctx.arg(0).unwrap_or(0), ctx.arg(1).unwrap_or(0)) {
        // It cut one followed mapping; the range may overlap more: run this
        // program again (the loader puts it at UNMAP_AGAIN[0]).
        // SAFETY: the same program, with the same context.
        unsafe { UNMAP_AGAIN.tail_call(&ctx, 0) };
    }
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
