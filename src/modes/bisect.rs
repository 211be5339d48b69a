//! `vexec bisect --good A --bad B [--build CMD] [RUN OPTIONS] -- CMD...`:
//! finds the first bad commit of the repository in the working directory
//! with `git bisect run`, each step building (in a kernel tree) and then
//! booting the result with vexec to run CMD.
//!
//! Each step is this same program, called back by git as
//! `vexec __bisect-step ...`: a failed build or a kernel that does not boot
//! says "skip" (125), the command's own failure "bad", success "good".

use std::ffi::{OsStr, OsString};
use std::path::Path;
use std::process::{Command, Stdio};

/// What `vexec bisect` was asked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BisectArgs {
    pub good: Vec<OsString>,
    pub bad: OsString,
    /// A shell command that builds each step (default: `make` in a kernel
    /// tree, nothing elsewhere).
    pub build: Option<OsString>,
    /// Options for each run (`-k`, `--accel`, `--timeout`...).
    pub run_options: Vec<OsString>,
    pub command: Vec<OsString>,
}

const USAGE: &str = "usage: vexec bisect --good COMMIT [--good COMMIT...] --bad COMMIT [--build CMD] [RUN OPTIONS] -- COMMAND [ARGS...]";

/// Why a bisection could not be run.
#[derive(Debug, thiserror::Error)]
pub enum BisectError {
    #[error("{0}; {USAGE}")]
    Usage(String),
    #[error("running {what}: {source}; install git")]
    NoGit {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("`git {args}` failed: {stderr}")]
    Git { args: String, stderr: String },
    #[error("vexec bisect must run inside a git repository: {0}")]
    NotARepo(Box<BisectError>),
    #[error(
        "the work tree {0} has uncommitted changes; bisecting checks out other commits, so commit or stash them first"
    )]
    Dirty(String),
    #[error("finding vexec itself: {0}")]
    SelfExe(std::io::Error),
    #[error("the bisection found no single first bad commit (see git's output above)")]
    NoFirstBad,
}

/// Parses the words after `bisect` (or `__bisect-step`).
pub fn parse(args: &[OsString]) -> Result<BisectArgs, BisectError> {
    let mut good = Vec::new();
    let mut bad = None;
    let mut build = None;
    let mut run_options = Vec::new();
    let mut it = args.iter();
    let mut command = Vec::new();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        let mut value = |name: &str| -> Result<OsString, BisectError> {
            match s.strip_prefix(&format!("{name}=")) {
                Some(v) => Ok(v.into()),
                None => it
                    .next()
                    .cloned()
                    .ok_or_else(|| BisectError::Usage(format!("{name} needs a value"))),
            }
        };
        if s == "--" {
            command = it.cloned().collect();
            break;
        } else if s == "--good" || s.starts_with("--good=") {
            good.push(value("--good")?);
        } else if s == "--bad" || s.starts_with("--bad=") {
            bad = Some(value("--bad")?);
        } else if s == "--build" || s.starts_with("--build=") {
            build = Some(value("--build")?);
        } else {
            run_options.push(a.clone());
        }
    }
    let usage = |what: &str| BisectError::Usage(what.into());
    let bad = bad.ok_or_else(|| usage("--bad is missing"))?;
    if good.is_empty() {
        return Err(usage("--good is missing"));
    }
    if command.is_empty() {
        return Err(usage("no command after --"));
    }
    Ok(BisectArgs {
        good,
        bad,
        build,
        run_options,
        command,
    })
}

/// The argument list that gives `b` back to [`parse`].
fn unparse(b: &BisectArgs) -> Vec<OsString> {
    let mut v = Vec::new();
    for g in &b.good {
        v.extend(["--good".into(), g.clone()]);
    }
    v.extend(["--bad".into(), b.bad.clone()]);
    if let Some(build) = &b.build {
        v.extend(["--build".into(), build.clone()]);
    }
    v.extend(b.run_options.iter().cloned());
    v.push("--".into());
    v.extend(b.command.iter().cloned());
    v
}

fn git(args: &[&OsStr]) -> Result<std::process::Output, BisectError> {
    Command::new("git")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| BisectError::NoGit {
            what: "git",
            source,
        })
}

