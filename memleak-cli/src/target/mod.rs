//! What is traced: processes and their /proc files (`proc`), a command
//! started for `-c` (`command`), the files they map, opened only as
//! `file` says, the ELF in them (`elf`), and their separate debug info
//! (`debuglink`), or from a debuginfod server (`debuginfod`), and of a large
//! one only the units a report needs (`dwarf_part`).

pub mod command;
pub mod debuginfod;
pub mod debuglink;
pub mod dwarf_part;
pub mod elf;
pub mod file;
pub mod memory;
pub mod proc;
