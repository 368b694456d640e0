//! A task storage map: one value per thread, kept in the thread's
//! task_struct. Reaching it is a pointer chase, where a hash map keyed by
//! thread id costs a hash, a bucket lock and an element per call (about a
//! tenth of what tracing a malloc costs). aya-ebpf 0.2 has no such map, so
//! it is declared here the way its BTF maps are: the kernel needs the key
//! and value types from BTF to create it.

use core::ptr;

use aya_ebpf::{
    bindings::{BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE, bpf_map_type::BPF_MAP_TYPE_TASK_STORAGE},
    helpers::generated::{bpf_get_current_task_btf, bpf_task_storage_get},
};

/// The BTF shape loaders read (libbpf's `__uint`/`__type`): each field's
/// pointee encodes one attribute.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; BPF_MAP_TYPE_TASK_STORAGE as usize],
    key: *const i32,
    value: *const T,
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: never dereferenced from Rust: the loader turns it into a map.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        Self { r#type: ptr::null(), key: ptr::null(), value: ptr::null(), map_flags: ptr::null() }
    }

    /// The current thread's value, zeroed when first made; None if the
    /// kernel could not allocate it.
    #[inline(always)]
    pub fn current_or_new(&self) -> Option<&mut T> {
        self.current_with(BPF_LOCAL_STORAGE_GET_F_CREATE as u64)
    }

    /// The current thread's value if it has one.
    #[inline(always)]
    pub fn current(&self) -> Option<&mut T> {
        self.current_with(0)
    }

    #[inline(always)]
    fn current_with(&self, flags: u64) -> Option<&mut T> {
        // SAFETY: the map pointer is this map's; the task is the current
        // one, alive while the program runs; the value is the map's T.
        unsafe {
            let task = bpf_get_current_task_btf();
            let value = bpf_task_storage_get(ptr::from_ref(self).cast_mut().cast(), task, ptr::null_mut(), flags);
            value.cast::<T>().as_mut()
        }
    }
}
