//! What is traced: processes and their /proc files (`proc`), a command
//! started for `-c` (`command`), and the ELF files they map (`elf`).

pub mod command;
pub mod elf;
pub mod memory;
pub mod proc;
