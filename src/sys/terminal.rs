//! The host's terminal: which standard descriptors are terminals, their
//! window size, and raw mode for interactive use, always restored.

use std::sync::Mutex;

/// True when `fd` is a terminal.
pub fn is_tty(fd: i32) -> bool {
    // SAFETY: isatty only queries the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The window size (rows, cols) of the first terminal among `fds`.
pub fn window_size(fds: &[i32]) -> Option<(u16, u16)> {
    fds.iter().find_map(|&fd| {
        // SAFETY: TIOCGWINSZ fills a plain struct.
        let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
        let ok = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } == 0;
        (ok && ws.ws_row > 0 && ws.ws_col > 0).then_some((ws.ws_row, ws.ws_col))
    })
}

/// Settings to put back, shared with [`restore`] for exits that skip
/// destructors.
static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);

/// Raw mode on stdin while alive: keys (Ctrl-C, Ctrl-Z included) go to the
/// guest as bytes. Dropping it restores the terminal.
pub struct RawMode(());

impl RawMode {
    /// Switches stdin to raw mode; None when it is not a terminal.
    pub fn enter() -> Option<RawMode> {
        // SAFETY: termios is plain data filled by tcgetattr.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return None;
            }
            *SAVED.lock().unwrap_or_else(|p| p.into_inner()) = Some(t);
            let mut raw = t;
            // Output processing too: the guest's terminal already turns \n
            // into \r\n.
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(0, libc::TCSADRAIN, &raw) != 0 {
                return None;
            }
        }
        Some(RawMode(()))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

/// Puts the terminal back as it was, if raw mode is on.
pub fn restore() {
    if let Some(t) = SAVED.lock().unwrap_or_else(|p| p.into_inner()).take() {
        // SAFETY: restoring settings read by tcgetattr.
        unsafe { libc::tcsetattr(0, libc::TCSADRAIN, &t) };
    }
}
