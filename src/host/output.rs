//! The command's output on the host: written to vexec's own stdout and
//! stderr by the thread that reads the control channel, so a slow reader
//! slows the guest (backpressure through QEMU) instead of filling vexec's
//! memory, and never blocks the session's handling of deadlines and
//! signals. When a reader goes away the guest is told, so the command's
//! next write fails as it would locally.

use std::fs::File;
use std::io::Write;
use std::mem::ManuallyDrop;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crate::protocol::{self, HostMsg, Stream};

/// Writes to vexec's own stdout (1) or stderr (2). An error means the
/// reader went away (EPIPE: vexec ignores SIGPIPE to see it).
pub fn write_fd(fd: i32, data: &[u8]) -> std::io::Result<()> {
    // SAFETY: fd 1/2 stay open for vexec's lifetime; ManuallyDrop keeps them.
    let mut f = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    f.write_all(data)
}

/// Sends one message to the guest.
pub fn send(w: &Mutex<UnixStream>, m: &HostMsg) -> std::io::Result<()> {
    let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
    protocol::write_frame(&mut *s, m)
}

/// How far the guest's output got, for the report on a hang.
#[derive(Debug)]
pub struct Progress {
    start: Instant,
    /// Bytes of stdout and stderr written on the host.
    pub written: [AtomicU64; 2],
    /// Milliseconds after start of the last message from the guest.
    last_message_ms: AtomicU64,
    /// Milliseconds after start when the current write to stdout/stderr
    /// began, 0 when none is under way.
    writing_since_ms: [AtomicU64; 2],
    /// The reader of stdout/stderr went away.
    pub closed: [AtomicBool; 2],
}

impl Progress {
    /// Counters starting now.
    pub fn new() -> Arc<Progress> {
        Arc::new(Progress {
            start: Instant::now(),
            written: Default::default(),
            last_message_ms: AtomicU64::new(0),
            writing_since_ms: Default::default(),
            closed: Default::default(),
        })
    }

    fn now_ms(&self) -> u64 {
        // At least 1: 0 means "none".
        (self.start.elapsed().as_millis() as u64).max(1)
    }

    /// A message arrived from the guest.
    pub fn message(&self) {
        self.last_message_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The host side of the run in one paragraph, for a hang report.
    pub fn describe(&self) -> String {
        let now = self.now_ms();
        let last = self.last_message_ms.load(Ordering::Relaxed);
        let mut s = if last == 0 {
            "no message from the guest yet".to_string()
        } else {
            format!(
                "last message from the guest {:.1}s ago",
                (now - last) as f64 / 1000.0
            )
        };
        for (i, name) in ["stdout", "stderr"].iter().enumerate() {
            s.push_str(&format!(
                "; {name}: {} bytes written",
                self.written[i].load(Ordering::Relaxed)
            ));
            if self.closed[i].load(Ordering::Relaxed) {
                s.push_str(", its reader went away");
            }
            let since = self.writing_since_ms[i].load(Ordering::Relaxed);
            if since != 0 {
                s.push_str(&format!(
                    ", a write has been blocked for {:.1}s (its reader is not reading)",
                    (now - since) as f64 / 1000.0
                ));
            }
        }
        s
    }
}

/// Sees every piece of the command's stdout before it is written (a
/// results parser). It must not block: the guest waits on it.
pub trait Tap: Send {
    fn seen(&mut self, data: &[u8]);
}

/// A [`Tap`] shared with whoever reads it after the run.
pub type StdoutTap = Arc<Mutex<dyn Tap>>;

/// Writes the command's output streams and notices when their readers go.
pub struct Outputs {
    progress: Arc<Progress>,
    ctl: Arc<Mutex<UnixStream>>,
    tap: Option<StdoutTap>,
}

impl Outputs {
    /// Output going to vexec's stdout and stderr; `ctl` tells the guest.
    pub fn new(
        progress: Arc<Progress>,
        ctl: Arc<Mutex<UnixStream>>,
        tap: Option<StdoutTap>,
    ) -> Self {
        Outputs { progress, ctl, tap }
    }

    /// Writes `data` of `stream`. The first time its reader is found gone,
    /// the guest is told; later data is dropped.
    pub fn write(&self, stream: Stream, data: &[u8]) {
        let (i, fd) = match stream {
            Stream::Stdout => (0, 1),
            Stream::Stderr => (1, 2),
        };
        if let (Stream::Stdout, Some(tap)) = (stream, &self.tap) {
            tap.lock().unwrap_or_else(|p| p.into_inner()).seen(data);
        }
        let p = &self.progress;
        if p.closed[i].load(Ordering::Relaxed) {
            return;
        }
        p.writing_since_ms[i].store(p.now_ms(), Ordering::Relaxed);
        let written = write_fd(fd, data);
        p.writing_since_ms[i].store(0, Ordering::Relaxed);
        match written {
            Ok(()) => {
                p.written[i].fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                p.closed[i].store(true, Ordering::Relaxed);
                let _ = send(&self.ctl, &HostMsg::OutputClosed(stream));
            }
        }
    }
}

/// The command closed its input: close vexec's own too (all that reads
/// it), so whatever writes into vexec sees EPIPE as it would locally. The
/// stdin pump then reads end of file from /dev/null.
pub fn close_own_stdin() {
    use std::os::fd::AsRawFd;
    if let Ok(null) = File::open("/dev/null") {
        // SAFETY: replaces fd 0 with a descriptor we own for the call.
        unsafe { libc::dup2(null.as_raw_fd(), 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_a_blocked_write_and_a_gone_reader() {
        let p = Progress::new();
        assert!(p.describe().starts_with("no message from the guest yet"));
        p.message();
        p.written[0].store(42, Ordering::Relaxed);
        p.writing_since_ms[0].store(1, Ordering::Relaxed);
        p.closed[1].store(true, Ordering::Relaxed);
        let d = p.describe();
        assert!(
            d.contains("stdout: 42 bytes written, a write has been blocked"),
            "{d}"
        );
        assert!(
            d.contains("stderr: 0 bytes written, its reader went away"),
            "{d}"
        );
    }
}
