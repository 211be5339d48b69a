//! What a session is asked to do: the machine, the guest's job, and what
//! to do about snapshots.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{Exec, Exit, Setup};
use crate::vm::qemu::QemuConfig;
use crate::vm::virtiofsd::DaemonSpec;

use super::output::StdoutTap;

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
