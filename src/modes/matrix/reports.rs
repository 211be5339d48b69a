//! What a matrix run reports: the summary table on stderr, a JUnit file
//! (one test case per kernel, or per test case and kernel with
//! `--results`) and a JSON document.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::KernelResult;
use crate::report::tap::Status;

/// The table of kernels, results and times, on stderr.
pub(super) fn print_summary(results: &[KernelResult], total: Duration) {
    let width = results
        .iter()
        .map(|r| r.kernel.len())
        .max()
        .unwrap_or(6)
        .max(6);
    crate::say!("vexec: matrix summary");
    let cases = results.iter().any(|r| r.case_counts.is_some());
    let head = if cases {
        "  CASES (pass/fail/skip)"
    } else {
        ""
    };
    crate::say!(
        "  {:width$}  {:<12}  {:>7}{head}",
        "KERNEL",
        "RESULT",
        "TIME"
    );
    for r in results {
        let result = match r.result {
            "pass" => "pass".to_string(),
            other => format!("{} ({})", other.to_uppercase(), r.status),
        };
        let counts = r.case_counts.map_or(String::new(), |n| {
            format!("  {}/{}/{}", n.passed, n.failed, n.skipped)
        });
        crate::say!(
            "  {:width$}  {:<12}  {:>6.1}s{counts}",
            r.kernel,
            result,
            r.duration_s
        );
    }
    let passed = results.iter().filter(|r| r.status == 0).count();
    crate::say!(
        "  {passed}/{} passed in {:.1}s",
        results.len(),
        total.as_secs_f64()
    );
    if cases {
        print_differences(results);
    }
}

/// At most this many differing cases are shown.
const MAX_DIFFERENCES: usize = 50;

/// The cases whose outcome is not the same on every kernel: the question a
/// matrix exists to answer.
fn print_differences(results: &[KernelResult]) {
    let rows = differing_cases(results);
    if rows.is_empty() {
        crate::say!("  every test case has the same outcome on every kernel");
        return;
    }
    let width = rows.iter().map(|(p, _)| p.len()).max().unwrap_or(4).max(4);
    crate::say!("vexec: test cases that differ between kernels");
    let shown = &rows[..rows.len().min(MAX_DIFFERENCES)];
    // Each kernel's column is as wide as its name or its widest status.
    let widths: Vec<usize> = (results.iter().enumerate())
        .map(|(i, r)| {
            let cells = shown.iter().map(|(_, s)| s[i].len());
            cells.max().unwrap_or(0).max(r.kernel.len())
        })
        .collect();
    let line = |first: &str, cells: Vec<&str>| {
        let cells: Vec<String> = (cells.iter().zip(&widths))
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        crate::say!("  {first:width$}  {}", cells.join("  ").trim_end());
    };
    line("CASE", results.iter().map(|r| r.kernel.as_str()).collect());
    for (path, statuses) in shown {
        line(path, statuses.clone());
    }
    if rows.len() > MAX_DIFFERENCES {
        crate::say!("  and {} more", rows.len() - MAX_DIFFERENCES);
    }
}

/// Each case path (in first-seen order) whose status differs between
/// kernels, with its status on each ("-" where a kernel lacks it).
fn differing_cases(results: &[KernelResult]) -> Vec<(String, Vec<&'static str>)> {
    let mut paths: Vec<&str> = Vec::new();
    for r in results {
        for c in r.results.iter().flat_map(|x| x.reported()) {
            if !paths.contains(&c.path.as_str()) {
                paths.push(&c.path);
            }
        }
    }
    paths
        .into_iter()
        .filter_map(|path| {
            let statuses: Vec<&'static str> = results
                .iter()
                .map(|r| {
                    r.results
                        .iter()
                        .flat_map(|x| x.reported())
                        .find(|c| c.path == path)
                        .map_or("-", |c| c.status.name())
                })
                .collect();
            let same = statuses.iter().all(|s| *s == statuses[0]);
            (!same).then(|| (path.to_string(), statuses))
        })
        .collect()
}