fn git_ok(args: &[&OsStr]) -> Result<String, BisectError> {
    let out = git(args)?;
    if !out.status.success() {
        return Err(BisectError::Git {
            args: args
                .iter()
                .map(|a| a.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().into(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A Linux source tree (the default build applies).
fn is_kernel_tree(dir: &Path) -> bool {
    dir.join("Kconfig").is_file() && dir.join("Makefile").is_file() && dir.join("arch").is_dir()
}

/// Runs the whole bisection; returns vexec's exit status (0 when a first
/// bad commit was found).
pub fn bisect(args: &BisectArgs) -> Result<i32, BisectError> {
    let top = git_ok(&["rev-parse".as_ref(), "--show-toplevel".as_ref()])
        .map_err(|e| BisectError::NotARepo(Box::new(e)))?;
    let status = git_ok(&[
        "status".as_ref(),
        "--porcelain".as_ref(),
        "--untracked-files=no".as_ref(),
    ])?;
    if !status.trim().is_empty() {
        return Err(BisectError::Dirty(top.trim().into()));
    }
    let me = std::env::current_exe().map_err(BisectError::SelfExe)?;
    let mut start: Vec<&OsStr> = vec!["bisect".as_ref(), "start".as_ref(), &args.bad];
    start.extend(args.good.iter().map(|g| g.as_os_str()));
    git_ok(&start)?;
    crate::say!(
        "vexec: bisecting between {} (good) and {} (bad)",
        args.good
            .iter()
            .map(|g| g.to_string_lossy())
            .collect::<Vec<_>>()
            .join(", "),
        args.bad.to_string_lossy()
    );
    let mut run = Command::new("git");
    run.args(["bisect", "run"])
        .arg(&me)
        .arg("__bisect-step")
        .args(unparse(args))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let out = run.output().map_err(|source| BisectError::NoGit {
        what: "git bisect",
        source,
    });
    let log = git_ok(&["bisect".as_ref(), "log".as_ref()]).unwrap_or_default();
    let _ = git(&["bisect".as_ref(), "reset".as_ref()]);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first_bad = text
        .lines()
        .find(|l| l.contains("is the first bad commit"))
        .map(|l| l.split_whitespace().next().unwrap_or_default().to_string());
    crate::say!("vexec: bisect log:\n{}", log.trim_end());
    match first_bad {
        Some(sha) => {
            let subject = git_ok(&[
                "log".as_ref(),
                "-1".as_ref(),
                "--format=%h %s".as_ref(),
                sha.as_ref(),
            ])
            .unwrap_or_default();
            crate::say!("vexec: first bad commit: {}", subject.trim());
            println!("{sha}");
            Ok(0)
        }
        None => {
            crate::say!("{}", text.trim_end());
            Err(BisectError::NoFirstBad)
        }
    }
}

/// One bisection step, run by git: build, boot, run, and answer git with
/// 0 (good), 1 (bad) or 125 (skip).
pub fn step(args: &BisectArgs) -> i32 {
    let head =
        git_ok(&["log".as_ref(), "-1".as_ref(), "--format=%h %s".as_ref()]).unwrap_or_default();
    let head = head.trim();
    let here = std::env::current_dir().unwrap_or_else(|_| ".".into());
    let kernel_tree = is_kernel_tree(&here);
    let build = match (&args.build, kernel_tree) {
        (Some(b), _) => Some(b.clone()),
        (None, true) => Some(
            "make olddefconfig >/dev/null && make -j\"$(nproc)\" bzImage modules"
                .to_string()
                .into(),
        ),
        (None, false) => None,
    };
    if let Some(b) = build {
        crate::say!("vexec: bisect: {head}: building");
        let ok = Command::new("/bin/sh")
            .arg("-c")
            .arg(&b)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            crate::say!("vexec: bisect: {head}: build failed: skip");
            return 125;
        }
    }
    let me = match std::env::current_exe() {
        Ok(m) => m,
        Err(_) => return 125,
    };
    let mut run = Command::new(me);
    let has_kernel = args
        .run_options
        .iter()
        .any(|o| o == "-k" || o == "--kernel" || o.to_string_lossy().starts_with("--kernel="));
    if kernel_tree && !has_kernel {
        run.args(["-k", "."]);
    }
    // A splat in the kernel log fails the step, as in a matrix. Each step
    // boots a kernel used once: saving it for warm starts would only
    // leave a snapshot per step behind.
    run.args(["--fail-on-oops", "--cold"])
        .args(&args.run_options)
        .arg("--")
        .args(&args.command)
        .stdin(Stdio::null());
    let started = std::time::Instant::now();
    let status = run.status().map(|s| s.code().unwrap_or(128)).unwrap_or(125);
    let verdict = match status {
        0 => 0,
        125 => 125,
        // Interrupted: stop the bisection (git aborts above 127).
        130 | 143 => status,
        _ => 1,
    };
    crate::say!(
        "vexec: bisect: {head}: {} (exit {status}, {:.1}s)",
        match verdict {
            0 => "good",
            125 => "skip",
            1 => "bad",
            _ => "interrupted",
        },
        started.elapsed().as_secs_f64()
    );
    verdict
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn parses_and_round_trips() {
        let a = parse(&os(&[
            "--good",
            "v1",
            "--good=v0",
            "--bad",
            "HEAD",
            "--build=make",
            "-k",
            ".",
            "--timeout",
            "5m",
            "--",
            "./t.sh",
            "--fast",
        ]))
        .unwrap();
        assert_eq!(a.good, os(&["v1", "v0"]));
        assert_eq!(a.bad, "HEAD");
        assert_eq!(a.build.as_deref(), Some(OsStr::new("make")));
        assert_eq!(a.run_options, os(&["-k", ".", "--timeout", "5m"]));
        assert_eq!(a.command, os(&["./t.sh", "--fast"]));
        assert_eq!(parse(&unparse(&a)).unwrap(), a);
    }

    #[test]
    fn missing_parts_are_clear() {
        assert!(
            parse(&os(&["--bad", "x", "--", "t"]))
                .unwrap_err()
                .to_string()
                .contains("--good")
        );
        assert!(
            parse(&os(&["--good", "x", "--", "t"]))
                .unwrap_err()
                .to_string()
                .contains("--bad")
        );
        assert!(
            parse(&os(&["--good", "x", "--bad", "y"]))
                .unwrap_err()
                .to_string()
                .contains("no command")
        );
    }
}
