//! The host system as every layer sees it: programs on PATH, terminals.
//! It imports nothing of vexec's own, so any module may use it.

pub mod programs;
pub mod terminal;
