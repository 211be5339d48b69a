//! virtiofsd: finding one, telling the Rust daemon (crates.io `virtiofsd`)
//! from the C one QEMU 7.2 ships, and running one per share.
//!
//! Each daemon gets an already-listening socket (`--fd`) whose file is
//! removed before the daemon starts, and vexec connects to it first and
//! hands that connection to QEMU: nothing is left on disk, and no other
//! process can reach the daemon.

use std::ffi::{CString, OsStr, OsString};
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};

/// Which implementation a virtiofsd binary is; their options differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavour {
    /// The Rust daemon (virtio-fs project, crates.io `virtiofsd`).
    Rust,
    /// The C daemon shipped with QEMU up to 7.2. It must run as root.
    C,
}

/// A virtiofsd binary vexec can use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Virtiofsd {
    pub path: PathBuf,
    pub flavour: Flavour,
}

/// Why no daemon could be found or started.
#[derive(Debug, thiserror::Error)]
pub enum VirtiofsdError {
    #[error(
        "no virtiofsd found (looked in PATH, {libexec}, and QEMU's vhost-user descriptors); install the Rust one (`cargo install virtiofsd`, needs libcap-ng-dev and libseccomp-dev) or pass --virtiofsd PATH"
    )]
    NotFound { libexec: String },
    #[error("virtiofsd {0} is not an executable file; pass --virtiofsd PATH to one")]
    NotExecutable(PathBuf),
    #[error("{path} does not look like a virtiofsd (`--version` printed {output:?})")]
    Unknown { path: PathBuf, output: String },
    #[error(
        "{0} is QEMU's C virtiofsd, which runs only as root; install the Rust virtiofsd (`cargo install virtiofsd`) to use virtio-fs without root"
    )]
    NeedsRoot(PathBuf),
    #[error("starting virtiofsd {path}: {source}")]
    Spawn {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where distributions install virtiofsd outside PATH.
pub const LIBEXEC: &[&str] = &[
    "/usr/libexec/virtiofsd",
    "/usr/lib/virtiofsd",
    "/usr/lib/qemu/virtiofsd",
    "/usr/libexec/qemu/virtiofsd",
];

/// Where QEMU's vhost-user JSON descriptors live.
pub const DESCRIPTOR_DIRS: &[&str] = &["/usr/share/qemu/vhost-user", "/etc/qemu/vhost-user"];

use crate::sys::programs::is_executable as is_exe;

/// The `binary` of every descriptor of type "fs" in `dirs`, in file order.
pub fn from_descriptors(dirs: &[PathBuf]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = dirs
        .iter()
        .filter_map(|d| std::fs::read_dir(d).ok())
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension() == Some(OsStr::new("json")))
        .collect();
    // QEMU's rule: descriptors sort by file name, whatever their directory.
    files.sort_by(|a, b| a.file_name().cmp(&b.file_name()));
    files
        .iter()
        .filter_map(|f| std::fs::read(f).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .filter(|v| v["type"] == "fs")
        .filter_map(|v| v["binary"].as_str().map(PathBuf::from))
        .collect()
}

/// Tells the flavour from `--version`: the C daemon prints
/// "virtiofsd version 7.2.x", the Rust one "virtiofsd 1.x".
pub fn flavour_of(version_output: &str) -> Option<Flavour> {
    let first = version_output.lines().next()?.trim();
    let rest = first.strip_prefix("virtiofsd")?.trim();
    if rest.starts_with("version") {
        Some(Flavour::C)
    } else if rest.starts_with(|c: char| c.is_ascii_digit()) {
        Some(Flavour::Rust)
    } else {
        None
    }
}

fn identify(path: &Path) -> Result<Virtiofsd, VirtiofsdError> {
    if !is_exe(path) {
        return Err(VirtiofsdError::NotExecutable(path.to_path_buf()));
    }
    let out = Command::new(path)
        .arg("--version")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .map_err(|source| VirtiofsdError::Spawn {
            path: path.to_path_buf(),
            source,
        })?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    // QEMU's daemon fails even `--version` without root (it drops
    // supplementary groups first); its binary still names itself.
    let c_by_content = || {
        std::fs::read(path).is_ok_and(|b| memchr::memmem::find(&b, b"virtiofsd version").is_some())
    };
    match flavour_of(&text).or_else(|| c_by_content().then_some(Flavour::C)) {
        Some(flavour) => Ok(Virtiofsd {
            path: path.to_path_buf(),
            flavour,
        }),
        None => Err(VirtiofsdError::Unknown {
            path: path.to_path_buf(),
            output: text,
        }),
    }
}

/// Finds a virtiofsd usable by this user: `explicit`, else the first of
/// PATH, [`LIBEXEC`] and the descriptors that runs with our privileges (the
/// C daemon only as root).
pub fn find(
    explicit: Option<&Path>,
    path_var: Option<&OsStr>,
    descriptor_dirs: &[PathBuf],
    root: bool,
) -> Result<Virtiofsd, VirtiofsdError> {
    let usable = |v: Virtiofsd| {
        if v.flavour == Flavour::C && !root {
            Err(VirtiofsdError::NeedsRoot(v.path))
        } else {
            Ok(v)
        }
    };
    if let Some(p) = explicit {
        return usable(identify(p)?);
    }
    let mut candidates = crate::sys::programs::candidates_on_path("virtiofsd", path_var);
    candidates.extend(LIBEXEC.iter().map(PathBuf::from));
    candidates.extend(from_descriptors(descriptor_dirs));
    let mut first_err = None;
    let mut seen = Vec::new();
    for c in candidates {
        if !is_exe(&c) {
            continue;
        }
        let real = std::fs::canonicalize(&c).unwrap_or(c.clone());
        if seen.contains(&real) {
            continue;
        }
        seen.push(real);
        match identify(&c).and_then(usable) {
            Ok(v) => return Ok(v),
            Err(e) => {
                first_err.get_or_insert(e);
            }
        }
    }
    Err(first_err.unwrap_or(VirtiofsdError::NotFound {
        libexec: LIBEXEC.join(", "),
    }))
}

/// How one share is served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonSpec {
    pub virtiofsd: Virtiofsd,
    /// The host directory to export.
    pub source: PathBuf,
    /// Refuse every write from the guest, enforced on the host.
    pub readonly: bool,
    /// virtiofsd's cache policy (`auto`, `always`, ...).
    pub cache: &'static str,
    /// Show host mount points below the share as submounts (own st_dev).
    /// Off for overlay lower layers: overlayfs refuses automount points.
    pub submounts: bool,
}

