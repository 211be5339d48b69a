//! The guest's serial console: kept as a tail in memory (shown when a boot
//! fails), echoed to stderr with `-v`, optionally written to a log file, and
//! watched for the lines that mean the run is over (a kernel panic).

use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::{Arc, Mutex};

use crate::protocol::{REPORT_END, REPORT_PREFIX, REPORT_REQUEST};

/// Lines of console output kept for error reports.
const TAIL_LINES: usize = 40;

/// Something on the console the session must react to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleEvent {
    /// The kernel panicked.
    Panic(String),
    /// The agent's answer to a report request, its lines without prefix.
    Report(String),
    /// The kernel says a CPU has stopped making progress (a soft lockup or
    /// an RCU stall).
    Stall(String),
}

/// Asks the agent, on its console, for a report of where it stands.
pub fn request_report(console: &mut impl Write) {
    let _ = console.write_all(format!("\n{REPORT_REQUEST}\n").as_bytes());
}

/// The retained tail of the console.
#[derive(Debug, Default)]
pub struct ConsoleTail {
    lines: Mutex<VecDeque<String>>,
}

impl ConsoleTail {
    fn push(&self, line: String) {
        let mut l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if l.len() == TAIL_LINES {
            l.pop_front();
        }
        l.push_back(line);
    }

    /// The last `n` lines, oldest first.
    pub fn last(&self, n: usize) -> Vec<String> {
        let l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.iter().skip(l.len().saturating_sub(n)).cloned().collect()
    }

    /// Lines the guest agent printed as errors.
    pub fn agent_errors(&self) -> Vec<String> {
        let l = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        l.iter()
            .filter_map(|s| {
                s.split_once("vexec-init: error: ")
                    .map(|(_, e)| e.to_string())
            })
            .collect()
    }
}

/// Classifies one console line.
pub fn classify(line: &str) -> Option<ConsoleEvent> {
    let text = || line.trim().to_string();
    if line.contains("Kernel panic - not syncing") {
        Some(ConsoleEvent::Panic(text()))
    } else if line.contains("BUG: soft lockup")
        || line.contains("self-detected stall on CPU")
        || line.contains("detected stalls on CPUs")
    {
        Some(ConsoleEvent::Stall(text()))
    } else {
        None
    }
}

/// Reads the console until QEMU closes it.
pub fn spawn_reader(
    stream: impl Read + Send + 'static,
    verbose: bool,
    mut log: Option<File>,
    on_event: impl Fn(ConsoleEvent) + Send + 'static,
) -> (Arc<ConsoleTail>, std::thread::JoinHandle<()>) {
    let tail = Arc::new(ConsoleTail::default());
    let t = Arc::clone(&tail);
    let handle = std::thread::spawn(move || {
        let mut r = BufReader::new(stream);
        let mut raw = Vec::new();
        let mut report: Option<String> = None;
        loop {
            raw.clear();
            match r.read_until(b'\n', &mut raw) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if let Some(f) = log.as_mut() {
                let _ = f.write_all(&raw);
            }
            let line = String::from_utf8_lossy(&raw)
                .trim_end_matches(['\r', '\n'])
                .to_string();
            if let Some(rest) = line.strip_prefix(REPORT_PREFIX) {
                // Kept whole for the session, not in the tail.
                if rest == REPORT_END {
                    on_event(ConsoleEvent::Report(report.take().unwrap_or_default()));
                } else {
                    let r = report.get_or_insert_with(String::new);
                    r.push_str(rest);
                    r.push('\n');
                }
                continue;
            }
            if verbose {
                crate::say!("vexec: console: {line}");
            }
            if let Some(ev) = classify(&line) {
                on_event(ev);
            }
            t.push(line);
        }
    });
    (tail, handle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lockups_and_rcu_stalls_are_stalls() {
        let stall = |l: &str| matches!(classify(l), Some(ConsoleEvent::Stall(_)));
        assert!(stall(
            "[   28.570226] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [cryptomgr_test:52]"
        ));
        assert!(stall(
            "[   21.0] rcu: INFO: rcu_preempt self-detected stall on CPU"
        ));
        assert!(stall(
            "[   21.0] rcu: INFO: rcu_sched detected stalls on CPUs/tasks:"
        ));
        assert!(!stall(
            "[    0.1] rcu: Preemptible hierarchical RCU implementation."
        ));
    }

    #[test]
    fn keeps_tail_and_flags_panics() {
        let text: String = (0..100)
            .map(|i| format!("line {i}\r\n"))
            .collect::<String>()
            + "vexec-init: error: mount failed\n[ 1.0] Kernel panic - not syncing: Attempted to kill init!\n";
        let (tx, rx) = std::sync::mpsc::channel();
        let (tail, h) = spawn_reader(
            std::io::Cursor::new(text.into_bytes()),
            false,
            None,
            move |e| {
                let _ = tx.send(e);
            },
        );
        h.join().unwrap();
        let last = tail.last(3);
        assert_eq!(last[0], "line 99");
        assert!(last[2].contains("Kernel panic"));
        assert_eq!(tail.agent_errors(), ["mount failed"]);
        assert!(matches!(rx.recv().unwrap(), ConsoleEvent::Panic(_)));
    }

    #[test]
    fn collects_a_report_apart_from_the_tail() {
        let text = "before\nvexec-report: agent: running\nvexec-report:     [<0>] pipe_write\nvexec-report: end\nafter\n";
        let (tx, rx) = std::sync::mpsc::channel();
        let (tail, h) = spawn_reader(
            std::io::Cursor::new(text.as_bytes().to_vec()),
            false,
            None,
            move |e| {
                let _ = tx.send(e);
            },
        );
        h.join().unwrap();
        assert_eq!(tail.last(5), ["before", "after"]);
        assert_eq!(
            rx.recv().unwrap(),
            ConsoleEvent::Report("agent: running\n    [<0>] pipe_write\n".into())
        );
    }
}
