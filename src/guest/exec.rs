//! Running the command: as the caller's uid/gid/groups, with its
//! environment and working directory, output streamed to the host, stdin
//! and signals from it, and its end reported once all output is out.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
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

/// Runs the setup commands, the command and the teardown commands.
pub fn run(port: &PortWriter, reader: File, exec: &Exec) -> Exit {
    if let Err(message) = hooks(port, exec, &exec.setup, "setup") {
        return Exit::NotStarted {
            status: 125,
            message,
        };
    }
    let exit = command(port, reader, exec);
    if let Err(message) = hooks(port, exec, &exec.teardown, "teardown") {
        let _ = send(port, &GuestMsg::Stderr(format!("{message}\n").into_bytes()));
    }
    if exec.kernel_log {
        let _ = send(port, &GuestMsg::KernelLog(sys::kernel_log()));
    }
    exit
}

/// Runs `cmds` one by one with `/bin/sh -c` as root, in the command's
/// environment and directory; their output goes to the host's stderr
/// (stdout belongs to the command under test).
fn hooks(port: &PortWriter, exec: &Exec, cmds: &[Vec<u8>], what: &str) -> Result<(), String> {
    for c in cmds {
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(os(c))
            .env_clear()
            .envs(exec.env.iter().map(|(k, v)| (os(k), os(v))))
            .current_dir(os(&exec.cwd))
            .stdin(Stdio::null())
            .output()
            .map_err(|e| {
                format!(
                    "vexec: {what} command `{}`: {e}",
                    String::from_utf8_lossy(c)
                )
            })?;
        for data in [out.stdout, out.stderr] {
            if !data.is_empty() {
                let _ = send(port, &GuestMsg::Stderr(data));
            }
        }
        if !out.status.success() {
            return Err(format!(
                "vexec: {what} command `{}` failed ({})",
                String::from_utf8_lossy(c),
                out.status
            ));
        }
    }
    Ok(())
}

/// Where execvp would find `prog` along the command's PATH, found with stat
/// rather than execvp's failed execve per directory (~4 ms each under
/// TCG). None when `prog` has a slash or nothing runnable is found: the
/// spawn then searches as before and reports the same errors.
fn find_in_path(prog: &[u8], exec: &Exec) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::MetadataExt;
    if prog.is_empty() || prog.contains(&b'/') {
        return None;
    }
    // glibc's default when PATH is unset.
    let path = exec
        .env
        .iter()
        .find(|(k, _)| k == b"PATH")
        .map_or(&b"/bin:/usr/bin"[..], |(_, v)| v);
    // The execute bit that applies to the command's user (root: any).
    let runnable = |m: &std::fs::Metadata| {
        let bit = if exec.uid == 0 {
            0o111
        } else if m.uid() == exec.uid {
            0o100
        } else if m.gid() == exec.gid || exec.groups.contains(&m.gid()) {
            0o010
        } else {
            0o001
        };
        m.is_file() && m.mode() & bit != 0
    };
    // Relative entries (an empty one is ".") are the command's, not the
    // agent's, working directory.
    let cwd = std::path::Path::new(os(&exec.cwd));
    std::env::split_paths(os(path))
        .map(|dir| cwd.join(dir).join(os(prog)))
        .find(|c| std::fs::metadata(c).is_ok_and(|m| runnable(&m)))
}

