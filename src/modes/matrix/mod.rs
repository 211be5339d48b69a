//! Kernel matrices: one command on many kernels, in parallel, with output
//! kept apart, a summary table, JUnit/JSON reports and deterministic shards.
//!
//! Each kernel's run is this same program called with `-k KERNEL` and the
//! caller's other options, so every run is exactly what a single `vexec`
//! would do, with its own process, stdio and VM.

mod reports;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

use crate::report::tap::{Counts, Format, Parser, Results};
use reports::{print_summary, write_json, write_junit};

/// How each kernel's output is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputMode {
    /// Live, each line prefixed with `[kernel]`.
    Prefix,
    /// Each kernel's output in one block when its run ends.
    Grouped,
}

/// A slice of the matrix: the I-th of N (1-based).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

/// Why a matrix could not be set up or its reports written.
#[derive(Debug, thiserror::Error)]
pub enum MatrixError {
    #[error("`{0}` is not I/N with 1 <= I <= N (e.g. 2/4)")]
    Shard(String),
    #[error("kernel sets nest too deep (does one include itself?)")]
    TooDeep,
    #[error("no kernel set `{name}` in the config file (sets: {known})")]
    NoSet { name: String, known: String },
    #[error("bad kernel pattern `{pattern}`: {detail}")]
    BadPattern { pattern: String, detail: String },
    #[error("no kernel matches `{pattern}`; known releases: {known}")]
    NoMatch { pattern: String, known: String },
    #[error("the matrix (or this shard of it) has no kernels")]
    Empty,
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Parses `I/N`.
pub fn parse_shard(s: &str) -> Result<Shard, MatrixError> {
    let bad = || MatrixError::Shard(s.into());
    let (i, n) = s.split_once('/').ok_or_else(bad)?;
    let (index, count): (usize, usize) = (
        i.trim().parse().map_err(|_| bad())?,
        n.trim().parse().map_err(|_| bad())?,
    );
    if index == 0 || count == 0 || index > count {
        return Err(bad());
    }
    Ok(Shard { index, count })
}

/// The kernels of shard `s` out of `all` (already sorted and unique): every
/// kernel lands in exactly one shard.
pub fn shard<T: Clone>(all: &[T], s: Shard) -> Vec<T> {
    all.iter()
        .enumerate()
        .filter(|(i, _)| i % s.count == s.index - 1)
        .map(|(_, k)| k.clone())
        .collect()
}

/// True when a kernel reference is a pattern.
pub fn is_pattern(r: &str) -> bool {
    r.contains(['*', '?', '['])
}

/// Expands references: `@name` from `sets`, patterns against `known`
/// (release, image) pairs; anything else stays as it is.
pub fn expand(
    refs: &[String],
    sets: &std::collections::BTreeMap<String, Vec<String>>,
    known: &[(String, PathBuf)],
) -> Result<Vec<String>, MatrixError> {
    expand_within(refs, sets, known, 0)
}

fn expand_within(
    refs: &[String],
    sets: &std::collections::BTreeMap<String, Vec<String>>,
    known: &[(String, PathBuf)],
    depth: usize,
) -> Result<Vec<String>, MatrixError> {
    if depth > 8 {
        return Err(MatrixError::TooDeep);
    }
    let mut out: Vec<String> = Vec::new();
    let mut push = |k: String| {
        if !out.contains(&k) {
            out.push(k);
        }
    };
    for r in refs {
        if let Some(name) = r.strip_prefix('@') {
            let set = sets.get(name).ok_or_else(|| MatrixError::NoSet {
                name: name.into(),
                known: sets.keys().cloned().collect::<Vec<_>>().join(", "),
            })?;
            for k in expand_within(set, sets, known, depth + 1)? {
                push(k);
            }
        } else if is_pattern(r) {
            let pat = glob::Pattern::new(r).map_err(|e| MatrixError::BadPattern {
                pattern: r.clone(),
                detail: e.to_string(),
            })?;
            let mut hits: Vec<&(String, PathBuf)> =
                known.iter().filter(|(rel, _)| pat.matches(rel)).collect();
            if hits.is_empty() {
                return Err(MatrixError::NoMatch {
                    pattern: r.clone(),
                    known: (known.iter().map(|(r, _)| r.as_str()))
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            hits.sort();
            for (_, img) in hits {
                push(img.display().to_string());
            }
        } else {
            push(r.clone());
        }
    }
    Ok(out)
}

/// Releases vexec can name: images in /boot and in the kernel store.
pub fn known_kernels(boot: &Path, store: Option<&Path>) -> Vec<(String, PathBuf)> {
    let mut v = Vec::new();
    let mut scan = |dir: &Path| {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rel) = name.strip_prefix("vmlinuz-") {
                v.push((rel.to_string(), e.path()));
            }
        }
    };
    scan(boot);
    if let Some(store) = store {
        for e in std::fs::read_dir(store).into_iter().flatten().flatten() {
            scan(&e.path().join("boot"));
        }
    }
    v.sort();
    v.dedup_by(|a, b| a.0 == b.0);
    v
}

/// A short name for a kernel reference (the release, where it shows).
pub fn display_name(r: &str) -> String {
    let p = Path::new(r);
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| r.to_string());
    name.strip_prefix("vmlinuz-")
        .map(str::to_string)
        .unwrap_or(name)
}

/// One kernel's run.
#[derive(Debug, Clone, Serialize)]
pub struct KernelResult {
    pub kernel: String,
    pub reference: String,
    /// vexec's exit status for this kernel.
    pub status: i32,
    /// "pass", "fail" or "error" (vexec or the VM failed: 125).
    pub result: &'static str,
    pub duration_s: f64,
    /// Its test cases (`--results`), read from its stdout.
    #[serde(flatten)]
    pub results: Option<Results>,
    /// Those cases by outcome.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub case_counts: Option<Counts>,
    #[serde(skip)]
    pub stdout: Vec<u8>,
    #[serde(skip)]
    pub stderr: Vec<u8>,
}

/// Everything a matrix run needs.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// Kernel references, in order.
    pub kernels: Vec<String>,
    /// Options for every run (without -k and the matrix's own).
    pub options: Vec<OsString>,
    pub command: Vec<OsString>,
    pub jobs: usize,
    pub mode: OutputMode,
    pub junit: Option<PathBuf>,
    pub json: Option<PathBuf>,
    /// Read each kernel's stdout as test results (`--results`).
    pub results: Option<Format>,
    pub dry_run: bool,
}

