//! Children vexec owns (QEMU, the virtiofsd daemons): watched from a
//! thread that learns when one exits without reaping it, so its pid stays
//! ours until the owner kills and reaps it on drop.

/// Calls `on_exit` from a thread with `pid`'s exit status (or 128 + the
/// signal that killed it) once it ends. The process is left unreaped.
pub fn watch(
    pid: libc::pid_t,
    on_exit: impl FnOnce(i32) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || on_exit(wait_exit(pid)))
}

/// Blocks until `pid` exits; its status, without reaping it.
fn wait_exit(pid: libc::pid_t) -> i32 {
    loop {
        // SAFETY: waitid fills a zeroed siginfo_t.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = unsafe {
            libc::waitid(
                libc::P_PID,
                pid as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOWAIT,
            )
        };
        if rc == 0 {
            // SAFETY: filled by a successful waitid.
            let (code, status) = unsafe { (info.si_code, info.si_status()) };
            return if code == libc::CLD_EXITED {
                status
            } else {
                128 + status
            };
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return 255;
        }
    }
}

/// Kills `pid` with SIGKILL and reaps it. For a child that is ours and not
/// yet reaped (see [`watch`]).
pub fn kill_and_reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: the pid is our unreaped child, so it cannot have been reused.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, &mut status, 0);
    }
}

/// How a status from [`watch`] reads in a message.
pub fn describe_status(status: i32) -> String {
    if status > 128 {
        let sig = status - 128;
        // SAFETY: strsignal returns a static string for any number.
        let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(sig)) };
        format!("killed by signal {sig}, {}", name.to_string_lossy())
    } else {
        format!("exit status {status}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_exit_and_signal_without_reaping() {
        let child = std::process::Command::new("/bin/sh")
            .args(["-c", "exit 3"])
            .spawn()
            .unwrap();
        let pid = child.id() as libc::pid_t;
        std::mem::forget(child);
        let (tx, rx) = std::sync::mpsc::channel();
        watch(pid, move |s| tx.send(s).unwrap()).join().unwrap();
        assert_eq!(rx.recv().unwrap(), 3);
        // Still ours to reap.
        kill_and_reap(pid);
        assert_eq!(describe_status(3), "exit status 3");
        assert!(describe_status(128 + 9).starts_with("killed by signal 9"));
    }
}
