//! Running the command: as the caller's uid/gid/groups, with its
//! environment and working directory, output streamed to the host, stdin
//! and signals from it, and its end reported once all output is out.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::protocol::{self, Exec, Exit, GuestMsg, HostMsg};

use super::sys;

/// How long output pipes may stay open after the command exited (a
/// background child holding them) before the exit is reported anyway.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// The agent's handle on the control port, shared by the output pumps.
pub type PortWriter = Arc<Mutex<File>>;

/// Sends one message to the host; failures mean the host is gone.
pub fn send(port: &PortWriter, msg: &GuestMsg) -> std::io::Result<()> {
    let mut w = port.lock().unwrap_or_else(|p| p.into_inner());
    protocol::write_frame(&mut *w, msg)
}

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Runs `exec` to completion and returns how it ended. `reader` yields the
/// host's further messages (stdin, signals).
pub fn run(port: &PortWriter, mut reader: File, exec: &Exec) -> Exit {
    let Some((prog, args)) = exec.argv.split_first() else {
        return Exit::NotStarted {
            status: 127,
            message: "vexec: no command given".into(),
        };
    };
    let cwd = os(&exec.cwd);
    if !std::path::Path::new(cwd).is_dir() {
        return Exit::NotStarted {
            status: 126,
            message: format!(
                "vexec: working directory {} does not exist in the guest",
                cwd.to_string_lossy()
            ),
        };
    }
    let mut cmd = Command::new(os(prog));
    cmd.args(args.iter().map(|a| os(a)))
        .env_clear()
        .envs(exec.env.iter().map(|(k, v)| (os(k), os(v))))
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (uid, gid, groups) = (exec.uid, exec.gid, exec.groups.clone());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Its own process group, so signals reach everything it started.
            if libc::setpgid(0, 0) < 0
                || libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            let name = String::from_utf8_lossy(prog);
            let (status, what) = match e.kind() {
                std::io::ErrorKind::NotFound => (127, "command not found".to_string()),
                _ => (126, e.to_string()),
            };
            return Exit::NotStarted {
                status,
                message: format!("vexec: {name}: {what}"),
            };
        }
    };
    let pid = child.id() as i32;
    let _ = send(
        port,
        &GuestMsg::Started {
            uptime_ms: sys::uptime_ms(),
        },
    );

    // stdin: a writer thread, so a command that never reads its input does
    // not stall the handling of signals.
    let mut stdin = child.stdin.take();
    let (stdin_tx, stdin_rx) = mpsc::channel::<Option<Vec<u8>>>();
    std::thread::spawn(move || {
        while let Ok(Some(data)) = stdin_rx.recv() {
            if let Some(s) = stdin.as_mut()
                && s.write_all(&data).is_err()
            {
                stdin = None;
            }
        }
        drop(stdin);
    });
    std::thread::spawn(move || {
        while let Ok(Some(msg)) = protocol::read_frame::<HostMsg>(&mut reader) {
            match msg {
                HostMsg::Stdin(d) => {
                    let _ = stdin_tx.send(Some(d));
                }
                HostMsg::StdinEof => {
                    let _ = stdin_tx.send(None);
                }
                HostMsg::Signal(n) => {
                    // SAFETY: plain kill(2) to the command's process group.
                    unsafe { libc::kill(-pid, n) };
                }
                _ => {}
            }
        }
    });

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let pump = |mut from: Box<dyn Read + Send>, wrap: fn(Vec<u8>) -> GuestMsg| {
        let port = Arc::clone(port);
        let done = done_tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if send(&port, &wrap(buf[..n].to_vec())).is_err() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = done.send(());
        });
    };
    pump(Box::new(child.stdout.take().unwrap()), GuestMsg::Stdout);
    pump(Box::new(child.stderr.take().unwrap()), GuestMsg::Stderr);
    drop(done_tx);

    let exit = reap(pid);
    let deadline = std::time::Instant::now() + DRAIN_GRACE;
    for _ in 0..2 {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if done_rx.recv_timeout(left).is_err() {
            break;
        }
    }
    exit
}

/// Waits for `pid`, reaping any other orphan that PID 1 inherits meanwhile.
fn reap(pid: i32) -> Exit {
    loop {
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let got = unsafe { libc::waitpid(-1, &mut status, 0) };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return Exit::Code(255);
        }
        if got != pid {
            continue;
        }
        if libc::WIFEXITED(status) {
            return Exit::Code(libc::WEXITSTATUS(status));
        }
        if libc::WIFSIGNALED(status) {
            return Exit::Signal(libc::WTERMSIG(status));
        }
    }
}