/// Parallel runs that fit the host: one per core, and as many guests as
/// available memory holds (guest memory plus QEMU's own ~300 MiB).
pub fn default_jobs(guest_mib: u64) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let avail_mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map(|kib| kib / 1024)
        .unwrap_or(u64::MAX);
    let by_mem = (avail_mib / (guest_mib + 300)).max(1) as usize;
    cores.min(by_mem).max(1)
}

fn run_one(m: &Matrix, r: &str, out_lock: &Mutex<()>) -> KernelResult {
    let name = display_name(r);
    let me = std::env::current_exe().unwrap_or_else(|_| "vexec".into());
    let started = Instant::now();
    // The run's own cases, the kernel log's included (stdout alone lacks
    // those): written to a file of ours.
    let cases_file = m.results.and_then(|_| match tempfile::NamedTempFile::new() {
        Ok(f) => Some(f),
        Err(e) => {
            crate::say!(
                "vexec: warning: no file for {name}'s test cases ({e}): its cases are not in the reports"
            );
            None
        }
    });
    let mut cmd = Command::new(me);
    cmd.arg("-k").arg(r).args(&m.options);
    if let Some(f) = &cases_file {
        cmd.arg("--cases-out").arg(f.path());
    }
    cmd.arg("--")
        .args(&m.command)
        .env_remove("VEXEC_KERNEL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return KernelResult {
                kernel: name,
                reference: r.to_string(),
                status: 125,
                result: "error",
                duration_s: 0.0,
                results: None,
                case_counts: None,
                stdout: Vec::new(),
                stderr: format!("vexec: error: starting the run: {e}\n").into_bytes(),
            };
        }
    };
    let prefix = (m.mode == OutputMode::Prefix).then(|| format!("[{name}] "));
    let out = pump(
        Box::new(child.stdout.take().unwrap()),
        false,
        prefix.clone(),
    );
    let err = pump(Box::new(child.stderr.take().unwrap()), true, prefix);
    let status = child.wait().ok().and_then(|s| s.code()).unwrap_or(125);
    let stdout = out.join().unwrap_or_default();
    let stderr = err.join().unwrap_or_default();
    let duration = started.elapsed();
    let result = match status {
        0 => "pass",
        125 => "error",
        _ => "fail",
    };
    if m.mode == OutputMode::Grouped {
        let _g = out_lock.lock().unwrap_or_else(|p| p.into_inner());
        crate::say!(
            "==> {name}: {result} (exit {status}, {:.1}s) <==",
            duration.as_secs_f64()
        );
        let _ = std::io::stdout().write_all(&stdout);
        let _ = std::io::stdout().flush();
        let _ = std::io::stderr().write_all(&stderr);
    }
    let written = (cases_file.as_ref())
        .and_then(|f| std::fs::read(f.path()).ok())
        .and_then(|j| serde_json::from_slice::<Results>(&j).ok());
    let results = m
        .results
        .map(|format| written.unwrap_or_else(|| cases_in(format, &stdout, status)));
    KernelResult {
        kernel: name,
        reference: r.to_string(),
        status,
        result,
        duration_s: duration.as_secs_f64(),
        case_counts: results.as_ref().map(Results::counts),
        results,
        stdout,
        stderr,
    }
}

