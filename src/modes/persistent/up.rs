//! `vexec up`: a VM that stays. The command the user typed starts an `up`
//! process (vexec itself, detached in a session of its own), shows what it
//! says until the guest serves commands, and returns. The `up` process
//! owns QEMU and its daemons through the same launch as a plain run, and
//! serves the VM's control socket until `vexec down`, `--idle`, a signal
//! or the guest's own end; then it removes every file it made.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::artifacts::cache::Cache;
use crate::host::events::SignalRelay;
use crate::host::outcome::Outcome;
use crate::host::params::Job;
use crate::kernel::image::Arch;
use crate::launch::{self, Watch};
use crate::modes::spec::RunSpec;
use crate::modes::{command, run};

use super::VmsError;
use super::registry::{self, Entry, Info};
use super::server::{OnReady, PortServer};

/// The word that starts the `up` process (not a user-facing verb).
pub const DAEMON_WORD: &str = "__up";

/// The word that starts the `up` process's cleaner (see [`cleaner`]).
pub const CLEANER_WORD: &str = "__up-cleaner";

/// What `vexec up` takes beyond a plain run's options.
#[derive(Debug, Clone)]
pub struct UpOptions {
    pub name: String,
    /// Serve the QEMU guest agent protocol on this socket.
    pub qga: Option<PathBuf>,
    /// Shut down after this long without a command.
    pub idle: Option<Duration>,
    /// How many commands may run at once.
    pub ports: usize,
    /// Say nothing but errors (`-q`).
    pub quiet: bool,
}

/// Starts the `up` process with `words` (what followed `up`), relays its
/// messages until the VM serves or the process ends; vexec's status.
pub fn up(words: &[OsString], opts: &UpOptions) -> Result<i32, VmsError> {
    registry::check_name(&opts.name)?;
    let entry = Entry::new(&registry::root()?, &opts.name);
    if entry.alive() {
        return Err(VmsError::NameInUse(opts.name.clone()));
    }
    if let Some(q) = &opts.qga {
        free_socket_path(q)?;
    }
    let exe = std::env::current_exe().map_err(VmsError::Daemon)?;
    let mut child = Command::new(exe)
        .arg(DAEMON_WORD)
        .args(words)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(VmsError::Daemon)?;
    // Everything it says until it serves (then its stderr is its log).
    if let Some(mut err) = child.stderr.take() {
        let mut buf = [0u8; 8192];
        while let Ok(n @ 1..) = err.read(&mut buf) {
            let _ = std::io::stderr().write_all(&buf[..n]);
        }
    }
    match entry.info() {
        Some(i) if i.ready && i.pid == child.id() => {
            if opts.quiet {
                return Ok(0);
            }
            crate::say!(
                "vexec: VM {} is up (kernel {}); run `vexec exec {0} -- COMMAND`, `vexec shell {0}`, `vexec down {0}`",
                opts.name,
                i.kernel
            );
            Ok(0)
        }
        _ => {
            let _ = child.wait();
            Ok(crate::status::STATUS_FAILED)
        }
    }
}

/// Refuses a socket path another process serves; removes a dead one.
fn free_socket_path(path: &Path) -> Result<(), VmsError> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(m) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    if !m.file_type().is_socket() || UnixStream::connect(path).is_ok() {
        return Err(VmsError::SocketInUse(path.to_path_buf()));
    }
    let _ = std::fs::remove_file(path);
    Ok(())
}

/// A listening socket at `path` that only its owner can connect to (0600,
/// like the control sockets): bound in a private 0700 directory beside
/// it, made 0600 there, then renamed into place, so no other user can
/// connect in between, whatever the umask.
fn bind_private(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let private = parent.join(format!(".vexec-bind-{}", std::process::id()));
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let inside = private.join("s");
    let bound = UnixListener::bind(&inside).and_then(|l| {
        std::fs::set_permissions(&inside, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&inside, path)?;
        Ok(l)
    });
    let _ = std::fs::remove_file(&inside);
    let _ = std::fs::remove_dir(&private);
    bound
}

/// The `up` process: boots the VM and serves it until it ends.
pub fn daemon(spec: &RunSpec, opts: &UpOptions) -> Result<i32, VmsError> {
    // Its own session: the terminal's Ctrl-C and hangup are not its own.
    // SAFETY: setsid has no preconditions.
    unsafe { libc::setsid() };
    let entry = Entry::new(&registry::root()?, &opts.name);
    let _lock = entry.claim()?;
    let _cleaner = spawn_cleaner(&entry, opts.qga.as_deref());
    let served = serve(spec, opts, &entry);
    if let Some(q) = &opts.qga {
        let _ = std::fs::remove_file(q);
    }
    entry.remove();
    served
}

/// A child that outlives this process if it is killed (SIGKILL leaves no
/// time to clean up): when the returned pipe closes, it removes what this
/// process left. QEMU and the daemons die with it on their own.
fn spawn_cleaner(entry: &Entry, qga: Option<&Path>) -> Option<std::process::ChildStdin> {
    let exe = std::env::current_exe().ok()?;
    let mut c = Command::new(exe);
    c.arg(CLEANER_WORD)
        .arg(&entry.dir)
        .arg(std::process::id().to_string());
    if let Some(q) = qga {
        c.arg(q);
    }
    // Nothing of the user's terminal: `vexec up` waits for EOF on stderr.
    let mut child = (c
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null()))
    .spawn()
    .ok()?;
    child.stdin.take()
}

