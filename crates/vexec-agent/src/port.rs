//! The agent's end of the control port: one writer shared by everything
//! that talks to the host (the command's runner, its output pumps, the
//! serve loop), each message written whole.

use std::fs::File;
use std::sync::{Arc, Mutex};

use vexec_protocol::{self as protocol, GuestMsg};

use super::report::STATE;

/// The agent's handle on the control port, shared by the output pumps.
pub type PortWriter = Arc<Mutex<File>>;

/// Sends one message to the host; failures mean the host is gone.
pub fn send(port: &PortWriter, msg: &GuestMsg) -> std::io::Result<()> {
    let mut w = port.lock().unwrap_or_else(|p| p.into_inner());
    let len = match msg {
        GuestMsg::Stdout(d) | GuestMsg::Stderr(d) => d.len(),
        _ => 0,
    };
    STATE.sending(Some(len));
    let r = protocol::write_frame(&mut *w, msg);
    STATE.sending(None);
    r
}
