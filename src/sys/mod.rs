//! The host system as every layer sees it: files and locks, other
//! processes, programs on PATH, terminals.
//! It imports nothing of vexec's own, so any module may use it.

pub mod files;
pub mod process;
pub mod programs;
pub mod terminal;
