//! How a run failed, in words: QEMU's exit, a panic, an agent error, a
//! daemon's death, with what QEMU, the daemons and the console said.

use super::super::outcome::Outcome;
use super::Loop;

impl Loop<'_, '_> {
    /// QEMU exited and the channel is drained.
    pub(super) fn qemu_gone(&self) -> Outcome {
        if self.p.kvm_probe.is_none() || self.panic_line.is_some() {
            return self.failed();
        }
        let errs = self
            .cx
            .qemu_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let status = self.qemu_status.unwrap_or_default();
        // Under a KVM probe, QEMU dying before anything of the user's ran
        // (an assertion on MSRs, an emulation failure; seen too when the
        // first run's save resumed the guest) condemns KVM, not the
        // kernel, and the run goes on under TCG; a panic is the kernel's
        // own doing.
        // A daemon's complaints as QEMU dies under it are its reaction,
        // not a cause: only a daemon that died first speaks against KVM.
        if !self.user_work_began && self.daemon_died.is_none() {
            let last = errs.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("");
            return Outcome::KvmBroken(format!(
                "QEMU exited (status {status}) before the command started: {last}"
            ));
        }
        // KVM that boots Linux may still abort QEMU later (seen: an MSR
        // assertion in kvm.c seconds into the command).
        let kvm_line = errs.lines().find(|l| l.contains("kvm")).map(str::trim);
        match kvm_line {
            Some(line) => Outcome::KvmCrashed(format!(
                "QEMU exited (status {status}) under KVM while the command ran: {line}"
            )),
            None => {
                // failed() reads the same errors: let go of them first.
                drop(errs);
                self.failed()
            }
        }
    }

    pub(super) fn failed(&self) -> Outcome {
        Outcome::Failed(self.failure())
    }

    /// What went wrong, with what QEMU, the daemons and the console said.
    pub(super) fn failure(&self) -> String {
        let headline = if let Some(line) = &self.panic_line {
            format!("the guest kernel panicked: {line}")
        } else if let Some(err) = self.cx.tail.agent_errors().last() {
            format!("the guest could not start the command: {err}")
        } else if let Some(s) = self.qemu_status {
            format!("QEMU exited (status {s}) before the command finished")
        } else {
            "the guest closed the control channel before the command finished".to_string()
        };
        headline + &self.details()
    }

    /// What QEMU and the daemons said, and the console's last lines when
    /// they explain more than an agent error does.
    pub(super) fn details(&self) -> String {
        let tail = self.cx.tail;
        let mut msg = String::new();
        let errs = self
            .cx
            .qemu_errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .trim()
            .to_string();
        if !errs.is_empty() {
            msg.push_str(&format!("\nQEMU said:\n{errs}"));
        }
        // A daemon's complaints after QEMU went away are only its reaction.
        if self.qemu_status.is_none() || self.daemon_died.is_some() {
            for e in self.cx.vm.daemon_errors() {
                msg.push_str(&format!(
                    "\n{}",
                    daemon_words(&e, self.daemon_died.is_some() || self.p.verbose)
                ));
            }
        }
        // The console tail explains a panic or a silent death; an agent
        // error already says what went wrong.
        let lines = tail.last(25);
        if !lines.is_empty() && (self.panic_line.is_some() || tail.agent_errors().is_empty()) {
            msg.push_str("\nlast console lines:\n");
            msg.push_str(&lines.join("\n"));
        }
        msg
    }

    /// Says which share's daemon died and what that means.
    pub(super) fn daemon_death(&self, i: usize, status: i32) -> String {
        let what = match self.cx.vm.daemon_source(i) {
            Some(src) if i == 0 => format!("the guest's root ({})", src.display()),
            Some(src) => src.display().to_string(),
            None => format!("share {i}"),
        };
        format!(
            "virtiofsd serving {what} ended ({}) while the guest ran; the guest can no longer reach those files",
            crate::vm::child::describe_status(status)
        )
    }
}

/// What a daemon printed, for a failed run's message: whole when it
/// explains the failure (the daemon died) or with `-v`; otherwise its own
/// noise (a daemon complains when the guest goes away under it) in one
/// line that says how to see it.
fn daemon_words(said: &str, whole: bool) -> String {
    let (who, text) = said.split_once(": ").unwrap_or(("a daemon", said));
    let lines = text.lines().filter(|l| !l.trim().is_empty()).count();
    if whole || lines == 0 {
        return said.to_string();
    }
    format!(
        "({who} logged {lines} line{} of its own; -v shows {})",
        if lines == 1 { "" } else { "s" },
        if lines == 1 { "it" } else { "them" }
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_daemons_noise_is_one_line_unless_it_explains() {
        let said = "virtiofsd for /: virtio_loop: Unexpected poll revents 11\nvirtio_loop: Unexpected poll revents 11";
        assert_eq!(
            super::daemon_words(said, false),
            "(virtiofsd for / logged 2 lines of its own; -v shows them)"
        );
        assert_eq!(super::daemon_words(said, true), said);
    }
}
