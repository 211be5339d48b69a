//! Kernel matrices: a 3-kernel run with one failing kernel (summary, JUnit,
//! JSON, exit status), shards, and patterns/sets over the kernel store.

mod common;

use std::process::{Command, Stdio};

use common::*;

fn bare() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
    c.env_remove("VEXEC_KERNEL").stdin(Stdio::null());
    c
}

#[test]
fn three_kernels_one_failing() {
    let dir = workdir("matrix");
    let (junit, json) = (
        dir.path().join("report.xml"),
        dir.path().join("report.json"),
    );
    let kernels = [kernel("5.10"), kernel("6.1"), kernel("6.12")];
    let mut c = bare();
    c.env("XDG_CACHE_HOME", cache_dir())
        .args([
            "--accel",
            "tcg",
            "-q",
            "-j",
            "2",
            "--matrix-output",
            "grouped",
        ])
        .arg("-k")
        .arg(format!("{},{}", kernels[0].display(), kernels[1].display()))
        .arg("-k")
        .arg(&kernels[2])
        .arg("--junit")
        .arg(&junit)
        .arg("--json")
        .arg(&json)
        .args([
            "--",
            "sh",
            "-c",
            "uname -r; case $(uname -r) in 6.12*) exit 3;; esac",
        ]);
    let out = c.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let rels: Vec<String> = kernels.iter().map(|k| release_of(k)).collect();
    let text = stdout(&out);
    for r in &rels {
        assert!(
            text.contains(&format!("{r}\n")),
            "stdout:\n{text}\nstderr:\n{err}"
        );
    }
    // The summary names each kernel with its result.
    assert!(err.contains("matrix summary"), "{err}");
    assert!(
        err.contains(&format!("{}  ", rels[2])) && err.contains("FAIL (3)"),
        "{err}"
    );
    assert!(err.contains("2/3 passed"), "{err}");

    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(xml.starts_with("<?xml"), "{xml}");
    assert!(
        xml.contains(r#"<testsuites name="vexec" tests="3" failures="1" errors="0""#),
        "{xml}"
    );
    assert_eq!(xml.matches("<testcase ").count(), 3, "{xml}");
    assert_eq!(xml.matches("<failure").count(), 1, "{xml}");
    assert!(
        xml.contains(&format!(r#"<testcase name="{}""#, rels[2])),
        "{xml}"
    );

    let doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(doc["passed"], 2);
    assert_eq!(doc["failed"], 1);
    let results: Vec<&str> = doc["kernels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["result"].as_str().unwrap())
        .collect();
    assert_eq!(results, ["pass", "pass", "fail"]);
}

#[test]
fn shards_cover_every_kernel_exactly_once() {
    let all: Vec<String> = (1..=7).map(|i| format!("/k/vmlinuz-{i}")).collect();
    let mut seen = Vec::new();
    for i in 1..=3 {
        let out = bare()
            .arg("-k")
            .arg(all.join(","))
            .args(["--dry-run", "--shard", &format!("{i}/3"), "--", "true"])
            .output()
            .unwrap();
        assert_ok(&out);
        let got: Vec<String> = stdout(&out).lines().map(str::to_string).collect();
        assert!(!got.is_empty());
        seen.extend(got);
    }
    seen.sort();
    let mut want = all.clone();
    want.sort();
    assert_eq!(seen, want);
}

#[test]
fn patterns_and_sets_over_the_kernel_store() {
    // A kernel store holding two of the test kernels.
    let home = workdir("store");
    let store = home.path().join("vexec/kernels");
    for name in ["5.10", "6.1"] {
        std::fs::create_dir_all(store.join(name)).unwrap();
        std::os::unix::fs::symlink(
            kernels_dir().join(name).join("boot"),
            store.join(name).join("boot"),
        )
        .unwrap();
    }
    let proj = home.path().join("proj");
    std::fs::create_dir_all(&proj).unwrap();
    std::fs::write(
        proj.join(".vexec.toml"),
        "[kernel-sets]\nold = [\"5.*\"]\nboth = [\"@old\", \"6.1.*\"]\n",
    )
    .unwrap();
    let list = |k: &str| {
        let out = bare()
            .current_dir(&proj)
            .env("XDG_CACHE_HOME", home.path())
            .args(["-k", k, "--dry-run", "--shard", "1/1", "--", "true"])
            .output()
            .unwrap();
        assert_ok(&out);
        stdout(&out)
            .lines()
            .map(|l| release_of(std::path::Path::new(l)))
            .collect::<Vec<_>>()
    };
    let r510 = release_of(&kernel("5.10"));
    let r61 = release_of(&kernel("6.1"));
    assert_eq!(list("6.1.*"), std::slice::from_ref(&r61));
    assert_eq!(list("@old"), std::slice::from_ref(&r510));
    let mut both = list("@both");
    both.sort();
    assert_eq!(both, [r510, r61]);
    let out = bare()
        .current_dir(&proj)
        .env("XDG_CACHE_HOME", home.path())
        .args(["-k", "7.*", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(125));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no kernel matches `7.*`"));
}
