//! Test results per case (`--results`): a real TAP producer (Perl's
//! Test::More), 50 MB of TAP passing through unchanged, and a matrix of two
//! kernels where one case differs (summary, JUnit, JSON).

mod common;

use std::process::{Command, Stdio};

use common::*;

const K: &str = "6.1";

/// Test::More with a subtest, a skip, a TODO and a failure.
const TEST_MORE: &str = r#"use Test::More;
ok(1, "first");
subtest "grp" => sub { plan tests => 2; ok(1, "in1"); ok(0, "in2"); };
SKIP: { skip "no hw", 1; ok(1, "hw"); }
TODO: { local $TODO = "later"; ok(0, "td"); }
done_testing();
"#;

#[test]
fn test_more_cases_are_counted_and_a_failed_one_fails_the_run() {
    // Test::More exits with its failure count: run it as a script that
    // ignores that, to see the results alone fail the run.
    let args = ["-c", "perl -e \"$1\"; exit 0", "sh", TEST_MORE];
    let local = Command::new("sh").args(args).output().unwrap();
    let mut c = vexec_saying(K);
    c.args(["--results", "tap", "--", "sh"]).args(args);
    let out = run(c);
    // Output as it comes locally, byte for byte.
    assert_eq!(out.stdout, local.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("vexec: results: 2 passed, 1 failed, 2 skipped"),
        "{err}"
    );
    assert!(err.contains("vexec:   FAIL grp.in2"), "{err}");
    assert!(err.contains("although the command exited 0"), "{err}");
}

#[test]
fn fifty_megabytes_of_tap_pass_through_unchanged() {
    // 500,000 result lines of 100 bytes, one failing at the end.
    let script = "awk 'BEGIN { print \"TAP version 13\"; print \"1..500001\"; \
        for (i = 1; i <= 500000; i++) printf \"ok %d - %0*d\\n\", i, 93 - length(i), i; \
        print \"not ok 500001 - last\" }'";
    let local = Command::new("sh").args(["-c", script]).output().unwrap();
    assert!(local.stdout.len() > 50_000_000);
    let mut c = vexec_saying(K);
    c.args(["--results", "auto", "--", "sh", "-c", script]);
    let out = run(c);
    assert!(
        out.stdout == local.stdout,
        "stdout differs from the local run"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("results: 500000 passed, 1 failed, 0 skipped"),
        "{err}"
    );
}

/// KTAP whose cases depend on the kernel: newer_feature is skipped before
/// 6.12, regression fails on 6.12.
const BY_KERNEL: &str = r##"echo "KTAP version 1"; echo "1..3"; echo "ok 1 common"
case "$(uname -r)" in 6.12.*) echo "ok 2 feature";; *) echo "ok 2 feature # SKIP needs 6.12";; esac
case "$(uname -r)" in 6.12.*) echo "# broke here"; echo "not ok 3 regression";; *) echo "ok 3 regression";; esac"##;

