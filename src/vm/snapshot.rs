//! Saving a running machine to a file and bringing it back, through QMP
//! on QEMU 7.2: a migration stream written by `exec:` (7.2 has no `file:`
//! URI) and read back from an inherited descriptor (`-incoming defer`,
//! then `migrate-incoming fd:N`). A machine whose RAM is shared memory
//! vexec owns ([`super::ram`]) leaves it out of the stream
//! (`x-ignore-shared`) and has it saved as an image of its own.

use std::fs::File;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::qmp::Qmp;
use crate::sys::programs::quote;

/// Why a machine was not saved.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    /// QEMU will not migrate this machine (a device that cannot be saved,
    /// a mounted 9p export): it never will, with this shape.
    #[error("QEMU refuses to save this machine: {0}")]
    Refused(String),
    /// This attempt failed (I/O, time); a later one may work.
    #[error("saving the machine failed: {0}")]
    Failed(String),
}

/// How often QEMU is asked how a migration or a restore goes.
const POLL: Duration = Duration::from_millis(3);

/// Where a machine is saved: its migration stream, and with shared RAM
/// (the memfd, and the image file) its RAM apart.
pub struct SaveTo<'a> {
    pub state: &'a Path,
    pub ram: Option<(&'a File, &'a Path)>,
}

/// Saves the running machine and lets it run on. The machine is stopped
/// while its memory is written (a running guest would compete with the
/// copy for the host's CPUs and dirty what was copied), so a restored one
/// starts paused ([`resume`] starts it).
pub fn save(q: &mut Qmp, to: SaveTo, limit: Duration) -> Result<(), SaveError> {
    // QEMU 7.2 throttles migration to 32 MiB/s by default.
    q.execute(
        "migrate-set-parameters",
        json!({ "max-bandwidth": 1u64 << 40, "downtime-limit": 10_000 }),
    )
    .map_err(SaveError::Failed)?;
    if to.ram.is_some() {
        // A QEMU without it can never save this machine.
        ignore_shared(q).map_err(SaveError::Refused)?;
    }
    q.execute("stop", json!({})).map_err(SaveError::Failed)?;
    let path = to.state;
    // QEMU runs an `exec:` URI with `sh -c`.
    let uri = format!("exec:cat > {}", quote(&path.to_string_lossy()));
    if let Err(e) = q.execute("migrate", json!({ "uri": uri })) {
        let _ = resume(q);
        return Err(SaveError::Refused(e));
    }
    let mut result = wait_migrated(q, limit);
    if let (Ok(()), Some((ram, image))) = (&result, to.ram) {
        result = super::ram::save(ram, image)
            .map(drop)
            .map_err(|e| SaveError::Failed(e.to_string()));
    }
    // A failed or completed migration leaves the machine stopped.
    let resumed = resume(q).map_err(SaveError::Failed);
    result.and(resumed)
}

fn wait_migrated(q: &mut Qmp, limit: Duration) -> Result<(), SaveError> {
    let start = Instant::now();
    loop {
        let info = q
            .execute("query-migrate", json!({}))
            .map_err(SaveError::Failed)?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => {
                return Ok(());
            }
            Some("failed") | Some("cancelled") => {
                let why = info.get("error-desc").and_then(Value::as_str);
                return Err(SaveError::Failed(why.unwrap_or("no reason given").into()));
            }
            _ if start.elapsed() > limit => {
                let _ = q.execute("migrate_cancel", json!({}));
                return Err(SaveError::Failed(format!(
                    "not done within {}s",
                    limit.as_secs()
                )));
            }
            _ => std::thread::sleep(POLL),
        }
    }
}

/// Starts the machine again unless it runs.
pub fn resume(q: &mut Qmp) -> Result<(), String> {
    if status(q)? != "running" {
        q.execute("cont", json!({}))?;
    }
    Ok(())
}

fn status(q: &mut Qmp) -> Result<String, String> {
    let s = q.execute("query-status", json!({}))?;
    Ok(s.get("status")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string())
}

/// Leaves shared RAM out of the migration stream: both ends must agree.
fn ignore_shared(q: &mut Qmp) -> Result<(), String> {
    q.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] }),
    )
    .map(drop)
}

/// Has a machine started with `-incoming defer` read its saved state from
/// inherited descriptor `fd`; `shared_ram`: its RAM was saved apart.
pub fn start_restore(q: &mut Qmp, fd: i32, shared_ram: bool) -> Result<(), String> {
    if shared_ram {
        ignore_shared(q)?;
    }
    q.execute("migrate-incoming", json!({ "uri": format!("fd:{fd}") }))
        .map(drop)
}

/// Plugs in `devices` (`device_add` arguments) on a running machine.
pub fn plug(q: &mut Qmp, devices: &[Value]) -> Result<(), String> {
    for d in devices {
        q.execute("device_add", d.clone())?;
    }
    Ok(())
}

/// Waits until a machine started with `-incoming` has loaded its state
/// (QEMU exits when it cannot); the machine is then paused, as it was
/// saved, for [`resume`] to start.
pub fn wait_loaded(q: &mut Qmp, limit: Duration) -> Result<(), String> {
    let start = Instant::now();
    loop {
        match status(q)?.as_str() {
            "running" | "paused" => return Ok(()),
            "inmigrate" if start.elapsed() < limit => std::thread::sleep(POLL),
            "inmigrate" => {
                return Err(format!(
                    "the saved state was not loaded within {}s",
                    limit.as_secs()
                ));
            }
            other => return Err(format!("the restored machine is {other}, not running")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_quoted_for_the_shell() {
        assert_eq!(quote("/a b/c"), "'/a b/c'");
        assert_eq!(quote("/it's"), r"'/it'\''s'");
    }
}
