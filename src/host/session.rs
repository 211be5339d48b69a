//! The host end of one run: starts the VM, answers the agent, pumps stdio,
//! forwards signals, enforces deadlines, and says how the run ended.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{self, Aftermath, Exec, Exit, GuestMsg, HostMsg, Setup, Stream};
use crate::vm::qemu::{self, Backend, QemuConfig};
use crate::vm::qmp::LazyQmp;
use crate::vm::virtiofsd::{Daemon, DaemonSpec};
use crate::vm::{Vm, VmError};

use super::console::{self, ConsoleEvent};
use super::event_loop;
use super::output::{Outputs, Progress, StdoutTap, send};

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
                        super::terminal::restore();
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

/// What a session needs.
pub struct Params {
    pub qemu: QemuConfig,
    /// The virtiofsd for each virtio-fs share, by index into `qemu.shares`.
    pub daemons: Vec<(usize, DaemonSpec)>,
    /// What the guest runs.
    pub job: Job,
    pub timeout: Option<Duration>,
    /// Deadline for the agent to report in.
    pub boot_timeout: Duration,
    /// When trying KVM under `auto`: a boot slower than this means KVM is
    /// broken here.
    pub kvm_probe: Option<Duration>,
    pub verbose: bool,
    pub console_log: Option<File>,
    pub print_qemu: bool,
    /// Dump guest memory here when the kernel panics.
    pub dump_on_panic: Option<std::path::PathBuf>,
    /// Boot, boot and save, or restore.
    pub warm: Warm,
}

/// What a session does about snapshots of the booted guest (warm start).
pub enum Warm {
    /// Boot; save nothing.
    Cold,
    /// Boot, and save the guest when its agent reports ready, before
    /// anything host-backed is mounted.
    Save(Box<dyn Saver>),
    /// Restore the guest from a saved state instead of booting it.
    Restore(Restore),
}

/// Saves a booted guest (the policy of where and whether is the caller's).
pub trait Saver: Send {
    /// Saves the running machine behind `qmp`, whose agent reported `ready`
    /// (`ram`: its RAM, when shared memory of the session's); the machine
    /// must be running again on return. Failures are the saver's to
    /// report: the run goes on either way.
    fn save(&mut self, qmp: &mut crate::vm::qmp::Qmp, ready: &Ready, ram: Option<&File>);
}

/// A saved guest to restore.
pub struct Restore {
    /// The saved state, read by QEMU.
    pub state: File,
    /// The image of its RAM, when that was saved apart (see
    /// [`crate::vm::ram`]).
    pub ram: Option<File>,
    /// What the agent reported before the guest was saved.
    pub ready: Ready,
}

/// What the agent reports when it is ready.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Ready {
    pub version: u32,
    pub release: String,
    pub uptime_ms: u64,
}

/// What a session has the guest do.
pub enum Job {
    /// Set up the root described by `Setup`, run one command.
    Command {
        setup: Box<Setup>,
        exec: Box<Exec>,
        /// Sees the command's stdout as it passes (`--results`).
        tap: Option<StdoutTap>,
        /// Serves the exec ports beside the command (`vexec exec run-PID`).
        server: Option<Arc<dyn Server>>,
    },
    /// A batch run (`vexec run-dir`): the guest runs what its initramfs
    /// holds and reports each program to the sink.
    Batch(Box<dyn BatchSink>),
    /// A persistent VM (`vexec up`): set up the root, then serve commands
    /// on the exec ports until stopped (a signal, or `vexec down`).
    Serve {
        setup: Box<Setup>,
        /// The VM's own setup and teardown commands.
        hooks: Box<crate::protocol::Hooks>,
        server: Arc<dyn Server>,
    },
}

/// Whoever serves a VM's exec ports on the host (a persistent VM's, or a
/// one-shot run's beside its command).
pub trait Server: Send + Sync {
    /// The guest serves: the host ends of its exec ports (as many as
    /// [`QemuConfig::exec_port_fds`]) and of its QEMU guest agent port,
    /// and QEMU's pid.
    fn serving(&self, ports: Vec<UnixStream>, qga: Option<UnixStream>, qemu_pid: u32);
}

