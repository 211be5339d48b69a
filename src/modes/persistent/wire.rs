//! What `vexec exec`, `shell`, `ps` and `down` say to a VM's `up` process
//! over its control socket: one [`Request`] frame, one [`Reply`] frame;
//! after an accepted `Exec`, the guest protocol's frames flow as over a
//! one-shot run's control port (host messages in, guest messages out)
//! until `Exited`.

use serde::{Deserialize, Serialize};

use crate::protocol::Exec;

/// The first frame of a connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Request {
    /// Run a command (waits for a free port when every one is busy).
    Exec(Box<Exec>),
    /// Shut the VM down.
    Down,
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// The command was handed to the guest; its messages follow.
    Accepted,
    /// The VM shuts down.
    Stopping,
    /// Refused, and why.
    Refused(String),
}
