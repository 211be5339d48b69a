//! The host side of a run.

pub mod console;
pub mod session;
