//! When a deadline passes: the boot deadline (moved by time QEMU waited
//! for a host CPU), the command's setup deadline, `--timeout`, and the
//! outcomes of each (a stall to boot again, a timeout, a hang report).

use std::time::{Duration, Instant};

use super::super::console;
use super::super::outcome::{HangReport, Outcome};
use super::super::params::Job;
use super::{HANG_CONSOLE_LINES, Loop, Phase, REPORT_WAIT, STARVATION_CAP};

impl Loop<'_, '_> {
    /// A deadline passed: the run ends, or first asks the agent where it
    /// stands (returns None then).
    pub(super) fn on_deadline(&mut self) -> Option<Outcome> {
        if let Some(o) = self.reporting.take() {
            self.t.hang = Some(HangReport {
                host: self.cx.progress.describe(),
                guest: None,
                console: self.cx.tail.last(HANG_CONSOLE_LINES),
                booting: false,
            });
            return Some(o);
        }
        if let Some(why) = &self.daemon_died {
            return Some(Outcome::Failed(format!("{why}{}", self.details())));
        }
        if self.qemu_status.is_some() || self.ctl_closed || self.panic_line.is_some() {
            return Some(self.failed());
        }
        if self.phase == Phase::Booting
            && let Some(later) = self.starved_deadline()
        {
            self.deadline = Some(later);
            return None;
        }
        if self.interrupted.is_none()
            && self.run_deadline.is_none_or(|d| d > Instant::now())
            && let Some((until, waited_before)) = self.setup
        {
            return self.setup_overdue(until, waited_before);
        }
        let stopping = match (&self.phase, self.interrupted) {
            (Phase::Running, Some(sig)) => Outcome::Interrupted(sig),
            (Phase::Running, None) => Outcome::TimedOut(self.p.timeout.unwrap_or_default()),
            (Phase::Booting, _) if self.p.kvm_probe.is_some() => {
                return Some(Outcome::KvmBroken(format!(
                    "the kernel did not reach init within {}s under KVM",
                    self.boot_limit.as_secs()
                )));
            }
            (Phase::Booting, _) => {
                // A boot that never ends is a hang too: keep its trail.
                self.t.hang = Some(HangReport {
                    host: format!(
                        "the guest did not report in within {}s",
                        self.boot_limit.as_secs()
                    ),
                    guest: None,
                    console: self.cx.tail.last(HANG_CONSOLE_LINES),
                    booting: true,
                });
                if self.cx.tail.last(1).is_empty() {
                    return Some(self.silent_boot());
                }
                return Some(Outcome::Failed(format!(
                    "the guest did not report in within {}s of starting{} (raise --boot-timeout if this machine is very slow)\nlast console lines:\n{}",
                    self.t
                        .spawned
                        .map_or(self.boot_limit, |t| t.elapsed())
                        .as_secs(),
                    self.waited_words(),
                    self.cx.tail.last(25).join("\n")
                )));
            }
        };
        // Batch guests (and foreign ones) do not answer on the console.
        if matches!(self.p.job, Job::Batch(_)) {
            return Some(stopping);
        }
        console::request_report(&mut self.cx.console);
        self.reporting = Some(stopping);
        self.deadline = Some(Instant::now() + REPORT_WAIT);
        None
    }

    /// A boot deadline that passed while the host was too busy to run the
    /// guest moves by the time QEMU waited for a CPU: an overloaded host
    /// slows a booting guest (under TCG, a vCPU spinning on a lock whose
    /// holder's thread waits for a CPU slows it far more than its share),
    /// it does not stop it. A guest halted or spinning on an idle host is
    /// not moved. None when the deadline stands.
    fn starved_deadline(&mut self) -> Option<Instant> {
        let spawned = self.t.spawned?;
        let waited = self.cx.vm.cpu_wait().min(self.boot_limit * STARVATION_CAP);
        let later = spawned + self.boot_limit + waited;
        if later <= Instant::now() + Duration::from_millis(100) {
            return None;
        }
        if self.p.verbose && self.deadline == Some(spawned + self.boot_limit) {
            crate::say!(
                "vexec: the host is busy: QEMU waited {:.1}s for a CPU; the boot deadline moves by as much as it waits",
                waited.as_secs_f64()
            );
        }
        Some(later)
    }

    /// The command's setup (mounting the host's files) has not finished by
    /// `until`: moved by the time QEMU waited for a CPU since it began, like
    /// the boot deadline; past that it is stuck (seen once: the agent's
    /// first request to a fresh virtiofsd never answered, the agent in
    /// `fuse_get_req` for 150 s). The command has not started, so the
    /// machine may be booted again: ask the agent where it stands first,
    /// for the hang report.
    fn setup_overdue(&mut self, until: Instant, waited_before: Duration) -> Option<Outcome> {
        let waited = self.cx.vm.cpu_wait().saturating_sub(waited_before);
        let later = until + waited.min(self.p.boot_timeout * STARVATION_CAP);
        if later > Instant::now() + Duration::from_millis(100) {
            self.deadline = Some(self.run_deadline.map_or(later, |d| d.min(later)));
            return None;
        }
        self.setup = None;
        let stuck = Outcome::BootStalled(format!(
            "the guest's setup (mounting the host's files) did not finish within {}s of the agent reporting in",
            self.p.boot_timeout.as_secs()
        ));
        console::request_report(&mut self.cx.console);
        self.reporting = Some(stuck);
        self.deadline = Some(Instant::now() + REPORT_WAIT);
        None
    }

    /// How long QEMU waited for a host CPU, for a boot-timeout message.
    /// A boot whose kernel printed nothing at all by the deadline: once in
    /// a few hundred boots on a loaded host, QEMU 7.2's TCG never ran the
    /// kernel past its first instructions (the console stayed empty for
    /// 90 s). Nothing has run in the guest, so the boot may be tried again.
    fn silent_boot(&self) -> Outcome {
        Outcome::BootStalled(format!(
            "the guest kernel printed nothing on its console within {}s of starting{}",
            self.t
                .spawned
                .map_or(self.boot_limit, |t| t.elapsed())
                .as_secs(),
            self.waited_words()
        ))
    }

    fn waited_words(&self) -> String {
        let waited = self.cx.vm.cpu_wait();
        if waited < Duration::from_secs(1) {
            return String::new();
        }
        format!(
            " ({:.0}s of it waiting for a host CPU, which moves the {}s boot deadline, up to {}x)",
            waited.as_secs_f64(),
            self.boot_limit.as_secs(),
            STARVATION_CAP
        )
    }
}
