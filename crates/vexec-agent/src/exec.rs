//! Running the command: as the caller's uid/gid/groups, with its
//! environment and working directory, output streamed to the host, stdin
//! and signals from it, and its end reported once all output is out.

use std::ffi::OsStr;
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::Duration;

use vexec_protocol::{self as protocol, Aftermath, Exec, Exit, GuestMsg, HostMsg, Stream};

use super::port::{PortWriter, send};
use super::report::{Phase, STATE};
use super::{limits, pump, reaper, sys};

/// How long output pipes may stay open after a program exited (a
/// background child holding them) when the host does not say.
pub const DEFAULT_OUTPUT_GRACE: Duration = Duration::from_secs(2);

fn os(b: &[u8]) -> &OsStr {
    OsStr::from_bytes(b)
}

/// Where the host's messages about a running command come from: handed
/// the command's [`Control`] once it runs. A one-shot run starts a thread
/// reading the control port ([`from_port`]); a persistent VM's port
/// reader, which outlives commands, keeps it for the command's lifetime.
pub type Inbox = Box<dyn FnOnce(Control) + Send>;

/// An inbox fed by `reader` until it closes.
pub fn from_port(port: &PortWriter, mut reader: File) -> Inbox {
    let port = Arc::clone(port);
    let said = Arc::clone(&port);
    Box::new(move |control: Control| {
        let started = sys::thread("host-reader", move || {
            loop {
                let msg = match protocol::read_frame::<HostMsg>(&mut reader) {
                    Ok(Some(m)) => m,
                    Ok(None) => return,
                    Err(e) => {
                        // A message this agent cannot decode: say so and
                        // stop listening; the host fails the run on Error.
                        let _ = send(&port, &GuestMsg::Error(undecodable(&e)));
                        return;
                    }
                };
                STATE.received();
                control.handle(msg);
            }
        });
        if let Err(e) = started {
            // Without it no signal or input reaches the command: the host
            // ends the run on Error.
            let _ = send(&said, &GuestMsg::Error(e.to_string()));
        }
    })
}

/// Runs the setup commands, the command and the teardown commands.
pub fn run(port: &PortWriter, inbox: Inbox, exec: &Exec) -> Exit {
    if let Err(message) = hooks(port, &exec.env, &exec.cwd, &exec.setup, "setup") {
        return Exit::NotStarted {
            status: 125,
            message,
        };
    }
    let (exit, aftermath) = command(port, inbox, exec);
    teardown(port, &exec.env, &exec.cwd, &exec.teardown);
    if exec.kernel_log {
        let _ = send(port, &GuestMsg::KernelLog(sys::kernel_log()));
    }
    if aftermath != Aftermath::default() {
        let _ = send(port, &GuestMsg::Aftermath(aftermath));
    }
    exit
}

/// Runs teardown commands as [`hooks`] does; a failure is told on the
/// host's stderr, and what was torn down stays torn down.
pub fn teardown(port: &PortWriter, env: &[(Vec<u8>, Vec<u8>)], cwd: &[u8], cmds: &[Vec<u8>]) {
    if let Err(message) = hooks(port, env, cwd, cmds, "teardown") {
        let _ = send(port, &GuestMsg::Stderr(format!("{message}\n").into_bytes()));
    }
}

/// Runs `cmds` one by one with `/bin/sh -c` as root, with `env` in `cwd`
/// (the command's); their output goes to the host's stderr (stdout
/// belongs to the command under test).
pub fn hooks(
    port: &PortWriter,
    env: &[(Vec<u8>, Vec<u8>)],
    cwd: &[u8],
    cmds: &[Vec<u8>],
    what: &str,
) -> Result<(), String> {
    for c in cmds {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(os(c))
            .env_clear()
            .envs(env.iter().map(|(k, v)| (os(k), os(v))))
            .current_dir(os(cwd))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let (exit, out) = output_of(&mut cmd)
            .map_err(|e| format!("vexec: {what} command `{}`: {e}", shown(c)))?;
        if !out.is_empty() {
            let _ = send(port, &GuestMsg::Stderr(out));
        }
        if exit != Exit::Code(0) {
            return Err(format!(
                "vexec: {what} command `{}` failed ({exit:?})",
                shown(c)
            ));
        }
    }
    Ok(())
}

