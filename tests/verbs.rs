//! Every verb answers `--help` with its own usage and examples, at once
//! and without booting anything or running what it wraps (apt-get, git,
//! make); bad verb input is 125.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn vexec(args: &[&str]) -> Output {
    let t = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_vexec"))
        .args(args)
        // A kernel that does not exist: anything that tried to boot fails.
        .env("VEXEC_KERNEL", "/nonexistent/vmlinuz")
        .output()
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "{args:?} took {:?}",
        t.elapsed()
    );
    out
}

#[test]
fn every_verb_has_its_own_help() {
    let verbs: &[(&[&str], &str)] = &[
        (&["kernel", "--help"], "Usage: vexec kernel <COMMAND>"),
        (&["cache", "--help"], "Usage: vexec cache <COMMAND>"),
        (&["cache", "clean", "--help"], "Usage: vexec cache clean"),
        (
            &["kernel", "add", "--help"],
            "Usage: vexec kernel add <PATH>",
        ),
        (
            &["kernel", "fetch", "--help"],
            "Usage: vexec kernel fetch [OPTIONS] <PACKAGE|IMAGE>",
        ),
        (&["kernel", "list", "--help"], "Usage: vexec kernel list"),
        (
            &["kernel", "path", "--help"],
            "Usage: vexec kernel path <RELEASE>",
        ),
        (
            &["kernel", "rm", "--help"],
            "Usage: vexec kernel rm <RELEASE>...",
        ),
        (
            &["run-dir", "--help"],
            "Usage: vexec run-dir [OPTIONS] <DIR>",
        ),
        (
            &["kconfig", "--help"],
            "Usage: vexec kconfig [OPTIONS] [DIR]",
        ),
        (&["build", "--help"], "Usage: vexec build [OPTIONS] [DIR]"),
        (
            &["bisect", "--help"],
            "Usage: vexec bisect [OPTIONS] --good <COMMIT> --bad <COMMIT>",
        ),
        (&["shell", "--help"], "Usage: vexec shell [OPTIONS]"),
        (
            &["completions", "--help"],
            "Usage: vexec completions <SHELL>",
        ),
        (&["manpage", "--help"], "Usage: vexec manpage"),
    ];
    for (args, usage) in verbs {
        let out = vexec(args);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{args:?}: {out:?}");
        assert!(text.contains(usage), "{args:?}:\n{text}");
    }
    for verb in ["kernel", "kconfig", "build", "bisect", "shell", "run-dir"] {
        let out = vexec(&[verb, "--help"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("Example"),
            "{verb} --help has no examples:\n{text}"
        );
    }
}

#[test]
fn the_plain_help_and_the_completions_name_the_verbs() {
    let out = vexec(&["--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for verb in [
        "kernel",
        "run-dir",
        "kconfig",
        "build",
        "bisect",
        "completions",
        "manpage",
    ] {
        assert!(text.contains(&format!("vexec {verb}")), "{verb}:\n{text}");
    }
    let out = vexec(&["completions", "bash"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for word in ["run-dir", "kconfig", "fetch", "--good", "--gcov"] {
        assert!(
            text.contains(word),
            "{word} missing from the bash completions"
        );
    }
}

#[test]
fn bad_verb_input_is_125() {
    for args in [
        &["kernel"][..],
        &["kernel", "frob"],
        &["kernel", "rm"],
        &["completions", "tcsh"],
        &["kconfig", "--frob"],
        &["shell", "ls"],
        &["bisect", "--good", "A", "--", "true"],
    ] {
        let out = vexec(args);
        assert_eq!(out.status.code(), Some(125), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
}
