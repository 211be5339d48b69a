//! `guest-exec` and `guest-exec-status`: a program started as root, its
//! output kept (up to qemu-ga's 16 MiB per stream) until its status is
//! collected once.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Map, Value, json};
use vexec_protocol::Exit;

use super::super::{limits, reaper, sys};
use super::args::{Answer, Args, QgaError};

/// qemu-ga's cap on each captured stream.
const MAX_OUTPUT: usize = 16 << 20;
/// The PATH a program gets when the request sets no environment.
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// A stream's captured bytes.
#[derive(Default)]
struct Captured {
    data: Vec<u8>,
    truncated: bool,
}

/// One started program.
#[derive(Default)]
struct Job {
    captured: bool,
    out: Captured,
    err: Captured,
    /// Set once it exited and its output reached end of file.
    exit: Option<Exit>,
}

/// Started programs, by pid, until their end is collected.
#[derive(Default)]
pub struct Jobs {
    jobs: HashMap<i64, Arc<Mutex<Job>>>,
}

fn lock(job: &Mutex<Job>) -> std::sync::MutexGuard<'_, Job> {
    job.lock().unwrap_or_else(|p| p.into_inner())
}

impl Jobs {
    pub fn start(&mut self, a: &Args) -> Answer {
        a.only(&["path", "arg", "env", "input-data", "capture-output"])?;
        let path = a.str("path")?;
        let input = match a.opt_str("input-data")? {
            Some(b) => Some(
                B64.decode(b)
                    .map_err(|_| QgaError::generic("Base64 data contains invalid characters"))?,
            ),
            None => None,
        };
        let capture = a.opt_bool("capture-output")?.unwrap_or(false);
        let mut cmd = command(path, &a.opt_strs("arg")?, &a.opt_strs("env")?);
        let piped = |on: bool| if on { Stdio::piped() } else { Stdio::null() };
        cmd.stdin(piped(input.is_some()))
            .stdout(piped(capture))
            .stderr(piped(capture));
        let mut child = reaper::spawn(&mut cmd).map_err(|e| {
            QgaError::generic(format!(
                "Guest agent command failed, error was 'Failed to execute child process \u{201c}{path}\u{201d} ({})'",
                e.to_string().split(" (os error").next().unwrap_or_default()
            ))
        })?;
        let pid = child.id() as i32;
        let job = Arc::new(Mutex::new(Job {
            captured: capture,
            ..Job::default()
        }));
        if let Err(e) = watch(&mut child, input, &job) {
            // A program whose status could never be collected: end it.
            sys::kill_group_of(pid);
            reaper::wait(pid);
            return Err(QgaError::generic(format!(
                "Guest agent command failed, error was '{e}'"
            )));
        }
        self.jobs.insert(pid as i64, job);
        Ok(json!({ "pid": pid }))
    }

    pub fn status(&mut self, a: &Args) -> Answer {
        a.only(&["pid"])?;
        let pid = a.int("pid")?;
        let job = self
            .jobs
            .get(&pid)
            .ok_or_else(|| QgaError::generic("Invalid parameter 'pid'"))?;
        let j = lock(job);
        let Some(exit) = &j.exit else {
            return Ok(json!({"exited": false}));
        };
        let mut r = Map::new();
        r.insert("exited".into(), true.into());
        match exit {
            Exit::Code(c) => r.insert("exitcode".into(), (*c).into()),
            Exit::Signal(s) => r.insert("signal".into(), (*s).into()),
            Exit::NotStarted { status, .. } => r.insert("exitcode".into(), (*status).into()),
        };
        if j.captured {
            for (name, c) in [("out", &j.out), ("err", &j.err)] {
                // qemu-ga leaves out a stream that said nothing.
                if !c.data.is_empty() {
                    r.insert(format!("{name}-data"), B64.encode(&c.data).into());
                    r.insert(format!("{name}-truncated"), c.truncated.into());
                }
            }
        }
        drop(j);
        self.jobs.remove(&pid);
        Ok(Value::Object(r))
    }
}

/// The program as qemu-ga starts it: looked up along PATH, in `/`, with
/// exactly the environment given (or a PATH alone); in a session of its
/// own (qemu-ga's own, as a service, is one) with the limits of whoever
/// started the VM.
fn command(path: &str, args: &[String], env: &[String]) -> Command {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(path);
    let limits = limits::default();
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            sys::new_session(None)?;
            limits::apply(&limits)
        });
    }
    cmd.args(args).current_dir("/").env_clear();
    if env.is_empty() {
        cmd.env("PATH", DEFAULT_PATH);
    }
    for e in env {
        match e.split_once('=') {
            Some((k, v)) => cmd.env(k, v),
            None => cmd.env(e, ""),
        };
    }
    cmd
}

/// Starts the threads that feed `child` its input, keep its output and
/// record its exit in `job`.
fn watch(
    child: &mut std::process::Child,
    input: Option<Vec<u8>>,
    job: &Arc<Mutex<Job>>,
) -> std::io::Result<()> {
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        sys::thread("qga-input", move || {
            let _ = stdin.write_all(&data);
        })?;
    }
    let mut readers = Vec::new();
    if let Some(o) = child.stdout.take() {
        readers.push(drain(Box::new(o), job, true)?);
    }
    if let Some(e) = child.stderr.take() {
        readers.push(drain(Box::new(e), job, false)?);
    }
    let (waited, pid) = (Arc::clone(job), child.id() as i32);
    sys::thread("qga-exec", move || {
        let exit = reaper::wait(pid);
        for r in readers {
            let _ = r.join();
        }
        lock(&waited).exit = Some(exit);
    })?;
    Ok(())
}

/// Reads one output stream to its end on a thread, keeping the first
/// [`MAX_OUTPUT`] bytes.
fn drain(
    mut from: Box<dyn Read + Send>,
    job: &Arc<Mutex<Job>>,
    stdout: bool,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let job = Arc::clone(job);
    sys::thread("qga-output", move || {
        let mut buf = vec![0u8; 64 * 1024];
        while let Ok(n) = from.read(&mut buf) {
            if n == 0 {
                return;
            }
            let mut j = lock(&job);
            let c = if stdout { &mut j.out } else { &mut j.err };
            let room = MAX_OUTPUT - c.data.len();
            c.data.extend_from_slice(&buf[..n.min(room)]);
            c.truncated |= n > room;
        }
    })
}
