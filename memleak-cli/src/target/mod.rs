//! What is traced: processes and their /proc files (`proc`), a command
//! started for `-c` (`command`), the files they map, opened only as
//! `file` says, and the ELF in them (`elf`).

pub mod command;
pub mod elf;
pub mod file;
pub mod memory;
pub mod proc;
