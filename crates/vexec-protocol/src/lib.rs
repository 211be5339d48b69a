//! The host–guest protocol, shared by both ends.
//!
//! One virtio-serial port carries frames: a little-endian `u32` length, then
//! a postcard-encoded message. The host waits for [`GuestMsg::Ready`], sends
//! [`HostMsg::Setup`] and [`HostMsg::Exec`], then streams stdin and signals;
//! the guest streams output and sends [`GuestMsg::Exited`] only after both
//! output pipes reached end-of-file, so no byte is lost or reordered.
//!
//! Batch runs (`vexec run-dir`) use a subset the guest speaks on its own,
//! with no message from the host: `Ready`, then for each program `Begin`,
//! `Stdout`/`Stderr`, `Exited`; then `Coverage` pieces and `Finished`. The
//! foreign-architecture init, a busybox `sh` script, encodes exactly these
//! (see `src/modes/rundir/init.sh`, which gets the numbers from [`batch_tags`],
//! and docs/run-dir.md).

pub mod layout;

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; both ends refuse a mismatch.
pub const VERSION: u32 = 9;

/// Name of the virtio-serial port carrying the protocol.
pub const PORT_NAME: &str = "vexec.ctl";

/// How the agent's error begins when share devices plugged in after a
/// restore never appeared (nothing ran: the host may boot instead).
pub const PLUG_FAILED: &str = "the plugged share devices did not appear";

/// A persistent VM (`vexec up`) has ports named this plus a number, one
/// per command that may run at once; each carries one command at a time
/// (`Exec`, its input and signals; its output and `Exited`), again and
/// again.
pub const EXEC_PORT_PREFIX: &str = "vexec.exec.";

/// The port the QEMU guest agent's protocol is served on (qemu-ga's name,
/// so tools that look for it find it).
pub const QGA_PORT_NAME: &str = "org.qemu.guest_agent.0";

/// The line the host writes on the serial console to ask the agent where
/// it stands (a channel apart from the control port, so it works when the
/// control port is stuck).
pub const REPORT_REQUEST: &str = "vexec:report";
/// Every line of the agent's answer on the console starts with this.
pub const REPORT_PREFIX: &str = "vexec-report: ";
/// The answer's last line, after the prefix.
pub const REPORT_END: &str = "end";

/// How many kinds of [`HostMsg`] there are: a frame whose tag is this or
/// more is not a message (checked against the encoding by a unit test).
pub const HOST_MSG_COUNT: usize = 8;
/// How many kinds of [`GuestMsg`] there are.
pub const GUEST_MSG_COUNT: usize = 13;

/// Frames larger than this are refused as corrupt.
pub const MAX_FRAME: usize = 16 << 20;

/// How the host's files reach the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    /// virtio-9p, served by QEMU itself.
    NineP,
    /// virtio-fs, served by a virtiofsd per share.
    Virtiofs,
}

impl Transport {
    /// The name users write (`--transport`).
    pub fn name(self) -> &'static str {
        match self {
            Transport::NineP => "9p",
            Transport::Virtiofs => "virtiofs",
        }
    }
}

/// What the guest may do with a share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ShareMode {
    /// Writes reach the host.
    ReadWrite,
    /// Writes fail (EROFS).
    ReadOnly,
    /// Writes succeed in the guest and are discarded with the VM.
    Overlay,
}

/// A host directory to mount in the guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Share {
    /// The mount tag the device exports it under.
    pub tag: String,
    /// Where it appears in the guest (same as the host path).
    pub path: Vec<u8>,
    pub mode: ShareMode,
}

