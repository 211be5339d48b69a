//! How the host stops a running command, one policy for a one-shot run's
//! event loop and an exec into a persistent VM: what each host signal
//! does, and how long a stopped command has to end.

use std::time::{Duration, Instant};

use crate::sys::terminal;

/// How long a command has to end after the signal it was sent (or a
/// SIGKILL at its `--timeout`) before vexec stops waiting for it.
pub const GRACE: Duration = Duration::from_secs(3);

/// What a host signal means for a running command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnSignal {
    /// SIGQUIT: say where the run stands; the run goes on.
    Report,
    /// SIGWINCH with a terminal: the guest's terminal takes this size.
    Resize { rows: u16, cols: u16 },
    /// Nothing to do (SIGWINCH without a terminal).
    Ignore,
    /// The first signal: forwarded to the command, which then has until
    /// the instant given to end.
    Forward(Instant),
    /// A second signal, while the first one's grace runs: stop now.
    EndNow,
}

/// What `sig` does to a running command that has a terminal (`has_tty`)
/// and was already sent a signal (`interrupted`).
pub fn on_signal(sig: i32, has_tty: bool, interrupted: bool) -> OnSignal {
    match sig {
        libc::SIGQUIT => OnSignal::Report,
        libc::SIGWINCH => match terminal::window_size(&[0, 1, 2]) {
            Some((rows, cols)) if has_tty => OnSignal::Resize { rows, cols },
            _ => OnSignal::Ignore,
        },
        _ if interrupted => OnSignal::EndNow,
        _ => OnSignal::Forward(Instant::now() + GRACE),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_signal_ends_at_once_and_sigquit_never_does() {
        assert!(matches!(
            on_signal(libc::SIGINT, false, false),
            OnSignal::Forward(_)
        ));
        assert_eq!(on_signal(libc::SIGTERM, false, true), OnSignal::EndNow);
        assert_eq!(on_signal(libc::SIGQUIT, true, true), OnSignal::Report);
        assert_eq!(on_signal(libc::SIGWINCH, false, false), OnSignal::Ignore);
    }
}
