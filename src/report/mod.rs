//! What the user is told about how a run ended: its exit status, the
//! words for its outcome, OOM kills and cut output, a hang report, kernel
//! reports, and the -v timing breakdown.

pub mod oops;
pub mod programs;
pub mod record;
pub mod results;
pub mod tap;

use std::path::Path;
use std::time::{Duration, Instant};

use crate::host::outcome;

use crate::host::outcome::{Outcome, Timings};
use crate::protocol::Exit;
use crate::status::{STATUS_FAILED, STATUS_TIMEOUT};

/// How the session ended, in words (for run.json).
pub(crate) fn outcome_words(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Finished => "finished".into(),
        Outcome::Exited(Exit::Code(c)) => format!("exited with status {c}"),
        Outcome::Exited(Exit::Signal(n)) => format!("killed by signal {n}"),
        Outcome::Exited(Exit::NotStarted { message, .. }) => format!("not started: {message}"),
        Outcome::TimedOut(d) => format!("timed out after {}", humantime::format_duration(*d)),
        Outcome::Interrupted(n) => format!("interrupted by signal {n}"),
        Outcome::Failed(m)
        | Outcome::BootStalled(m)
        | Outcome::RestoreFailed(m)
        | Outcome::PlugFailed(m) => {
            format!("failed: {m}")
        }
        Outcome::KvmBroken(m) | Outcome::KvmCrashed(m) => format!("KVM failed: {m}"),
    }
}

/// Says what the exit status alone does not: the guest's OOM killer ended
/// the command, or output was cut after the grace period.
/// `memory` is the guest's, as given to `--memory`; `grace` is the
/// `--output-grace` the run had.
pub(crate) fn report_aftermath(
    a: &crate::protocol::Aftermath,
    outcome: &Outcome,
    verbose: bool,
    memory: &str,
    grace: std::time::Duration,
) {
    let killed = matches!(outcome, Outcome::Exited(Exit::Signal(libc::SIGKILL)));
    if !a.oom_kills.is_empty() && (killed || verbose) {
        crate::say!(
            "vexec: the guest ran out of memory; its OOM killer killed {} process{} (give it more with --memory, now {}):",
            a.oom_kills.len(),
            if a.oom_kills.len() == 1 { "" } else { "es" },
            memory
        );
        for line in &a.oom_kills {
            crate::say!("vexec:   {line}");
        }
    }
    // Shown even with -q: output was lost.
    if a.output_cut {
        crate::say!(
            "vexec: warning: output was still open {} after the command exited (a background process holds its stdout or stderr); the rest was not kept (--output-grace DURATION waits longer)",
            humantime::format_duration(grace)
        );
    }
}

/// Says where a stopped run stood, host and guest, so a hang can be told
/// apart from a slow command.
pub(crate) fn report_hang(h: &outcome::HangReport) {
    if h.booting {
        return;
    }
    crate::say!("vexec: where the run stood when it was stopped:");
    crate::say!("vexec:   host: {}", h.host);
    match &h.guest {
        Some(g) => {
            for line in g.lines() {
                crate::say!("vexec:   guest: {line}");
            }
        }
        None => {
            crate::say!(
                "vexec:   guest: no answer on its console within 3s (its kernel may be stuck); its console's last lines:"
            );
            for line in h.console.iter().rev().take(15).rev() {
                crate::say!("vexec:   console: {line}");
            }
        }
    }
}

/// Writes the report into a new file in `dir` (`--hang-reports`).
pub(crate) fn keep_hang_report(
    dir: &Path,
    h: &outcome::HangReport,
    argv: &[std::ffi::OsString],
    kernel: &Path,
) {
    let text = format!(
        "command: {}\nkernel: {}\nhost: {}\nguest:\n{}\nconsole (last lines):\n{}\n",
        argv.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" "),
        kernel.display(),
        h.host,
        h.guest.as_deref().unwrap_or("(no answer on the console)\n"),
        h.console.join("\n")
    );
    let written = std::fs::create_dir_all(dir).and_then(|_| {
        let f = tempfile::Builder::new()
            .prefix("hang-")
            .suffix(".txt")
            .tempfile_in(dir)?;
        std::fs::write(f.path(), &text)?;
        f.keep().map_err(|e| e.error)
    });
    match written {
        Ok((_, path)) => crate::say!("vexec: report kept in {}", path.display()),
        Err(e) => crate::say!(
            "vexec: warning: keeping the report in {}: {e}",
            dir.display()
        ),
    }
}

