//! How a session ended, when things happened, and where a stopped run
//! stood.

use std::time::{Duration, Instant};

use crate::protocol::{Aftermath, Exit};

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
