//! Kernel allocators, through the kmem and percpu tracepoints (no kprobes
//! needed). Field offsets come from the running kernel's tracefs formats.

use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use aya_ebpf::EbpfContext;
use memleak_common::{AllocInfo, Field, KERNEL_PAGES, KERNEL_PERCPU, KERNEL_SLAB, Kind};

use crate::{
    blocks::{Origin, Place, take, track},
    calls::{now, thread_id},
    config::{field_offset, page_size, skipped_caller},
    stacks::kernel_stack_slot,
};

#[inline(always)]
fn field<T>(ctx: &TracePointContext, field: Field) -> T
where
    T: Default,
{
    // SAFETY: read_at checks the access against the tracepoint record.
    unsafe { ctx.read_at::<T>(field_offset(field)) }.unwrap_or_default()
}

#[tracepoint]
pub fn kmalloc(ctx: TracePointContext) -> u32 {
    if skipped_caller(field(&ctx, Field::KmallocCallSite)) {
        return 0;
    }
    let ptr: u64 = field(&ctx, Field::KmallocPtr);
    record_kernel(&ctx, KERNEL_SLAB, Kind::Kmalloc, ptr, field(&ctx, Field::KmallocBytes));
    0
}

#[tracepoint]
pub fn kfree(ctx: TracePointContext) -> u32 {
    forget_kernel(KERNEL_SLAB, field(&ctx, Field::KfreePtr));
    0
}

#[tracepoint]
pub fn kmem_cache_alloc(ctx: TracePointContext) -> u32 {
    if skipped_caller(field(&ctx, Field::CacheAllocCallSite)) {
        return 0;
    }
    let ptr: u64 = field(&ctx, Field::CacheAllocPtr);
    record_kernel(&ctx, KERNEL_SLAB, Kind::KmemCacheAlloc, ptr, field(&ctx, Field::CacheAllocBytes));
    0
}

#[tracepoint]
pub fn kmem_cache_free(ctx: TracePointContext) -> u32 {
    forget_kernel(KERNEL_SLAB, field(&ctx, Field::CacheFreePtr));
    0
}

/// Pages are keyed by page frame number.
#[tracepoint]
pub fn mm_page_alloc(ctx: TracePointContext) -> u32 {
    let pfn: u64 = field(&ctx, Field::PageAllocPfn);
    let order: u32 = field(&ctx, Field::PageAllocOrder);
    record_kernel(&ctx, KERNEL_PAGES, Kind::Pages, pfn, page_size() << (order & 31));
    0
}

#[tracepoint]
pub fn mm_page_free(ctx: TracePointContext) -> u32 {
    forget_kernel(KERNEL_PAGES, field(&ctx, Field::PageFreePfn));
    0
}

#[tracepoint]
pub fn percpu_alloc_percpu(ctx: TracePointContext) -> u32 {
    let ptr: u64 = field(&ctx, Field::PercpuAllocPtr);
    record_kernel(&ctx, KERNEL_PERCPU, Kind::Percpu, ptr, field(&ctx, Field::PercpuAllocBytes));
    0
}

#[tracepoint]
pub fn percpu_free_percpu(ctx: TracePointContext) -> u32 {
    forget_kernel(KERNEL_PERCPU, field(&ctx, Field::PercpuFreePtr));
    0
}

/// A kernel allocation (tracepoints): recorded with the kernel stack.
#[inline(always)]
fn record_kernel<C: EbpfContext>(ctx: &C, space: u32, kind: Kind, addr: u64, size: u64) {
    if addr == 0 {
        return;
    }
    let info = AllocInfo {
        size,
        timestamp_ns: now(),
        slot: kernel_stack_slot(ctx, space, kind),
        tid: thread_id() as u32,
    };
    track(space, addr, info, Origin::New, Place::Table);
}

/// A kernel free.
#[inline(always)]
fn forget_kernel(space: u32, addr: u64) {
    if addr != 0 {
        let _ = take(space, addr);
    }
}