/// Keeps what one kernel's run writes to `from` (and with `prefix`,
/// passes each line on at once, prefixed, to vexec's stderr or stdout).
fn pump(
    from: Box<dyn Read + Send>,
    to_stderr: bool,
    prefix: Option<String>,
) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut reader = BufReader::new(from);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line).is_ok_and(|n| n > 0) {
            if let Some(p) = &prefix {
                let mut buf = p.clone().into_bytes();
                buf.extend_from_slice(&line);
                if !buf.ends_with(b"\n") {
                    buf.push(b'\n');
                }
                if to_stderr {
                    let _ = std::io::stderr().write_all(&buf);
                } else {
                    let _ = std::io::stdout().write_all(&buf);
                }
            }
            kept.extend_from_slice(&line);
            line.clear();
        }
        kept
    })
}

/// The test cases in one kernel's stdout.
fn cases_in(format: Format, stdout: &[u8], status: i32) -> Results {
    let mut p = Parser::new(format);
    p.feed(stdout);
    let early = (status == 125).then_some("the run failed (exit status 125)");
    p.finish(early)
}

/// Runs the matrix; returns the exit status: 0 when every kernel passed, 1
/// when any command failed, 125 when runs failed only for vexec's reasons.
pub fn run(m: &Matrix) -> Result<i32, MatrixError> {
    if m.kernels.is_empty() {
        return Err(MatrixError::Empty);
    }
    if m.dry_run {
        for k in &m.kernels {
            println!("{}", k);
        }
        return Ok(0);
    }
    crate::say!(
        "vexec: running on {} kernels, {} at a time",
        m.kernels.len(),
        m.jobs
    );
    let started = Instant::now();
    let queue: Arc<Mutex<VecDeque<(usize, String)>>> =
        Arc::new(Mutex::new(m.kernels.iter().cloned().enumerate().collect()));
    let results: Arc<Mutex<Vec<Option<KernelResult>>>> =
        Arc::new(Mutex::new(vec![None; m.kernels.len()]));
    let lock = Arc::new(Mutex::new(()));
    let workers: Vec<_> = (0..m.jobs.min(m.kernels.len()))
        .map(|_| {
            let (queue, results, lock, m) = (
                Arc::clone(&queue),
                Arc::clone(&results),
                Arc::clone(&lock),
                m.clone(),
            );
            std::thread::spawn(move || {
                loop {
                    let job = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                    let Some((i, r)) = job else { break };
                    let res = run_one(&m, &r, &lock);
                    results.lock().unwrap_or_else(|p| p.into_inner())[i] = Some(res);
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    let results: Vec<KernelResult> = Arc::try_unwrap(results)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_default()
        .into_iter()
        .flatten()
        .collect();
    let total = started.elapsed();
    print_summary(&results, total);
    if let Some(p) = &m.junit {
        write_junit(p, &results, &m.command).map_err(|source| MatrixError::Write {
            path: p.clone(),
            source,
        })?;
    }
    if let Some(p) = &m.json {
        write_json(p, &results, &m.command, total).map_err(|source| MatrixError::Write {
            path: p.clone(),
            source,
        })?;
    }
    Ok(if results.iter().all(|r| r.status == 0) {
        0
    } else if results.iter().any(|r| r.result == "fail") {
        1
    } else {
        125
    })
}

/// The caller's options for each run: `args` (without the program name and
/// the command) less `-k` and the matrix's own options.
pub fn run_options(args: &[OsString]) -> Vec<OsString> {
    const WITH_VALUE: &[&str] = &[
        "-k",
        "--kernel",
        "-j",
        "--jobs",
        "--junit",
        "--json",
        "--shard",
        "--matrix-output",
    ];
    let mut out = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if WITH_VALUE.contains(&s.as_ref()) {
            it.next();
            continue;
        }
        let joined = WITH_VALUE
            .iter()
            .any(|o| o.starts_with("--") && s.starts_with(&format!("{o}=")));
        let short_joined =
            (s.starts_with("-k") || s.starts_with("-j")) && s.len() > 2 && !s.starts_with("--");
        if joined || short_joined || s == "--" {
            continue;
        }
        out.push(a.clone());
    }
    // Reports in the kernel log fail a kernel, as in bisect.
    if !out.iter().any(|a| a == "--fail-on-oops") {
        out.push("--fail-on-oops".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_everything_once() {
        let all: Vec<u32> = (0..7).collect();
        let mut seen = Vec::new();
        for i in 1..=3 {
            seen.extend(shard(&all, parse_shard(&format!("{i}/3")).unwrap()));
        }
        seen.sort();
        assert_eq!(seen, all);
        assert!(parse_shard("0/2").is_err());
        assert!(parse_shard("3/2").is_err());
        assert!(parse_shard("x").is_err());
    }

    #[test]
    fn expands_sets_and_patterns() {
        let known = vec![
            (
                "5.10.0-32-amd64".to_string(),
                PathBuf::from("/b/vmlinuz-5.10.0-32-amd64"),
            ),
            (
                "6.1.0-56-amd64".to_string(),
                PathBuf::from("/b/vmlinuz-6.1.0-56-amd64"),
            ),
            (
                "6.12.57+deb13-amd64".to_string(),
                PathBuf::from("/s/x/boot/vmlinuz-6.12.57+deb13-amd64"),
            ),
        ];
        let mut sets = std::collections::BTreeMap::new();
        sets.insert(
            "lts".to_string(),
            vec!["5.10.*".to_string(), "/k/bzImage".to_string()],
        );
        let got = expand(
            &["6.*".into(), "@lts".into(), "/k/bzImage".into()],
            &sets,
            &known,
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "/b/vmlinuz-6.1.0-56-amd64",
                "/s/x/boot/vmlinuz-6.12.57+deb13-amd64",
                "/b/vmlinuz-5.10.0-32-amd64",
                "/k/bzImage"
            ]
        );
        assert!(
            expand(&["7.*".into()], &sets, &known)
                .unwrap_err()
                .to_string()
                .contains("no kernel matches")
        );
        assert!(expand(&["@nope".into()], &sets, &known).is_err());
        sets.insert("loop".to_string(), vec!["@loop".to_string()]);
        assert!(
            expand(&["@loop".into()], &sets, &known)
                .unwrap_err()
                .to_string()
                .contains("nest")
        );
        assert_eq!(display_name("/b/vmlinuz-6.1.0-56-amd64"), "6.1.0-56-amd64");
    }

    #[test]
    fn run_options_drop_matrix_flags() {
        let args: Vec<OsString> = [
            "-k",
            "a,b",
            "--accel",
            "tcg",
            "-j2",
            "--junit",
            "r.xml",
            "--json=r.json",
            "-q",
            "--shard",
            "1/2",
            "--kernel=c",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        assert_eq!(
            run_options(&args),
            ["--accel", "tcg", "-q", "--fail-on-oops"]
                .iter()
                .map(OsString::from)
                .collect::<Vec<_>>()
        );
    }
}