/// Runs the command to completion and returns how it ended. `reader`
/// yields the host's further messages (stdin, signals).
fn command(port: &PortWriter, mut reader: File, exec: &Exec) -> Exit {
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
    let pty = match &exec.tty {
        Some(t) => match sys::open_pty(t.rows, t.cols, t.job_control, t.host_raw) {
            Ok(p) => Some(p),
            Err(e) => {
                return Exit::NotStarted {
                    status: 125,
                    message: format!("vexec: cannot allocate a pseudo-terminal in the guest: {e}"),
                };
            }
        },
        None => None,
    };
    let tty = exec.tty.clone();
    let on_tty = |want: bool| -> Option<Stdio> {
        let (_, slave) = pty.as_ref()?;
        want.then(|| slave.try_clone().ok().map(Stdio::from))?
    };
    let mut cmd = match find_in_path(prog, exec) {
        // argv[0] stays as typed: busybox and error messages read it.
        Some(path) => {
            let mut c = Command::new(path);
            c.arg0(os(prog));
            c
        }
        None => Command::new(os(prog)),
    };
    cmd.args(args.iter().map(|a| os(a)))
        .env_clear()
        .envs(exec.env.iter().map(|(k, v)| (os(k), os(v))))
        .current_dir(cwd)
        .stdin(on_tty(tty.as_ref().is_some_and(|t| t.stdin)).unwrap_or(Stdio::piped()))
        .stdout(on_tty(tty.as_ref().is_some_and(|t| t.stdout)).unwrap_or(Stdio::piped()))
        .stderr(on_tty(tty.as_ref().is_some_and(|t| t.stderr)).unwrap_or(Stdio::piped()));
    let (uid, gid, groups) = (exec.uid, exec.gid, exec.groups.clone());
    // The descriptor that becomes the controlling terminal, if any.
    let ctty: Option<i32> = tty.as_ref().and_then(|t| {
        [(t.stdin, 0), (t.stdout, 1), (t.stderr, 2)]
            .into_iter()
            .find_map(|(on, fd)| on.then_some(fd))
    });
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            // Its own process group (a session, on a terminal), so signals
            // reach everything it started.
            let grouped = match ctty {
                Some(fd) => libc::setsid() >= 0 && libc::ioctl(fd, libc::TIOCSCTTY, 0) >= 0,
                None => libc::setpgid(0, 0) >= 0,
            };
            if !grouped
                || libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let spawned = cmd.spawn();
    // The command's copies of the terminal's slave side close with `cmd`:
    // the master then reads EOF once the command and its children are gone.
    drop(cmd);
    let master = pty.map(|(m, _)| m);
    let mut child = match spawned {
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
    let mut stdin: Option<Box<dyn Write + Send>> = match (&master, &tty) {
        (Some(m), Some(t)) if t.stdin => m
            .try_clone()
            .ok()
            .map(|f| Box::new(File::from(f)) as Box<dyn Write + Send>),
        _ => child
            .stdin
            .take()
            .map(|s| Box::new(s) as Box<dyn Write + Send>),
    };
    let stdin_is_tty = tty.as_ref().is_some_and(|t| t.stdin);
    let (stdin_tx, stdin_rx) = mpsc::channel::<Option<Vec<u8>>>();
    std::thread::spawn(move || {
        while let Ok(msg) = stdin_rx.recv() {
            let data = match msg {
                Some(d) => d,
                // End of input on a terminal is its EOF character.
                None if stdin_is_tty => vec![4],
                None => break,
            };
            if let Some(s) = stdin.as_mut()
                && s.write_all(&data).is_err()
            {
                stdin = None;
            }
        }
        drop(stdin);
    });
    let winsize_fd = master.as_ref().map(|m| m.as_raw_fd());
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
                HostMsg::WindowSize { rows, cols } => {
                    if let Some(fd) = winsize_fd {
                        sys::set_window_size(fd, rows, cols);
                    }
                }
                _ => {}
            }
        }
    });

    let (done_tx, done_rx) = mpsc::channel::<()>();
    let pump = |from: Box<dyn Read + Send>, wrap: fn(Vec<u8>) -> GuestMsg| {
        pump_output(port, from, wrap, done_tx.clone());
    };
    let mut pumps = 0;
    if let Some(out) = child.stdout.take() {
        pump(Box::new(out), GuestMsg::Stdout);
        pumps += 1;
    }
    if let Some(err) = child.stderr.take() {
        pump(Box::new(err), GuestMsg::Stderr);
        pumps += 1;
    }
    if let (Some(m), Some(t)) = (master, &tty)
        && (t.stdout || t.stderr)
    {
        let wrap = if t.stdout {
            GuestMsg::Stdout
        } else {
            GuestMsg::Stderr
        };
        pump(Box::new(File::from(m)), wrap);
        pumps += 1;
    }
    drop(done_tx);

    let exit = reap(pid);
    drain(&done_rx, pumps);
    exit
}

