//! The host end of one run: starts the VM, answers the agent, pumps stdio,
//! forwards signals, enforces deadlines, and says how the run ended.

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vm::qemu::{self, Backend, QemuConfig};
use crate::vm::qmp::LazyQmp;
use crate::vm::virtiofsd::Daemon;
use crate::vm::{Vm, VmError};

use super::console;
use super::event_loop;
use super::events::{Event, SignalRelay, read_control};
use super::outcome::{Outcome, Timings};
use super::output::{Outputs, Progress};
use super::params::{Job, Params, Restore, ServeEnds, Warm};

/// Makes a socket pair per exec port (and the QEMU guest agent's), points
/// QEMU at the guest ends; the host ends, and the guest ends to inherit.
fn serve_ports(q: &mut QemuConfig) -> std::io::Result<(ServeEnds, Vec<UnixStream>)> {
    let (mut host, mut guest) = (Vec::new(), Vec::new());
    for fd in q.exec_port_fds.iter_mut() {
        let (h, g) = UnixStream::pair()?;
        *fd = g.as_raw_fd();
        host.push(h);
        guest.push(g);
    }
    let qga = match q.qga_fd {
        Some(_) => {
            let (h, g) = UnixStream::pair()?;
            q.qga_fd = Some(g.as_raw_fd());
            guest.push(g);
            Some(h)
        }
        None => None,
    };
    Ok(((host, qga), guest))
}

/// Runs one VM to the end.
pub fn run(mut p: Params, relay: &SignalRelay) -> Result<(Outcome, Timings), VmError> {
    let mut t = Timings::default();
    let ram = match guest_ram(&p) {
        Ok(ram) => ram,
        Err(why) => return Ok((Outcome::RestoreFailed(why), t)),
    };
    let (tx, rx) = mpsc::channel::<Event>();
    let mut w = wire(&mut p, ram.as_ref())?;
    let args = qemu::argv(&p.qemu);
    if p.print_qemu {
        crate::say!("vexec: {}", qemu::shell_line(&p.qemu.binary, &args));
    }
    let mut vm = spawn(&p, &args, &mut w, tx.clone())?;
    t.spawned = Some(Instant::now());
    // QEMU holds the guest ends now.
    w.guest.clear();
    let mut qmp = LazyQmp::new(w.qmp.take());
    relay.attach(Some(tx.clone()));

    let qemu_errors = read_qemu_errors(vm.stderr.take(), tx.clone());
    let con_tx = tx.clone();
    let console_writer = w.console.try_clone().map_err(spawn_err(&p))?;
    let (tail, _con_thread) =
        console::spawn_reader(w.console, p.verbose, p.console_log.take(), move |e| {
            let _ = con_tx.send(Event::Console(e));
        });
    let ctl_writer = Arc::new(Mutex::new(w.control.try_clone().map_err(spawn_err(&p))?));
    let progress = Progress::new();
    // A command's output is written by the reader itself; a batch's goes
    // to its sink through the event loop.
    let outputs = match &p.job {
        Job::Command { tap, .. } => Some(Outputs::new(
            Arc::clone(&progress),
            Arc::clone(&ctl_writer),
            tap.clone(),
        )),
        Job::Batch(_) | Job::Serve { .. } => None,
    };
    read_control(w.control, tx, outputs, Arc::clone(&progress));

    let cx = event_loop::Context {
        ctl: &ctl_writer,
        tail: &tail,
        qemu_errors: &qemu_errors,
        vm: &vm,
        progress: &progress,
        console: console_writer,
        qmp: &mut qmp,
        serve_ends: Some(w.serve_ends),
        ram: ram.as_ref(),
    };
    let mut outcome = event_loop::run(&mut p, &mut t, cx, &rx);
    if let Some(path) = &p.dump_on_panic {
        dump_on_panic(&mut outcome, &mut qmp, path);
    }
    relay.attach(None);
    t.qemu_peak_rss_kib = vm.peak_rss_kib();
    t.guest_ram_kib = (ram.as_ref())
        .and_then(|f| f.metadata().ok())
        .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) / 2);
    drop(vm);
    t.ended = Some(Instant::now());
    Ok((outcome, t))
}

/// The connections between vexec, QEMU and the guest, made before QEMU
/// starts.
struct Wiring {
    /// The host ends of the console and the control port.
    console: UnixStream,
    control: UnixStream,
    /// The host end of the QMP monitor, when the session wants one.
    qmp: Option<UnixStream>,
    serve_ends: ServeEnds,
    daemons: Vec<Daemon>,
    /// What QEMU inherits and vexec closes once it has.
    guest: Vec<OwnedFd>,
    /// The fds of `guest` and of the files QEMU reads (state, RAM).
    inherit: Vec<i32>,
}

