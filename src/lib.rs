//! vexec: run a command inside a throwaway VM booted with any Linux kernel.
//!
//! The host library behind `vexec`. The guest's PID 1 is the
//! `vexec-agent` crate, installed with it as a second binary (so the
//! initramfs each boot unpacks carries only the agent's code); both speak
//! the `vexec-protocol` crate, re-exported here as [`protocol`].

pub mod artifacts;
pub mod cli;
pub mod host;
pub mod kernel;
pub mod launch;
pub mod modes;
pub mod report;
pub mod status;
pub mod store;
pub mod sys;
pub mod vm;

pub use vexec_protocol as protocol;

/// Writes a line to stderr as `eprintln!` does, but never panics: once
/// stderr's reader has gone away, vexec's own messages are dropped (the
/// command's output decides how the run ends, as it would locally).
#[macro_export]
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr().lock(), $($arg)*);
    }};
}
