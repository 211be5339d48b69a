//! The session's part in warm start: bringing a restored machine back,
//! and what makes each run's guest new.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::protocol::Fresh;
use crate::vm::qmp::LazyQmp;
use crate::vm::snapshot;

/// How long one QMP command may take to be answered.
pub const QMP_WAIT: Duration = Duration::from_secs(30);

/// Has a machine started to restore (`-incoming defer`) load its saved
/// state from inherited descriptor `fd` (`shared_ram`: with its RAM saved
/// apart), and waits until it has; it is left paused.
pub fn bring_back(
    qmp: &mut LazyQmp,
    fd: i32,
    shared_ram: bool,
    limit: Duration,
) -> Result<(), String> {
    let q = qmp
        .get(limit)
        .map_err(|e| format!("cannot restore the saved guest: {e}"))?;
    snapshot::start_restore(q, fd, shared_ram)
        .and_then(|()| snapshot::wait_loaded(q, limit))
        .map_err(|e| format!("cannot restore the saved guest: {e}"))?;
    Ok(())
}

/// Starts a restored machine that [`bring_back`] left paused.
pub fn start(qmp: &mut LazyQmp) -> Result<(), String> {
    let q = qmp.get(QMP_WAIT)?;
    snapshot::resume(q).map_err(|e| format!("cannot start the restored guest: {e}"))
}

/// Fresh entropy and the wall clock, for the guest to take before the
/// command runs.
pub fn fresh() -> Fresh {
    let mut entropy = vec![0u8; 64];
    // SAFETY: the buffer is valid for its length.
    let n = unsafe { libc::getrandom(entropy.as_mut_ptr().cast(), entropy.len(), 0) };
    if n < entropy.len() as isize {
        // Said on the host: the guest's own warning goes to its console.
        crate::say!(
            "vexec: warning: the host's getrandom gave {} of {} bytes ({}); a restored guest's random pool may repeat another run's",
            n.max(0),
            entropy.len(),
            std::io::Error::last_os_error()
        );
    }
    entropy.truncate(n.max(0) as usize);
    let wall_clock_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Fresh {
        entropy,
        wall_clock_ns,
    }
}
