//! Reading what the kernel side recorded: maps read in batches (`batch`)
//! or in place through mmap (`mapped`, with the allocation table in
//! `table` and the per-stack totals in `totals`), and all of it together
//! for one report (`collect`); and given back once no block needs them
//! (`reclaim`).

pub mod batch;
pub mod collect;
pub mod mapped;
pub mod reclaim;
pub mod table;
pub mod totals;
