//! Persistent VMs: `vexec up` boots one that stays, `exec` and `shell` run
//! commands in it (many at once), `ps` lists them, `down` ends them. A
//! front end like the others: the VM is launched through
//! [`crate::launch`] with a job that serves instead of running one
//! command.

pub mod attach;
pub mod reach;
pub mod registry;
pub mod server;
pub mod up;
pub mod wire;

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use registry::Entry;

/// Why a persistent VM could not be started, reached or stopped.
#[derive(Debug, thiserror::Error)]
pub enum VmsError {
    #[error(
        "{0:?} is not a usable VM name: use letters, digits, '.', '_' and '-' (up to 64, not starting with '.' or '-')"
    )]
    BadName(String),
    #[error(
        "a VM named {0} is already up (see `vexec ps`); `vexec down {0}` first, or pick another --name"
    )]
    NameInUse(String),
    #[error(
        "no VM named {name} is up (running: {running}); start one with `vexec up --name {name}`"
    )]
    NoSuchVm { name: String, running: String },
    #[error(
        "cannot use the runtime directory {path}: {why}; set XDG_RUNTIME_DIR to a private directory of yours"
    )]
    RuntimeDir { path: PathBuf, why: String },
    #[error(
        "{0} is in use (another VM or program serves it, or it is not a socket); pick another --qga path"
    )]
    SocketInUse(PathBuf),
    #[error("cannot listen on {0}: {1}; check that its directory exists and is writable")]
    Bind(PathBuf, std::io::Error),
    #[error("cannot reach VM {name}: {source}; is it shutting down? see `vexec ps`")]
    Connect {
        name: String,
        source: std::io::Error,
    },
    #[error("VM {0} is still booting; try again in a moment (`vexec ps` says when it is up)")]
    Starting(String),
    #[error("VM {0} went away: {1}")]
    Gone(String, String),
    #[error("VM {0} refused the command: {1}")]
    Refused(String, String),
    #[error(
        "a persistent VM boots x86_64 kernels only (this one is {0}); use `vexec run-dir` for other architectures"
    )]
    Foreign(&'static str),
    #[error("starting the VM's up process: {0}")]
    Daemon(std::io::Error),
    #[error(transparent)]
    Run(#[from] crate::modes::run::RunError),
    #[error(transparent)]
    Launch(#[from] crate::launch::LaunchError),
}

impl From<crate::launch::shares::ShareError> for VmsError {
    fn from(e: crate::launch::shares::ShareError) -> Self {
        VmsError::Run(e.into())
    }
}

impl From<crate::kernel::ResolveError> for VmsError {
    fn from(e: crate::kernel::ResolveError) -> Self {
        VmsError::Run(e.into())
    }
}

/// `vexec ps`: every VM of this user, live or dead, and the one-shot
/// runs going on now.
pub fn ps() -> Result<i32, VmsError> {
    let root = registry::root()?;
    registry::sweep_dead_runs(&root);
    let rows: Vec<[String; 9]> = registry::all(&root).iter().map(row).collect();
    let head = [
        "NAME", "STATE", "KERNEL", "UPTIME", "MEMORY", "RSS", "PID", "SOCKET", "COMMAND",
    ];
    let mut widths = head.map(str::len);
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    for r in std::iter::once(head.map(String::from)).chain(rows) {
        let cells: Vec<String> = (r.iter().zip(widths))
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    Ok(0)
}

fn row(e: &Entry) -> [String; 9] {
    let info = e.info();
    let run = info.as_ref().and_then(|i| i.command.clone());
    let state = match (e.alive(), info.as_ref().is_some_and(|i| i.ready)) {
        (true, true) if run.is_some() => "running",
        (true, true) => "up",
        (true, false) => "starting",
        (false, _) => "dead",
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let get = |f: &dyn Fn(&registry::Info) -> String| info.as_ref().map_or("-".into(), f);
    let rss = (info.as_ref().and_then(|i| i.qemu_pid))
        .filter(|_| matches!(state, "up" | "running"))
        .and_then(rss_mib)
        .map_or("-".into(), |m| format!("{m}M"));
    [
        e.name(),
        state.into(),
        get(&|i| i.kernel.clone()),
        get(&|i| {
            let secs = now.saturating_sub(i.started);
            humantime::format_duration(Duration::from_secs(secs)).to_string()
        }),
        get(&|i| format!("{} ×{}", i.memory, i.cpus)),
        rss,
        get(&|i| i.pid.to_string()),
        e.socket().display().to_string(),
        run.unwrap_or_else(|| "(up)".into()),
    ]
}

/// QEMU's resident memory, MiB.
fn rss_mib(pid: u32) -> Option<u64> {
    Some(crate::sys::process::status_kib(pid, "VmRSS")? / 1024)
}

/// `vexec down NAME...` / `--all`: each VM shut down and waited for; a
/// dead VM's leftovers removed.
pub fn down(names: &[String], all: bool, runs: bool) -> Result<i32, VmsError> {
    let root = registry::root()?;
    let entries: Vec<Entry> = if all {
        // A plain run is another terminal's command: stopped only when asked.
        registry::all(&root)
            .into_iter()
            .filter(|e| runs || e.info().is_none_or(|i| i.command.is_none()))
            .collect()
    } else {
        let mut v = Vec::new();
        for n in names {
            registry::check_name(n)?;
            let e = Entry::new(&root, n);
            if !e.dir.exists() {
                return Err(attach::find(n)
                    .err()
                    .unwrap_or(VmsError::NameInUse(n.clone())));
            }
            v.push(e);
        }
        v
    };
    for e in entries {
        stop(&e);
    }
    Ok(0)
}

/// Asks one VM to stop and waits for its `up` process to finish (killing
/// it if it does not within a while); then nothing of it is left.
fn stop(e: &Entry) {
    use crate::protocol;
    let qga = e.info().and_then(|i| i.qga);
    if e.alive() {
        if let Ok(mut c) = std::os::unix::net::UnixStream::connect(e.socket()) {
            // A VM still booting answers once it serves, or never: the
            // wait below bounds it either way.
            let _ = c.set_read_timeout(Some(Duration::from_secs(20)));
            let _ = protocol::write_frame(&mut c, &wire::Request::Down);
            let _ = protocol::read_frame::<wire::Reply>(&mut c);
        }
        let start = std::time::Instant::now();
        while e.alive() && start.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if e.alive()
            && let Some(i) = e.info()
        {
            // SAFETY: kill(2) of the VM's own up process; its QEMU and
            // daemons die with it (parent-death signal).
            unsafe { libc::kill(i.pid as i32, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    e.remove();
    if let Some(q) = qga {
        let _ = std::fs::remove_file(q);
    }
    crate::say!("vexec: VM {} is down", e.name());
}