/// Prints the kernel's reports after the command's output.
pub(crate) fn report_splats(splats: &[oops::Splat], failing: bool) {
    crate::say!(
        "vexec: the kernel logged {} report{} during the run{}:",
        splats.len(),
        if splats.len() == 1 { "" } else { "s" },
        if failing {
            " (--fail-on-oops: exit status 1)"
        } else {
            ""
        }
    );
    for s in splats {
        crate::say!("{}", s.text);
    }
}

/// Maps how the session ended to vexec's exit status, telling the user why
/// when it was not the command's own doing.
pub(crate) fn status_of(outcome: &Outcome) -> i32 {
    match outcome {
        Outcome::Finished => 0,
        Outcome::Exited(Exit::Code(c)) => *c,
        Outcome::Exited(Exit::Signal(n)) => 128 + *n,
        Outcome::Exited(Exit::NotStarted { status, message }) => {
            crate::say!("{message}");
            *status
        }
        Outcome::TimedOut(d) => {
            crate::say!(
                "vexec: timed out after {}; the command was stopped with its VM",
                humantime::format_duration(*d)
            );
            STATUS_TIMEOUT
        }
        Outcome::Interrupted(sig) => 128 + *sig,
        Outcome::Failed(msg)
        | Outcome::BootStalled(msg)
        | Outcome::RestoreFailed(msg)
        | Outcome::PlugFailed(msg) => {
            crate::say!("vexec: error: {msg}");
            STATUS_FAILED
        }
        Outcome::KvmBroken(why) => {
            crate::say!("vexec: error: KVM failed: {why}");
            STATUS_FAILED
        }
        Outcome::KvmCrashed(why) => {
            crate::say!(
                "vexec: error: {why}\nvexec: KVM is unreliable on this host: later runs use TCG until it reboots (--accel kvm forces KVM); run the command again (it was not rerun because it had started)"
            );
            STATUS_FAILED
        }
    }
}

pub(crate) fn print_timings(prep: Duration, t: &Timings, t0: Instant) {
    let ms = |d: Duration| d.as_millis();
    let (Some(spawned), Some(ready)) = (t.spawned, t.ready) else {
        return;
    };
    let host_to_ready = ready - spawned;
    let guest_ready = Duration::from_millis(t.guest_ready_ms);
    let qemu_start = host_to_ready.saturating_sub(guest_ready);
    // A restored guest's boot happened when it was saved.
    let mut start_words = if t.restored {
        format!("restore {}ms", ms(host_to_ready))
    } else {
        format!(
            "qemu start {}ms, kernel boot to agent {}ms",
            ms(qemu_start),
            t.guest_ready_ms
        )
    };
    // The guest's clock stood still while it was saved.
    let saving = t.saving.unwrap_or_default();
    if t.saving.is_some() {
        start_words.push_str(&format!(", save {}ms", ms(saving)));
    }
    let started = t.guest_started_ms.unwrap_or(t.guest_ready_ms);
    let exited = t.guest_exited_ms.unwrap_or(started);
    let teardown = t
        .ended
        .map(|e| e.saturating_duration_since(ready))
        .unwrap_or_default()
        .saturating_sub(Duration::from_millis(
            exited.saturating_sub(t.guest_ready_ms),
        ))
        .saturating_sub(saving);
    crate::say!(
        "vexec: timings: host prep {}ms, {start_words}, agent to command {}ms, command {}ms, teardown {}ms, total {}ms",
        ms(prep),
        started.saturating_sub(t.guest_ready_ms),
        exited.saturating_sub(started),
        ms(teardown),
        ms(t0.elapsed())
    );
    if let Some(kib) = t.qemu_peak_rss_kib {
        let ram = t.guest_ram_kib.map_or(String::new(), |r| {
            format!(" (guest RAM in vexec's memfd: {} MiB)", r / 1024)
        });
        crate::say!("vexec: QEMU peak RSS {} MiB{ram}", kib / 1024);
    }
}
