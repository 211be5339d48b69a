//! What happens during a run, as the event loop hears it: the guest's
//! messages, QEMU's and the daemons' ends, console lines, host signals.

use std::os::unix::net::UnixStream;
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};

use crate::protocol::{self, GuestMsg, Stream};

use super::console::ConsoleEvent;
use super::output::{Outputs, Progress};

/// Something that happened during the run.
#[derive(Debug)]
pub enum Event {
    Guest(GuestMsg),
    /// The guest sent bytes that are not a valid message.
    ControlError(String),
    ControlClosed,
    QemuExited(i32),
    /// The share daemon at this index (in [`Params::daemons`]) exited.
    DaemonExited(usize, i32),
    Console(ConsoleEvent),
    KvmError(String),
    Signal(i32),
}

/// Delivers host signals to whichever session is running.
#[derive(Clone, Default)]
pub struct SignalRelay {
    slot: Arc<Mutex<Option<Sender<Event>>>>,
}

impl SignalRelay {
    /// Installs handlers for SIGINT, SIGTERM, SIGHUP, SIGQUIT (a report of
    /// where a run stands, as Go and the JVM answer it) and SIGWINCH.
    /// Without a session, a signal other than SIGWINCH ends vexec at once
    /// with 128+N.
    pub fn install() -> std::io::Result<Self> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGQUIT, SIGTERM, SIGWINCH};
        let relay = SignalRelay::default();
        let mut signals =
            signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGWINCH])?;
        let slot = Arc::clone(&relay.slot);
        std::thread::spawn(move || {
            for sig in signals.forever() {
                let tx = slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
                match tx {
                    Some(tx) if tx.send(Event::Signal(sig)).is_ok() => {}
                    _ if sig == SIGWINCH => {}
                    _ => {
                        crate::sys::terminal::restore();
                        std::process::exit(128 + sig)
                    }
                }
            }
        });
        Ok(relay)
    }

    /// Delivers `sig` to the running session as if it came from outside
    /// (`vexec down` stops a persistent VM this way); false without one.
    pub fn raise(&self, sig: i32) -> bool {
        let tx = self.slot.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tx.is_some_and(|tx| tx.send(Event::Signal(sig)).is_ok())
    }

    pub(crate) fn attach(&self, tx: Option<Sender<Event>>) {
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = tx;
    }
}

/// Reads the guest's messages on a thread until the channel closes:
/// output is written at once (in order with everything else the guest
/// says), the rest goes to the event loop.
pub fn read_control(
    mut reader: UnixStream,
    tx: Sender<Event>,
    outputs: Option<Outputs>,
    progress: Arc<Progress>,
) {
    std::thread::spawn(move || {
        loop {
            let msg = match protocol::read_frame::<GuestMsg>(&mut reader) {
                Ok(Some(m)) => m,
                Ok(None) => break,
                Err(e) => {
                    let _ = tx.send(Event::ControlError(e.to_string()));
                    break;
                }
            };
            progress.message();
            match (msg, &outputs) {
                (GuestMsg::Stdout(d), Some(o)) => o.write(Stream::Stdout, &d),
                (GuestMsg::Stderr(d), Some(o)) => o.write(Stream::Stderr, &d),
                (m, _) => {
                    if tx.send(Event::Guest(m)).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = tx.send(Event::ControlClosed);
    });
}
