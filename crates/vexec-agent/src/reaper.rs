//! Reaping children when several threads wait for their own: PID 1
//! inherits every orphan, and a persistent VM runs commands (and QEMU guest
//! agent `guest-exec`s) side by side. One `waitpid(-1)` at a time, by
//! whichever waiter comes first; statuses of registered children are kept
//! for their waiter, an orphan's are dropped.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command};
use std::sync::{Condvar, Mutex};

use vexec_protocol::Exit;

#[derive(Default)]
struct State {
    /// Spawned through [`spawn`] and not yet reaped.
    wanted: HashSet<i32>,
    /// Reaped, waiting for their waiter.
    done: HashMap<i32, Exit>,
    /// A thread is in `waitpid(-1)`.
    waiting: bool,
}

static STATE: std::sync::LazyLock<Mutex<State>> = std::sync::LazyLock::new(Mutex::default);
static CHANGED: Condvar = Condvar::new();

fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Spawns `cmd` as a child whose status [`wait`] will return (registered
/// before any waiter can reap it).
pub fn spawn(cmd: &mut Command) -> std::io::Result<Child> {
    let mut s = state();
    let child = cmd.spawn()?;
    s.wanted.insert(child.id() as i32);
    Ok(child)
}

/// How a wait status ended, if it did (not a stop).
fn exit_of(status: i32) -> Option<Exit> {
    if libc::WIFEXITED(status) {
        Some(Exit::Code(libc::WEXITSTATUS(status)))
    } else if libc::WIFSIGNALED(status) {
        Some(Exit::Signal(libc::WTERMSIG(status)))
    } else {
        None
    }
}

/// Waits for `pid` (spawned through [`spawn`]), reaping any other child
/// meanwhile.
pub fn wait(pid: i32) -> Exit {
    let mut s = state();
    loop {
        if let Some(e) = s.done.remove(&pid) {
            return e;
        }
        if s.waiting {
            s = CHANGED.wait(s).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        s.waiting = true;
        drop(s);
        let mut status = 0;
        // SAFETY: status is a valid out-pointer.
        let got = unsafe { libc::waitpid(-1, &mut status, 0) };
        let err = std::io::Error::last_os_error();
        s = state();
        s.waiting = false;
        CHANGED.notify_all();
        if got > 0 {
            if let Some(e) = exit_of(status)
                && s.wanted.remove(&got)
            {
                s.done.insert(got, e);
            }
        } else if err.raw_os_error() != Some(libc::EINTR) {
            // No child at all: `pid` was never ours to wait for.
            return Exit::Code(255);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `waitpid(-1)` would reap the children of tests running beside it:
    /// the real test runs alone in a process of its own.
    #[test]
    fn waiters_on_several_threads_each_get_their_own_status() {
        let out = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "reaper::tests::alone", "--nocapture"])
            .env("VEXEC_REAPER_ALONE", "1")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("1 passed"), "{text}");
    }

    #[test]
    fn alone() {
        if std::env::var_os("VEXEC_REAPER_ALONE").is_none() {
            return;
        }
        let kids: Vec<i32> = (0..6)
            .map(|i| {
                let mut c = Command::new("/bin/sh");
                c.arg("-c").arg(format!("sleep 0.0{i}; exit {i}"));
                spawn(&mut c).unwrap().id() as i32
            })
            .collect();
        let threads: Vec<_> = kids
            .iter()
            .rev()
            .map(|&pid| std::thread::spawn(move || wait(pid)))
            .collect();
        let got: Vec<Exit> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let want: Vec<Exit> = (0..6).rev().map(Exit::Code).collect();
        assert_eq!(got, want);
    }
}
