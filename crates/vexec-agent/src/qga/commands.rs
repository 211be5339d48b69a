//! The commands served, by name.

use serde_json::{Value, json};

use super::args::{Answer, Args, QgaError};
use super::{exec, file};

/// What the commands keep between requests.
#[derive(Default)]
pub struct State {
    pub jobs: exec::Jobs,
    pub files: file::Files,
    /// `guest-shutdown` was asked: power off once the line is handled.
    pub shutdown: bool,
}

/// Every command, and whether it answers on success.
const COMMANDS: &[(&str, bool)] = &[
    ("guest-sync-delimited", true),
    ("guest-sync", true),
    ("guest-ping", true),
    ("guest-info", true),
    ("guest-exec", true),
    ("guest-exec-status", true),
    ("guest-file-open", true),
    ("guest-file-close", true),
    ("guest-file-read", true),
    ("guest-file-write", true),
    ("guest-file-seek", true),
    ("guest-file-flush", true),
    ("guest-get-osinfo", true),
    ("guest-get-time", true),
    ("guest-get-host-name", true),
    ("guest-shutdown", false),
];

/// Runs one command; None when it has no success response and succeeded.
pub fn run(state: &mut State, name: &str, a: Args) -> Option<Answer> {
    let answer = match name {
        "guest-sync" | "guest-sync-delimited" => {
            a.only(&["id"]).and_then(|_| a.int("id").map(Value::from))
        }
        "guest-ping" => a.only(&[]).map(|_| json!({})),
        "guest-info" => a.only(&[]).map(|_| info()),
        "guest-exec" => state.jobs.start(&a),
        "guest-exec-status" => state.jobs.status(&a),
        "guest-file-open" => state.files.open(&a),
        "guest-file-close" => state.files.close(&a),
        "guest-file-read" => state.files.read(&a),
        "guest-file-write" => state.files.write(&a),
        "guest-file-seek" => state.files.seek(&a),
        "guest-file-flush" => state.files.flush(&a),
        "guest-get-osinfo" => a.only(&[]).map(|_| osinfo()),
        "guest-get-time" => a.only(&[]).map(|_| now_ns()),
        "guest-get-host-name" => a.only(&[]).map(|_| json!({"host-name": uname().1})),
        "guest-shutdown" => match shutdown(&a) {
            Ok(()) => {
                state.shutdown = true;
                return None;
            }
            Err(e) => Err(e),
        },
        _ => Err(QgaError {
            class: "CommandNotFound",
            desc: format!("The command {name} has not been found"),
        }),
    };
    Some(answer)
}

fn info() -> Value {
    let commands: Vec<Value> = COMMANDS
        .iter()
        .map(|(name, success)| json!({"name": name, "enabled": true, "success-response": success}))
        .collect();
    json!({
        "version": concat!("vexec-agent ", env!("CARGO_PKG_VERSION")),
        "supported_commands": commands,
    })
}

/// The modes qemu-ga knows; every one ends a vexec VM (it never reboots).
fn shutdown(a: &Args) -> Result<(), QgaError> {
    a.only(&["mode"])?;
    match a.opt_str("mode")? {
        None | Some("powerdown" | "halt" | "reboot") => Ok(()),
        Some(_) => Err(QgaError::generic(
            "Parameter 'mode' expects 'halt', 'powerdown' or 'reboot'",
        )),
    }
}

fn now_ns() -> Value {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Value::from(t.as_nanos() as u64)
}

/// (kernel release, node name, kernel version, machine).
fn uname() -> (String, String, String, String) {
    // SAFETY: uname fills the zeroed struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    unsafe { libc::uname(&mut u) };
    let field = |f: &[libc::c_char]| {
        let bytes: Vec<u8> = f
            .iter()
            .take_while(|&&c| c != 0)
            .map(|&c| c as u8)
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    };
    (
        field(&u.release),
        field(&u.nodename),
        field(&u.version),
        field(&u.machine),
    )
}

/// The kernel's uname and the root's os-release, named as qemu-ga names
/// them (keys absent from os-release are left out, as qemu-ga does).
fn osinfo() -> Value {
    let (release, _, version, machine) = uname();
    let mut info = json!({
        "kernel-release": release,
        "kernel-version": version,
        "machine": machine,
    });
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    for line in text.lines() {
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let key = match k.trim() {
            "ID" => "id",
            "NAME" => "name",
            "PRETTY_NAME" => "pretty-name",
            "VERSION" => "version",
            "VERSION_ID" => "version-id",
            "VARIANT" => "variant",
            "VARIANT_ID" => "variant-id",
            _ => continue,
        };
        info[key] = Value::from(v.trim().trim_matches(['"', '\'']));
    }
    info
}