impl DaemonSpec {
    /// The daemon's arguments, given the number of its listening socket.
    pub fn args(&self, fd: i32) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        match self.virtiofsd.flavour {
            Flavour::Rust => {
                a.push(format!("--fd={fd}").into());
                let mut dir = OsString::from("--shared-dir=");
                dir.push(&self.source);
                a.push(dir);
                a.push(format!("--cache={}", self.cache).into());
                a.push("--sandbox=namespace".into());
                a.push("--log-level=error".into());
                if !self.submounts {
                    a.push("--no-announce-submounts".into());
                }
                if self.readonly {
                    a.push("--readonly".into());
                }
            }
            Flavour::C => {
                a.push(format!("--fd={fd}").into());
                // The C daemon splits -o values at commas unless escaped.
                let mut src = b"source=".to_vec();
                for &b in self.source.as_os_str().as_bytes() {
                    if b == b',' || b == b'\\' {
                        src.push(b'\\');
                    }
                    src.push(b);
                }
                a.extend(["-o".into(), OsString::from_vec(src)]);
                // Its namespace sandbox cannot pivot_root into "/" (EBUSY);
                // chroot confines nothing less there.
                let sandbox = if self.source == Path::new("/") {
                    "chroot"
                } else {
                    "namespace"
                };
                a.extend([
                    "-o".into(),
                    format!("cache={},sandbox={sandbox},log_level=err", self.cache).into(),
                ]);
                if self.submounts {
                    a.extend(["-o".into(), "announce_submounts".into()]);
                }
            }
        }
        a
    }
}

