//! The `up` process's side of a persistent VM: it owns the host ends of
//! the guest's exec ports and lends one to each `vexec exec` that
//! connects, relaying whole frames both ways. A client that goes away
//! mid-command never leaves the port half-used: its command is killed and
//! the rest of its output drained before the port is lent again. The QEMU
//! guest agent's port is relayed to whoever connects to `--qga`'s socket.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::host::params::Server;

use crate::host::events::SignalRelay;
use crate::protocol::{self, GuestMsg, HostMsg};

use super::wire::{Reply, Request};

/// What to do once the guest serves, given QEMU's pid.
pub type OnReady = Box<dyn FnOnce(u32) + Send>;

/// What happens once the guest serves: the listener to accept on and
/// what to do when ready.
pub struct PortServer {
    inner: Arc<Inner>,
}

struct Inner {
    free: Mutex<Vec<UnixStream>>,
    freed: Condvar,
    relay: SignalRelay,
    listener: Mutex<Option<UnixListener>>,
    qga: Mutex<Option<UnixListener>>,
    stopping: AtomicBool,
    /// Commands running now, and when the last one ended or started.
    running: AtomicUsize,
    last: Mutex<Instant>,
    idle: Option<Duration>,
    on_ready: Mutex<Option<OnReady>>,
}

