//! What the agent is doing, kept in counters it updates as it goes, and a
//! report of it — with the kernel stacks of the agent's threads and of
//! every other process — written to the serial console when the host asks
//! there. The console is a channel apart from the control port, so a run
//! stuck on the control port can still say where it stuck.

use std::io::BufRead;
use std::sync::atomic::{AtomicI32, AtomicU8, AtomicU64, Ordering};

use super::sys;

use vexec_protocol::{REPORT_END as END, REPORT_PREFIX as PREFIX, REPORT_REQUEST as REQUEST};

/// Where the agent is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    WaitingForHost = 1,
    SettingUp,
    Running,
    Draining,
    Ending,
}

impl Phase {
    fn name(v: u8) -> &'static str {
        match v {
            0 => "booting",
            1 => "ready, waiting for the host",
            2 => "setting up the root",
            3 => "running the command",
            4 => "draining the command's output",
            _ => "reporting the end",
        }
    }
}

/// The agent's counters.
pub struct State {
    phase: AtomicU8,
    pid: AtomicI32,
    /// Bytes read from the command's stdout/stderr, and sent to the host.
    read: [AtomicU64; 2],
    sent: [AtomicU64; 2],
    /// Guest uptime (ms) when the current write to the control port
    /// began, 0 when none is under way; and its size.
    sending_since: AtomicU64,
    sending_len: AtomicU64,
    /// Host messages read.
    received: AtomicU64,
}

/// The one agent's state.
pub static STATE: State = State {
    phase: AtomicU8::new(0),
    pid: AtomicI32::new(0),
    read: [AtomicU64::new(0), AtomicU64::new(0)],
    sent: [AtomicU64::new(0), AtomicU64::new(0)],
    sending_since: AtomicU64::new(0),
    sending_len: AtomicU64::new(0),
    received: AtomicU64::new(0),
};

impl State {
    /// The agent moved on.
    pub fn phase(&self, p: Phase) {
        self.phase.store(p as u8, Ordering::Relaxed);
    }

    /// The command runs as `pid`.
    pub fn command(&self, pid: i32) {
        self.pid.store(pid, Ordering::Relaxed);
    }

    /// `n` bytes of stream `i` (0 stdout, 1 stderr) read from the command.
    pub fn read(&self, i: usize, n: usize) {
        self.read[i].fetch_add(n as u64, Ordering::Relaxed);
    }

    /// `n` bytes of stream `i` sent to the host.
    pub fn sent(&self, i: usize, n: usize) {
        self.sent[i].fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A write of `len` bytes to the control port begins (Some) or ends.
    pub fn sending(&self, len: Option<usize>) {
        match len {
            Some(n) => {
                self.sending_len.store(n as u64, Ordering::Relaxed);
                self.sending_since
                    .store(sys::uptime_ms().max(1), Ordering::Relaxed);
            }
            None => self.sending_since.store(0, Ordering::Relaxed),
        }
    }

    /// A message from the host was read.
    pub fn received(&self) {
        self.received.fetch_add(1, Ordering::Relaxed);
    }

    fn summary(&self) -> Vec<String> {
        let now = sys::uptime_ms();
        let mut lines = vec![format!(
            "agent: {} (command pid {}), {} host messages read",
            Phase::name(self.phase.load(Ordering::Relaxed)),
            self.pid.load(Ordering::Relaxed),
            self.received.load(Ordering::Relaxed)
        )];
        let since = self.sending_since.load(Ordering::Relaxed);
        lines.push(if since == 0 {
            "control port: no write under way".into()
        } else {
            format!(
                "control port: a write of {} bytes blocked for {:.1}s",
                self.sending_len.load(Ordering::Relaxed),
                now.saturating_sub(since) as f64 / 1000.0
            )
        });
        for (i, name) in ["stdout", "stderr"].iter().enumerate() {
            lines.push(format!(
                "{name}: {} bytes read from the command, {} sent to the host",
                self.read[i].load(Ordering::Relaxed),
                self.sent[i].load(Ordering::Relaxed)
            ));
        }
        lines
    }
}

/// Answers report requests on the console (fd 0) for as long as the agent
/// lives. Echo is turned off so requests do not show in the console log.
pub fn listen() {
    sys::console_no_echo(0);
    let listening = sys::thread("console", || {
        let stdin = std::io::stdin();
        for line in stdin.lock().lines() {
            match line {
                Ok(l) if l.trim() == REQUEST => write_report(),
                Ok(_) => {}
                Err(_) => return,
            }
        }
    });
    if let Err(e) = listening {
        eprintln!("vexec-init: warning: hang reports will not be answered: {e}");
    }
}

/// Writes the report to the console, one prefixed line at a time.
fn write_report() {
    let mut lines = STATE.summary();
    lines.extend(processes());
    let mut out = String::new();
    for l in lines.iter().chain(std::iter::once(&END.to_string())) {
        out.push_str(PREFIX);
        out.push_str(l);
        out.push('\n');
    }
    eprint!("{out}");
}

/// Every process and thread with its state, wait channel and kernel stack
/// (the agent's threads first).
fn processes() -> Vec<String> {
    let mut pids: Vec<i32> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    pids.sort();
    let mut lines = Vec::new();
    for pid in pids {
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                let mut t: Vec<i32> = d
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse().ok())
                    .collect();
                t.sort();
                t
            })
            .unwrap_or_default();
        for tid in tasks {
            let dir = format!("/proc/{pid}/task/{tid}");
            let Some((comm, state)) = stat_of(&dir) else {
                continue;
            };
            // Kernel threads idle in their own loops, and this thread is
            // only writing the report: left out.
            if is_kernel_thread(pid) || tid == sys::gettid() {
                continue;
            }
            let stack = std::fs::read_to_string(format!("{dir}/stack")).unwrap_or_default();
            let wchan = std::fs::read_to_string(format!("{dir}/wchan")).unwrap_or_default();
            lines.push(format!("task {pid}/{tid} ({comm}) {state} wchan={wchan}"));
            lines.extend(stack.lines().map(|l| format!("    {l}")));
        }
    }
    lines
}

fn is_kernel_thread(pid: i32) -> bool {
    pid != 1
        && std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
        && std::fs::read_link(format!("/proc/{pid}/exe")).is_err()
}

/// (comm, state letter) from a task's stat file.
fn stat_of(dir: &str) -> Option<(String, char)> {
    let stat = std::fs::read_to_string(format!("{dir}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let state = stat.get(close + 2..)?.chars().next()?;
    Some((comm, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_comm_with_spaces_and_parens() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("stat"), "42 (a (b) c) S 1 42 42 0").unwrap();
        assert_eq!(
            stat_of(d.path().to_str().unwrap()),
            Some(("a (b) c".to_string(), 'S'))
        );
    }

    #[test]
    fn summary_says_what_is_blocked() {
        let s = State {
            phase: AtomicU8::new(Phase::Draining as u8),
            pid: AtomicI32::new(7),
            read: [AtomicU64::new(10), AtomicU64::new(0)],
            sent: [AtomicU64::new(4), AtomicU64::new(0)],
            sending_since: AtomicU64::new(1),
            sending_len: AtomicU64::new(6),
            received: AtomicU64::new(3),
        };
        let l = s.summary();
        assert!(l[0].contains("draining") && l[0].contains("pid 7"), "{l:?}");
        assert!(l[1].contains("write of 6 bytes blocked"), "{l:?}");
        assert!(
            l[2].contains("10 bytes read") && l[2].contains("4 sent"),
            "{l:?}"
        );
    }
}
