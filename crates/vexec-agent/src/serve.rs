//! A persistent VM (`vexec up`): instead of one command, the agent serves
//! every exec port (one command at a time each, again and again) and the
//! QEMU guest agent's port, until the host asks it to stop.

use std::fs::File;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vexec_protocol::{
    self as protocol, EXEC_PORT_PREFIX, Exec, Exit, GuestMsg, Hooks, HostMsg, QGA_PORT_NAME,
    ServedPorts,
};

use super::exec::{self, Control};
use super::port::{PortWriter, send};
use super::{qga, sys};

/// Runs the VM's setup commands, then serves until the control port says
/// stop (a signal) or closes; then the teardown commands run, every
/// process is killed, the disks synced and `Exited` sent.
pub fn run(
    writer: &PortWriter,
    mut reader: File,
    served: &ServedPorts,
    hooks: &Hooks,
) -> Result<(), String> {
    exec::hooks(writer, &hooks.env, &hooks.cwd, &hooks.setup, "setup")?;
    let (exec_ports, qga_port) = served_ports(served, Duration::from_secs(10));
    let count = exec_ports.len();
    for dev in exec_ports {
        serve_in_background(dev);
    }
    if let Some(dev) = qga_port
        && let Err(e) = sys::thread("qga", move || qga::serve(&dev))
    {
        eprintln!("vexec-init: error: the guest agent protocol is not served: {e}");
    }
    super::step(&format!("serving {count} exec ports"));
    send(
        writer,
        &GuestMsg::Started {
            uptime_ms: sys::uptime_ms(),
        },
    )
    .map_err(|e| format!("writing to the control port: {e}"))?;
    loop {
        match protocol::read_frame::<HostMsg>(&mut reader) {
            Ok(Some(HostMsg::Signal(_))) | Ok(None) | Err(_) => break,
            Ok(Some(_)) => {}
        }
    }
    exec::teardown(writer, &hooks.env, &hooks.cwd, &hooks.teardown);
    shut_down(writer);
    Ok(())
}

/// A one-shot run's exec ports, served beside its command (found and
/// opened on a thread: the command does not wait for them).
pub fn beside_command(served: ServedPorts) {
    if served.exec == 0 {
        return;
    }
    let serving = sys::thread("exec-ports", move || {
        let (exec_ports, _) = served_ports(&served, Duration::from_secs(10));
        exec_ports.into_iter().for_each(serve_in_background);
    });
    if let Err(e) = serving {
        eprintln!("vexec-init: error: exec ports are not served: {e}");
    }
}

fn serve_in_background(dev: PathBuf) {
    let shown = dev.display().to_string();
    let serving = sys::thread("exec-port", move || {
        if let Err(e) = serve_port(&dev) {
            eprintln!("vexec-init: error: {}: {e}", dev.display());
        }
    });
    if let Err(e) = serving {
        eprintln!("vexec-init: error: {shown} is not served: {e}");
    }
}

/// Ends every process but this one, and says so once the disks are synced.
fn shut_down(writer: &PortWriter) {
    sys::sync();
    // SAFETY: kill(2); -1 spares PID 1 (this agent) itself.
    unsafe { libc::kill(-1, libc::SIGKILL) };
    sys::sync();
    let _ = send(
        writer,
        &GuestMsg::Exited {
            exit: protocol::Exit::Code(0),
            uptime_ms: sys::uptime_ms(),
        },
    );
}

