//! `vexec cache`: what vexec keeps in its cache directory, listed or
//! removed. The kernel store beside it is `vexec kernel`'s.

use std::path::PathBuf;
use std::time::SystemTime;

use crate::artifacts::cache::{Cache, CacheError};

/// What `vexec cache` does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheAction {
    /// Each entry: kind, size, last use, key.
    List,
    /// Remove entries (all, or those of one kind).
    Clean { kind: Option<String> },
}

/// Runs a `vexec cache` action; returns the exit status.
pub fn main(action: &CacheAction, root: PathBuf) -> Result<i32, CacheError> {
    let cache = Cache::open(root)?;
    match action {
        CacheAction::List => list(&cache),
        CacheAction::Clean { kind } => clean(&cache, kind.as_deref()),
    }
    Ok(0)
}

fn list(cache: &Cache) {
    let entries = cache.entries();
    if entries.is_empty() {
        crate::say!(
            "vexec: the cache ({}) holds nothing",
            cache.root().display()
        );
        return;
    }
    println!("{:<18} {:>10}  {:<12} KEY", "KIND", "SIZE", "LAST USE");
    let mut total = 0;
    for e in &entries {
        total += e.bytes;
        println!(
            "{:<18} {:>10}  {:<12} {}",
            e.kind,
            size(e.bytes),
            ago(e.used),
            e.key
        );
    }
    println!(
        "{:<18} {:>10}  in {}",
        "total",
        size(total),
        cache.root().display()
    );
}

fn clean(cache: &Cache, kind: Option<&str>) {
    let (mut n, mut bytes) = (0, 0);
    for e in cache.entries() {
        if kind.is_none_or(|k| k == e.kind) {
            cache.remove(&e.kind, &e.key);
            n += 1;
            bytes += e.bytes;
        }
    }
    if kind.is_none() {
        cache.remove_leftovers();
    }
    crate::say!(
        "vexec: removed {n} cache entr{} ({})",
        if n == 1 { "y" } else { "ies" },
        size(bytes)
    );
}

/// A size in the largest unit that keeps it above 1.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// How long ago `t` was, roughly.
fn ago(t: SystemTime) -> String {
    let secs = SystemTime::now()
        .duration_since(t)
        .unwrap_or_default()
        .as_secs();
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m ago", secs / 60),
        3600..86400 => format!("{}h ago", secs / 3600),
        _ => format!("{}d ago", secs / 86400),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(size(512), "512 B");
        assert_eq!(size(88 << 20), "88.0 MiB");
        assert_eq!(size(3 << 30), "3.0 GiB");
    }
}
