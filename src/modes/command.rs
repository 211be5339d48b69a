//! The command as the guest runs it ([`Exec`]): argv, environment,
//! identity (the caller's, or root's with `--sudo`), hooks, terminal and
//! resource limits, from a [`RunSpec`]. Every mode that runs a command
//! (a plain run, `vexec exec`, `up`'s hooks) builds it here.

use std::os::unix::ffi::OsStrExt;

use crate::modes::spec::{RunSpec, TtyMode};
use crate::protocol::{Exec, Tty};
use crate::sys::terminal;

/// The command as the guest runs it: as the caller, or with `--sudo` as
/// root with the caller's environment plus what sudo adds.
pub fn exec_for(spec: &RunSpec) -> Exec {
    let mut env: Vec<(Vec<u8>, Vec<u8>)> = spec
        .env
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
    let (uid, gid, groups) = if spec.sudo {
        let user = env
            .iter()
            .find(|(k, _)| k == b"USER")
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| spec.uid.to_string().into_bytes());
        let set: [(&[u8], Vec<u8>); 5] = [
            (b"SUDO_USER", user),
            (b"SUDO_UID", spec.uid.to_string().into_bytes()),
            (b"SUDO_GID", spec.gid.to_string().into_bytes()),
            (b"USER", b"root".to_vec()),
            (b"LOGNAME", b"root".to_vec()),
        ];
        env.retain(|(k, _)| !set.iter().any(|(s, _)| k == s));
        env.extend(set.into_iter().map(|(k, v)| (k.to_vec(), v)));
        (0, 0, vec![0])
    } else {
        (spec.uid, spec.gid, spec.groups.clone())
    };
    Exec {
        argv: spec.argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
        env,
        cwd: spec.cwd.as_os_str().as_bytes().to_vec(),
        uid,
        gid,
        groups,
        setup: spec.setup.iter().map(|c| c.as_bytes().to_vec()).collect(),
        teardown: spec
            .teardown
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect(),
        tty: tty_for(spec),
        kernel_log: false,
        output_grace_ms: spec.output_grace.as_millis() as u64,
        limits: spec.limits.clone(),
    }
}

/// Which of the command's descriptors are a terminal in the guest.
fn tty_for(spec: &RunSpec) -> Option<Tty> {
    let (stdin, stdout, stderr) = match spec.tty {
        TtyMode::Never => return None,
        TtyMode::Always => (true, true, true),
        TtyMode::Auto => (
            terminal::is_tty(0),
            terminal::is_tty(1),
            terminal::is_tty(2),
        ),
    };
    if !(stdin || stdout || stderr) {
        return None;
    }
    let (rows, cols) = terminal::window_size(&[0, 1, 2]).unwrap_or((24, 80));
    Some(Tty {
        stdin,
        stdout,
        stderr,
        rows,
        cols,
        job_control: spec.shell,
        host_raw: stdin && terminal::is_tty(0),
    })
}