/// How the guest should set itself up before running the command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setup {
    /// How every share, the root included, is mounted.
    pub transport: Transport,
    /// Tag of the host's root directory (mounted read-only, overlaid).
    pub root_tag: String,
    /// Further shares mounted over the overlay, parents before children.
    pub shares: Vec<Share>,
    /// Host path of the kernel's module tree, shown at /lib/modules/REL.
    pub modules: Option<Vec<u8>>,
    /// Host path of generated modules.dep/modules.alias for that tree.
    pub module_index: Option<Vec<u8>>,
    /// Guest hostname.
    pub hostname: String,
    /// 9p msize in bytes.
    pub msize: u32,
    /// Print setup steps on the console.
    pub verbose: bool,
    /// Configure the network interface (QEMU user networking).
    pub net: bool,
    /// What makes this run's guest a new machine, even one restored from a
    /// snapshot that every warm run shares.
    pub fresh: Fresh,
    /// With virtio-fs: how many descriptors each virtiofsd can spend on the
    /// guest. A daemon holds one for every inode the guest has cached, so
    /// the guest lets go of unused ones well before that many.
    pub virtiofs_fd_budget: Option<u64>,
    /// The ports beside the control port the agent serves (their names
    /// reach the guest one by one, so it waits for this many).
    pub served: ServedPorts,
    /// With virtio-fs on a restored (or just saved) guest: the share
    /// devices are plugged in after the guest runs, so the agent waits
    /// until this many virtio-fs devices are bound before mounting.
    pub plugged: u32,
    /// The resource limits of whoever started the VM: those of programs
    /// started through the QEMU guest agent's `guest-exec`.
    pub limits: Vec<Rlimit>,
    /// Device nodes a host makes at boot for the kernel's modules
    /// (`modules.devname`: opening one loads its module), with the host's
    /// modes.
    pub device_nodes: Vec<DeviceNode>,
}

/// One resource limit of the caller, given to the guest command as its
/// own: `resource` is Linux's `RLIMIT_*` number, [`Rlimit::INFINITY`] is
/// unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

impl Rlimit {
    /// No limit (`RLIM_INFINITY`).
    pub const INFINITY: u64 = u64::MAX;
}

/// A device node to make in the guest's /dev.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceNode {
    /// Path under /dev, such as `net/tun`.
    pub path: String,
    /// A character device (else a block device).
    pub char: bool,
    pub major: u32,
    pub minor: u32,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Ports a guest serves beside its command or instead of one: exec ports
/// (a persistent VM's, or a one-shot run's for `vexec exec`) and the
/// QEMU guest agent's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServedPorts {
    /// How many ports named [`EXEC_PORT_PREFIX`]N.
    pub exec: u32,
    /// Whether there is a [`QGA_PORT_NAME`] port.
    pub qga: bool,
}

/// Per-run state the guest takes before anything runs: a restored
/// snapshot would otherwise repeat its random pool and its clock.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fresh {
    /// Bytes from the host's entropy source, mixed into the kernel's pool
    /// (then the pool is reseeded).
    pub entropy: Vec<u8>,
    /// The host's wall clock, nanoseconds since the Unix epoch.
    pub wall_clock_ns: u64,
}

/// Which of the command's standard descriptors are a pseudo-terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tty {
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub rows: u16,
    pub cols: u16,
    /// An interactive shell: keep the suspend key (Ctrl-Z). For a plain
    /// command it is disabled, since nothing in the guest could resume it.
    pub job_control: bool,
    /// The host terminal is in raw mode, so the guest's terminal does the
    /// output processing (\n to \r\n); otherwise the host's does.
    pub host_raw: bool,
}

/// The command to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exec {
    pub argv: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    pub cwd: Vec<u8>,
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    /// Shell commands run as root before the command (any failure stops
    /// the run with status 125).
    pub setup: Vec<Vec<u8>>,
    /// Shell commands run as root after the command.
    pub teardown: Vec<Vec<u8>>,
    /// Run on a pseudo-terminal (None: pipes only).
    pub tty: Option<Tty>,
    /// Send the kernel log ([`GuestMsg::KernelLog`]) before `Exited`.
    pub kernel_log: bool,
    /// How long output pipes may stay open after the command exited (a
    /// background process holding them) before the end is reported.
    pub output_grace_ms: u64,
    /// The caller's resource limits, the command's own (clamped where the
    /// guest kernel allows less).
    pub limits: Vec<Rlimit>,
}

