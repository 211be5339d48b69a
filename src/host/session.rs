//! The host end of one run: starts the VM, answers the agent, pumps stdio,
//! forwards signals, enforces deadlines, and says how the run ended.

use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{self, Exec, Exit, GuestMsg, HostMsg, Setup, VERSION};
use crate::vm::qemu::{self, Backend, QemuConfig};
use crate::vm::virtiofsd::{Daemon, DaemonSpec};
use crate::vm::{Vm, VmError};

use super::console::{self, ConsoleEvent};
use super::terminal;

/// How long vexec waits after QEMU exits for the rest of the guest's
/// messages (and vice versa).
const SETTLE: Duration = Duration::from_secs(1);
/// How long the guest command gets to exit after a forwarded Ctrl-C.
const INTERRUPT_GRACE: Duration = Duration::from_secs(3);

/// Something that happened during the run.
#[derive(Debug)]
pub enum Event {
    Guest(GuestMsg),
    ControlClosed,
    QemuExited(i32),
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
    /// Installs handlers for SIGINT, SIGTERM, SIGHUP and SIGWINCH. Without
    /// a session, a signal other than SIGWINCH ends vexec at once with 128+N.
    pub fn install() -> std::io::Result<Self> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGWINCH};
        let relay = SignalRelay::default();
        let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP, SIGWINCH])?;
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

    fn attach(&self, tx: Option<Sender<Event>>) {
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
}

/// What a session has the guest do.
pub enum Job {
    /// Set up the root described by `Setup`, run one command.
    Command { setup: Box<Setup>, exec: Box<Exec> },
    /// A batch run (`vexec run-dir`): the guest runs what its initramfs
    /// holds and reports each program to the sink.
    Batch(Box<dyn BatchSink>),
}

impl Job {
    fn exec(&self) -> Option<&Exec> {
        match self {
            Job::Command { exec, .. } => Some(exec),
            Job::Batch(_) => None,
        }
    }
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
}

/// When things happened, for `-v`.
#[derive(Debug, Default, Clone)]
pub struct Timings {
    pub spawned: Option<Instant>,
    pub ready: Option<Instant>,
    pub guest_ready_ms: u64,
    pub guest_started_ms: Option<u64>,
    pub guest_exited_ms: Option<u64>,
    pub ended: Option<Instant>,
    /// QEMU's peak resident memory, KiB.
    pub qemu_peak_rss_kib: Option<u64>,
    /// The guest's kernel log, when the run asked for it.
    pub kernel_log: Option<Vec<u8>>,
}

