//! Thin wrappers over the system calls the guest agent makes.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

fn cstr(p: impl AsRef<std::ffi::OsStr>) -> io::Result<CString> {
    CString::new(p.as_ref().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Makes the calling process the leader of a new session and process
/// group, as a login or a service manager does for what it starts (PID 1's
/// session id is 0, which no program on a host sees); with `ctty`, that
/// descriptor's terminal becomes the session's controlling terminal.
/// Async-signal-safe: for use between fork and exec.
pub fn new_session(ctty: Option<i32>) -> io::Result<()> {
    // SAFETY: setsid and ioctl(TIOCSCTTY) take no pointers.
    check(unsafe { libc::setsid() })?;
    if let Some(fd) = ctty {
        check(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) })?;
    }
    Ok(())
}

/// mount(2); `data` is the comma-separated option string.
pub fn mount(
    source: &str,
    target: impl AsRef<Path>,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = cstr(source)?;
    let tgt = cstr(target.as_ref())?;
    let fs = cstr(fstype)?;
    let data = data.map(cstr).transpose()?;
    // SAFETY: all pointers are valid NUL-terminated strings or null.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            fs.as_ptr(),
            flags,
            data.as_ref()
                .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
        )
    })
}

/// Moves a mount (`mount --move`).
pub fn move_mount(from: impl AsRef<Path>, to: impl AsRef<Path>) -> io::Result<()> {
    let from = cstr(from.as_ref())?;
    let to = cstr(to.as_ref())?;
    // SAFETY: valid strings; MS_MOVE ignores fstype and data.
    check(unsafe {
        libc::mount(
            from.as_ptr(),
            to.as_ptr(),
            std::ptr::null(),
            libc::MS_MOVE,
            std::ptr::null(),
        )
    })
}

/// Loads a kernel module from an open file (finit_module(2)).
pub fn finit_module(file: &std::fs::File, params: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let p = cstr(params)?;
    // SAFETY: fd is open for the call's duration; params is a valid string.
    let rc = unsafe { libc::syscall(libc::SYS_finit_module, file.as_raw_fd(), p.as_ptr(), 0) };
    check(rc as libc::c_int)
}

/// chroot(2).
pub fn chroot(p: impl AsRef<Path>) -> io::Result<()> {
    let p = cstr(p.as_ref())?;
    // SAFETY: valid string.
    check(unsafe { libc::chroot(p.as_ptr()) })
}

/// Flushes all filesystems.
pub fn sync() {
    // SAFETY: no arguments.
    unsafe { libc::sync() }
}

/// Powers the machine off; never returns.
pub fn power_off() -> ! {
    sync();
    // SAFETY: PID 1 may call reboot; on success it does not return.
    unsafe {
        libc::reboot(libc::RB_POWER_OFF);
    }
    // If even that failed, halting by exiting PID 1 panics the kernel, which
    // with panic=-1 resets the machine and QEMU (-no-reboot) exits.
    std::process::exit(1)
}