/// Runs `cmd` to its end (reaped through [`reaper`], which owns waiting
/// in PID 1): how it ended, and its stdout then stderr.
pub fn output_of(cmd: &mut Command) -> std::io::Result<(Exit, Vec<u8>)> {
    use std::io::Read;
    let mut child = reaper::spawn(cmd)?;
    let err = child.stderr.take();
    let err = sys::thread("hook-stderr", move || {
        let mut b = Vec::new();
        if let Some(mut e) = err {
            let _ = e.read_to_end(&mut b);
        }
        b
    });
    let err = match err {
        Ok(e) => e,
        Err(e) => {
            sys::kill_group_of(child.id() as i32);
            reaper::wait(child.id() as i32);
            return Err(e);
        }
    };
    let mut out = Vec::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_end(&mut out);
    }
    out.extend(err.join().unwrap_or_default());
    Ok((reaper::wait(child.id() as i32), out))
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

/// Runs the command to completion; how it ended, and what else the host
/// should know. `reader` yields the host's further messages.
fn command(port: &PortWriter, inbox: Inbox, exec: &Exec) -> (Exit, Aftermath) {
    let oom_before = sys::oom_kill_count();
    let (pid, stdio) = match spawn(exec) {
        Ok(s) => s,
        Err(exit) => return (exit, Aftermath::default()),
    };
    STATE.command(pid);
    STATE.phase(Phase::Running);
    let _ = send(
        port,
        &GuestMsg::Started {
            uptime_ms: sys::uptime_ms(),
        },
    );
    let (done_tx, done_rx) = mpsc::channel::<()>();
    let carried = carriers(port, stdio.stdin, stdio.outputs, &done_tx);
    drop(done_tx);
    let (stdin, closers) = match carried {
        Ok(c) => c,
        Err(e) => {
            // Its input or output would be lost without a word: end it.
            sys::kill_group_of(pid);
            reaper::wait(pid);
            let message = format!("vexec: the command was stopped: {e}");
            let exit = Exit::NotStarted {
                status: 125,
                message,
            };
            return (exit, Aftermath::default());
        }
    };
    let pumps = closers.len();
    let winsize_fd = stdio.master.as_ref().map(|m| m.as_raw_fd());
    inbox(Control {
        pid,
        stdin,
        closers,
        winsize_fd,
    });

    let exit = reaper::wait(pid);
    STATE.phase(Phase::Draining);
    let grace = Duration::from_millis(exec.output_grace_ms);
    let output_cut = pump::drain(&done_rx, pumps, grace);
    drop(stdio.master);
    let oom_kills = match sys::oom_kill_count() {
        Some(after) if after > oom_before.unwrap_or(after) => {
            sys::oom_kill_lines(after - oom_before.unwrap_or(0))
        }
        _ => Vec::new(),
    };
    (
        exit,
        Aftermath {
            oom_kills,
            output_cut,
        },
    )
}

/// The threads that carry the command's input and output: the input's
/// feed and a closer per output stream.
fn carriers(
    port: &PortWriter,
    stdin: Option<File>,
    outputs: Vec<(Stream, OwnedFd)>,
    done: &mpsc::Sender<()>,
) -> std::io::Result<(StdinFeed, Vec<(Stream, pump::Closer)>)> {
    let stdin = stdin_writer(port, stdin)?;
    let mut closers = Vec::new();
    for (stream, fd) in outputs {
        let wrap = match stream {
            Stream::Stdout => GuestMsg::Stdout,
            Stream::Stderr => GuestMsg::Stderr,
        };
        closers.push((stream, pump::spawn(port, fd, wrap, done.clone())?));
    }
    Ok((stdin, closers))
}

/// The command's ends of its standard streams as the agent holds them.
struct Stdio3 {
    /// Where its input goes (a pipe, or the terminal master).
    stdin: Option<File>,
    /// Its output streams that the agent drains.
    outputs: Vec<(Stream, OwnedFd)>,
    /// The terminal master, when the command has a terminal.
    master: Option<OwnedFd>,
}