/// A persistent VM's own shell commands, run as root with `env` in `cwd`:
/// `setup` once before it serves (a failure ends it), `teardown` when it
/// stops.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hooks {
    pub setup: Vec<Vec<u8>>,
    pub teardown: Vec<Vec<u8>>,
    pub env: Vec<(Vec<u8>, Vec<u8>)>,
    pub cwd: Vec<u8>,
}

/// One of the command's output streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Stream {
    Stdout,
    Stderr,
}

/// Host → guest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostMsg {
    Setup(Setup),
    Exec(Exec),
    Stdin(Vec<u8>),
    StdinEof,
    /// Deliver signal N to the command's process group.
    Signal(i32),
    WindowSize {
        rows: u16,
        cols: u16,
    },
    /// Whoever read this stream on the host went away: the command's next
    /// write to it must fail with EPIPE (SIGPIPE), as it would locally.
    OutputClosed(Stream),
    /// Instead of one command: stay up and serve the exec ports (and the
    /// QEMU guest agent's port when there is one), answering `Started`
    /// once they are served, after the VM's setup commands. A `Signal` or
    /// the end of the control port then runs its teardown commands, ends
    /// every command, syncs, sends `Exited` and powers off.
    Serve(Hooks),
}

impl HostMsg {
    /// The message's name, for errors.
    pub fn name(&self) -> &'static str {
        match self {
            HostMsg::Setup(_) => "Setup",
            HostMsg::Exec(_) => "Exec",
            HostMsg::Stdin(_) => "Stdin",
            HostMsg::StdinEof => "StdinEof",
            HostMsg::Signal(_) => "Signal",
            HostMsg::WindowSize { .. } => "WindowSize",
            HostMsg::OutputClosed(_) => "OutputClosed",
            HostMsg::Serve(_) => "Serve",
        }
    }
}

/// How the command ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// It never started: 126 (cannot execute) or 127 (not found), and why.
    NotStarted {
        status: i32,
        message: String,
    },
}

/// Guest → host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum GuestMsg {
    /// The agent is up; `uptime_ms` is the guest clock since kernel start.
    Ready {
        version: u32,
        release: String,
        uptime_ms: u64,
    },
    /// The command was started (guest clock).
    Started {
        uptime_ms: u64,
    },
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// The kernel log as `dmesg` shows it, when [`Exec::kernel_log`] asked.
    KernelLog(Vec<u8>),
    Exited {
        exit: Exit,
        uptime_ms: u64,
    },
    /// Setup failed; the text says what and why.
    Error(String),
    /// Batch runs (`vexec run-dir`): the next program's output and
    /// [`GuestMsg::Exited`] follow.
    Begin {
        name: String,
    },
    /// Batch runs: a piece of a tar archive of the kernel's GCOV data.
    Coverage(Vec<u8>),
    /// Batch runs: every program ran; the guest powers off next.
    Finished,
    /// The command closed its standard input: the host stops reading its
    /// own, so a producer piping into vexec sees EPIPE as it would locally.
    InputClosed,
    /// What the host should know about how the command ended, sent just
    /// before [`GuestMsg::Exited`].
    Aftermath(Aftermath),
    /// vexec's own part of the setup (mounts, root switch) is done: what
    /// follows (the user's setup commands, the command) is the user's
    /// work, under `--timeout` only. Guest clock.
    Mounted {
        uptime_ms: u64,
    },
}

/// Facts about the end of a command that its exit status does not tell.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Aftermath {
    /// The kernel's lines about processes its OOM killer killed while the
    /// command ran.
    pub oom_kills: Vec<String>,
    /// Output was still open when the grace period ended (a background
    /// process held it); what it wrote later was not sent.
    pub output_cut: bool,
}