/// The exec ports and the QGA port the host announced, once each has
/// its name and device node (they arrive one by one, bus by bus); after
/// `wait`, those that came.
fn served_ports(want: &ServedPorts, wait: Duration) -> (Vec<PathBuf>, Option<PathBuf>) {
    let start = Instant::now();
    loop {
        let ports = super::ports().unwrap_or_default();
        let exec: Vec<PathBuf> = (ports.iter())
            .filter(|(_, name, dev)| name.starts_with(EXEC_PORT_PREFIX) && dev.exists())
            .map(|(_, _, dev)| dev.clone())
            .collect();
        let qga = (ports.into_iter())
            .find(|(_, name, dev)| name == QGA_PORT_NAME && dev.exists())
            .map(|(_, _, dev)| dev);
        let all = exec.len() >= want.exec as usize && (qga.is_some() || !want.qga);
        if all || start.elapsed() > wait {
            if !all {
                eprintln!(
                    "vexec-init: warning: {} of {} exec ports{} appeared; serving those",
                    exec.len(),
                    want.exec,
                    if want.qga && qga.is_none() {
                        " and no guest agent port"
                    } else {
                        ""
                    }
                );
            }
            return (exec, qga);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// What an exec port is doing.
#[derive(Default)]
struct Slot {
    /// A command was asked for and has not ended.
    busy: bool,
    /// Its control, once it runs.
    control: Option<Control>,
    /// Messages that came before it ran (input sent right after `Exec`).
    early: Vec<HostMsg>,
}

type SharedSlot = Arc<Mutex<Slot>>;

fn lock(slot: &SharedSlot) -> std::sync::MutexGuard<'_, Slot> {
    slot.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads one exec port for the VM's lifetime: each `Exec` runs on a thread
/// of its own, and the messages that follow go to it until it ends.
fn serve_port(dev: &std::path::Path) -> Result<(), String> {
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .map_err(|e| format!("opening: {e}"))?;
    let writer: PortWriter = Arc::new(Mutex::new(
        reader
            .try_clone()
            .map_err(|e| format!("duplicating: {e}"))?,
    ));
    let slot = SharedSlot::default();
    loop {
        let msg = match protocol::read_frame::<HostMsg>(&mut reader) {
            Ok(Some(m)) => m,
            // The host end not connected yet: QEMU announces its ports
            // one by one after the guest opens them.
            Ok(None) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                let _ = send(&writer, &GuestMsg::Error(exec::undecodable(&e)));
                return Err(e.to_string());
            }
        };
        let mut s = lock(&slot);
        match msg {
            HostMsg::Exec(e) if !s.busy => {
                s.busy = true;
                drop(s);
                start(&writer, &slot, e);
            }
            HostMsg::Exec(_) => {
                let _ = send(
                    &writer,
                    &GuestMsg::Error("a command is still running on this port".into()),
                );
            }
            other => match &s.control {
                Some(c) => c.handle(other),
                None if s.busy => s.early.push(other),
                // Input or a signal for a command that already ended.
                None => {}
            },
        }
    }
}

/// Runs `e` on a thread: its messages reach it through `slot`, and the
/// port is free again before `Exited` is sent.
fn start(writer: &PortWriter, slot: &SharedSlot, e: Exec) {
    let (writer, slot) = (Arc::clone(writer), Arc::clone(slot));
    let (writer_if_not, slot_if_not) = (Arc::clone(&writer), Arc::clone(&slot));
    let started = sys::thread("exec", move || {
        let keep = Arc::clone(&slot);
        let inbox: exec::Inbox = Box::new(move |control: Control| {
            let mut s = lock(&keep);
            for m in std::mem::take(&mut s.early) {
                control.handle(m);
            }
            s.control = Some(control);
        });
        let exit = exec::run(&writer, inbox, &e);
        // Writes to shared directories reach the host before the caller
        // hears the command ended, as in a one-shot run.
        sys::sync();
        finish(&writer, &slot, exit);
    });
    if let Err(e) = started {
        let message = format!("vexec: the command was not started: {e}");
        let exit = Exit::NotStarted {
            status: 125,
            message,
        };
        finish(&writer_if_not, &slot_if_not, exit);
    }
}

/// Frees the port for the next command and tells the caller how this one
/// ended.
fn finish(writer: &PortWriter, slot: &SharedSlot, exit: Exit) {
    *lock(slot) = Slot::default();
    let _ = send(
        writer,
        &GuestMsg::Exited {
            exit,
            uptime_ms: sys::uptime_ms(),
        },
    );
}
