//! The interactive shell and `-t`, driven through a real pseudo-terminal:
//! typing commands, reading output, resizing the window, Ctrl-C, and the
//! host terminal restored afterwards.

mod common;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// vexec running on the slave side of a fresh pseudo-terminal.
struct Terminal {
    master: File,
    output: Arc<Mutex<Vec<u8>>>,
    child: Child,
}

fn set_size(fd: i32, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the struct.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

fn termios(fd: i32) -> libc::termios {
    // SAFETY: plain data filled by tcgetattr.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        libc::tcgetattr(fd, &mut t);
        t
    }
}

/// A test that fails midway must not leave its VM running.
impl Drop for Terminal {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Terminal {
    fn start(args: &[&str], rows: u16, cols: u16) -> (Terminal, OwnedFd) {
        let (mut m, mut s) = (-1, -1);
        // SAFETY: out-pointers to locals.
        let rc = unsafe {
            libc::openpty(
                &mut m,
                &mut s,
                std::ptr::null_mut(),
                std::ptr::null(),
                std::ptr::null(),
            )
        };
        assert_eq!(rc, 0);
        // Not inherited by vexec: a master it held itself would keep its
        // terminal from ever hanging up.
        for fd in [m, s] {
            // SAFETY: fcntl on descriptors we own.
            unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        }
        // SAFETY: fresh descriptors we own.
        let (master, slave) = unsafe { (File::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
        set_size(master.as_raw_fd(), rows, cols);
        let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
        c.env("XDG_CACHE_HOME", cache_dir())
            .env_remove("VEXEC_KERNEL")
            .env("SHELL", "/bin/sh")
            .env("TERM", "xterm")
            .args(["--accel", "tcg", "-q", "-k"])
            .arg(kernel("6.1"))
            .args(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()));
        // SAFETY: setsid and ioctl only, between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::setsid();
                libc::ioctl(0, libc::TIOCSCTTY, 0);
                Ok(())
            });
        }
        let child = c.spawn().unwrap();
        let output = Arc::new(Mutex::new(Vec::new()));
        let (mut r, out) = (master.try_clone().unwrap(), Arc::clone(&output));
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                out.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        (
            Terminal {
                master,
                output,
                child,
            },
            slave,
        )
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until the output contains `needle` (after what was seen so far
    /// when `from` is given), failing with the output after `secs`.
    fn wait_for(&self, needle: &str, secs: u64) {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if self.text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "no {needle:?} in the terminal within {secs}s:\n{}",
            self.text()
        );
    }

    fn type_keys(&mut self, keys: &str) {
        self.master.write_all(keys.as_bytes()).unwrap();
    }

    fn wait_exit(&mut self, secs: u64) -> Option<i32> {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        panic!("vexec did not exit within {secs}s:\n{}", self.text());
    }
}

#[test]
fn interactive_shell_on_a_real_terminal() {
    let (mut t, slave) = Terminal::start(&[], 33, 101);
    let before = termios(slave.as_raw_fd());
    // Typed ahead: kept by the terminal until the shell reads it.
    t.type_keys("echo ready-$((1+1))\r");
    t.wait_for("ready-2", 60);
    // Raw mode on the host side while the shell runs.
    let during = termios(slave.as_raw_fd());
    assert_eq!(during.c_lflag & libc::ICANON, 0, "host terminal not raw");

    t.type_keys("echo typed-$((6*7)); tty; stty size\r");
    t.wait_for("typed-42", 30);
    t.wait_for("/dev/pts/0", 10);
    t.wait_for("33 101", 10);

    // A resize reaches the guest's terminal.
    set_size(t.master.as_raw_fd(), 40, 120);
    std::thread::sleep(Duration::from_millis(500));
    t.type_keys("stty size\r");
    t.wait_for("40 120", 30);

    // Ctrl-C stops the foreground program in the guest, not vexec.
    // Results are computed, so the echo of typed lines never matches them.
    t.type_keys("sleep 100; echo not-$((1+1))-interrupted\r");
    std::thread::sleep(Duration::from_secs(2));
    t.type_keys("\x03");
    t.type_keys("echo after-$((2+3))-ctrl-c\r");
    t.wait_for("after-5-ctrl-c", 30);
    assert!(!t.text().contains("not-2-interrupted"), "{}", t.text());

    t.type_keys("exit 3\r");
    assert_eq!(t.wait_exit(30), Some(3));
    // The host terminal is as it was.
    let after = termios(slave.as_raw_fd());
    assert_eq!(after.c_lflag, before.c_lflag);
    assert_eq!(after.c_oflag, before.c_oflag);
    assert_eq!(after.c_iflag, before.c_iflag);
}

#[test]
fn command_with_tty_sees_a_terminal_and_colors() {
    let (mut t, _slave) = Terminal::start(
        &[
            "--",
            "sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && [ -t 2 ] && echo all-ttys; ls --color=auto -d /",
        ],
        24,
        80,
    );
    assert_eq!(t.wait_exit(60), Some(0));
    // What vexec wrote before it exited may still be on its way through
    // the pseudo-terminal to this test's reader thread.
    t.wait_for("all-ttys\r\n", 10);
    // ls colors a directory on a terminal.
    t.wait_for("\u{1b}[01;34m/", 10);
}

#[test]
fn piped_stdin_gets_no_terminal() {
    let mut c = vexec("6.1");
    c.stdin(Stdio::piped())
        .args(["--", "sh", "-c", "[ -t 0 ] || echo stdin-is-a-pipe; cat"]);
    let mut child = c.stdout(Stdio::piped()).spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"from the pipe\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(stdout(&out), "stdin-is-a-pipe\nfrom the pipe\n");
}
