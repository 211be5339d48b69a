//! What a batch run (`vexec run-dir`) found, as its record keeps it: each
//! program's result and where the kernel's coverage went.

use std::path::PathBuf;

use serde::Serialize;

/// One program's result.
#[derive(Debug, Clone, Serialize)]
pub struct ProgramResult {
    pub name: String,
    /// pass, fail, "unfinished" (started, then the run stopped) or "not run".
    pub result: &'static str,
    /// The exit code, when it exited.
    pub exit_code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// Why it could not start, when it did not.
    pub error: Option<String>,
    pub duration_ms: u64,
}

impl ProgramResult {
    /// How it ended, in words.
    pub fn words(&self) -> String {
        match (self.exit_code, self.signal, &self.error) {
            (_, _, Some(e)) => e.clone(),
            (Some(c), _, _) => format!("exit {c}"),
            (_, Some(s), _) => format!("killed by signal {s}"),
            _ if self.result == "unfinished" => "did not finish (the run stopped)".into(),
            _ => "not run".into(),
        }
    }
}

/// Where the coverage went, for run.json and the user.
#[derive(Debug, Default, Serialize)]
pub struct Saved {
    /// The .gcda archive.
    pub archive: Option<PathBuf>,
    /// The LCOV tracefile.
    pub lcov: Option<PathBuf>,
    /// Why no LCOV file was made, when none was.
    pub note: Option<String>,
}