/// Writes to vexec's own stdout (1) or stderr (2), ignoring errors (a
/// closed pipe must not stop the run).
pub fn write_fd(fd: i32, data: &[u8]) {
    // SAFETY: fd 1/2 stay open for vexec's lifetime; ManuallyDrop keeps them.
    let mut f = ManuallyDrop::new(unsafe { File::from_raw_fd(fd) });
    let _ = f.write_all(data);
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
    // A QMP monitor, only to dump memory on a panic.
    let qmp_pair = match &p.dump_on_panic {
        Some(_) => Some(UnixStream::pair().map_err(spawn_err(&p))?),
        None => None,
    };
    if let Some((_, guest_qmp)) = &qmp_pair {
        p.qemu.qmp_fd = Some(guest_qmp.as_raw_fd());
        inherit.push(guest_qmp.as_raw_fd());
    }
    let (daemons, daemon_fds) = start_daemons(&mut p)?;
    inherit.extend(daemon_fds.iter().map(|f| f.as_raw_fd()));
    let args = qemu::argv(&p.qemu);
    if p.print_qemu {
        eprintln!("vexec: {}", qemu::shell_line(&p.qemu.binary, &args));
    }
    let exit_tx = tx.clone();
    let mut vm = Vm::spawn(&p.qemu.binary, &args, &inherit, daemons, move |status| {
        let _ = exit_tx.send(Event::QemuExited(status));
    })?;
    t.spawned = Some(Instant::now());
    drop(guest_con);
    drop(guest_ctl);
    drop(daemon_fds);
    let host_qmp = qmp_pair.map(|(host, guest)| {
        drop(guest);
        host
    });
    relay.attach(Some(tx.clone()));

    let qemu_errors = Arc::new(Mutex::new(String::new()));
    if let Some(err) = vm.stderr.take() {
        let (buf, tx) = (Arc::clone(&qemu_errors), tx.clone());
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
    let con_tx = tx.clone();
    let (tail, _con_thread) =
        console::spawn_reader(host_con, p.verbose, p.console_log.take(), move |e| {
            let _ = con_tx.send(Event::Console(e));
        });
    let ctl_writer = Arc::new(Mutex::new(host_ctl.try_clone().map_err(spawn_err(&p))?));
    {
        let tx = tx.clone();
        let mut reader = host_ctl;
        std::thread::spawn(move || {
            loop {
                match protocol::read_frame::<GuestMsg>(&mut reader) {
                    Ok(Some(m)) => {
                        if tx.send(Event::Guest(m)).is_err() {
                            return;
                        }
                    }
                    _ => {
                        let _ = tx.send(Event::ControlClosed);
                        return;
                    }
                }
            }
        });
    }
    drop(tx);

    let mut outcome = event_loop(&mut p, &rx, &ctl_writer, &mut t, &tail, &qemu_errors, &vm);
    if let (Some(path), Some(qmp), Outcome::Failed(msg)) =
        (&p.dump_on_panic, host_qmp, &mut outcome)
        && msg.starts_with("the guest kernel panicked")
    {
        let result = crate::vm::qmp::Qmp::connect(qmp, Duration::from_secs(120))
            .and_then(|mut q| crate::vm::qmp::dump_guest_memory(&mut q, path));
        msg.push_str(&match result {
            Ok(()) => format!(
                "\nguest memory dumped to {} (ELF core; open with drgn or crash)",
                path.display()
            ),
            Err(e) => format!("\nthe memory dump to {} failed: {e}", path.display()),
        });
    }
    relay.attach(None);
    t.qemu_peak_rss_kib = vm.peak_rss_kib();
    drop(vm);
    t.ended = Some(Instant::now());
    Ok((outcome, t))
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

fn send(w: &Arc<Mutex<UnixStream>>, m: &HostMsg) -> std::io::Result<()> {
    let mut s = w.lock().unwrap_or_else(|p| p.into_inner());
    protocol::write_frame(&mut *s, m)
}

/// Forwards vexec's stdin to the guest until end of file.
fn pump_stdin(w: Arc<Mutex<UnixStream>>) {
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

#[derive(PartialEq)]
enum Phase {
    Booting,
    Running,
}

fn event_loop(
    p: &mut Params,
    rx: &Receiver<Event>,
    ctl: &Arc<Mutex<UnixStream>>,
    t: &mut Timings,
    tail: &console::ConsoleTail,
    qemu_errors: &Mutex<String>,
    vm: &Vm,
) -> Outcome {
    let start = t.spawned.unwrap_or_else(Instant::now);
    let boot_limit = p.kvm_probe.unwrap_or(p.boot_timeout);
    let mut deadline = Some(start + boot_limit);
    let mut phase = Phase::Booting;
    let mut panic_line: Option<String> = None;
    let mut qemu_status: Option<i32> = None;
    let mut ctl_closed = false;
    let mut interrupted: Option<i32> = None;
    // Raw mode on the host terminal while an interactive command runs;
    // restored when the loop ends, however it ends.
    let mut _raw: Option<terminal::RawMode> = None;

    let failure = |panic_line: &Option<String>, status: Option<i32>| -> String {
        let mut msg = if let Some(line) = panic_line {
            format!("the guest kernel panicked: {line}")
        } else if let Some(err) = tail.agent_errors().last() {
            format!("the guest could not start the command: {err}")
        } else if let Some(s) = status {
            format!("QEMU exited (status {s}) before the command finished")
        } else {
            "the guest closed the control channel before the command finished".to_string()
        };
        let errs = qemu_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .trim()
            .to_string();
        if !errs.is_empty() {
            msg.push_str(&format!("\nQEMU said:\n{errs}"));
        }
        for e in vm.daemon_errors() {
            msg.push_str(&format!("\n{e}"));
        }
        // The console tail explains a panic or a silent death; an agent
        // error already says what went wrong.
        let lines = tail.last(25);
        if !lines.is_empty() && (panic_line.is_some() || tail.agent_errors().is_empty()) {
            msg.push_str("\nlast console lines:\n");
            msg.push_str(&lines.join("\n"));
        }
        msg
    };

    loop {
        // Once QEMU is gone and the channel drained, the run is over.
        if qemu_status.is_some() && ctl_closed {
            // Under a KVM probe, QEMU dying before init reports in (an
            // assertion on MSRs, an emulation failure) condemns KVM, not
            // the kernel; a panic is the kernel's own doing.
            if p.kvm_probe.is_some()
                && phase == Phase::Booting
                && panic_line.is_none()
                && vm.daemon_errors().is_empty()
            {
                let errs = qemu_errors.lock().unwrap_or_else(|p| p.into_inner());
                let last = errs
                    .lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or("");
                return Outcome::KvmBroken(format!(
                    "QEMU exited (status {}) while booting: {last}",
                    qemu_status.unwrap_or_default()
                ));
            }
            return Outcome::Failed(failure(&panic_line, qemu_status));
        }
        let ev = match deadline {
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(sig) = interrupted {
                        return Outcome::Interrupted(sig);
                    }
                    if qemu_status.is_some() || ctl_closed || panic_line.is_some() {
                        return Outcome::Failed(failure(&panic_line, qemu_status));
                    }
                    return match phase {
                        Phase::Booting if p.kvm_probe.is_some() => Outcome::KvmBroken(format!(
                            "the kernel did not reach init within {}s under KVM",
                            boot_limit.as_secs()
                        )),
                        Phase::Booting => Outcome::Failed(format!(
                            "the guest did not report in within {}s of starting (raise --boot-timeout if this machine is very slow)\nlast console lines:\n{}",
                            boot_limit.as_secs(),
                            tail.last(25).join("\n")
                        )),
                        Phase::Running => Outcome::TimedOut(p.timeout.unwrap_or_default()),
                    };
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Outcome::Failed(failure(&panic_line, qemu_status));
                }
            },
            None => match rx.recv() {
                Ok(ev) => ev,
                Err(_) => return Outcome::Failed(failure(&panic_line, qemu_status)),
            },
        };
        match ev {
            Event::Guest(GuestMsg::Ready {
                version,
                release: _,
                uptime_ms,
            }) => {
                t.ready = Some(Instant::now());
                t.guest_ready_ms = uptime_ms;
                if version != VERSION {
                    return Outcome::Failed(format!(
                        "the guest agent speaks protocol {version}, this vexec {VERSION}: vexec-agent beside vexec comes from another build; reinstall vexec (both executables)"
                    ));
                }
                if let Job::Command { setup, exec } = &p.job {
                    let sent = send(ctl, &HostMsg::Setup((**setup).clone()))
                        .and_then(|_| send(ctl, &HostMsg::Exec((**exec).clone())));
                    if sent.is_err() {
                        continue; // QEMU exiting; its event explains.
                    }
                    // Keys go to the guest's terminal as they are typed.
                    if exec.tty.as_ref().is_some_and(|t| t.stdin) && terminal::is_tty(0) {
                        _raw = terminal::RawMode::enter();
                    }
                    pump_stdin(Arc::clone(ctl));
                }
                phase = Phase::Running;
                deadline = p.timeout.map(|d| Instant::now() + d);
            }
            Event::Guest(GuestMsg::Started { uptime_ms }) => t.guest_started_ms = Some(uptime_ms),
            Event::Guest(GuestMsg::Stdout(d)) => match &mut p.job {
                Job::Batch(sink) => sink.stdout(&d),
                Job::Command { .. } => write_fd(1, &d),
            },
            Event::Guest(GuestMsg::Stderr(d)) => match &mut p.job {
                Job::Batch(sink) => sink.stderr(&d),
                Job::Command { .. } => write_fd(2, &d),
            },
            Event::Guest(GuestMsg::KernelLog(d)) => t.kernel_log = Some(d),
            Event::Guest(GuestMsg::Begin { name }) => {
                if let Job::Batch(sink) = &mut p.job {
                    sink.begin(&name);
                }
            }
            Event::Guest(GuestMsg::Coverage(d)) => {
                if let Job::Batch(sink) = &mut p.job {
                    sink.coverage(&d);
                }
            }
            Event::Guest(GuestMsg::Finished) => {
                t.guest_exited_ms = None;
                return match interrupted {
                    Some(sig) => Outcome::Interrupted(sig),
                    None => Outcome::Finished,
                };
            }
            Event::Guest(GuestMsg::Exited { exit, uptime_ms })
                if matches!(p.job, Job::Batch(_)) =>
            {
                if let Job::Batch(sink) = &mut p.job {
                    sink.exited(&exit, uptime_ms);
                }
            }
            Event::Guest(GuestMsg::Exited { exit, uptime_ms }) => {
                t.guest_exited_ms = Some(uptime_ms);
                return match interrupted {
                    Some(sig) => Outcome::Interrupted(sig),
                    None => Outcome::Exited(exit),
                };
            }
            Event::Guest(GuestMsg::Error(e)) => {
                return Outcome::Failed(format!("the guest could not start the command: {e}"));
            }
            Event::ControlClosed => {
                ctl_closed = true;
                deadline = Some(Instant::now() + SETTLE);
            }
            Event::QemuExited(status) => {
                qemu_status = Some(status);
                deadline = Some(Instant::now() + SETTLE);
            }
            Event::Console(ConsoleEvent::Panic(line)) => {
                panic_line = Some(line);
                // panic=-1 resets the guest and QEMU exits; do not wait long.
                deadline = Some(Instant::now() + SETTLE * 2);
            }
            Event::KvmError(line) => {
                // Outside a probe, QEMU exits next and its stderr explains.
                if p.kvm_probe.is_some() && phase == Phase::Booting {
                    return Outcome::KvmBroken(line);
                }
            }
            Event::Signal(libc::SIGWINCH) => {
                if p.job.exec().is_some_and(|e| e.tty.is_some())
                    && phase == Phase::Running
                    && let Some((rows, cols)) = terminal::window_size(&[0, 1, 2])
                {
                    let _ = send(ctl, &HostMsg::WindowSize { rows, cols });
                }
            }
            Event::Signal(sig) => {
                // A batch guest takes no signals: stopping means stopping it.
                if phase == Phase::Booting
                    || interrupted.is_some()
                    || matches!(p.job, Job::Batch(_))
                {
                    return Outcome::Interrupted(sig);
                }
                interrupted = Some(sig);
                let _ = send(ctl, &HostMsg::Signal(sig));
                deadline = Some(Instant::now() + INTERRUPT_GRACE);
            }
        }
    }
}