/// Makes every connection the session's QEMU needs and points `p.qemu` at
/// the guest ends.
fn wire(p: &mut Params, ram: Option<&File>) -> Result<Wiring, VmError> {
    let mut guest: Vec<OwnedFd> = Vec::new();
    let mut inherit = Vec::new();
    let (console, guest_con) = UnixStream::pair().map_err(spawn_err(p))?;
    let (control, guest_ctl) = UnixStream::pair().map_err(spawn_err(p))?;
    p.qemu.console_fd = guest_con.as_raw_fd();
    p.qemu.control_fd = guest_ctl.as_raw_fd();
    guest.extend([guest_con.into(), guest_ctl.into()]);
    if let Warm::Restore(r) = &p.warm {
        p.qemu.incoming_fd = Some(r.state.as_raw_fd());
        inherit.push(r.state.as_raw_fd());
    }
    if let Some(ram) = ram {
        p.qemu.ram_fd = Some(ram.as_raw_fd());
        inherit.push(ram.as_raw_fd());
    }
    // A QMP monitor, to save or restore the guest, or dump its memory on
    // a panic.
    let qmp = match p.dump_on_panic.is_some() || !matches!(p.warm, Warm::Cold) {
        true => {
            let (host, g) = UnixStream::pair().map_err(spawn_err(p))?;
            p.qemu.qmp_fd = Some(g.as_raw_fd());
            guest.push(g.into());
            Some(host)
        }
        false => None,
    };
    let (serve_ends, guest_ports) = serve_ports(&mut p.qemu).map_err(spawn_err(p))?;
    guest.extend(guest_ports.into_iter().map(OwnedFd::from));
    let (daemons, daemon_fds) = start_daemons(p)?;
    guest.extend(daemon_fds);
    inherit.extend(guest.iter().map(|f| f.as_raw_fd()));
    Ok(Wiring {
        console,
        control,
        qmp,
        serve_ends,
        daemons,
        guest,
        inherit,
    })
}

/// Starts QEMU with what `w` wired; its end and its daemons' ends reach
/// the event loop through `tx`.
fn spawn(
    p: &Params,
    args: &[std::ffi::OsString],
    w: &mut Wiring,
    tx: mpsc::Sender<Event>,
) -> Result<Vm, VmError> {
    let (exit_tx, daemon_tx) = (tx.clone(), Arc::new(Mutex::new(tx)));
    Vm::spawn(
        &p.qemu.binary,
        args,
        &w.inherit,
        std::mem::take(&mut w.daemons),
        move |status| {
            let _ = exit_tx.send(Event::QemuExited(status));
        },
        move |i, status| {
            let tx = daemon_tx.lock().unwrap_or_else(|p| p.into_inner());
            let _ = tx.send(Event::DaemonExited(i, status));
        },
    )
}

/// The guest's RAM as shared memory of the session's, when the machine
/// keeps it so: new, or filled from the saved image of a restore.
fn guest_ram(p: &Params) -> Result<Option<File>, String> {
    if p.qemu.ram_fd.is_none() {
        return Ok(None);
    }
    let why = |e: &dyn std::fmt::Display| format!("cannot restore the saved guest: {e}");
    let ram = crate::vm::ram::new_shared().map_err(|e| why(&e))?;
    if let Warm::Restore(Restore {
        ram: Some(image), ..
    }) = &p.warm
    {
        crate::vm::ram::load(image, &ram).map_err(|e| why(&e))?;
    }
    Ok(Some(ram))
}

/// Collects QEMU's stderr on a thread (for messages about its end), and
/// tells the event loop at once about KVM failures.
fn read_qemu_errors(
    stderr: Option<std::process::ChildStderr>,
    tx: mpsc::Sender<Event>,
) -> Arc<Mutex<String>> {
    let qemu_errors = Arc::new(Mutex::new(String::new()));
    if let Some(err) = stderr {
        let buf = Arc::clone(&qemu_errors);
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                if line.contains("KVM internal error") || line.contains("emulation failure") {
                    let _ = tx.send(Event::KvmError(line.clone()));
                }
                let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                b.push_str(&line);
                b.push('\n');
            }
        });
    }
    qemu_errors
}

/// `--dump-on-panic`: a guest whose kernel panicked has its memory dumped
/// through QMP, and the outcome says where (or why not).
fn dump_on_panic(outcome: &mut Outcome, qmp: &mut LazyQmp, path: &std::path::Path) {
    let Outcome::Failed(msg) = outcome else {
        return;
    };
    if !msg.starts_with("the guest kernel panicked") {
        return;
    }
    let result = qmp
        .get(Duration::from_secs(120))
        .and_then(|q| crate::vm::qmp::dump_guest_memory(q, path));
    msg.push_str(&match result {
        Ok(()) => format!(
            "\nguest memory dumped to {} (ELF core; open with drgn or crash)",
            path.display()
        ),
        Err(e) => format!("\nthe memory dump to {} failed: {e}", path.display()),
    });
}

/// Starts the virtiofsd of every virtio-fs share and points its device at
/// the daemon's connection.
fn start_daemons(p: &mut Params) -> Result<(Vec<Daemon>, Vec<std::os::fd::OwnedFd>), VmError> {
    if p.daemons.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    // Private (0700) and gone before QEMU starts: sockets live in it only
    // for as long as it takes to connect to them.
    let dir = tempfile::Builder::new()
        .prefix("vexec-")
        .tempdir()
        .map_err(spawn_err(p))?;
    let mut daemons = Vec::new();
    let mut fds = Vec::new();
    for (i, spec) in &p.daemons {
        let (d, fd) = Daemon::spawn(spec, dir.path())?;
        p.qemu.shares[*i].backend = Backend::Virtiofs { fd: fd.as_raw_fd() };
        daemons.push(d);
        fds.push(fd);
    }
    Ok((daemons, fds))
}

fn spawn_err(p: &Params) -> impl Fn(std::io::Error) -> VmError + '_ {
    |source| VmError::Spawn {
        binary: p.qemu.binary.clone(),
        source,
    }
}
