//! The guest agent: vexec running as PID 1 in the VM. It loads the modules
//! its initramfs carries, opens the control port, builds the root
//! filesystem the host describes, runs the command, reports, powers off.

mod batch;
mod devnodes;
mod exec;
mod fresh;
mod inodes;
mod limits;
mod modules;
mod mounts;
mod port;
mod pump;
mod qga;
mod reaper;
mod report;
mod serve;
mod sys;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vexec_protocol::{self as protocol, GuestMsg, HostMsg, PORT_NAME, VERSION};

/// Runs the agent. Never returns: the machine powers off at the end.
pub fn run() -> ! {
    ensure_stdio();
    report::listen();
    let (port, pseudo) = match boot() {
        Ok(p) => p,
        Err(e) => fail_console(&e),
    };
    let writer: port::PortWriter =
        Arc::new(Mutex::new(port.try_clone().unwrap_or_else(|e| {
            fail_console(&format!("duplicating the control port: {e}"))
        })));
    let served = if batch::wanted() {
        joined(pseudo).and_then(|_| batch::run(&writer))
    } else {
        serve(&writer, port, pseudo)
    };
    if let Err(e) = served {
        eprintln!("vexec-init: error: {e}");
        let _ = port::send(&writer, &GuestMsg::Error(e));
    }
    sys::power_off()
}

fn fail_console(msg: &str) -> ! {
    eprintln!("vexec-init: error: {msg}");
    sys::power_off()
}

/// PID 1 may start without stdio when the initramfs lacks /dev/console.
fn ensure_stdio() {
    // SAFETY: fcntl on fd 2 only queries it.
    if unsafe { libc::fcntl(2, libc::F_GETFD) } >= 0 {
        return;
    }
    let _ = std::fs::create_dir_all("/dev");
    let _ = sys::mount("devtmpfs", "/dev", "devtmpfs", 0, None);
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        use std::os::fd::IntoRawFd;
        let fd = f.into_raw_fd();
        // SAFETY: duplicating a valid descriptor onto 0-2.
        unsafe {
            for t in 0..3 {
                libc::dup2(fd, t);
            }
        }
    }
}

/// Mounting the pseudo filesystems, under way beside the boot (None: done
/// already, when no thread could be had for it).
type PseudoFs = Option<std::thread::JoinHandle<()>>;

/// Waits for the pseudo filesystems to be mounted.
fn joined(pseudo: PseudoFs) -> Result<(), String> {
    pseudo.map_or(Ok(()), |p| {
        p.join()
            .map_err(|_| "setting up the pseudo filesystems panicked".to_string())
    })
}

/// Everything up to an open control port, and the pseudo filesystems being
/// mounted meanwhile (joined before the root switch moves /dev and /sys).
fn boot() -> Result<(File, PseudoFs), String> {
    // Before /proc is mounted, -v is not known yet: report the start after.
    let started = sys::uptime_ms();
    mounts::early()?;
    DEBUG.store(
        std::fs::read_to_string("/proc/cmdline")
            .is_ok_and(|c| c.split_whitespace().any(|w| w == "vexec.debug")),
        std::sync::atomic::Ordering::Relaxed,
    );
    if DEBUG.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("vexec-init: [{started:>6}ms] agent started");
    }
    step("early mounts done");
    // The pseudo filesystems under /dev and /sys and the loopback interface
    // need no module: set them up while the modules load and the host
    // answers (bringing lo up alone waits ~50 ms on the kernel under TCG).
    // They move with /dev and /sys when the root is switched.
    let pseudo = match sys::thread("pseudo-fs", mounts::pseudo_filesystems) {
        Ok(p) => Some(p),
        Err(_) => {
            mounts::pseudo_filesystems();
            None
        }
    };
    let n = modules::load_all(Path::new("/"))?;
    step(&format!("{n} modules loaded"));
    // Long enough for a guest starved of CPU on a loaded host (seen taking
    // over 10 s there); the host's boot timeout still bounds the wait.
    let path = find_port(Duration::from_secs(30))?;
    step("control port found");
    let port = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| format!("opening {}: {e}", path.display()))?;
    Ok((port, pseudo))
}

/// Set from the kernel command line (`vexec.debug`, added by `vexec -v`).
static DEBUG: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// With `vexec -v`, prints a setup step with the guest clock on the console.
pub(crate) fn step(what: &str) {
    if DEBUG.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!("vexec-init: [{:>6}ms] {what}", sys::uptime_ms());
    }
}

/// The virtio ports the guest has: (device name, port name, /dev node).
pub(crate) fn ports() -> std::io::Result<Vec<(String, String, PathBuf)>> {
    let mut v: Vec<_> = std::fs::read_dir("/sys/class/virtio-ports")?
        .flatten()
        .map(|e| {
            let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
            let dev = Path::new("/dev").join(e.file_name());
            (
                e.file_name().to_string_lossy().into_owned(),
                name.trim().to_string(),
                dev,
            )
        })
        .collect();
    v.sort();
    Ok(v)
}

