//! Other processes as /proc shows them.

/// A `kB` field of `/proc/PID/status` (VmRSS, VmHWM...), in KiB.
pub fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    kib_field(&status, field)
}

/// The `field:` line of a status text, in KiB.
fn kib_field(status: &str, field: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_read_by_their_whole_name() {
        let s = "VmHWM:\t  2048 kB\nVmRSS:\t  1024 kB\nVmRSSx: 1 kB\n";
        assert_eq!(kib_field(s, "VmRSS"), Some(1024));
        assert_eq!(kib_field(s, "VmHWM"), Some(2048));
        assert_eq!(kib_field(s, "VmSwap"), None);
    }
}