/// Starts the command as the caller, in its own process group (a session
/// on a terminal); its pid and the agent's ends of its streams.
fn spawn(exec: &Exec) -> Result<(i32, Stdio3), Exit> {
    let Some((prog, args)) = exec.argv.split_first() else {
        return Err(Exit::NotStarted {
            status: 127,
            message: "vexec: no command given".into(),
        });
    };
    let cwd = os(&exec.cwd);
    if !std::path::Path::new(cwd).is_dir() {
        return Err(Exit::NotStarted {
            status: 126,
            message: format!(
                "vexec: working directory {} does not exist in the guest",
                shown(&exec.cwd)
            ),
        });
    }
    let tty = exec.tty.as_ref();
    let pty = match tty {
        Some(t) => Some(
            sys::open_pty(t.rows, t.cols, t.job_control, t.host_raw).map_err(|e| {
                Exit::NotStarted {
                    status: 125,
                    message: format!("vexec: cannot allocate a pseudo-terminal in the guest: {e}"),
                }
            })?,
        ),
        None => None,
    };
    let on_tty = |want: bool| -> Option<Stdio> {
        let (_, slave) = pty.as_ref()?;
        want.then(|| slave.try_clone().ok().map(Stdio::from))?
    };
    let (tin, tout, terr) = tty.map_or((false, false, false), |t| (t.stdin, t.stdout, t.stderr));
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
        .stdin(on_tty(tin).unwrap_or(Stdio::piped()))
        .stdout(on_tty(tout).unwrap_or(Stdio::piped()))
        .stderr(on_tty(terr).unwrap_or(Stdio::piped()));
    // The descriptor that becomes the controlling terminal, if any.
    let ctty = [(tin, 0), (tout, 1), (terr, 2)]
        .into_iter()
        .find_map(|(on, fd)| on.then_some(fd));
    become_caller(&mut cmd, exec, ctty);
    let spawned = reaper::spawn(&mut cmd);
    // The command's copies of the terminal's slave side close with `cmd`:
    // the master then reads EOF once the command and its children are gone.
    drop(cmd);
    let master = pty.map(|(m, _)| m);
    let mut child = spawned.map_err(|e| {
        let (status, what) = match e.kind() {
            std::io::ErrorKind::NotFound => (127, "command not found".to_string()),
            _ => (126, e.to_string()),
        };
        Exit::NotStarted {
            status,
            message: format!("vexec: {}: {what}", shown(prog)),
        }
    })?;
    let mut outputs: Vec<(Stream, OwnedFd)> = Vec::new();
    if let Some(o) = child.stdout.take() {
        outputs.push((Stream::Stdout, o.into()));
    }
    if let Some(e) = child.stderr.take() {
        outputs.push((Stream::Stderr, e.into()));
    }
    // One reader for the terminal, however many streams it carries.
    if let Some(m) = &master
        && (tout || terr)
        && let Ok(fd) = m.try_clone()
    {
        outputs.push((if tout { Stream::Stdout } else { Stream::Stderr }, fd));
    }
    let stdin = match &master {
        Some(m) if tin => m.try_clone().ok().map(File::from),
        _ => child.stdin.take().map(|s| File::from(OwnedFd::from(s))),
    };
    Ok((
        child.id() as i32,
        Stdio3 {
            stdin,
            outputs,
            master,
        },
    ))
}