/// The cleaner: `DIR PID [QGA]`. Waits for its stdin to close (the `up`
/// process PID ended, however), then removes the VM's directory and guest
/// agent socket unless they are gone or a new `up` owns them.
pub fn cleaner(words: &[OsString]) -> i32 {
    let [dir, pid, qga @ ..] = words else {
        return crate::status::STATUS_FAILED;
    };
    let _ = std::io::copy(&mut std::io::stdin(), &mut std::io::sink());
    let dir = PathBuf::from(dir);
    let (Some(root), Some(name)) = (dir.parent(), dir.file_name()) else {
        return crate::status::STATUS_FAILED;
    };
    let entry = Entry::new(root, &name.to_string_lossy());
    let ours = entry
        .info()
        .is_some_and(|i| pid.to_str() == Some(&i.pid.to_string()));
    // The dying process's descriptors close one by one: its lock may
    // outlive the pipe for a moment.
    let give_up = std::time::Instant::now() + Duration::from_secs(5);
    while ours && entry.alive() && std::time::Instant::now() < give_up {
        std::thread::sleep(Duration::from_millis(20));
    }
    if ours && !entry.alive() {
        entry.remove();
        if let Some(q) = qga.first() {
            let _ = free_socket_path(Path::new(q));
        }
    }
    0
}

fn serve(spec: &RunSpec, opts: &UpOptions, entry: &Entry) -> Result<i32, VmsError> {
    let relay = SignalRelay::install().map_err(VmsError::Daemon)?;
    let cache = Cache::open(spec.cache_dir.clone()).map_err(run::RunError::from)?;
    let kernel = run::resolve_kernel(spec, &cache)?;
    if kernel.info.arch != Arch::X86_64 {
        return Err(VmsError::Foreign(kernel.info.arch.name()));
    }
    let shares = run::shares_for(spec, None)?;
    let writable = run::writable_of(&shares);
    let mut m = run::machine(spec, &cache, kernel, shares)?;
    m.plan.config.exec_port_fds = vec![-1; opts.ports];
    m.plan.config.qga_fd = opts.qga.as_ref().map(|_| -1);
    let info = Info {
        qga: opts.qga.clone(),
        ports: opts.ports,
        defaults: registry::ExecDefaults::of(spec),
        ..Info::starting(
            opts.name.clone(),
            m.kernel.info.release.clone(),
            spec,
            writable,
        )
    };
    entry.write_info(&info).map_err(VmsError::Daemon)?;
    let listener = UnixListener::bind(entry.socket()).map_err(VmsError::Daemon)?;
    let qga = match &opts.qga {
        Some(p) => Some(bind_private(p).map_err(|e| VmsError::Bind(p.clone(), e))?),
        None => None,
    };
    let ready = Arc::new(Mutex::new(false));
    let server = Arc::new(PortServer::new(
        listener,
        qga,
        relay.clone(),
        opts.idle,
        on_ready(entry.clone(), info, Arc::clone(&ready)),
    ));
    // The VM has no deadline: its `--timeout` is each exec's.
    let watch = Watch {
        timeout: None,
        ..run::watch_for(spec, Some(entry.dir.join("console.log")))
    };
    let warm = run::warm_start_for(spec, &cache);
    let setup = m.setup.clone();
    let hooks = hooks_of(spec);
    let launched = launch::launch(&m.start, m.plan, &watch, &warm, &relay, || Job::Serve {
        setup: Box::new(setup.clone()),
        hooks: Box::new(hooks.clone()),
        server: server.clone(),
    })?;
    let words = crate::report::outcome_words(&launched.outcome);
    let served = *ready.lock().unwrap_or_else(|p| p.into_inner());
    if !served {
        crate::say!("vexec: error: the VM did not come up: {words}");
        return Ok(crate::status::STATUS_FAILED);
    }
    let ended_well = matches!(
        launched.outcome,
        Outcome::Interrupted(_) | Outcome::Exited(_)
    );
    crate::say!("vexec: VM {} ended: {words}", opts.name);
    Ok(if ended_well {
        0
    } else {
        crate::status::STATUS_FAILED
    })
}

/// The VM's setup (run once it is up) and teardown (run at `down`)
/// commands from the config file, with the environment `up` was given.
fn hooks_of(spec: &RunSpec) -> crate::protocol::Hooks {
    let exec = command::exec_for(spec);
    crate::protocol::Hooks {
        setup: exec.setup,
        teardown: exec.teardown,
        env: exec.env,
        cwd: exec.cwd,
    }
}

/// Once the guest serves: the VM is marked ready, and the `up` process's
/// stderr becomes the VM's log (the user's terminal is let go).
fn on_ready(entry: Entry, mut info: Info, ready: Arc<Mutex<bool>>) -> OnReady {
    Box::new(move |qemu_pid| {
        entry.mark_ready(&mut info, qemu_pid);
        *ready.lock().unwrap_or_else(|p| p.into_inner()) = true;
        if let Ok(log) = std::fs::File::create(entry.log()) {
            use std::os::fd::AsRawFd;
            // SAFETY: dup2 onto stderr of a descriptor we own.
            unsafe { libc::dup2(log.as_raw_fd(), 2) };
        }
    })
}