/// The host ends of a persistent VM's ports, until the guest serves them.
pub type ServeEnds = (Vec<UnixStream>, Option<UnixStream>);

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

/// Where a batch run's reports go, as they arrive.
pub trait BatchSink: Send {
    /// The next program starts.
    fn begin(&mut self, name: &str);
    fn stdout(&mut self, data: &[u8]);
    fn stderr(&mut self, data: &[u8]);
    /// The current program ended (guest clock).
    fn exited(&mut self, exit: &Exit, uptime_ms: u64);
    /// A piece of the GCOV archive.
    fn coverage(&mut self, data: &[u8]);
}

/// How the run ended.
#[derive(Debug)]
pub enum Outcome {
    /// A batch run finished every program.
    Finished,
    Exited(Exit),
    TimedOut(Duration),
    Interrupted(i32),
    /// The VM failed before the command finished; the text explains.
    Failed(String),
    /// KVM did not boot the kernel; rerun with TCG.
    KvmBroken(String),
    /// A saved guest could not be restored (a damaged or unloadable
    /// state, a guest that does not answer): nothing ran, so the machine
    /// may be booted instead.
    RestoreFailed(String),
    /// The share devices plugged in after a save or restore could not be
    /// added, or the guest never saw them: nothing ran, so the machine may
    /// be booted with its devices instead.
    PlugFailed(String),
    /// The kernel stalled (a CPU stuck) before the agent reported in:
    /// nothing ran yet, so the machine may be started again.
    BootStalled(String),
    /// QEMU crashed under KVM after the command had started: KVM is broken
    /// here, but the command is not rerun (it may have done half its work).
    KvmCrashed(String),
}

/// When things happened, for `-v`.
#[derive(Debug, Default, Clone)]
pub struct Timings {
    pub spawned: Option<Instant>,
    pub ready: Option<Instant>,
    /// The guest was restored from a snapshot, not booted.
    pub restored: bool,
    /// How long saving the booted guest took (the guest stood still).
    pub saving: Option<Duration>,
    pub guest_ready_ms: u64,
    pub guest_started_ms: Option<u64>,
    pub guest_exited_ms: Option<u64>,
    pub ended: Option<Instant>,
    /// QEMU's peak resident memory, KiB.
    pub qemu_peak_rss_kib: Option<u64>,
    /// Guest RAM held in the session's memfd at the end, KiB (restored
    /// pages the guest never touched count here, not in QEMU's RSS).
    pub guest_ram_kib: Option<u64>,
    /// The guest's kernel log, when the run asked for it.
    pub kernel_log: Option<Vec<u8>>,
    /// What the guest reported about the command's end.
    pub aftermath: Aftermath,
    /// Where the run stood when it was stopped while the guest still ran.
    pub hang: Option<HangReport>,
    /// The kernel reported a stuck CPU while the command ran (said at
    /// once; kept with `--hang-reports` even if the run then ended well).
    pub stall: Option<HangReport>,
}

/// Where a run stood when it was stopped (timeout, an ignored Ctrl-C).
#[derive(Debug, Clone)]
pub struct HangReport {
    /// The host's side: output written, blocked writes, last message.
    pub host: String,
    /// The agent's answer on the console (its state and the kernel stacks
    /// of every task), or None when it did not answer in time.
    pub guest: Option<String>,
    /// The console's last lines: a guest that does not answer, or never
    /// reported in, left its last words there.
    pub console: Vec<String>,
    /// The guest never reported in: the failure message already said so
    /// with the console's last lines, and this report is only kept.
    pub booting: bool,
}