/// What the guest sees of virtio ports and devices, for the error when the
/// control port never shows up.
fn port_state() -> String {
    let ports = match ports() {
        Ok(p) if p.is_empty() => "none".to_string(),
        Ok(p) => p
            .iter()
            .map(|(dev, name, node)| {
                let made = if node.exists() { "yes" } else { "no" };
                format!("{dev}(name={name:?} dev={made})")
            })
            .collect::<Vec<_>>()
            .join(" "),
        Err(e) => format!("unreadable ({e})"),
    };
    let devices = match std::fs::read_dir("/sys/bus/virtio/devices") {
        Ok(entries) => {
            let mut v: Vec<String> = entries
                .flatten()
                .map(|e| {
                    let id = std::fs::read_to_string(e.path().join("device")).unwrap_or_default();
                    let driver = std::fs::read_link(e.path().join("driver"))
                        .ok()
                        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
                        .unwrap_or_else(|| "none".into());
                    let dev = e.file_name().to_string_lossy().into_owned();
                    format!("{dev}(id={} driver={driver})", id.trim())
                })
                .collect();
            v.sort();
            if v.is_empty() {
                "none".into()
            } else {
                v.join(" ")
            }
        }
        Err(e) => format!("unreadable ({e})"),
    };
    format!("virtio ports: {ports}; virtio devices: {devices}")
}

/// Ports appear asynchronously once the host side has announced them.
fn find_port(wait: Duration) -> Result<PathBuf, String> {
    let start = Instant::now();
    loop {
        let found = ports()
            .unwrap_or_default()
            .into_iter()
            .find(|(_, name, dev)| name == PORT_NAME && dev.exists());
        if let Some((_, _, dev)) = found {
            return Ok(dev);
        }
        if start.elapsed() > wait {
            return Err(format!(
                "the control port {PORT_NAME} did not appear within {}s (is virtio_console loaded?); {}",
                wait.as_secs(),
                port_state()
            ));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn serve(writer: &port::PortWriter, mut reader: File, pseudo: PseudoFs) -> Result<(), String> {
    let mut pseudo = Some(pseudo);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    port::send(
        writer,
        &GuestMsg::Ready {
            version: VERSION,
            release: release.trim().to_string(),
            uptime_ms: sys::uptime_ms(),
        },
    )
    .map_err(|e| format!("writing to the control port: {e}"))?;
    report::STATE.phase(report::Phase::WaitingForHost);
    // Set up, and the ports to serve beside the command or instead of it.
    let mut setup_done: Option<protocol::ServedPorts> = None;
    loop {
        let msg = protocol::read_frame::<HostMsg>(&mut reader)
            .map_err(|e| exec::undecodable(&e))?
            .ok_or("the host closed the control port")?;
        report::STATE.received();
        match msg {
            HostMsg::Setup(setup) => {
                report::STATE.phase(report::Phase::SettingUp);
                step("setup received");
                // Before anything the command could see.
                if let Err(e) = fresh::apply(&setup.fresh) {
                    eprintln!("vexec-init: warning: {e}");
                }
                mounts::build_root(&setup, || pseudo.take().map_or(Ok(()), joined))?;
                step("root switched");
                devnodes::make(&setup.device_nodes);
                limits::set_default(&setup.limits);
                if let Some(budget) = setup.virtiofs_fd_budget {
                    inodes::watch(budget);
                }
                if setup.net {
                    mounts::network()?;
                }
                let _ = sys::set_hostname(&setup.hostname);
                step("filesystems ready");
                port::send(
                    writer,
                    &GuestMsg::Mounted {
                        uptime_ms: sys::uptime_ms(),
                    },
                )
                .map_err(|e| format!("writing to the control port: {e}"))?;
                setup_done = Some(setup.served.clone());
            }
            HostMsg::Exec(e) if setup_done.is_some() => {
                serve::beside_command(setup_done.unwrap_or_default());
                let exit = exec::run(writer, exec::from_port(writer, reader), &e);
                report::STATE.phase(report::Phase::Ending);
                sys::sync();
                let _ = port::send(
                    writer,
                    &GuestMsg::Exited {
                        exit,
                        uptime_ms: sys::uptime_ms(),
                    },
                );
                return Ok(());
            }
            HostMsg::Serve(hooks) => match setup_done {
                Some(served) => return serve::run(writer, reader, &served, &hooks),
                None => return Err("the host sent Serve before the setup; vexec and vexec-agent from different builds? reinstall both".into()),
            },
            other => {
                return Err(format!(
                    "the host sent {} before the command was set up; vexec and vexec-agent from different builds? reinstall both",
                    other.name()
                ));
            }
        }
    }
}
