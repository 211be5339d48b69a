//! The virtual machine process: QEMU spawned with inherited sockets, owned
//! so that dropping a [`Vm`] kills and reaps it on every exit path.

pub mod accel;
pub mod child;
pub mod qemu;
pub mod qmp;
pub mod ram;
pub mod snapshot;
pub mod virtiofsd;

use std::ffi::OsString;
use std::os::fd::RawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::kernel::image::Arch;

/// QEMU could not be started.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "QEMU ({0}) was not found; install it (Debian/Ubuntu: `sudo apt-get install {1}`) or pass --qemu PATH"
    )]
    QemuMissing(String, &'static str),
    #[error("starting {binary}: {source}")]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Virtiofsd(#[from] virtiofsd::VirtiofsdError),
}

/// The Debian/Ubuntu package holding QEMU for `arch`.
fn qemu_package(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "qemu-system-x86",
        Arch::Aarch64 => "qemu-system-arm",
    }
}

/// Finds the x86_64 QEMU binary: an explicit path, else on `PATH`.
pub fn find_qemu(explicit: Option<&Path>, path_var: Option<OsString>) -> Result<PathBuf, VmError> {
    find_qemu_for(Arch::X86_64, explicit, path_var)
}

/// Finds QEMU for guests of `arch`: an explicit path, else
/// `qemu-system-ARCH` on `PATH`.
pub fn find_qemu_for(
    arch: Arch,
    explicit: Option<&Path>,
    path_var: Option<OsString>,
) -> Result<PathBuf, VmError> {
    use crate::sys::programs;
    if let Some(p) = explicit {
        return if programs::is_executable(p) {
            Ok(p.to_path_buf())
        } else {
            Err(VmError::QemuMissing(
                p.display().to_string(),
                qemu_package(arch),
            ))
        };
    }
    let name = format!("qemu-system-{}", arch.name());
    programs::on_path(&name, path_var.as_deref())
        .ok_or_else(|| VmError::QemuMissing(name.clone(), qemu_package(arch)))
}

/// A running QEMU and the daemons serving its shares. Dropping it kills and
/// reaps QEMU, then the daemons.
pub struct Vm {
    pid: libc::pid_t,
    waiter: Option<std::thread::JoinHandle<()>>,
    /// QEMU's own stderr (errors about devices, KVM), to be drained.
    pub stderr: Option<std::process::ChildStderr>,
    /// Dropped after QEMU is gone (fields drop after `Drop::drop`).
    daemons: Vec<virtiofsd::Daemon>,
}

impl Vm {
    /// Starts QEMU with `args`; `inherit` are descriptors QEMU receives under
    /// the same numbers; `daemons` serve its shares and end with it.
    /// `on_exit` is called from a watcher thread with the exit status (or
    /// 128+signal) once QEMU ends, before it is reaped; likewise
    /// `on_daemon_exit` with a daemon's index in `daemons` and its status.
    pub fn spawn(
        binary: &Path,
        args: &[OsString],
        inherit: &[RawFd],
        mut daemons: Vec<virtiofsd::Daemon>,
        on_exit: impl FnOnce(i32) + Send + 'static,
        on_daemon_exit: impl Fn(usize, i32) + Clone + Send + 'static,
    ) -> Result<Vm, VmError> {
        let mut cmd = Command::new(binary);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let fds = inherit.to_vec();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Own process group: the terminal's Ctrl-C reaches vexec,
                // which stops the guest command first.
                libc::setpgid(0, 0);
                // Never outlive vexec, even if it is killed with SIGKILL.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                VmError::QemuMissing(binary.display().to_string(), "qemu-system-x86")
            } else {
                VmError::Spawn {
                    binary: binary.to_path_buf(),
                    source,
                }
            }
        })?;
        let pid = child.id() as libc::pid_t;
        let stderr = child.stderr.take();
        // The Child is not waited through std: the watcher waits without
        // reaping (WNOWAIT), so the pid cannot be reused before Drop kills.
        std::mem::forget(child);
        let waiter = child::watch(pid, on_exit);
        for (i, d) in daemons.iter_mut().enumerate() {
            let f = on_daemon_exit.clone();
            d.watch(move |status| f(i, status));
        }
        Ok(Vm {
            pid,
            waiter: Some(waiter),
            stderr,
            daemons,
        })
    }

    /// QEMU's process id.
    pub fn pid(&self) -> libc::pid_t {
        self.pid
    }

    /// The directory the daemon at `i` serves.
    pub fn daemon_source(&self, i: usize) -> Option<&Path> {
        self.daemons.get(i).map(|d| d.source())
    }

    /// What the share daemons reported, one line per daemon that spoke.
    pub fn daemon_errors(&self) -> Vec<String> {
        self.daemons.iter().filter_map(|d| d.errors()).collect()
    }

    /// How long QEMU's most starved thread has waited for a host CPU while
    /// runnable (the scheduler's run delay): time the guest could not use.
    pub fn cpu_wait(&self) -> Duration {
        let tasks = std::fs::read_dir(format!("/proc/{}/task", self.pid));
        let waited = tasks
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
            .filter_map(|s| run_delay_ns(&s))
            .max()
            .unwrap_or(0);
        Duration::from_nanos(waited)
    }

    /// QEMU's peak resident memory so far (VmHWM), in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        crate::sys::process::status_kib(self.pid as u32, "VmHWM")
    }
}

/// The run delay (ns spent runnable but waiting for a CPU) from a task's
/// `/proc/.../schedstat`: "on-CPU ns, waiting ns, timeslices".
pub fn run_delay_ns(schedstat: &str) -> Option<u64> {
    schedstat.split_whitespace().nth(1)?.parse().ok()
}

impl Drop for Vm {
    fn drop(&mut self) {
        // SAFETY: the pid is still ours: it is not reaped until below.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
        }
        if let Some(w) = self.waiter.take() {
            let _ = w.join();
        }
        child::kill_and_reap(self.pid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_run_delay_from_schedstat() {
        assert_eq!(run_delay_ns("120 2976435 1\n"), Some(2976435));
        assert_eq!(run_delay_ns(""), None);
        assert_eq!(run_delay_ns("1 x 2"), None);
    }

    #[test]
    fn missing_qemu_is_a_clear_error() {
        let e = find_qemu(None, Some("/nonexistent".into())).unwrap_err();
        assert!(
            e.to_string().contains("apt-get install qemu-system-x86"),
            "{e}"
        );
        let e = find_qemu(Some(Path::new("/nonexistent/qemu")), None).unwrap_err();
        assert!(matches!(e, VmError::QemuMissing(..)));
    }

    #[test]
    fn drop_kills_and_reaps() {
        let (tx, rx) = std::sync::mpsc::channel();
        let vm = Vm::spawn(
            Path::new("/bin/sleep"),
            &["30".into()],
            &[],
            Vec::new(),
            move |s| {
                let _ = tx.send(s);
            },
            |_, _| {},
        )
        .unwrap();
        let pid = vm.pid();
        drop(vm);
        assert_eq!(rx.recv().unwrap(), 128 + libc::SIGKILL);
        // SAFETY: probing a pid with signal 0.
        assert_eq!(unsafe { libc::kill(pid, 0) }, -1);
    }
}