/// Between fork and exec: a session of its own (so a process group, as
/// under a shell; with a terminal, that terminal controlling it), the
/// caller's resource limits, groups, gid and uid.
fn become_caller(cmd: &mut Command, exec: &Exec, ctty: Option<i32>) {
    let (uid, gid, groups) = (exec.uid, exec.gid, exec.groups.clone());
    let limits = limits::fit(&exec.limits);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            sys::new_session(ctty)?;
            limits::apply(&limits)?;
            if libc::setgroups(groups.len(), groups.as_ptr()) < 0
                || libc::setgid(gid) < 0
                || libc::setuid(uid) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// What the stdin writer is told: data, or end of input.
type StdinFeed = mpsc::Sender<Option<Vec<u8>>>;

/// Feeds the command's input on a thread of its own, so a command that
/// never reads does not stall signals. When the command closes its input,
/// the host is told once, so it stops reading its own.
fn stdin_writer(port: &PortWriter, stdin: Option<File>) -> std::io::Result<StdinFeed> {
    let (tx, rx) = mpsc::channel::<Option<Vec<u8>>>();
    let port = Arc::clone(port);
    let is_tty = stdin
        .as_ref()
        .is_some_and(|f| unsafe { libc::isatty(f.as_raw_fd()) } == 1);
    sys::thread("stdin", move || {
        let mut stdin = stdin;
        while let Ok(msg) = rx.recv() {
            let data = match msg {
                Some(d) => d,
                // End of input on a terminal is its EOF character.
                None if is_tty => vec![4],
                None => break,
            };
            if let Some(s) = stdin.as_mut()
                && s.write_all(&data).is_err()
            {
                stdin = None;
                let _ = send(&port, &GuestMsg::InputClosed);
            }
        }
    })?;
    Ok(tx)
}

/// The error for a host message that cannot be read.
pub fn undecodable(e: &std::io::Error) -> String {
    format!(
        "reading the control port: {e}; the host sent a message this agent cannot decode (vexec and vexec-agent from different builds? reinstall both)"
    )
}

/// The host's say over a running command.
pub struct Control {
    /// The command's process group.
    pid: i32,
    stdin: StdinFeed,
    closers: Vec<(Stream, pump::Closer)>,
    /// The terminal master, when the command has a terminal.
    winsize_fd: Option<i32>,
}

impl Control {
    /// Acts on one of the host's messages about the command.
    pub fn handle(&self, msg: HostMsg) {
        match msg {
            HostMsg::Stdin(d) => {
                let _ = self.stdin.send(Some(d));
            }
            HostMsg::StdinEof => {
                let _ = self.stdin.send(None);
            }
            // SAFETY: plain kill(2) to the command's process group.
            HostMsg::Signal(n) => unsafe {
                libc::kill(-self.pid, n);
            },
            HostMsg::WindowSize { rows, cols } => {
                if let Some(fd) = self.winsize_fd {
                    sys::set_window_size(fd, rows, cols);
                }
            }
            HostMsg::OutputClosed(stream) => {
                for (_, c) in self.closers.iter().filter(|(s, _)| *s == stream) {
                    c.close();
                }
            }
            other @ (HostMsg::Setup(_) | HostMsg::Exec(_) | HostMsg::Serve(_)) => {
                eprintln!(
                    "vexec-init: error: unexpected {} while the command runs; ignored",
                    other.name()
                );
            }
        }
    }
}

/// A name or path for messages: non-printing bytes escaped, so a newline
/// in a file name cannot forge a line of output.
pub fn shown(b: &[u8]) -> String {
    String::from_utf8_lossy(b).escape_debug().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    #[test]
    fn an_unknown_host_message_is_answered_with_an_error_not_dropped() {
        let (port, mut host_in) = UnixStream::pair().unwrap();
        let (mut host_out, reader) = UnixStream::pair().unwrap();
        let port: PortWriter = Arc::new(std::sync::Mutex::new(File::from(OwnedFd::from(port))));
        let (stdin, _rx) = mpsc::channel();
        from_port(&port, File::from(OwnedFd::from(reader)))(Control {
            pid: 0,
            stdin,
            closers: vec![],
            winsize_fd: None,
        });
        // A frame whose tag no HostMsg has.
        let tag = vexec_protocol::HOST_MSG_COUNT as u8;
        std::io::Write::write_all(&mut host_out, &[1, 0, 0, 0, tag]).unwrap();
        match protocol::read_frame::<GuestMsg>(&mut host_in).unwrap() {
            Some(GuestMsg::Error(e)) => assert!(e.contains("cannot decode"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

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
            output_grace_ms: 0,
            limits: vec![],
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
