//! The session's event loop: guest messages, QEMU's and the daemons' exits,
//! console events, host signals and deadlines, until the run has an
//! outcome. When a run is stopped while the guest still runs (timeout, a
//! Ctrl-C the command ignores), the agent is first asked over the console
//! where it stands, so a hang leaves a trail.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::protocol::{GuestMsg, HostMsg, VERSION};
use crate::vm::Vm;
use crate::vm::qmp::LazyQmp;

use super::console::{ConsoleEvent, ConsoleTail};
use super::events::Event;
use super::outcome::{HangReport, Outcome, Timings};
use super::output::{self, Progress, send};
use super::params::{Job, Params, Warm};
use super::stop::{self, OnSignal};
use super::warm;
use crate::sys::terminal;

mod deadlines;
mod failure;
mod reports;

/// How long vexec waits after QEMU exits for the rest of the guest's
/// messages (and vice versa).
const SETTLE: Duration = Duration::from_secs(1);
/// How long a daemon's exit may precede the command's end that explains it
/// (the guest powering off) before it counts as the run's failure.
const DAEMON_SETTLE: Duration = Duration::from_millis(500);
/// How long the agent gets to answer a report request on the console.
const REPORT_WAIT: Duration = Duration::from_secs(3);
/// Console lines a hang report keeps.
const HANG_CONSOLE_LINES: usize = 60;
/// The boot deadline moves by the time QEMU waited for a host CPU, up to
/// this many times the deadline itself.
const STARVATION_CAP: u32 = 2;

#[derive(PartialEq)]
enum Phase {
    Booting,
    Running,
}

/// What the loop reads from besides its events.
pub struct Context<'a> {
    pub ctl: &'a Arc<Mutex<UnixStream>>,
    pub tail: &'a ConsoleTail,
    pub qemu_errors: &'a Mutex<String>,
    pub vm: &'a Vm,
    pub progress: &'a Progress,
    /// Where report requests are written (the console's host end).
    pub console: UnixStream,
    /// The machine's monitor (saving, restoring, adding devices).
    pub qmp: &'a mut LazyQmp,
    /// A persistent VM's ports, handed to its server once the guest serves.
    pub serve_ends: Option<super::params::ServeEnds>,
    /// The guest's RAM, when it is shared memory of the session's.
    pub ram: Option<&'a std::fs::File>,
}

/// The loop's state.
struct Loop<'a, 'p> {
    p: &'p mut Params,
    t: &'p mut Timings,
    cx: Context<'a>,
    boot_limit: Duration,
    deadline: Option<Instant>,
    phase: Phase,
    panic_line: Option<String>,
    qemu_status: Option<i32>,
    ctl_closed: bool,
    interrupted: Option<i32>,
    /// A daemon that died while QEMU ran: what it served and how it ended.
    daemon_died: Option<String>,
    /// The exit status of that daemon (above 128: killed by a signal).
    daemon_status: Option<i32>,
    /// The outcome waiting for the agent's report.
    reporting: Option<Outcome>,
    /// A report was asked for with SIGQUIT (the run goes on).
    report_asked: bool,
    /// The guest said `Mounted`: from then on the user's setup commands or
    /// command may run, so this attempt is never booted again.
    user_work_began: bool,
    /// Raw mode on the host terminal while an interactive command runs.
    raw: Option<terminal::RawMode>,
    /// Until the command has started: when its setup (the mounts) counts
    /// as stuck, and QEMU's CPU wait when it began.
    setup: Option<(Instant, Duration)>,
    /// When `--timeout` ends the run.
    run_deadline: Option<Instant>,
}

/// Runs the loop until the session has an outcome.
pub fn run(p: &mut Params, t: &mut Timings, cx: Context<'_>, rx: &Receiver<Event>) -> Outcome {
    let boot_limit = p.kvm_probe.unwrap_or(p.boot_timeout);
    let start = t.spawned.unwrap_or_else(Instant::now);
    let mut l = Loop {
        p,
        t,
        cx,
        boot_limit,
        deadline: Some(start + boot_limit),
        phase: Phase::Booting,
        panic_line: None,
        qemu_status: None,
        ctl_closed: false,
        interrupted: None,
        daemon_died: None,
        daemon_status: None,
        reporting: None,
        report_asked: false,
        user_work_began: false,
        raw: None,
        setup: None,
        run_deadline: None,
    };
    let outcome = match l.restore() {
        Some(o) => o,
        None => l.run(rx),
    };
    drop(l.raw.take());
    outcome
}

