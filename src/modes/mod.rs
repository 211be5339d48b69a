//! The front ends: each mode turns what the user asked into requests for
//! [`crate::launch`] and reports the outcome. None boots a VM on its own.

pub mod bisect;
pub mod cache;
pub mod command;
pub mod matrix;
pub mod persistent;
pub mod run;
pub mod rundir;
pub mod spec;
