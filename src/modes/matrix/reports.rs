//! What a matrix run reports: the summary table on stderr, a JUnit file
//! (one test case per kernel) and a JSON document.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;

use super::KernelResult;

/// The table of kernels, results and times, on stderr.
pub(super) fn print_summary(results: &[KernelResult], total: Duration) {
    let width = results
        .iter()
        .map(|r| r.kernel.len())
        .max()
        .unwrap_or(6)
        .max(6);
    crate::say!("vexec: matrix summary");
    crate::say!("  {:width$}  {:<12}  {:>7}", "KERNEL", "RESULT", "TIME");
    for r in results {
        let result = match r.result {
            "pass" => "pass".to_string(),
            other => format!("{} ({})", other.to_uppercase(), r.status),
        };
        crate::say!(
            "  {:width$}  {:<12}  {:>6.1}s",
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