/// The command as one line, for the reports.
fn command_line(command: &[OsString]) -> String {
    command
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

/// A JUnit file: one test case per kernel, failures with their output.
pub(super) fn write_junit(
    path: &Path,
    results: &[KernelResult],
    command: &[OsString],
) -> std::io::Result<()> {
    use quick_junit::{NonSuccessKind, Report, TestCase, TestCaseStatus, TestSuite};
    let mut report = Report::new("vexec");
    if results.iter().any(|r| r.results.is_some()) {
        for r in results {
            report.add_test_suite(case_suite(r));
        }
        let xml = report.to_string().map_err(std::io::Error::other)?;
        return std::fs::write(path, xml);
    }
    let mut suite = TestSuite::new(command_line(command));
    for r in results {
        let status = match r.result {
            "pass" => TestCaseStatus::success(),
            "fail" => {
                let mut s = TestCaseStatus::non_success(NonSuccessKind::Failure);
                s.set_message(format!("exit status {}", r.status));
                s
            }
            _ => {
                let mut s = TestCaseStatus::non_success(NonSuccessKind::Error);
                s.set_message("vexec or the VM failed (exit status 125)");
                s
            }
        };
        let mut case = TestCase::new(r.kernel.clone(), status);
        case.set_classname("vexec.kernel")
            .set_time(Duration::from_secs_f64(r.duration_s))
            .set_system_out(String::from_utf8_lossy(&r.stdout).into_owned())
            .set_system_err(String::from_utf8_lossy(&r.stderr).into_owned());
        suite.add_test_case(case);
    }
    report.add_test_suite(suite);
    let xml = report.to_string().map_err(std::io::Error::other)?;
    std::fs::write(path, xml)
}

/// One kernel's test cases as a JUnit suite: classname is the kernel and
/// the case's suite path, skipped cases are skipped, failures carry their
/// reason and diagnostics.
fn case_suite(r: &KernelResult) -> quick_junit::TestSuite {
    use quick_junit::{NonSuccessKind, TestCase, TestCaseStatus, TestSuite};
    let mut suite = TestSuite::new(r.kernel.clone());
    for c in r.results.iter().flat_map(|x| x.reported()) {
        let mut status = match c.status {
            s if s.failed() => TestCaseStatus::non_success(NonSuccessKind::Failure),
            Status::Skip | Status::Todo => TestCaseStatus::skipped(),
            _ => TestCaseStatus::success(),
        };
        let message = if c.reason.is_empty() {
            c.status.name().to_string()
        } else {
            format!("{}: {}", c.status.name(), c.reason)
        };
        match &mut status {
            TestCaseStatus::NonSuccess { .. } => {
                status.set_message(message);
                status.set_description(c.diagnostics.join("\n"));
            }
            TestCaseStatus::Skipped { .. } => {
                status.set_message(message);
            }
            TestCaseStatus::Success { .. } => {}
        }
        let (suite_path, name) = c.path.rsplit_once('.').unwrap_or(("", &c.path));
        let classname = if suite_path.is_empty() {
            r.kernel.clone()
        } else {
            format!("{}.{suite_path}", r.kernel)
        };
        let mut case = TestCase::new(name.to_string(), status);
        case.set_classname(classname);
        if !c.diagnostics.is_empty() && !c.status.failed() {
            case.set_system_out(c.diagnostics.join("\n"));
        }
        suite.add_test_case(case);
    }
    suite
}

/// A JSON document of every kernel's result.
pub(super) fn write_json(
    path: &Path,
    results: &[KernelResult],
    command: &[OsString],
    total: Duration,
) -> std::io::Result<()> {
    #[derive(Serialize)]
    struct Doc<'a> {
        command: String,
        passed: usize,
        failed: usize,
        errors: usize,
        duration_s: f64,
        kernels: &'a [KernelResult],
    }
    let doc = Doc {
        command: command_line(command),
        passed: results.iter().filter(|r| r.result == "pass").count(),
        failed: results.iter().filter(|r| r.result == "fail").count(),
        errors: results.iter().filter(|r| r.result == "error").count(),
        duration_s: total.as_secs_f64(),
        kernels: results,
    };
    std::fs::write(
        path,
        serde_json::to_vec_pretty(&doc).map_err(std::io::Error::other)?,
    )
}
