//! The command's output, drained into the control port: one thread per
//! stream reads its pipe (or terminal master) until end of file. When the
//! host says the stream's reader went away, the thread closes the read end,
//! so the command's next write fails with EPIPE (SIGPIPE) as it would on
//! the host.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vexec_protocol::GuestMsg;

use super::port::{PortWriter, send};
use super::report::STATE;

/// Tells one pump to stop and close its read end.
pub struct Closer(OwnedFd);

impl Closer {
    fn new() -> std::io::Result<(Closer, OwnedFd)> {
        // SAFETY: eventfd returns a new descriptor or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is ours; the dup shares the counter.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let other = owned.try_clone()?;
        Ok((Closer(owned), other))
    }

    /// Asks the pump to close its stream; later calls do nothing more.
    pub fn close(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our eventfd.
        unsafe { libc::write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }
}

/// Wraps a chunk of output as the message of its stream.
pub type Wrap = fn(Vec<u8>) -> GuestMsg;

/// Streams `from` to the host as `wrap` messages on a thread of its own;
/// `done` is told when it stops. The returned [`Closer`] stops it early.
pub fn spawn(
    port: &PortWriter,
    from: OwnedFd,
    wrap: Wrap,
    done: mpsc::Sender<()>,
) -> std::io::Result<Closer> {
    let (closer, stop) = Closer::new()?;
    let port = std::sync::Arc::clone(port);
    let name = match wrap(Vec::new()) {
        GuestMsg::Stderr(_) => "stderr-pump",
        _ => "stdout-pump",
    };
    super::sys::thread(name, move || {
        drain_into(&port, File::from(from), wrap, &stop);
        let _ = done.send(());
    })?;
    Ok(closer)
}

/// Whether `fd` became readable (or hung up), waiting for either of two.
fn wait(a: &impl AsFd, b: &impl AsFd) -> std::io::Result<(bool, bool)> {
    let mut fds = [
        libc::pollfd {
            fd: a.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: fds is a valid array of two pollfd.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if rc >= 0 {
            return Ok((fds[0].revents != 0, fds[1].revents != 0));
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn drain_into(port: &PortWriter, mut from: File, wrap: Wrap, stop: &OwnedFd) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match wait(&from, stop) {
            // The host's reader is gone: dropping `from` closes the pipe.
            Ok((_, true)) | Err(_) => return,
            Ok((false, false)) => continue,
            Ok((true, false)) => {}
        }
        match from.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                let msg = wrap(buf[..n].to_vec());
                let i = usize::from(matches!(msg, GuestMsg::Stderr(_)));
                STATE.read(i, n);
                if send(port, &msg).is_err() {
                    return;
                }
                STATE.sent(i, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            // EIO on a terminal master: every slave side is closed.
            Err(_) => return,
        }
    }
}

/// Waits for `pumps` pumps to finish, at most `grace` (a background child
/// may hold a pipe open forever). True when some were still running.
pub fn drain(done: &mpsc::Receiver<()>, pumps: usize, grace: Duration) -> bool {
    let deadline = Instant::now() + grace;
    for _ in 0..pumps {
        let left = deadline.saturating_duration_since(Instant::now());
        if done.recv_timeout(left).is_err() {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    fn port() -> (PortWriter, File) {
        let (r, w) = std::io::pipe().unwrap();
        let w = File::from(OwnedFd::from(w));
        (Arc::new(Mutex::new(w)), File::from(OwnedFd::from(r)))
    }

    #[test]
    fn closing_makes_the_writer_see_epipe() {
        let (port, _rx) = port();
        let (r, mut w) = std::io::pipe().unwrap();
        let (tx, done) = mpsc::channel();
        let closer = spawn(&port, r.into(), GuestMsg::Stdout, tx).unwrap();
        closer.close();
        assert!(!drain(&done, 1, Duration::from_secs(5)));
        // Rust ignores SIGPIPE, so the write fails with EPIPE instead.
        let e = w.write_all(b"x").unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EPIPE));
    }

    #[test]
    fn end_of_file_finishes_and_a_held_pipe_is_cut() {
        let (port, _rx) = port();
        let (r, w) = std::io::pipe().unwrap();
        let (tx, done) = mpsc::channel();
        let _c = spawn(&port, r.into(), GuestMsg::Stdout, tx.clone()).unwrap();
        let (r2, _held) = std::io::pipe().unwrap();
        let _c2 = spawn(&port, r2.into(), GuestMsg::Stderr, tx).unwrap();
        drop(w);
        assert!(drain(&done, 2, Duration::from_millis(300)));
    }
}
