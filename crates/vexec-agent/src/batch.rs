//! Batch runs (`vexec run-dir`): the agent runs every program its
//! initramfs carries, in name order, reports each one's output and end,
//! then sends the kernel's GCOV data and powers off. The host sends
//! nothing; the foreign-architecture shell init speaks the same subset.

use std::io::{ErrorKind, Read};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;

use vexec_protocol::layout::BATCH_DIR;
use vexec_protocol::layout::programs;
use vexec_protocol::{Exit, GuestMsg, VERSION};

use std::os::fd::OwnedFd;

use super::exec;
use super::port::{PortWriter, send};
use super::sys;
use super::{pump, reaper};

/// Where debugfs shows the kernel's coverage counters.
const GCOV_DIR: &str = "/sys/kernel/debug/gcov";
/// Coverage is sent in pieces of this size (well under a frame's limit).
const CHUNK: usize = 1 << 20;

/// True when the initramfs is a batch run's.
pub fn wanted() -> bool {
    Path::new("/").join(BATCH_DIR).is_dir()
}

/// Runs the batch; returns once everything is reported.
pub fn run(port: &PortWriter) -> Result<(), String> {
    install_busybox();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let io = |e: std::io::Error| format!("writing to the control port: {e}");
    send(
        port,
        &GuestMsg::Ready {
            version: VERSION,
            release: release.trim().to_string(),
            uptime_ms: sys::uptime_ms(),
        },
    )
    .map_err(io)?;
    // The same listing the host put in; it cannot fail differently here.
    let dir = Path::new("/").join(BATCH_DIR);
    for (name, path) in programs(&dir).unwrap_or_default() {
        send(port, &GuestMsg::Begin { name }).map_err(io)?;
        let exit = run_one(port, &path);
        send(
            port,
            &GuestMsg::Exited {
                exit,
                uptime_ms: sys::uptime_ms(),
            },
        )
        .map_err(io)?;
    }
    if Path::new(GCOV_DIR).is_dir() {
        let archive =
            gcov_archive(Path::new(GCOV_DIR)).map_err(|e| format!("archiving {GCOV_DIR}: {e}"))?;
        for piece in archive.chunks(CHUNK) {
            send(port, &GuestMsg::Coverage(piece.to_vec())).map_err(io)?;
        }
    }
    sys::sync();
    send(port, &GuestMsg::Finished).map_err(io)
}

/// busybox's applets as links in /bin, so `#!/bin/sh` scripts run.
fn install_busybox() {
    if Path::new("/bin/busybox").exists() {
        let _ = Command::new("/bin/busybox")
            .args(["--install", "-s", "/bin"])
            .status();
    }
}

/// Runs one program with its output streamed; how it ended.
fn run_one(port: &PortWriter, path: &Path) -> Exit {
    let mut cmd = Command::new(path);
    cmd.env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin")
        .env("HOME", "/")
        .env("TERM", "linux")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = match reaper::spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => {
            let status = if e.kind() == ErrorKind::NotFound {
                127
            } else {
                126
            };
            let hint = if e.kind() == ErrorKind::NotFound {
                " (a script whose interpreter is missing? pass --busybox, or link it statically)"
            } else {
                ""
            };
            return Exit::NotStarted {
                status,
                message: format!("vexec: cannot run {}: {e}{hint}", path.display()),
            };
        }
    };
    let (done_tx, done_rx) = mpsc::channel();
    let mut pumps = Vec::new();
    let outputs: [(Option<OwnedFd>, pump::Wrap); 2] = [
        (child.stdout.take().map(OwnedFd::from), GuestMsg::Stdout),
        (child.stderr.take().map(OwnedFd::from), GuestMsg::Stderr),
    ];
    for (fd, wrap) in outputs {
        if let Some(fd) = fd
            && let Ok(closer) = pump::spawn(port, fd, wrap, done_tx.clone())
        {
            pumps.push(closer);
        }
    }
    drop(done_tx);
    let exit = reaper::wait(child.id() as i32);
    pump::drain(&done_rx, pumps.len(), exec::DEFAULT_OUTPUT_GRACE);
    exit
}

/// A tar of every `.gcda` file under `root`. debugfs reports them with
/// size 0, so each is read to its end rather than copied by size.
fn gcov_archive(root: &Path) -> std::io::Result<Vec<u8>> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)?.flatten() {
            let ft = e.file_type()?;
            let path = e.path();
            if ft.is_dir() {
                stack.push(path);
            } else if ft.is_file() && path.extension().is_some_and(|x| x == "gcda") {
                let mut data = Vec::new();
                std::fs::File::open(&path)?.read_to_end(&mut data)?;
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                let rel = path.strip_prefix(root).unwrap_or(&path);
                tar.append_data(&mut h, rel, &data[..])?;
            }
        }
    }
    tar.into_inner()
}