#[test]
fn a_matrix_reports_each_case_and_the_ones_that_differ() {
    let dir = workdir("results-matrix");
    let (junit, json) = (dir.path().join("r.xml"), dir.path().join("r.json"));
    let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
    c.env("XDG_CACHE_HOME", cache_dir())
        .env_remove("VEXEC_KERNEL")
        .stdin(Stdio::null())
        .args(["--accel", "tcg", "-q", "--results", "ktap"])
        .arg("-k")
        .arg(format!(
            "{},{}",
            kernel("6.1").display(),
            kernel("6.12").display()
        ))
        .arg("--junit")
        .arg(&junit)
        .arg("--json")
        .arg(&json)
        .args(["--", "sh", "-c", BY_KERNEL]);
    let out = run(c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("CASES (pass/fail/skip)"), "{err}");
    assert!(
        err.contains("test cases that differ between kernels"),
        "{err}"
    );
    let rows: Vec<Vec<&str>> = err
        .lines()
        .map(|l| l.split_whitespace().collect())
        .filter(|w: &Vec<&str>| {
            w.first()
                .is_some_and(|c| *c == "feature" || *c == "regression")
        })
        .collect();
    assert_eq!(
        rows,
        [
            vec!["feature", "skip", "pass"],
            vec!["regression", "pass", "fail"]
        ],
        "{err}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.contains(r#"tests="6" failures="1""#), "{xml}");
    assert!(
        xml.contains(r#"<skipped message="skip: needs 6.12"/>"#),
        "{xml}"
    );
    assert!(xml.contains("broke here"), "{xml}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let counts = &doc["kernels"][1]["case_counts"];
    assert_eq!(counts["failed"], 1, "{doc}");
    assert_eq!(doc["kernels"][1]["cases"][2]["status"], "fail", "{doc}");
}

#[test]
fn ktap_in_the_kernel_log_counts_as_kunit_prints_it() {
    if !is_root() {
        eprintln!("skipped: only root may write to the guest's /dev/kmsg");
        return;
    }
    // What a KUnit suite prints, one kernel log record per line.
    let script = r#"for l in "KTAP version 1" "1..2" "    KTAP version 1" "    # Subtest: s" \
        "    1..1" "    ok 1 inner" "ok 1 s" "not ok 2 other"; do echo "$l" > /dev/kmsg; done"#;
    let mut c = vexec_saying(K);
    c.args(["--results", "auto", "--", "sh", "-c", script]);
    let out = run(c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("results: 1 passed, 1 failed, 0 skipped"),
        "{err}"
    );
    assert!(err.contains("FAIL other"), "{err}");
    assert_eq!(stdout(&out), "");

    // A matrix's reports (--json makes one of any run) have them too.
    let dir = workdir("klog");
    let json = dir.path().join("r.json");
    let mut c = vexec_saying(K);
    c.args(["--results", "auto", "--json"]).arg(&json);
    c.args(["--", "sh", "-c", script]);
    assert_eq!(run(c).status.code(), Some(1));
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let cases = doc["kernels"][0]["cases"].as_array().unwrap();
    let got: Vec<(&str, &str)> = (cases.iter())
        .map(|c| (c["path"].as_str().unwrap(), c["status"].as_str().unwrap()))
        .collect();
    assert!(
        got.contains(&("s.inner", "pass")) && got.contains(&("other", "fail")),
        "{doc}"
    );
}

#[test]
fn a_kselftest_programs_ktap_is_read_per_case() {
    // Built from Debian's linux-source by scripts/fetch-test-kernels.sh.
    let dir = kernels_dir().join("kselftest");
    if !dir.join("timerfd").exists() {
        eprintln!("skipped: no kselftest programs (scripts/fetch-test-kernels.sh)");
        return;
    }
    if !is_root() {
        eprintln!("skipped: the time namespace selftests need root in the guest");
        return;
    }
    // Two programs, one plan each, as a selftest runner script runs them.
    let mut c = vexec_saying(K);
    c.args(["--results", "ktap", "--"])
        .arg("sh")
        .arg("-c")
        .arg(r#""$1"/timens && "$1"/timerfd"#)
        .arg("sh")
        .arg(&dir);
    let out = run(c);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    // vexec's counts are the sum of kselftest's own "# Totals" lines.
    let (mut pass, mut skip) = (0, 0);
    for l in stdout(&out).lines() {
        if let Some(t) = l.strip_prefix("# Totals: ") {
            for kv in t.split_whitespace() {
                let (k, v) = kv.split_once(':').unwrap();
                let v: usize = v.parse().unwrap();
                match k {
                    "pass" => pass += v,
                    "skip" => skip += v,
                    _ => assert_eq!(v, 0, "{t}"),
                }
            }
        }
    }
    assert!(pass >= 10, "{}", stdout(&out));
    assert!(
        err.contains(&format!("results: {pass} passed, 0 failed, {skip} skipped")),
        "{err}"
    );
}

/// Opt-in (VEXEC_SLOW_TESTS=1, a kernel build of ~10 minutes on 2 cores, or
/// VEXEC_KUNIT_TREE=DIR naming a tree built with the .kunitconfig below):
/// `vexec build --kunitconfig` builds KUnit suites in, and a run on that
/// tree reports each of their cases from the kernel log, as kunit.py does.
#[test]
fn kunit_built_in_is_reported_per_case() {
    let prebuilt = std::env::var_os("VEXEC_KUNIT_TREE").map(std::path::PathBuf::from);
    if prebuilt.is_none() && std::env::var_os("VEXEC_SLOW_TESTS").is_none() {
        eprintln!(
            "skipped: set VEXEC_SLOW_TESTS=1 (builds a KUnit kernel) or VEXEC_KUNIT_TREE=DIR"
        );
        return;
    }
    let work = workdir("kunit");
    let tree = match prebuilt {
        Some(t) => t,
        None => {
            let tree = linux_source(work.path());
            let kunitconfig = work.path().join("kunitconfig");
            std::fs::write(
                &kunitconfig,
                "CONFIG_KUNIT=y\nCONFIG_KUNIT_EXAMPLE_TEST=y\nCONFIG_LIST_KUNIT_TEST=y\n",
            )
            .unwrap();
            let out = std::process::Command::new(env!("CARGO_BIN_EXE_vexec"))
                .arg("build")
                .arg("--kunitconfig")
                .arg(&kunitconfig)
                .arg(&tree)
                .output()
                .unwrap();
            assert_ok(&out);
            tree
        }
    };
    let report = work.path().join("report.json");
    let mut c = vexec_in(&cache_dir());
    c.args(["--accel", "tcg", "-k"])
        .arg(&tree)
        .args(["--results", "ktap", "--json"])
        .arg(&report)
        .args(["--", "true"]);
    let out = run(c);
    let err = String::from_utf8_lossy(&out.stderr);
    // The example suite skips one case by design; nothing fails.
    assert_eq!(out.status.code(), Some(0), "{err}");
    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let cases = doc["kernels"][0]["cases"].as_array().unwrap();
    let names: Vec<&str> = cases.iter().map(|c| c["path"].as_str().unwrap()).collect();
    assert!(names.iter().any(|n| n.starts_with("example")), "{names:?}");
    assert!(
        names.iter().any(|n| n.starts_with("list-kunit-test")),
        "{names:?}"
    );
    assert!(cases.len() > 30, "{} cases", cases.len());
}
