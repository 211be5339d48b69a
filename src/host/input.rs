//! The command's input: vexec's own stdin, forwarded to the guest.

use std::fs::File;
use std::io::Read;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use crate::protocol::HostMsg;

use super::output::send;

/// Forwards vexec's stdin to the guest until end of file.
pub fn pump_stdin(w: Arc<Mutex<UnixStream>>) {
    std::thread::spawn(move || {
        // SAFETY: fd 0 stays open; ManuallyDrop keeps it so.
        let mut stdin = ManuallyDrop::new(unsafe { File::from_raw_fd(0) });
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => {
                    let _ = send(&w, &HostMsg::StdinEof);
                    return;
                }
                Ok(n) => {
                    if send(&w, &HostMsg::Stdin(buf[..n].to_vec())).is_err() {
                        return;
                    }
                }
            }
        }
    });
}
