//! The host side of a run.

pub mod console;
pub mod event_loop;
pub mod events;
pub mod input;
pub mod outcome;
pub mod output;
pub mod params;
pub mod session;
pub mod stop;
pub mod warm;
