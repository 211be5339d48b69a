//! Kernel coverage: the guest's GCOV counters (a tar of debugfs's gcov
//! tree) kept as an archive, and captured into LCOV when `lcov` and the
//! kernel's build tree are at hand.

use std::path::Path;
use std::process::Command;

use crate::report::programs::Saved;

/// What to do with the counters.
pub struct Capture<'a> {
    /// The output directory (`coverage/` is made in it).
    pub out: &'a Path,
    /// The kernel's build tree (its .gcno files and sources).
    pub build_tree: Option<&'a Path>,
    pub lcov: bool,
    pub path_var: Option<&'a std::ffi::OsStr>,
}

/// Saves `archive` and captures it into LCOV when possible.
pub fn save(archive: &[u8], c: &Capture) -> Result<Saved, String> {
    let dir = c.out.join("coverage");
    std::fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
    let tar_path = dir.join("gcda.tar");
    std::fs::write(&tar_path, archive)
        .map_err(|e| format!("writing {}: {e}", tar_path.display()))?;
    let mut saved = Saved {
        archive: Some(tar_path),
        ..Default::default()
    };
    if !c.lcov {
        saved.note = Some("--no-lcov: GCOV data kept as gcda.tar only".into());
        return Ok(saved);
    }
    let Some(lcov) = crate::sys::programs::on_path("lcov", c.path_var) else {
        saved.note = Some("lcov is not installed (Debian: apt-get install lcov)".into());
        return Ok(saved);
    };
    let Some(tree) = c.build_tree else {
        saved.note =
            Some("no kernel build tree to read .gcno files from; pass --build-tree DIR".into());
        return Ok(saved);
    };
    let gcda = dir.join("gcda");
    tar::Archive::new(archive)
        .unpack(&gcda)
        .map_err(|e| format!("unpacking the GCOV data into {}: {e}", gcda.display()))?;
    let linked = link_notes(&gcda);
    if linked == 0 {
        saved.note = Some(format!(
            "none of the .gcno files of this data were found (the build tree is expected where it was built, under {})",
            tree.display()
        ));
        return Ok(saved);
    }
    let info = dir.join("lcov.info");
    let out = Command::new(&lcov)
        .arg("--quiet")
        .arg("--capture")
        .arg("--directory")
        .arg(&gcda)
        .arg("--base-directory")
        .arg(tree)
        .arg("--output-file")
        .arg(&info)
        .output()
        .map_err(|e| format!("running {}: {e}", lcov.display()))?;
    if out.status.success() && info.is_file() {
        saved.lcov = Some(info);
    } else {
        saved.note = Some(format!(
            "lcov failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(saved)
}

/// debugfs names each .gcda by the absolute path of its object in the build
/// tree; links the matching .gcno (which gcov needs beside it) from there.
/// Returns how many were linked.
fn link_notes(root: &Path) -> usize {
    let mut linked = 0;
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "gcda") {
                let rel = p.strip_prefix(root).unwrap_or(&p);
                let note = Path::new("/").join(rel).with_extension("gcno");
                if note.is_file()
                    && std::os::unix::fs::symlink(&note, p.with_extension("gcno")).is_ok()
                {
                    linked += 1;
                }
            }
        }
    }
    linked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_archive_and_says_why_no_lcov() {
        let out = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "src/linux/kernel/fork.gcda", &b"abc"[..])
            .unwrap();
        let archive = b.into_inner().unwrap();
        let c = Capture {
            out: out.path(),
            build_tree: None,
            lcov: false,
            path_var: None,
        };
        let s = save(&archive, &c).unwrap();
        assert_eq!(std::fs::read(s.archive.unwrap()).unwrap(), archive);
        assert!(s.lcov.is_none() && s.note.unwrap().contains("--no-lcov"));
        let c = Capture { lcov: true, ..c };
        assert!(save(&archive, &c).unwrap().note.unwrap().contains("lcov"));
    }
}
