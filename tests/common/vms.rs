//! Persistent VMs for tests: a private runtime directory per test, so its
//! VMs are its own, and every one is taken down when the test ends.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{assert_ok, cache_dir, kernel};

/// A runtime directory and the VMs up in it; every one is taken down
/// (and checked gone) when the test ends, passed or not.
pub struct Vms {
    pub runtime: tempfile::TempDir,
    cwd: PathBuf,
}

impl Vms {
    /// Short paths: a unix socket path must fit in 108 bytes.
    pub fn new(cwd: &Path) -> Vms {
        Vms {
            runtime: tempfile::Builder::new().prefix("vx").tempdir().unwrap(),
            cwd: cwd.to_path_buf(),
        }
    }

    /// vexec with this test's runtime directory and cache, in `cwd`.
    pub fn vexec(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_vexec"));
        c.env("XDG_RUNTIME_DIR", self.runtime.path())
            .env("XDG_CACHE_HOME", cache_dir())
            .env_remove("VEXEC_KERNEL")
            .current_dir(&self.cwd)
            .stdin(Stdio::null());
        c
    }

    /// `vexec up --name NAME` on Debian 6.1, with `extra` options.
    pub fn up(&self, name: &str, extra: &[&str]) {
        let out = self
            .vexec()
            .args(["up", "-q", "--accel", "tcg", "--name", name, "-k"])
            .arg(kernel("6.1"))
            .args(extra)
            .output()
            .unwrap();
        assert_ok(&out);
    }

    pub fn exec(&self, name: &str, args: &[&str]) -> Output {
        self.vexec()
            .args(["exec", "-q", name, "--"])
            .args(args)
            .output()
            .unwrap()
    }

    pub fn dir(&self, name: &str) -> PathBuf {
        self.runtime.path().join("vexec/vms").join(name)
    }

    /// What VM `name`'s `up` process says of it.
    pub fn info(&self, name: &str) -> serde_json::Value {
        let info = std::fs::read(self.dir(name).join("info.json")).unwrap();
        serde_json::from_slice(&info).unwrap()
    }

    /// The `up` process of VM `name`.
    pub fn up_pid(&self, name: &str) -> i32 {
        self.info(name)["pid"].as_i64().unwrap() as i32
    }
}

impl Drop for Vms {
    fn drop(&mut self) {
        let _ = self.vexec().args(["down", "--all", "--runs"]).output();
    }
}

pub fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits up to `limit` for `cond`.
pub fn eventually(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + limit;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    cond()
}

/// Running (a zombie waiting for its reaper is not).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(") ").is_some_and(|(_, r)| r.starts_with('Z')))
}
