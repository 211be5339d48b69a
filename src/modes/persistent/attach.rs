//! `vexec exec NAME -- COMMAND` and `vexec shell NAME`: one command in a
//! running VM, with what a plain run gives it (byte-exact streams, stdin,
//! signals, a terminal, SIGPIPE, the exit status table), through the VM's
//! `up` process.

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host::events::{Event, SignalRelay};
use crate::host::outcome::Outcome;
use crate::host::output::{self, Outputs, Progress, send};
use crate::host::stop::{self, OnSignal};
use crate::host::{events, input};
use crate::modes::spec::RunSpec;
use crate::protocol::{self, Aftermath, Exec, GuestMsg, HostMsg};
use crate::report;
use crate::sys::terminal;

use super::VmsError;
use super::registry::{self, Entry};
use super::wire::{Reply, Request};

/// The VM named `name`, running; else why not.
pub fn find(name: &str) -> Result<Entry, VmsError> {
    registry::check_name(name)?;
    let root = registry::root()?;
    let entry = Entry::new(&root, name);
    if entry.alive() {
        return match entry.info() {
            Some(i) if i.ready => Ok(entry),
            _ => Err(VmsError::Starting(name.into())),
        };
    }
    let running: Vec<String> = (registry::all(&root).into_iter())
        .filter(Entry::alive)
        .map(|e| e.name())
        .collect();
    Err(VmsError::NoSuchVm {
        name: name.into(),
        running: if running.is_empty() {
            "none".into()
        } else {
            running.join(", ")
        },
    })
}

/// Says when the working directory is not written through to the host.
pub fn warn_unshared_cwd(entry: &Entry, spec: &RunSpec) {
    let Some(info) = entry.info() else { return };
    if !info.writable.iter().any(|w| spec.cwd.starts_with(w)) && !spec.quiet {
        crate::say!(
            "vexec: warning: {} is not shared writable with VM {}: the command sees the host's files there, but what it writes stays in the VM (run `vexec up` from it, or with --rw DIR)",
            spec.cwd.display(),
            info.name
        );
    }
}

/// Runs `exec` in the VM; vexec's exit status.
pub fn exec(
    entry: &Entry,
    spec: &RunSpec,
    exec: Exec,
    relay: &SignalRelay,
) -> Result<i32, VmsError> {
    let mut conn = UnixStream::connect(entry.socket()).map_err(|e| VmsError::Connect {
        name: entry.name(),
        source: e,
    })?;
    let tty_in = exec.tty.as_ref().is_some_and(|t| t.stdin);
    let has_tty = exec.tty.is_some();
    protocol::write_frame(&mut conn, &Request::Exec(Box::new(exec)))
        .map_err(|e| VmsError::Gone(entry.name(), e.to_string()))?;
    match protocol::read_frame::<Reply>(&mut conn) {
        Ok(Some(Reply::Accepted)) => {}
        Ok(Some(Reply::Refused(why))) => return Err(VmsError::Refused(entry.name(), why)),
        other => return Err(VmsError::Gone(entry.name(), format!("{other:?}"))),
    }
    let (tx, rx) = mpsc::channel::<Event>();
    let ctl = Arc::new(Mutex::new(
        conn.try_clone()
            .map_err(|e| VmsError::Gone(entry.name(), e.to_string()))?,
    ));
    let outputs = Outputs::new(Progress::new(), Arc::clone(&ctl), None);
    events::read_control(conn, tx.clone(), Some(outputs), Progress::new());
    relay.attach(Some(tx));
    let _raw = (tty_in && terminal::is_tty(0)).then(terminal::RawMode::enter);
    input::pump_stdin(Arc::clone(&ctl));
    let ended = wait(&rx, &ctl, spec.timeout, has_tty);
    relay.attach(None);
    drop(_raw);
    let (outcome, aftermath) = ended?;
    report::report_aftermath(
        &aftermath,
        &outcome,
        spec.verbose,
        &spec.memory,
        spec.output_grace,
    );
    // The VM stays up: only the command was stopped.
    if let Outcome::TimedOut(d) = outcome {
        crate::say!(
            "vexec: timed out after {}; the command was killed (VM {} keeps running)",
            humantime::format_duration(d),
            entry.name()
        );
        return Ok(crate::status::STATUS_TIMEOUT);
    }
    if let Outcome::Failed(why) = outcome {
        return Err(VmsError::Gone(entry.name(), why));
    }
    Ok(report::status_of(&outcome))
}

/// Follows the command to its end: how it ended and what the guest told.
fn wait(
    rx: &mpsc::Receiver<Event>,
    ctl: &Mutex<UnixStream>,
    timeout: Option<Duration>,
    has_tty: bool,
) -> Result<(Outcome, Aftermath), VmsError> {
    let run_until = timeout.map(|t| Instant::now() + t);
    let mut deadline = run_until;
    let mut stopping: Option<Outcome> = None;
    let mut aftermath = Aftermath::default();
    loop {
        let ev = match deadline {
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => match stopping.take() {
                    // The command outlived its grace: leave; the `up`
                    // process kills it when this connection closes.
                    Some(o) => return Ok((o, aftermath)),
                    None => {
                        let _ = send(ctl, &HostMsg::Signal(libc::SIGKILL));
                        stopping = timeout.map(Outcome::TimedOut);
                        deadline = Some(Instant::now() + stop::GRACE);
                        continue;
                    }
                },
                Err(RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(ev) => ev,
                Err(_) => break,
            },
        };
        match ev {
            Event::Guest(GuestMsg::Exited { exit, .. }) => {
                return Ok((stopping.unwrap_or(Outcome::Exited(exit)), aftermath));
            }
            Event::Guest(GuestMsg::Aftermath(a)) => aftermath = a,
            Event::Guest(GuestMsg::InputClosed) => output::close_own_stdin(),
            Event::Guest(GuestMsg::Error(e)) => {
                return Ok((
                    Outcome::Failed(format!("the guest agent said: {e}")),
                    aftermath,
                ));
            }
            Event::Guest(_) => {}
            Event::Signal(sig) => match stop::on_signal(sig, has_tty, stopping.is_some()) {
                OnSignal::Ignore => {}
                OnSignal::Resize { rows, cols } => {
                    let _ = send(ctl, &HostMsg::WindowSize { rows, cols });
                }
                // An exec has no run of its own to report on: SIGQUIT is
                // the command's, as any other signal. Another signal while
                // the first one's grace runs ends the wait at once.
                _ => match stopping.take() {
                    Some(o) => return Ok((o, aftermath)),
                    None => {
                        let _ = send(ctl, &HostMsg::Signal(sig));
                        stopping = Some(Outcome::Interrupted(sig));
                        deadline = Some(Instant::now() + stop::GRACE);
                    }
                },
            },
            Event::ControlClosed | Event::ControlError(_) => break,
            _ => {}
        }
    }
    Ok((
        Outcome::Failed("the connection closed before the command ended: the VM was shut down, or the run it belongs to ended".into()),
        aftermath,
    ))
}