impl Loop<'_, '_> {
    fn run(&mut self, rx: &Receiver<Event>) -> Outcome {
        loop {
            // Once QEMU is gone and the channel drained, the run is over.
            if self.qemu_status.is_some() && self.ctl_closed {
                return self.qemu_gone();
            }
            let ev = match self.deadline {
                Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                    Ok(ev) => ev,
                    Err(RecvTimeoutError::Timeout) => match self.on_deadline() {
                        Some(o) => return o,
                        None => continue,
                    },
                    Err(RecvTimeoutError::Disconnected) => return self.failed(),
                },
                None => match rx.recv() {
                    Ok(ev) => ev,
                    Err(_) => return self.failed(),
                },
            };
            if let Some(o) = self.handle(ev) {
                return o;
            }
        }
    }

    fn handle(&mut self, ev: Event) -> Option<Outcome> {
        match ev {
            Event::Guest(m) => self.on_guest(m),
            Event::ControlError(e) => Some(Outcome::Failed(format!(
                "the guest sent a message vexec cannot read ({e}); vexec-agent beside vexec comes from another build? reinstall vexec (both executables)"
            ))),
            Event::ControlClosed => {
                self.ctl_closed = true;
                self.deadline = Some(Instant::now() + SETTLE);
                None
            }
            Event::QemuExited(status) => {
                self.qemu_status = Some(status);
                // QEMU killed, and a daemon that ended on its own just
                // before: the daemon was reacting to QEMU's socket closing
                // (the two deaths are seen by separate threads, in either
                // order), so QEMU's death is the one to report.
                if status > 128 && self.daemon_status.is_some_and(|s| s <= 128) {
                    self.daemon_died = None;
                }
                self.deadline = Some(Instant::now() + SETTLE);
                None
            }
            Event::DaemonExited(i, status) => {
                // After QEMU is gone its daemons end too: that says nothing.
                if self.qemu_status.is_none() && self.daemon_died.is_none() {
                    self.daemon_status = Some(status);
                    self.daemon_died = Some(self.daemon_death(i, status));
                    self.deadline = Some(Instant::now() + DAEMON_SETTLE);
                }
                None
            }
            Event::Console(ConsoleEvent::Panic(line)) => {
                self.panic_line = Some(line);
                // panic=-1 resets the guest and QEMU exits; do not wait long.
                self.deadline = Some(Instant::now() + SETTLE * 2);
                None
            }
            // Before the agent reports in nothing has run: a stuck CPU
            // ends this boot so that it can be tried again. Later, the
            // kernel's report is the command's business (a splat).
            Event::Console(ConsoleEvent::Stall(line)) if self.phase == Phase::Booting => {
                self.t.hang = Some(HangReport {
                    host: format!("the kernel stalled while booting: {line}"),
                    guest: None,
                    console: self.cx.tail.last(HANG_CONSOLE_LINES),
                    booting: true,
                });
                Some(Outcome::BootStalled(format!(
                    "the guest kernel stalled while booting ({line})\nlast console lines:\n{}",
                    self.cx.tail.last(25).join("\n")
                )))
            }
            Event::Console(ConsoleEvent::Stall(line)) => {
                self.stalled_while_running(&line);
                None
            }
            Event::Console(ConsoleEvent::Report(text)) if self.reporting.is_none() => {
                if std::mem::take(&mut self.report_asked) {
                    self.print_guest_report(&text);
                }
                None
            }
            Event::Console(ConsoleEvent::Report(text)) => {
                let o = self.reporting.take()?;
                self.t.hang = Some(HangReport {
                    host: self.cx.progress.describe(),
                    guest: Some(text),
                    console: self.cx.tail.last(HANG_CONSOLE_LINES),
                    booting: false,
                });
                Some(o)
            }
            Event::KvmError(line) => {
                // Outside a probe, QEMU exits next and its stderr explains.
                (self.p.kvm_probe.is_some() && !self.user_work_began)
                    .then_some(Outcome::KvmBroken(line))
            }
            Event::Signal(sig) => self.on_signal(sig),
        }
    }

    fn on_guest(&mut self, m: GuestMsg) -> Option<Outcome> {
        match m {
            GuestMsg::Ready {
                version,
                release,
                uptime_ms,
            } => {
                let ready = super::params::Ready {
                    version,
                    release,
                    uptime_ms,
                };
                return self.on_ready(&ready);
            }
            GuestMsg::Started { uptime_ms } => {
                self.t.guest_started_ms = Some(uptime_ms);
                let server = match &self.p.job {
                    Job::Serve { server, .. } => Some(server),
                    Job::Command { server, .. } => server.as_ref(),
                    Job::Batch(_) => None,
                };
                if let (Some(server), Some((ports, qga))) = (server, self.cx.serve_ends.take()) {
                    server.serving(ports, qga, self.cx.vm.pid() as u32);
                }
                // Only now: an attempt booted again (a stall, devices not
                // seen) never started its command, so no input read for it
                // is lost; the one attempt that runs the command reads it.
                self.start_input();
            }
            // vexec's mounting is done: the user's setup commands and the
            // command run under --timeout alone, and never again.
            GuestMsg::Mounted { .. } => {
                self.user_work_began = true;
                self.setup = None;
                if self.interrupted.is_none() && self.reporting.is_none() {
                    self.deadline = self.run_deadline;
                }
            }
            GuestMsg::KernelLog(d) => self.t.kernel_log = Some(d),
            GuestMsg::InputClosed => output::close_own_stdin(),
            GuestMsg::Aftermath(a) => self.t.aftermath = a,
            GuestMsg::Stdout(d) => self.batch(|s| s.stdout(&d)),
            GuestMsg::Stderr(d) => self.batch(|s| s.stderr(&d)),
            GuestMsg::Begin { name } => self.batch(|s| s.begin(&name)),
            GuestMsg::Coverage(d) => self.batch(|s| s.coverage(&d)),
            GuestMsg::Exited { exit, uptime_ms } => {
                if let Job::Batch(sink) = &mut self.p.job {
                    sink.exited(&exit, uptime_ms);
                    return None;
                }
                self.t.guest_exited_ms = Some(uptime_ms);
                // The command ended on its own after a daemon died: its
                // status stands (it saw the I/O errors), but say why.
                if let Some(why) = &self.daemon_died {
                    crate::say!("vexec: warning: {why}");
                }
                return Some(match self.interrupted {
                    Some(sig) => Outcome::Interrupted(sig),
                    None => Outcome::Exited(exit),
                });
            }
            GuestMsg::Finished => {
                return Some(match self.interrupted {
                    Some(sig) => Outcome::Interrupted(sig),
                    None => Outcome::Finished,
                });
            }
            GuestMsg::Error(e) if e.starts_with(crate::protocol::PLUG_FAILED) => {
                return Some(Outcome::PlugFailed(e));
            }
            GuestMsg::Error(e) => {
                return Some(Outcome::Failed(format!(
                    "the guest could not start the command: {e}"
                )));
            }
        }
        None
    }

    /// Hands a batch message to the sink (a command's output never gets
    /// here: the control reader writes it).
    fn batch(&mut self, f: impl FnOnce(&mut dyn super::params::BatchSink)) {
        if let Job::Batch(sink) = &mut self.p.job {
            f(sink.as_mut());
        }
    }

    fn on_ready(&mut self, ready: &super::params::Ready) -> Option<Outcome> {
        self.t.ready = Some(Instant::now());
        self.t.guest_ready_ms = ready.uptime_ms;
        if ready.version != VERSION {
            return Some(Outcome::Failed(format!(
                "the guest agent speaks protocol {}, this vexec {VERSION}: vexec-agent beside vexec comes from another build; reinstall vexec (both executables)",
                ready.version
            )));
        }
        if let Warm::Save(saver) = &mut self.p.warm {
            match self.cx.qmp.get(warm::QMP_WAIT) {
                Ok(q) => {
                    let t = Instant::now();
                    saver.save(q, ready, self.cx.ram);
                    self.t.saving = Some(t.elapsed());
                }
                Err(e) => crate::say!(
                    "vexec: warning: the booted guest was not saved for warm starts: {e}; the run goes on"
                ),
            }
        }
        // A restored guest has its devices already.
        if !self.t.restored
            && let Some(o) = self.plug_shares()
        {
            return Some(o);
        }
        if !self.send_job() {
            return None; // QEMU exiting; its event explains.
        }
        self.phase = Phase::Running;
        self.run_deadline = self.p.timeout.map(|d| Instant::now() + d);
        self.deadline = self.run_deadline;
        // A batch reports each program; a command, that it started.
        if matches!(self.p.job, Job::Command { .. } | Job::Serve { .. }) {
            // The boot timeout itself, not a KVM probe's shorter limit.
            let setup_until = Instant::now() + self.p.boot_timeout;
            self.setup = Some((setup_until, self.cx.vm.cpu_wait()));
            self.deadline = Some(
                self.run_deadline
                    .map_or(setup_until, |d| d.min(setup_until)),
            );
        }
        None
    }

    /// A restored guest: brought back and given the command, as a booted
    /// one is when it reports ready. Some when the saved state could not be
    /// loaded (nothing ran: the machine may be booted instead).
    fn restore(&mut self) -> Option<Outcome> {
        let Warm::Restore(r) = &self.p.warm else {
            return None;
        };
        let ready = r.ready.clone();
        let limit = self.boot_limit;
        let (fd, shared) = (r.state.as_raw_fd(), r.ram.is_some());
        if let Err(e) = warm::bring_back(self.cx.qmp, fd, shared, limit) {
            // QEMU's own words on why it could not load the state.
            std::thread::sleep(Duration::from_millis(200));
            return Some(Outcome::RestoreFailed(format!("{e}{}", self.details())));
        }
        // Plugged in while it is still paused: the guest finds the devices
        // as soon as it runs, while its setup is on the way.
        if let Some(o) = self.plug_shares() {
            return Some(o);
        }
        if let Err(e) = warm::start(self.cx.qmp) {
            return Some(Outcome::RestoreFailed(format!("{e}{}", self.details())));
        }
        self.t.restored = true;
        self.on_ready(&ready)
    }

    /// Plugs in the share devices of a machine that starts without them
    /// (saved or restored with virtio-fs). Some when that failed.
    fn plug_shares(&mut self) -> Option<Outcome> {
        if !self.p.qemu.plug_shares {
            return None;
        }
        let devices = crate::vm::qemu::plugged_devices(&self.p.qemu);
        let plugged =
            (self.cx.qmp.get(warm::QMP_WAIT)).and_then(|q| crate::vm::snapshot::plug(q, &devices));
        let e = plugged.err()?;
        Some(Outcome::PlugFailed(format!(
            "cannot plug in the virtio-fs devices: {e}{}",
            self.details()
        )))
    }

    /// Sends the command's setup (fresh for this run) and the command;
    /// false when the control port is gone.
    fn send_job(&mut self) -> bool {
        let (setup, then) = match &self.p.job {
            Job::Command { setup, exec, .. } => (setup, HostMsg::Exec((**exec).clone())),
            Job::Serve { setup, hooks, .. } => (setup, HostMsg::Serve((**hooks).clone())),
            Job::Batch(_) => return true,
        };
        let mut setup = (**setup).clone();
        setup.fresh = warm::fresh();
        if self.p.qemu.plug_shares {
            setup.plugged = crate::vm::qemu::plugged_devices(&self.p.qemu).len() as u32;
        }
        if let Some((exec, qga)) = &self.cx.serve_ends {
            setup.served = crate::protocol::ServedPorts {
                exec: exec.len() as u32,
                qga: qga.is_some(),
            };
        }
        let ctl = self.cx.ctl;
        send(ctl, &HostMsg::Setup(setup))
            .and_then(|_| send(ctl, &then))
            .is_ok()
    }

    /// Starts forwarding stdin (and keys, raw, to an interactive command)
    /// once the command runs: one reader of vexec's stdin per run.
    fn start_input(&mut self) {
        let Job::Command { exec, .. } = &self.p.job else {
            return;
        };
        if exec.tty.as_ref().is_some_and(|t| t.stdin) && terminal::is_tty(0) {
            self.raw = terminal::RawMode::enter();
        }
        super::input::pump_stdin(Arc::clone(self.cx.ctl));
    }

    fn on_signal(&mut self, sig: i32) -> Option<Outcome> {
        let has_tty = matches!(&self.p.job, Job::Command { exec, .. } if exec.tty.is_some())
            && self.phase == Phase::Running;
        match stop::on_signal(sig, has_tty, self.interrupted.is_some()) {
            OnSignal::Report => self.report_on_demand(),
            OnSignal::Resize { rows, cols } => {
                let _ = send(self.cx.ctl, &HostMsg::WindowSize { rows, cols });
            }
            OnSignal::Ignore => {}
            // A batch guest takes no signals, nor does a booting one:
            // stopping means stopping it.
            _ if self.phase == Phase::Booting || matches!(self.p.job, Job::Batch(_)) => {
                return Some(Outcome::Interrupted(sig));
            }
            OnSignal::EndNow => return Some(Outcome::Interrupted(sig)),
            OnSignal::Forward(grace) => {
                self.interrupted = Some(sig);
                let _ = send(self.cx.ctl, &HostMsg::Signal(sig));
                self.deadline = Some(grace);
            }
        }
        None
    }
}
