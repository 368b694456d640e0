//! Putting the probes in: which allocator functions to hook and how
//! (`hooks`), where an entry probe goes inside a function (`placement`),
//! loading the eBPF object (`loader`), attaching it to user programs
//! (`attach`, with `multi` for uprobe_multi links), to the kernel's
//! allocators (`kernel`), and following exec (`exec`).

pub mod attach;
pub mod exec;
pub mod hooks;
pub mod kernel;
pub mod loader;
pub mod multi;
pub mod placement;