/// Streams `from` to the host as `wrap` messages on a thread of its own;
/// `done` is told at end of file.
pub fn pump_output(
    port: &PortWriter,
    mut from: Box<dyn Read + Send>,
    wrap: fn(Vec<u8>) -> GuestMsg,
    done: mpsc::Sender<()>,
) {
    let port = Arc::clone(port);
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
                // EIO on a terminal master: every slave side is closed.
                Err(_) => break,
            }
        }
        let _ = done.send(());
    });
}

/// Waits for `pumps` output pumps to finish, at most [`DRAIN_GRACE`] (a
/// background child may hold a pipe open forever).
pub fn drain(done: &mpsc::Receiver<()>, pumps: usize) {
    let deadline = std::time::Instant::now() + DRAIN_GRACE;
    for _ in 0..pumps {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if done.recv_timeout(left).is_err() {
            break;
        }
    }
}

/// Waits for `pid`, reaping any other orphan that PID 1 inherits meanwhile.
pub fn reap(pid: i32) -> Exit {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;

    fn exec_with(path: &str, cwd: &Path, uid: u32) -> Exec {
        Exec {
            argv: vec![],
            env: vec![(b"PATH".to_vec(), path.as_bytes().to_vec())],
            cwd: cwd.as_os_str().as_bytes().to_vec(),
            uid,
            gid: uid,
            groups: vec![],
            setup: vec![],
            teardown: vec![],
            tty: None,
            kernel_log: false,
        }
    }

    fn file(path: &Path, mode: u32) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn path_lookup_takes_the_first_runnable_file_like_execvp() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        file(&a.join("tool"), 0o644); // not executable: skipped
        std::fs::create_dir_all(b.join("tool")).unwrap(); // a directory: skipped
        file(&c.join("tool"), 0o755);
        let path = format!("{}:{}:{}", a.display(), b.display(), c.display());
        let e = exec_with(&path, d.path(), 0);
        assert_eq!(find_in_path(b"tool", &e), Some(c.join("tool")));
        assert_eq!(find_in_path(b"missing", &e), None);
        // A name with a slash is not searched.
        assert_eq!(find_in_path(b"c/tool", &e), None);
    }

    #[test]
    fn path_lookup_checks_the_bits_of_the_user_who_runs_it() {
        let d = tempfile::tempdir().unwrap();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        file(&a.join("tool"), 0o700); // only its owner (this test's user) may run it
        file(&b.join("tool"), 0o755);
        let path = format!("{}:{}", a.display(), b.display());
        let me = std::fs::metadata(a.join("tool")).unwrap().uid();
        let other = if me == 12345 { 12346 } else { 12345 };
        assert_eq!(
            find_in_path(b"tool", &exec_with(&path, d.path(), me)),
            Some(a.join("tool"))
        );
        assert_eq!(
            find_in_path(b"tool", &exec_with(&path, d.path(), other)),
            Some(b.join("tool"))
        );
    }

    #[test]
    fn relative_path_entries_are_the_commands_working_directory() {
        let d = tempfile::tempdir().unwrap();
        file(&d.path().join("bin/tool"), 0o755);
        file(&d.path().join("here"), 0o755);
        let e = exec_with("bin::/nonexistent", d.path(), 0);
        assert_eq!(find_in_path(b"tool", &e), Some(d.path().join("bin/tool")));
        assert_eq!(find_in_path(b"here", &e), Some(d.path().join("here")));
    }
}
