//! The host side of a run.

pub mod console;
pub mod event_loop;
pub mod events;
pub mod input;
pub mod outcome;
pub mod output;
pub mod params;
pub mod programs;
pub mod session;
pub mod terminal;
pub mod warm;