/// How many descriptors a virtiofsd is given: the user's hard limit.
fn nofile_limit() -> libc::rlim_t {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return 1024;
    }
    lim.rlim_max
}

/// What a daemon keeps for itself: the Rust virtiofsd 1.14 reserves 546
/// plus one per worker thread (64) and answers ENFILE past the rest; the
/// C one needs fewer.
const DAEMON_FD_RESERVE: u64 = 640;

/// How many descriptors a virtiofsd can spend on the guest's inodes and
/// open files.
///
/// It keeps one open for every inode the guest knows (unless it can use
/// file handles, which takes root), and the guest lets go of cached inodes
/// only when told to: the guest is given this number
/// (`Setup::virtiofs_fd_budget`). Each daemon gets the user's hard limit;
/// inheriting the soft one (often 1024) made a `find` over a big tree fail
/// with EMFILE halfway.
pub fn guest_fd_budget() -> u64 {
    (nofile_limit() as u64).saturating_sub(DAEMON_FD_RESERVE)
}

/// A running virtiofsd. Dropping it kills and reaps the process.
pub struct Daemon {
    pid: libc::pid_t,
    source: PathBuf,
    errors: Arc<Mutex<String>>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Starts the daemon; returns it and the connection QEMU should use
    /// (`-chardev socket,fd=N`).
    pub fn spawn(spec: &DaemonSpec, dir: &Path) -> Result<(Daemon, OwnedFd), VirtiofsdError> {
        let spawn_err = |source| VirtiofsdError::Spawn {
            path: spec.virtiofsd.path.clone(),
            source,
        };
        // Bind in a private directory, connect, and unlink: the pending
        // connection is ours, and no socket file outlives this call.
        let sock = dir.join("vfs.sock");
        let listener = UnixListener::bind(&sock).map_err(spawn_err)?;
        let client = UnixStream::connect(&sock);
        let _ = std::fs::remove_file(&sock);
        let client = client.map_err(spawn_err)?;
        let lfd = listener.as_raw_fd();

        let mut cmd = Command::new(&spec.virtiofsd.path);
        cmd.args(spec.args(lfd))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // The C daemon has no read-only option: give it a mount namespace
        // where the share is a read-only bind mount.
        let ro_source = (spec.readonly && spec.virtiofsd.flavour == Flavour::C)
            .then(|| CString::new(spec.source.as_os_str().as_bytes()))
            .transpose()
            .map_err(|e| spawn_err(std::io::Error::other(e)))?;
        let nofile = nofile_limit();
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                libc::setpgid(0, 0);
                // One descriptor per inode the guest knows: give the daemon
                // all the user may have (see guest_fd_budget).
                let lim = libc::rlimit {
                    rlim_cur: nofile,
                    rlim_max: nofile,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::fcntl(lfd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(src) = &ro_source {
                    read_only_view(src)?;
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        drop(listener);
        let pid = child.id() as libc::pid_t;
        let errors = Arc::new(Mutex::new(String::new()));
        if let Some(mut err) = child.stderr.take() {
            let buf = Arc::clone(&errors);
            std::thread::spawn(move || {
                let mut s = String::new();
                let _ = err.read_to_string(&mut s);
                buf.lock().unwrap_or_else(|p| p.into_inner()).push_str(&s);
            });
        }
        // Reaped in Drop, by pid.
        std::mem::forget(child);
        Ok((
            Daemon {
                pid,
                source: spec.source.clone(),
                errors,
                watcher: None,
            },
            client.into(),
        ))
    }

    /// Calls `on_exit` from a thread with the daemon's status when it ends.
    pub fn watch(&mut self, on_exit: impl FnOnce(i32) + Send + 'static) {
        self.watcher = Some(super::child::watch(self.pid, on_exit));
    }

    /// The directory this daemon serves.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// What the daemon printed so far, prefixed with the share it serves.
    pub fn errors(&self) -> Option<String> {
        let e = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        let e = e.trim();
        (!e.is_empty()).then(|| format!("virtiofsd for {}: {e}", self.source.display()))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: the pid is our unreaped child.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        super::child::kill_and_reap(self.pid);
    }
}

/// In a fresh mount namespace, makes `src` and everything below it
/// read-only. Runs between fork and exec: raw syscalls only.
fn read_only_view(src: &CString) -> std::io::Result<()> {
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 1;
    const AT_RECURSIVE: libc::c_uint = 0x8000;
    let check = |rc: libc::c_long| {
        if rc < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain syscalls on NUL-terminated paths and a local struct.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS).into())?;
        check(
            libc::mount(
                c"none".as_ptr(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            )
            .into(),
        )?;
        check(
            libc::mount(
                src.as_ptr(),
                src.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            )
            .into(),
        )?;
        let attr = MountAttr {
            attr_set: MOUNT_ATTR_RDONLY,
            attr_clr: 0,
            propagation: 0,
            userns_fd: 0,
        };
        check(libc::syscall(
            libc::SYS_mount_setattr,
            libc::AT_FDCWD,
            src.as_ptr(),
            AT_RECURSIVE,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flavours() {
        assert_eq!(flavour_of("virtiofsd 1.14.0\n"), Some(Flavour::Rust));
        assert_eq!(
            flavour_of("virtiofsd version 7.2.22 (Debian 1:7.2+dfsg-7)\nCopyright"),
            Some(Flavour::C)
        );
        assert_eq!(flavour_of("qemu-system-x86_64 7.2"), None);
    }

    #[test]
    fn descriptors_of_type_fs() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(
            d.path().join("50-fs.json"),
            r#"{"description":"x","type":"fs","binary":"/opt/virtiofsd"}"#,
        )
        .unwrap();
        std::fs::write(
            d.path().join("40-gpu.json"),
            r#"{"type":"gpu","binary":"/opt/gpu"}"#,
        )
        .unwrap();
        std::fs::write(d.path().join("60-bad.json"), "not json").unwrap();
        assert_eq!(
            from_descriptors(&[d.path().to_path_buf()]),
            [PathBuf::from("/opt/virtiofsd")]
        );
    }

    #[test]
    fn args_per_flavour() {
        let mut spec = DaemonSpec {
            virtiofsd: Virtiofsd {
                path: "/x".into(),
                flavour: Flavour::Rust,
            },
            source: "/home/a b".into(),
            readonly: true,
            cache: "always",
            submounts: false,
        };
        let a = spec.args(7);
        assert!(a.contains(&"--fd=7".into()));
        assert!(a.contains(&"--shared-dir=/home/a b".into()));
        assert!(a.contains(&"--readonly".into()));
        spec.virtiofsd.flavour = Flavour::C;
        let a = spec.args(7);
        assert!(a.contains(&"source=/home/a b".into()));
        spec.source = "/x,y".into();
        assert!(spec.args(7).contains(&r"source=/x\,y".into()));
        assert!(!a.contains(&"--readonly".into()));
    }

    #[test]
    fn c_daemon_refused_without_root() {
        let d = tempfile::tempdir().unwrap();
        let fake = d.path().join("virtiofsd");
        std::fs::write(&fake, "#!/bin/sh\necho 'virtiofsd version 7.2.0'\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = find(Some(&fake), None, &[], false).unwrap_err();
        assert!(matches!(e, VirtiofsdError::NeedsRoot(_)), "{e}");
        assert_eq!(
            find(Some(&fake), None, &[], true).unwrap().flavour,
            Flavour::C
        );
        let e = find(None, Some(OsStr::new("/nonexistent")), &[], false);
        assert!(e.is_err());
    }
}