/// The first byte postcard writes for a value: its variant's tag.
fn tag<T: Serialize>(v: &T) -> u8 {
    postcard::to_stdvec(v).map(|b| b[0]).unwrap_or(u8::MAX)
}

/// The tags of the messages (and exit kinds) a batch guest sends, by the
/// names the busybox init uses for them: that script encodes frames by
/// hand, and the host fills these numbers in, so they cannot drift.
pub fn batch_tags() -> Vec<(&'static str, u8)> {
    let exit = |exit| GuestMsg::Exited { exit, uptime_ms: 0 };
    vec![
        (
            "READY",
            tag(&GuestMsg::Ready {
                version: 0,
                release: String::new(),
                uptime_ms: 0,
            }),
        ),
        ("STDOUT", tag(&GuestMsg::Stdout(Vec::new()))),
        ("STDERR", tag(&GuestMsg::Stderr(Vec::new()))),
        ("EXITED", tag(&exit(Exit::Code(0)))),
        ("ERROR", tag(&GuestMsg::Error(String::new()))),
        (
            "BEGIN",
            tag(&GuestMsg::Begin {
                name: String::new(),
            }),
        ),
        ("COVERAGE", tag(&GuestMsg::Coverage(Vec::new()))),
        ("FINISHED", tag(&GuestMsg::Finished)),
        ("EXIT_CODE", tag(&Exit::Code(0))),
        ("EXIT_SIGNAL", tag(&Exit::Signal(0))),
    ]
}

/// Writes one frame.
pub fn write_frame<T: Serialize>(w: &mut impl Write, msg: &T) -> io::Result<()> {
    let body = postcard::to_stdvec(msg).map_err(io::Error::other)?;
    let mut buf = Vec::with_capacity(body.len() + 4);
    buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf)?;
    w.flush()
}

/// Reads one frame; `Ok(None)` at a clean end of stream.
pub fn read_frame<T: for<'de> Deserialize<'de>>(r: &mut impl Read) -> io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {len} bytes exceeds the {MAX_FRAME} limit"),
        ));
    }
    // Grown as bytes arrive, so a hostile length costs no memory up front.
    let mut body = Vec::new();
    r.take(len as u64).read_to_end(&mut body)?;
    if body.len() < len {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame cut short: {} of {len} bytes", body.len()),
        ));
    }
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn message_counts_match_the_encoding() {
        // postcard writes the variant index as the body's first byte.
        let last_host = postcard::to_stdvec(&HostMsg::Serve(Hooks::default())).unwrap();
        assert_eq!(last_host[0] as usize, HOST_MSG_COUNT - 1);
        let last_guest = postcard::to_stdvec(&GuestMsg::Mounted { uptime_ms: 0 }).unwrap();
        assert_eq!(last_guest[0] as usize, GUEST_MSG_COUNT - 1);
        assert!(postcard::from_bytes::<HostMsg>(&[HOST_MSG_COUNT as u8]).is_err());
        assert!(postcard::from_bytes::<GuestMsg>(&[GUEST_MSG_COUNT as u8]).is_err());
    }

    #[test]
    fn frames_round_trip() {
        let msgs = vec![
            GuestMsg::Ready {
                version: VERSION,
                release: "6.1".into(),
                uptime_ms: 1234,
            },
            GuestMsg::Stdout((0..=255).collect()),
            GuestMsg::Exited {
                exit: Exit::Signal(9),
                uptime_ms: 5,
            },
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            write_frame(&mut buf, m).unwrap();
        }
        let mut r = &buf[..];
        for m in &msgs {
            assert_eq!(&read_frame::<GuestMsg>(&mut r).unwrap().unwrap(), m);
        }
        assert!(read_frame::<GuestMsg>(&mut r).unwrap().is_none());
    }

    #[test]
    fn rejects_oversized_frames() {
        let buf = (u32::MAX).to_le_bytes();
        assert!(read_frame::<HostMsg>(&mut &buf[..]).is_err());
    }
}