/// Runs one VM to the end.
pub fn run(mut p: Params, relay: &SignalRelay) -> Result<(Outcome, Timings), VmError> {
    let mut t = Timings::default();
    let (tx, rx) = mpsc::channel::<Event>();
    let (host_con, guest_con) = UnixStream::pair().map_err(spawn_err(&p))?;
    let (host_ctl, guest_ctl) = UnixStream::pair().map_err(spawn_err(&p))?;
    p.qemu.console_fd = guest_con.as_raw_fd();
    p.qemu.control_fd = guest_ctl.as_raw_fd();
    let mut inherit = vec![guest_con.as_raw_fd(), guest_ctl.as_raw_fd()];
    if let Warm::Restore(r) = &p.warm {
        p.qemu.incoming_fd = Some(r.state.as_raw_fd());
        inherit.push(r.state.as_raw_fd());
    }
    let ram = match guest_ram(&p) {
        Ok(ram) => ram,
        Err(why) => return Ok((Outcome::RestoreFailed(why), t)),
    };
    if let Some(ram) = &ram {
        p.qemu.ram_fd = Some(ram.as_raw_fd());
        inherit.push(ram.as_raw_fd());
    }
    // A QMP monitor, to save or restore the guest, or dump its memory on
    // a panic.
    let wants_qmp = p.dump_on_panic.is_some() || !matches!(p.warm, Warm::Cold);
    let qmp_pair = match wants_qmp {
        true => Some(UnixStream::pair().map_err(spawn_err(&p))?),
        false => None,
    };
    if let Some((_, guest_qmp)) = &qmp_pair {
        p.qemu.qmp_fd = Some(guest_qmp.as_raw_fd());
        inherit.push(guest_qmp.as_raw_fd());
    }
    let (serve_ends, guest_ports) = serve_ports(&mut p.qemu).map_err(spawn_err(&p))?;
    inherit.extend(guest_ports.iter().map(|s| s.as_raw_fd()));
    let (daemons, daemon_fds) = start_daemons(&mut p)?;
    inherit.extend(daemon_fds.iter().map(|f| f.as_raw_fd()));
    let args = qemu::argv(&p.qemu);
    if p.print_qemu {
        crate::say!("vexec: {}", qemu::shell_line(&p.qemu.binary, &args));
    }
    let (exit_tx, daemon_tx) = (tx.clone(), Mutex::new(tx.clone()));
    let daemon_tx = Arc::new(daemon_tx);
    let mut vm = Vm::spawn(
        &p.qemu.binary,
        &args,
        &inherit,
        daemons,
        move |status| {
            let _ = exit_tx.send(Event::QemuExited(status));
        },
        move |i, status| {
            let tx = daemon_tx.lock().unwrap_or_else(|p| p.into_inner());
            let _ = tx.send(Event::DaemonExited(i, status));
        },
    )?;
    t.spawned = Some(Instant::now());
    drop(guest_con);
    drop(guest_ctl);
    drop(daemon_fds);
    drop(guest_ports);
    let mut qmp = LazyQmp::new(qmp_pair.map(|(host, guest)| {
        drop(guest);
        host
    }));
    relay.attach(Some(tx.clone()));

    let qemu_errors = read_qemu_errors(vm.stderr.take(), tx.clone());
    let con_tx = tx.clone();
    let console_writer = host_con.try_clone().map_err(spawn_err(&p))?;
    let (tail, _con_thread) =
        console::spawn_reader(host_con, p.verbose, p.console_log.take(), move |e| {
            let _ = con_tx.send(Event::Console(e));
        });
    let ctl_writer = Arc::new(Mutex::new(host_ctl.try_clone().map_err(spawn_err(&p))?));
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
    read_control(host_ctl, tx.clone(), outputs, Arc::clone(&progress));
    drop(tx);

    let cx = event_loop::Context {
        ctl: &ctl_writer,
        tail: &tail,
        qemu_errors: &qemu_errors,
        vm: &vm,
        progress: &progress,
        console: console_writer,
        qmp: &mut qmp,
        serve_ends: Some(serve_ends),
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

/// Reads the guest's messages on a thread until the channel closes:
/// output is written at once (in order with everything else the guest
/// says), the rest goes to the event loop.
pub(crate) fn read_control(
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

/// Forwards vexec's stdin to the guest until end of file.
pub(crate) fn pump_stdin(w: Arc<Mutex<UnixStream>>) {
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