/// Milliseconds since the kernel started (CLOCK_BOOTTIME).
pub fn uptime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Sets the hostname.
pub fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`.
    check(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })
}

/// Brings the loopback interface up, as every Linux system has it.
pub fn loopback_up() -> io::Result<()> {
    // SAFETY: plain socket and ioctl calls on a zeroed ifreq.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        let mut rc = libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr);
        if rc == 0 {
            ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr);
        }
        let err = io::Error::last_os_error();
        libc::close(fd);
        if rc < 0 { Err(err) } else { Ok(()) }
    }
}

/// Opens a pseudo-terminal of the given size; returns (master, slave), both
/// close-on-exec. Without `job_control` the suspend key is disabled;
/// without `output_processing`, output bytes pass through unchanged.
pub fn open_pty(
    rows: u16,
    cols: u16,
    job_control: bool,
    output_processing: bool,
) -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (-1, -1);
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: out-pointers to locals; the fds are owned right after.
    let (master, slave) = unsafe {
        if libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        ) < 0
        {
            return Err(io::Error::last_os_error());
        }
        (
            std::os::fd::OwnedFd::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    };
    use std::os::fd::AsRawFd;
    for fd in [master.as_raw_fd(), slave.as_raw_fd()] {
        // SAFETY: fcntl on fds we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    // SAFETY: termios is plain data filled by tcgetattr.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(slave.as_raw_fd(), &mut t) == 0 {
            if !job_control {
                t.c_cc[libc::VSUSP] = 0;
            }
            if !output_processing {
                t.c_oflag &= !libc::OPOST;
            }
            libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &t);
        }
    }
    Ok((master, slave))
}

/// Tells the terminal (and so its foreground programs) its new size.
pub fn set_window_size(fd: i32, rows: u16, cols: u16) {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads the struct.
    unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) };
}

/// The kernel log so far, formatted as `dmesg` does (`[secs.micros] text`).
pub fn kernel_log() -> Vec<u8> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut out = Vec::new();
    let Ok(mut f) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
    else {
        return out;
    };
    // One record per read; EAGAIN at the end; EPIPE when records were
    // overwritten meanwhile (read on).
    let mut buf = vec![0u8; 8192];
    loop {
        match f.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                let rec = &buf[..n];
                let Some(semi) = rec.iter().position(|&b| b == b';') else {
                    continue;
                };
                let fields: Vec<&[u8]> = rec[..semi].split(|&b| b == b',').collect();
                let usec: u64 = fields
                    .get(2)
                    .and_then(|f| std::str::from_utf8(f).ok())
                    .and_then(|f| f.parse().ok())
                    .unwrap_or(0);
                // The text runs to the first newline; continuation lines
                // (" KEY=value") are metadata.
                let text = &rec[semi + 1..];
                let text = &text[..text.iter().position(|&b| b == b'\n').unwrap_or(text.len())];
                out.extend_from_slice(
                    format!("[{:5}.{:06}] ", usec / 1_000_000, usec % 1_000_000).as_bytes(),
                );
                out.extend_from_slice(text);
                out.push(b'\n');
            }
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        }
    }
    out
}

/// Starts `f` on a thread named `name` (shown as its comm in /proc and in
/// the hang report). It fails when the guest kernel refuses a thread (out
/// of memory, or `kernel.threads-max` reached by the command's own
/// processes); the error names the thread and says what to do.
pub fn thread<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "cannot start the agent's {name} thread: {e} (the guest is out of memory or threads; give it more with -m)"
                ),
            )
        })
}

/// Ends `pid` and the process group it leads, if it leads one, with
/// SIGKILL: for a child the agent cannot serve and must not leave behind.
pub fn kill_group_of(pid: i32) {
    // SAFETY: kill(2) with a plain signal number; a group that does not
    // exist is ESRCH, nothing more.
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
        libc::kill(pid, libc::SIGKILL);
    }
}

/// The calling thread's id.
pub fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Turns off echo on the terminal `fd` (the console), so what the host
/// types there does not come back in the console log.
pub fn console_no_echo(fd: i32) {
    // SAFETY: termios is plain data filled by tcgetattr.
    unsafe {
        let mut t: libc::termios = std::mem::zeroed();
        if libc::tcgetattr(fd, &mut t) == 0 {
            t.c_lflag &= !(libc::ECHO | libc::ECHONL);
            libc::tcsetattr(fd, libc::TCSANOW, &t);
        }
    }
}

/// How many processes the kernel's OOM killer has killed since boot.
pub fn oom_kill_count() -> Option<u64> {
    std::fs::read_to_string("/proc/vmstat")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))?
        .trim()
        .parse()
        .ok()
}

/// The kernel's last `n` lines about processes its OOM killer killed.
pub fn oom_kill_lines(n: u64) -> Vec<String> {
    let log = String::from_utf8_lossy(&kernel_log()).into_owned();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("Killed process"))
        .collect();
    let skip = lines.len().saturating_sub(n as usize);
    lines[skip..].iter().map(|l| l.to_string()).collect()
}

fn sockaddr_v4(addr: [u8; 4]) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(addr),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// Configures `iface` with QEMU user networking's fixed plan: address
/// 10.0.2.15/24, default route via 10.0.2.2.
pub fn configure_user_net(iface: &str) -> io::Result<()> {
    let name = CString::new(iface).map_err(io::Error::other)?;
    // SAFETY: socket/ioctl calls on zeroed, correctly sized structs.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let check = |rc: libc::c_int| {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        let result = (|| {
            let mut ifr: libc::ifreq = std::mem::zeroed();
            for (d, s) in ifr
                .ifr_name
                .iter_mut()
                .zip(name.as_bytes_with_nul().iter().take(libc::IFNAMSIZ - 1))
            {
                *d = *s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_addr = sockaddr_v4([10, 0, 2, 15]);
            check(libc::ioctl(fd, libc::SIOCSIFADDR, &ifr))?;
            ifr.ifr_ifru.ifru_netmask = sockaddr_v4([255, 255, 255, 0]);
            check(libc::ioctl(fd, libc::SIOCSIFNETMASK, &ifr))?;
            check(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut ifr))?;
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            check(libc::ioctl(fd, libc::SIOCSIFFLAGS, &ifr))?;
            let mut rt: libc::rtentry = std::mem::zeroed();
            rt.rt_dst = sockaddr_v4([0, 0, 0, 0]);
            rt.rt_genmask = sockaddr_v4([0, 0, 0, 0]);
            rt.rt_gateway = sockaddr_v4([10, 0, 2, 2]);
            rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
            check(libc::ioctl(fd, libc::SIOCADDRT, &rt))
        })();
        libc::close(fd);
        result
    }
}
