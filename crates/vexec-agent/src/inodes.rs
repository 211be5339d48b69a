//! Keeping the guest's cached virtio-fs inodes under what the host's
//! virtiofsd can hold.
//!
//! virtiofsd keeps a descriptor open for every inode the guest knows, until
//! the guest forgets it. The guest forgets only inodes it evicts, and with
//! memory to spare it evicts none: a walk over a tree larger than the
//! daemon's descriptor limit (`find /usr`) would fail with EMFILE halfway.
//! So a thread watches how many inodes the guest gained since its root was
//! built (the FUSE ones among them) and, past half the limit,
//! has the kernel drop its unused dentries and inodes (which sends the
//! forgets). Only caches go; nothing the command sees changes.

use std::time::Duration;

/// How often the count is read: a guest looks up a few thousand names a
/// second under TCG, well under half a limit between two reads.
const PERIOD: Duration = Duration::from_millis(50);

/// The inodes of every filesystem, counted exactly (SLUB's per-cache counts
/// lag behind frees). The FUSE ones are among those added after the start.
const INODES: &str = "/proc/sys/fs/inode-nr";

/// Starts the watcher for daemons that can spend `budget` descriptors on
/// the guest.
pub fn watch(budget: u64) {
    let Some(base) = count() else {
        super::step("cannot count inodes: cached virtio-fs inodes are not bounded");
        return;
    };
    // What is new since the root was built: FUSE inodes and the overlay's
    // over them, so an upper bound on what the daemons hold.
    // 4: no kernel log line for each drop.
    let _ = std::fs::write(DROP_CACHES, "4");
    let grown = move || count().map(|n| n.saturating_sub(base));
    let watching = super::sys::thread("inode-watch", move || {
        let mut trigger = budget / 2;
        loop {
            std::thread::sleep(PERIOD);
            let Some(n) = grown() else { return };
            if n > trigger {
                forget();
                let kept = grown().unwrap_or(n);
                trigger = next_trigger(budget, kept);
                super::step(&format!(
                    "{n} inodes since setup (virtiofsd budget {budget}): {kept} after dropping unused ones"
                ));
            }
        }
    });
    if let Err(e) = watching {
        eprintln!("vexec-init: warning: cached virtio-fs inodes are not bounded: {e}");
    }
}

/// When to drop again, given the inodes a drop could not free (open files,
/// their directories): half-way from those to the limit, and never below
/// half the limit. So pinned inodes do not make it drop every period.
fn next_trigger(budget: u64, kept: u64) -> u64 {
    let half = budget / 2;
    half.max(kept + budget.saturating_sub(kept) / 2)
}

/// How many inodes the guest has.
fn count() -> Option<u64> {
    first_number(&std::fs::read_to_string(INODES).ok()?)
}

/// The first number of a procfs line (`34031\t0` in inode-nr).
fn first_number(s: &str) -> Option<u64> {
    s.split_whitespace().next()?.parse().ok()
}

const DROP_CACHES: &str = "/proc/sys/vm/drop_caches";

/// Drops unused dentries and inodes (2: not the page cache of files still
/// cached).
fn forget() {
    if let Err(e) = std::fs::write(DROP_CACHES, "2") {
        eprintln!("vexec-init: warning: dropping cached inodes: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_parse_as_their_first_number() {
        assert_eq!(first_number("19950 N0=19950\n"), Some(19950));
        assert_eq!(first_number("34031\t0\n"), Some(34031));
        assert_eq!(first_number(""), None);
        assert_eq!(first_number("x 1"), None);
    }

    #[test]
    fn pinned_inodes_move_the_trigger_up_never_below_half() {
        assert_eq!(next_trigger(20000, 200), 10100);
        assert_eq!(next_trigger(20000, 0), 10000);
        assert_eq!(next_trigger(20000, 16000), 18000);
        assert_eq!(next_trigger(1000, 5000), 5000);
    }
}
