//! What the loop says while a run goes on: a stuck CPU reported by the
//! guest kernel, and where the run stands when asked (SIGQUIT).

use crate::vm::accel::Accel;

use super::super::console;
use super::super::outcome::HangReport;
use super::super::params::Job;
use super::{HANG_CONSOLE_LINES, Loop, Phase};

/// Console lines shown with a stall warning.
const STALL_LINES: usize = 15;

impl Loop<'_, '_> {
    /// The guest kernel says a CPU stopped making progress while the
    /// command runs (a soft lockup, an RCU stall): said at once, with the
    /// console's last lines, and kept as a hang report. The run goes on:
    /// a stall can clear by itself, and `--timeout` ends one that does not.
    pub(super) fn stalled_while_running(&mut self, line: &str) {
        if self.t.stall.is_some() {
            return;
        }
        let console = self.cx.tail.last(HANG_CONSOLE_LINES);
        crate::say!(
            "vexec: warning: the guest kernel reports a stuck CPU while the command runs: {line}"
        );
        for l in console.iter().rev().take(STALL_LINES).rev() {
            crate::say!("vexec:   console: {l}");
        }
        // Seen under QEMU 7.2's multi-threaded TCG on loaded hosts: both
        // vCPUs livelocked while a BPF tracepoint was attached.
        if self.p.qemu.accel == Accel::Tcg && !self.p.qemu.tcg_single && self.p.qemu.cpus > 1 {
            crate::say!(
                "vexec:   under TCG on a loaded host this can be QEMU's multi-threaded TCG: if it recurs, try --tcg-threads single"
            );
        }
        if self.p.timeout.is_none() {
            crate::say!(
                "vexec:   the run goes on; it has no --timeout, so a guest that stays stuck is stopped only by you (kill -QUIT {} shows where it stands)",
                std::process::id()
            );
        }
        self.t.stall = Some(HangReport {
            host: format!("the guest kernel reported a stuck CPU while the command ran: {line}"),
            guest: None,
            console,
            booting: false,
        });
    }

    /// SIGQUIT: print where the run stands (the host's view and the
    /// console's last lines at once, the guest agent's own report when it
    /// answers), without ending it.
    pub(super) fn report_on_demand(&mut self) {
        crate::say!("vexec: where the run stands (SIGQUIT; the run goes on):");
        crate::say!("vexec:   host: {}", self.cx.progress.describe());
        for l in self.cx.tail.last(STALL_LINES) {
            crate::say!("vexec:   console: {l}");
        }
        let answers = self.phase == Phase::Running
            && !matches!(self.p.job, Job::Batch(_))
            && self.reporting.is_none();
        if answers {
            console::request_report(&mut self.cx.console);
            self.report_asked = true;
        }
    }

    /// The guest agent's answer to a SIGQUIT.
    pub(super) fn print_guest_report(&self, guest: &str) {
        for l in guest.lines() {
            crate::say!("vexec:   guest: {l}");
        }
    }
}
