//! What a results parse gives: each case with its status, and counts.

use serde::{Deserialize, Serialize};

/// How one case ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Pass,
    Fail,
    Skip,
    /// Failed as expected.
    Xfail,
    /// Not expected to pass yet (TAP's TODO): not a failure either way.
    Todo,
    Timeout,
    Error,
    /// Promised by a plan, never reported.
    Missing,
    /// A line that claimed to be a result but could not be read as one.
    ParseError,
}

impl Status {
    /// The word for it in messages and reports.
    pub fn name(self) -> &'static str {
        match self {
            Status::Pass => "pass",
            Status::Fail => "fail",
            Status::Skip => "skip",
            Status::Xfail => "xfail",
            Status::Todo => "todo",
            Status::Timeout => "timeout",
            Status::Error => "error",
            Status::Missing => "missing",
            Status::ParseError => "parse error",
        }
    }

    /// Whether this case makes the run fail.
    pub fn failed(self) -> bool {
        matches!(
            self,
            Status::Fail | Status::Timeout | Status::Error | Status::Missing | Status::ParseError
        )
    }
}

/// One test case.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Case {
    /// The names of its enclosing suites and its own, joined by dots.
    pub path: String,
    pub status: Status,
    /// The directive's reason, the parse error, or why it is missing.
    pub reason: String,
    /// Diagnostic lines that came before its result line.
    pub diagnostics: Vec<String>,
    /// Whether it had subtests (a suite's own result).
    pub suite: bool,
}

/// Cases by outcome.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub passed: usize,
    pub failed: usize,
    pub skipped: usize,
}

/// The cases of a run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Results {
    pub cases: Vec<Case>,
}

impl Results {
    /// The cases a report lists: leaves, plus suites whose own failure no
    /// failed subtest explains (a suite that crashed after passing ones).
    pub fn reported(&self) -> impl Iterator<Item = &Case> {
        self.cases.iter().filter(|c| {
            !c.suite
                || (c.status.failed()
                    && !self
                        .cases
                        .iter()
                        .any(|d| d.status.failed() && d.path.starts_with(&format!("{}.", c.path))))
        })
    }

    /// Passed, failed and skipped among the reported cases (TODO counts
    /// as skipped, an expected failure as passed).
    pub fn counts(&self) -> Counts {
        let mut n = Counts::default();
        for c in self.reported() {
            match c.status {
                s if s.failed() => n.failed += 1,
                Status::Skip | Status::Todo => n.skipped += 1,
                _ => n.passed += 1,
            }
        }
        n
    }
}
