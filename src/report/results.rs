//! Test cases parsed from a run (`--results`): counted and listed on
//! stderr, and a failed case fails the run even when the command passed.

use std::sync::{Arc, Mutex};

use super::tap::{Format, Parser, Results};
use crate::host::output::StdoutTap;

/// At most this many failed cases are named on stderr.
const MAX_LISTED: usize = 50;

/// The parser the command's stdout streams through.
pub struct Collector {
    format: Format,
    parser: Arc<Mutex<Parser>>,
}

impl Collector {
    /// A collector for `format`.
    pub fn new(format: Format) -> Collector {
        Collector {
            format,
            parser: Arc::new(Mutex::new(Parser::new(format))),
        }
    }

    /// What the session feeds the command's stdout to.
    pub fn tap(&self) -> StdoutTap {
        self.parser.clone()
    }

    /// The cases of stdout and of the kernel log (read as KTAP after a
    /// header, as KUnit prints it). `ended_early` says why a run stopped
    /// before its output ended, if it did.
    pub fn finish(&self, kernel_log: Option<&[u8]>, ended_early: Option<&str>) -> Results {
        let mut lock = self.parser.lock().unwrap_or_else(|p| p.into_inner());
        let parser = std::mem::replace(&mut *lock, Parser::new(self.format));
        let mut results = parser.finish(ended_early);
        if let Some(log) = kernel_log {
            let mut k = Parser::new(Format::Auto);
            k.feed_kernel_log(log);
            results.cases.extend(k.finish(ended_early).cases);
        }
        results
    }
}

/// Tells the cases on stderr; returns the run's exit status, 1 when a case
/// failed and the command itself exited 0.
pub fn settle(results: &Results, status: i32) -> i32 {
    let n = results.counts();
    if n.passed + n.failed + n.skipped == 0 {
        crate::say!("vexec: results: no KTAP or TAP test results in the output");
        return status;
    }
    crate::say!(
        "vexec: results: {} passed, {} failed, {} skipped",
        n.passed,
        n.failed,
        n.skipped
    );
    let failed: Vec<_> = results.reported().filter(|c| c.status.failed()).collect();
    for c in failed.iter().take(MAX_LISTED) {
        let status = c.status.name().to_uppercase();
        if c.reason.is_empty() {
            crate::say!("vexec:   {status} {}", c.path);
        } else {
            crate::say!("vexec:   {status} {} ({})", c.path, c.reason);
        }
    }
    if failed.len() > MAX_LISTED {
        crate::say!("vexec:   and {} more", failed.len() - MAX_LISTED);
    }
    if status == 0 && n.failed > 0 {
        crate::say!(
            "vexec: exit status 1: {} test case{} failed, although the command exited 0",
            n.failed,
            if n.failed == 1 { "" } else { "s" }
        );
        return 1;
    }
    status
}