impl PortServer {
    /// `listener` is the VM's control socket (bound before boot, so that
    /// clients wait rather than fail), `qga` the guest agent socket.
    pub fn new(
        listener: UnixListener,
        qga: Option<UnixListener>,
        relay: SignalRelay,
        idle: Option<Duration>,
        on_ready: OnReady,
    ) -> PortServer {
        PortServer {
            inner: Arc::new(Inner {
                free: Mutex::new(Vec::new()),
                freed: Condvar::new(),
                relay,
                listener: Mutex::new(Some(listener)),
                qga: Mutex::new(qga),
                stopping: AtomicBool::new(false),
                running: AtomicUsize::new(0),
                last: Mutex::new(Instant::now()),
                idle,
                on_ready: Mutex::new(Some(on_ready)),
            }),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Server for PortServer {
    fn serving(&self, ports: Vec<UnixStream>, qga: Option<UnixStream>, qemu_pid: u32) {
        *lock(&self.inner.free) = ports;
        if let Some(listener) = lock(&self.inner.listener).take() {
            let inner = Arc::clone(&self.inner);
            std::thread::spawn(move || accept(&inner, &listener));
        }
        if let (Some(port), Some(listener)) = (qga, lock(&self.inner.qga).take()) {
            std::thread::spawn(move || relay_qga(port, &listener));
        }
        if let Some(idle) = self.inner.idle {
            let inner = Arc::clone(&self.inner);
            std::thread::spawn(move || watch_idle(&inner, idle));
        }
        if let Some(ready) = lock(&self.inner.on_ready).take() {
            ready(qemu_pid);
        }
    }
}

fn accept(inner: &Arc<Inner>, listener: &UnixListener) {
    for conn in listener.incoming().flatten() {
        let inner = Arc::clone(inner);
        std::thread::spawn(move || serve_client(&inner, conn));
    }
}

fn serve_client(inner: &Inner, mut client: UnixStream) {
    let request = match protocol::read_frame::<Request>(&mut client) {
        Ok(Some(r)) => r,
        // Not one of ours (or gone): nothing to answer.
        _ => return,
    };
    match request {
        Request::Down => {
            inner.stopping.store(true, Ordering::SeqCst);
            let _ = protocol::write_frame(&mut client, &Reply::Stopping);
            inner.relay.raise(libc::SIGTERM);
        }
        Request::Exec(exec) => {
            let Some(port) = take_port(inner) else {
                let why = "the VM is shutting down".to_string();
                let _ = protocol::write_frame(&mut client, &Reply::Refused(why));
                return;
            };
            inner.running.fetch_add(1, Ordering::SeqCst);
            let kept = run_on(port, client, HostMsg::Exec(*exec));
            *lock(&inner.last) = Instant::now();
            inner.running.fetch_sub(1, Ordering::SeqCst);
            if let Some(port) = kept {
                lock(&inner.free).push(port);
                inner.freed.notify_one();
            }
        }
    }
}

/// A free port, waiting for one while all are busy; None once stopping.
fn take_port(inner: &Inner) -> Option<UnixStream> {
    let mut free = lock(&inner.free);
    loop {
        if inner.stopping.load(Ordering::SeqCst) {
            return None;
        }
        if let Some(p) = free.pop() {
            return Some(p);
        }
        free = inner
            .freed
            .wait_timeout(free, Duration::from_millis(500))
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}

/// Runs one command on `port` for `client`; the port back when it can be
/// used again (not when the guest stopped answering on it).
fn run_on(mut port: UnixStream, mut client: UnixStream, exec: HostMsg) -> Option<UnixStream> {
    if protocol::write_frame(&mut client, &Reply::Accepted).is_err()
        || protocol::write_frame(&mut port, &exec).is_err()
    {
        return Some(port);
    }
    // Whether the command ended, and the way to the guest: held while
    // writing, so nothing is written once the port is lent again.
    let to_guest = Arc::new(Mutex::new((false, port.try_clone().ok()?)));
    let forward = {
        let (to_guest, mut from) = (Arc::clone(&to_guest), client.try_clone().ok()?);
        std::thread::spawn(move || forward_client(&mut from, &to_guest))
    };
    let mut healthy = false;
    while let Ok(Some(m)) = protocol::read_frame::<GuestMsg>(&mut port) {
        let end = matches!(m, GuestMsg::Exited { .. });
        // A client gone is not the guest's problem: keep draining.
        let _ = protocol::write_frame(&mut client, &m);
        if end {
            healthy = true;
            break;
        }
        if matches!(m, GuestMsg::Error(_)) {
            break;
        }
    }
    lock(&to_guest).0 = true;
    let _ = client.shutdown(Shutdown::Both);
    let _ = forward.join();
    healthy.then_some(port)
}

/// Passes the client's messages about its command to the guest; when the
/// client goes away first, the command is killed (its output still
/// drains, so the port is clean for the next one).
fn forward_client(from: &mut UnixStream, to_guest: &Mutex<(bool, UnixStream)>) {
    loop {
        let msg = protocol::read_frame::<HostMsg>(from);
        let mut g = lock(to_guest);
        if g.0 {
            return;
        }
        let msg = match msg {
            Ok(Some(
                m @ (HostMsg::Stdin(_)
                | HostMsg::StdinEof
                | HostMsg::Signal(_)
                | HostMsg::WindowSize { .. }
                | HostMsg::OutputClosed(_)),
            )) => m,
            // Setup, Exec or Serve from a client: refused by dropping it.
            Ok(Some(_)) => continue,
            Ok(None) | Err(_) => {
                let _ = protocol::write_frame(&mut g.1, &HostMsg::Signal(libc::SIGKILL));
                let _ = protocol::write_frame(&mut g.1, &HostMsg::StdinEof);
                return;
            }
        };
        if protocol::write_frame(&mut g.1, &msg).is_err() {
            return;
        }
    }
}

/// Shuts the VM down after `idle` without a command.
fn watch_idle(inner: &Inner, idle: Duration) {
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let quiet = lock(&inner.last).elapsed();
        if inner.running.load(Ordering::SeqCst) == 0 && quiet >= idle {
            crate::say!(
                "vexec: no command for {}; shutting the VM down (--idle)",
                humantime::format_duration(idle)
            );
            inner.stopping.store(true, Ordering::SeqCst);
            inner.relay.raise(libc::SIGTERM);
            return;
        }
    }
}

/// Relays the guest agent port to one client of `listener` at a time.
/// Bytes the guest sends while nobody is connected are dropped, as a
/// qemu-ga chardev with no client drops them; clients resynchronise with
/// `guest-sync`.
fn relay_qga(port: UnixStream, listener: &UnixListener) {
    let current: Arc<Mutex<Option<UnixStream>>> = Arc::default();
    let Ok(mut from_guest) = port.try_clone() else {
        return;
    };
    let to_client = Arc::clone(&current);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n @ 1..) = from_guest.read(&mut buf) {
            if let Some(c) = lock(&to_client).as_mut() {
                let _ = c.write_all(&buf[..n]);
            }
        }
    });
    for conn in listener.incoming().flatten() {
        let Ok(mut reader) = conn.try_clone() else {
            continue;
        };
        *lock(&current) = Some(conn);
        let Ok(mut to_guest) = port.try_clone() else {
            return;
        };
        let _ = std::io::copy(&mut reader, &mut to_guest);
        *lock(&current) = None;
    }
}

/// Where a VM's guest agent socket is: the path given, made absolute.
pub fn qga_path(given: &std::path::Path, cwd: &std::path::Path) -> PathBuf {
    if given.is_absolute() {
        given.to_path_buf()
    } else {
        cwd.join(given)
    }
}
