//! What a batch run reports as it goes: each program's output to vexec's
//! stdout/stderr (and to its files in the output directory), its end, and
//! the summary.

use std::fs::File;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::host::output::write_fd;
use crate::host::params::BatchSink;
use crate::protocol::Exit;
use crate::report::programs::ProgramResult;

/// Everything reported so far.
#[derive(Default)]
pub struct Report {
    pub results: Vec<ProgramResult>,
    /// The GCOV archive, as received.
    pub coverage: Vec<u8>,
    started: Option<Instant>,
    files: Option<(File, File)>,
    /// results/ of the output directory, when there is one.
    results_dir: Option<PathBuf>,
    quiet: bool,
}

impl Report {
    pub fn new(results_dir: Option<PathBuf>, quiet: bool) -> Self {
        Report {
            results_dir,
            quiet,
            ..Default::default()
        }
    }
}

/// The session's handle on a shared [`Report`].
pub struct Sink(pub Arc<Mutex<Report>>);

impl Sink {
    fn report(&self) -> std::sync::MutexGuard<'_, Report> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BatchSink for Sink {
    fn begin(&mut self, name: &str) {
        let mut r = self.report();
        if !r.quiet {
            crate::say!("vexec: ── {name}");
        }
        r.started = Some(Instant::now());
        r.files = r.results_dir.as_ref().and_then(|d| {
            // A name is one path component (it came from a directory listing).
            let dir = d.join(name.replace('/', "_"));
            std::fs::create_dir_all(&dir).ok()?;
            Some((
                File::create(dir.join("stdout")).ok()?,
                File::create(dir.join("stderr")).ok()?,
            ))
        });
        r.results.push(ProgramResult {
            name: name.to_string(),
            result: "unfinished",
            exit_code: None,
            signal: None,
            error: None,
            duration_ms: 0,
        });
    }

    fn stdout(&mut self, data: &[u8]) {
        let _ = write_fd(1, data);
        if let Some((out, _)) = self.report().files.as_mut() {
            let _ = out.write_all(data);
        }
    }

    fn stderr(&mut self, data: &[u8]) {
        let _ = write_fd(2, data);
        if let Some((_, err)) = self.report().files.as_mut() {
            let _ = err.write_all(data);
        }
    }

    fn exited(&mut self, exit: &Exit, _uptime_ms: u64) {
        let mut r = self.report();
        let took = r.started.take().map_or(Duration::ZERO, |s| s.elapsed());
        let dir = r.results_dir.clone();
        r.files = None;
        let quiet = r.quiet;
        let Some(p) = r.results.last_mut() else {
            return;
        };
        p.duration_ms = took.as_millis() as u64;
        match exit {
            Exit::Code(c) => p.exit_code = Some(*c),
            Exit::Signal(s) => p.signal = Some(*s),
            Exit::NotStarted { status, message } => {
                p.exit_code = Some(*status);
                p.error = Some(message.clone());
            }
        }
        p.result = if p.exit_code == Some(0) && p.error.is_none() {
            "pass"
        } else {
            "fail"
        };
        if let Some(d) = dir {
            let _ = std::fs::write(
                d.join(p.name.replace('/', "_")).join("status"),
                format!("{} {}\n", p.result, p.words()),
            );
        }
        if !quiet {
            crate::say!(
                "vexec: {} {}: {}",
                p.result.to_uppercase(),
                p.name,
                p.words()
            );
        }
    }

    fn coverage(&mut self, data: &[u8]) {
        self.report().coverage.extend_from_slice(data);
    }
}

/// Adds the programs that never began (the run stopped early) as not run.
pub fn complete(results: &mut Vec<ProgramResult>, programs: &[String]) {
    for name in programs.iter().skip(results.len()) {
        results.push(ProgramResult {
            name: name.clone(),
            result: "not run",
            exit_code: None,
            signal: None,
            error: None,
            duration_ms: 0,
        });
    }
}

/// The summary table, for stderr.
pub fn summary(results: &[ProgramResult]) -> String {
    let width = results.iter().map(|r| r.name.len()).max().unwrap_or(0);
    let mut s = String::new();
    for r in results {
        s.push_str(&format!(
            "  {:<7} {:<width$}  {:>8.2}s  {}\n",
            r.result.to_uppercase(),
            r.name,
            r.duration_ms as f64 / 1000.0,
            r.words()
        ));
    }
    let failed = results.iter().filter(|r| r.result != "pass").count();
    s.push_str(&format!(
        "  {} passed, {} failed or not run, of {}",
        results.len() - failed,
        failed,
        results.len()
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn results_and_summary() {
        let report = Arc::new(Mutex::new(Report::new(None, true)));
        let mut sink = Sink(Arc::clone(&report));
        sink.begin("01-pass");
        sink.exited(&Exit::Code(0), 1);
        sink.begin("02-fail");
        sink.exited(&Exit::Code(3), 2);
        sink.begin("03-sig");
        sink.exited(&Exit::Signal(9), 3);
        let mut results = report.lock().unwrap().results.clone();
        complete(
            &mut results,
            &["01-pass", "02-fail", "03-sig", "04-late"].map(String::from),
        );
        let words: Vec<(&str, String)> = results.iter().map(|r| (r.result, r.words())).collect();
        assert_eq!(
            words,
            [
                ("pass", "exit 0".to_string()),
                ("fail", "exit 3".into()),
                ("fail", "killed by signal 9".into()),
                ("not run", "not run".into())
            ]
        );
        // Begun, never ended: the run stopped under it.
        sink.begin("05-cut");
        let cut = report.lock().unwrap().results.last().unwrap().clone();
        assert_eq!(
            (cut.result, cut.words()),
            ("unfinished", "did not finish (the run stopped)".to_string())
        );
        let s = summary(&results);
        assert!(
            s.contains("PASS    01-pass") && s.ends_with("1 passed, 3 failed or not run, of 4"),
            "{s}"
        );
    }
}
