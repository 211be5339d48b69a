//! The host side of a run.

pub mod console;
pub mod session;
pub mod terminal;
