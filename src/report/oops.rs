//! Finding kernel splats — BUG, Oops, WARNING, panic, KASAN/UBSAN/KFENCE
//! reports, lockdep, hung tasks, RCU stalls, soft lockups — in a kernel log.

use serde::Serialize;

/// One report the kernel logged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Splat {
    /// What kind of report, e.g. "WARNING", "BUG", "Oops".
    pub kind: String,
    /// Its first line, without the timestamp.
    pub title: String,
    /// The whole report as logged (up to its end marker or 80 lines).
    pub text: String,
}

/// Line starts (after the timestamp) that open a report, with their kind.
const STARTS: &[(&str, &str)] = &[
    ("BUG: KASAN:", "KASAN"),
    ("BUG: KFENCE:", "KFENCE"),
    ("BUG: KCSAN:", "KCSAN"),
    ("BUG:", "BUG"),
    ("kernel BUG at", "BUG"),
    ("Oops:", "Oops"),
    ("general protection fault", "Oops"),
    ("Unable to handle kernel", "Oops"),
    ("WARNING: possible circular locking dependency", "lockdep"),
    ("WARNING: possible recursive locking", "lockdep"),
    ("WARNING: suspicious RCU usage", "lockdep"),
    ("WARNING:", "WARNING"),
    ("UBSAN:", "UBSAN"),
    ("Kernel panic", "panic"),
    ("INFO: task", "hung task"),
    ("INFO: rcu", "RCU stall"),
    ("rcu: INFO:", "RCU stall"),
    ("watchdog: BUG: soft lockup", "soft lockup"),
];

/// Longest report kept.
const MAX_LINES: usize = 80;

/// The message of a log line: without a `[   12.345678] ` timestamp.
fn message(line: &str) -> &str {
    let t = line.trim_end_matches('\r');
    if let Some(rest) = t.strip_prefix('[')
        && let Some(end) = rest.find(']')
        && rest[..end]
            .trim()
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.')
    {
        return rest[end + 1..].trim_start();
    }
    t
}

fn kind_of(msg: &str) -> Option<&'static str> {
    // "watchdog: BUG: soft lockup" must win over a plain "BUG:".
    if msg.starts_with("watchdog: BUG: soft lockup") {
        return Some("soft lockup");
    }
    STARTS
        .iter()
        .find(|(p, _)| msg.starts_with(p))
        .map(|(_, k)| *k)
        .filter(|_| !msg.starts_with("INFO: task") || msg.contains("blocked for more than"))
}

fn ends_report(msg: &str) -> bool {
    msg.starts_with("---[ end ")
}

/// Every report in `log`, in order.
pub fn find(log: &str) -> Vec<Splat> {
    let lines: Vec<&str> = log.lines().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let msg = message(lines[i]);
        let Some(kind) = kind_of(msg) else {
            i += 1;
            continue;
        };
        let mut text = vec![lines[i].trim_end_matches('\r')];
        let mut j = i + 1;
        while j < lines.len() && text.len() < MAX_LINES {
            let m = message(lines[j]);
            // A new report that is not part of this one starts here (an
            // Oops following its BUG line belongs to the same report).
            if kind_of(m).is_some() && !(kind == "BUG" && m.starts_with("Oops:")) {
                break;
            }
            text.push(lines[j].trim_end_matches('\r'));
            j += 1;
            if ends_report(m) {
                break;
            }
        }
        out.push(Splat {
            kind: kind.to_string(),
            title: msg.to_string(),
            text: text.join("\n"),
        });
        i = j;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &str = "\
[    0.000000] Linux version 6.1.0-56-amd64
[    3.104455] ------------[ cut here ]------------
[    3.104460] WARNING: CPU: 1 PID: 123 at mm/page_alloc.c:5534 __alloc_pages+0x2f1/0x330
[    3.104470] Modules linked in: virtiofs fuse
[    3.104480] Call Trace:
[    3.104481]  <TASK>
[    3.104490] ---[ end trace 0000000000000000 ]---
[    3.200000] everything is fine
[    4.000001] BUG: kernel NULL pointer dereference, address: 0000000000000008
[    4.000002] #PF: supervisor read access in kernel mode
[    4.000003] Oops: 0000 [#1] PREEMPT SMP NOPTI
[    4.000004] RIP: 0010:do_thing+0x10/0x20
[    4.000005] ---[ end trace 1111111111111111 ]---
[    5.000000] UBSAN: array-index-out-of-bounds in drivers/x.c:10:5
[    5.000001] index 5 is out of range for type 'int [4]'
[    6.000000] INFO: task kworker/0:1:42 blocked for more than 120 seconds.
[    7.000000] INFO: task something unrelated
[    8.000000] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [sh:1]
";

    #[test]
    fn finds_each_report_with_its_lines() {
        let s = find(LOG);
        let kinds: Vec<&str> = s.iter().map(|s| s.kind.as_str()).collect();
        assert_eq!(
            kinds,
            ["WARNING", "BUG", "UBSAN", "hung task", "soft lockup"]
        );
        assert!(s[0].title.starts_with("WARNING: CPU: 1 PID: 123"));
        assert!(s[0].text.ends_with("---[ end trace 0000000000000000 ]---"));
        assert_eq!(s[0].text.lines().count(), 5);
        // The Oops line belongs to the BUG it follows.
        assert!(s[1].text.contains("Oops: 0000 [#1]"));
        assert!(!s[2].text.contains("INFO: task"));
    }

    #[test]
    fn quiet_logs_have_none() {
        assert!(find("[    1.0] hello\nWARNINGS are words\n").is_empty());
        assert_eq!(message("[   12.345678] BUG: x"), "BUG: x");
        assert_eq!(message("no stamp"), "no stamp");
    }
}
