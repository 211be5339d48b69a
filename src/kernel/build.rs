//! Building kernels for vexec: `vexec kconfig` merges the options vexec's
//! guest needs (all built in) into a `.config`; `vexec build` configures
//! and compiles a kernel tree so that `-k DIR` boots it.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use std::process::{Command, Stdio};

/// What every vexec guest needs, built in (also used by
/// scripts/build-test-kernel.sh).
pub const GUEST_OPTIONS: &str = include_str!("../../scripts/kconfig/vexec-builtin.config");

/// What gdb and drgn want on top.
pub const DEBUG_OPTIONS: &str = "\
CONFIG_DEBUG_KERNEL=y
CONFIG_DEBUG_INFO_DWARF_TOOLCHAIN_DEFAULT=y
# CONFIG_DEBUG_INFO_REDUCED is not set
CONFIG_KALLSYMS=y
CONFIG_KALLSYMS_ALL=y
CONFIG_GDB_SCRIPTS=y
CONFIG_FRAME_POINTER=y
";

/// Kernel coverage (`vexec run-dir` collects it into LCOV).
pub const GCOV_OPTIONS: &str = "\
CONFIG_DEBUG_FS=y
CONFIG_GCOV_KERNEL=y
CONFIG_GCOV_PROFILE_ALL=y
";

/// KUnit's suites when no .kunitconfig is given: kunit.py's default
/// (tools/testing/kunit/configs/default.config).
pub const KUNIT_DEFAULT: &str = "\
CONFIG_KUNIT=y
CONFIG_KUNIT_EXAMPLE_TEST=y
CONFIG_KUNIT_ALL_TESTS=y
";

/// KUnit, and the menu most in-tree suites sit in (tinyconfig, the base of
/// a tree without a .config, turns it off; kunit.py's olddefconfig keeps
/// its default, on).
const KUNIT_BASE: &str = "CONFIG_KUNIT=y\nCONFIG_RUNTIME_TESTING_MENU=y\n";

/// Which option sets to add on top of the guest's.
#[derive(Debug, Clone, Default)]
struct Extras {
    debug: bool,
    gcov: bool,
    /// KUnit and its suites, as a .kunitconfig says them.
    kunit: Option<String>,
}

/// The option a `.config` line sets, if any (`CONFIG_X=...` or
/// `# CONFIG_X is not set`).
fn option_of(line: &str) -> Option<&str> {
    let l = line.trim();
    if let Some(rest) = l.strip_prefix("# ") {
        return rest.strip_suffix(" is not set");
    }
    l.split_once('=')
        .map(|(k, _)| k)
        .filter(|k| k.starts_with("CONFIG_"))
}

/// `existing` with every option of `fragment` set as the fragment says:
/// replaced in place where present, appended otherwise.
pub fn merge(existing: &str, fragment: &str) -> String {
    // An option the fragment sets twice: the last word counts.
    let mut wanted: Vec<(&str, &str)> = Vec::new();
    for (o, l) in fragment
        .lines()
        .filter_map(|l| option_of(l).map(|o| (o, l.trim())))
    {
        wanted.retain(|(w, _)| *w != o);
        wanted.push((o, l));
    }
    let mut done = vec![false; wanted.len()];
    let mut out = String::new();
    for line in existing.lines() {
        match option_of(line).and_then(|o| wanted.iter().position(|(w, _)| *w == o)) {
            Some(i) if !done[i] => {
                out.push_str(wanted[i].1);
                done[i] = true;
            }
            Some(_) => continue,
            None => out.push_str(line),
        }
        out.push('\n');
    }
    for (i, (_, line)) in wanted.iter().enumerate() {
        if !done[i] {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The options of `fragment` that `config` does not have as asked.
pub fn missing(config: &str, fragment: &str) -> Vec<String> {
    let have: Vec<&str> = config.lines().map(str::trim).collect();
    fragment
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("CONFIG_"))
        .filter(|l| !have.contains(l))
        .map(str::to_string)
        .collect()
}

fn fragment(x: &Extras) -> String {
    let mut f = GUEST_OPTIONS.to_string();
    if x.debug {
        f.push_str(DEBUG_OPTIONS);
    }
    if x.gcov {
        f.push_str(GCOV_OPTIONS);
    }
    if let Some(k) = &x.kunit {
        f.push_str(KUNIT_BASE);
        f.push_str(k);
        f.push('\n');
    }
    f
}

fn extras_words(x: &Extras) -> String {
    let mut sets = Vec::new();
    if x.debug {
        sets.push("debug");
    }
    if x.gcov {
        sets.push("coverage");
    }
    if x.kunit.is_some() {
        sets.push("KUnit");
    }
    match sets.split_last() {
        None => String::new(),
        Some((last, [])) => format!(" and the {last} ones"),
        Some((last, rest)) => format!(" and the {} and {last} ones", rest.join(", ")),
    }
}

/// Why a kernel tree could not be configured or built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{} is not a Linux source tree (no Kconfig and Makefile); pass the tree's directory", .0.display())]
    NotATree(PathBuf),
    #[error("running make: {0}; install build-essential")]
    NoMake(std::io::Error),
    #[error("`make {args}` failed in {}", dir.display())]
    Make { args: String, dir: PathBuf },
    #[error("the kernel build failed in {} (make's errors are above)", .0.display())]
    Build(PathBuf),
    #[error(
        "these .kunitconfig options are not in the configured kernel, most likely for unmet dependencies: {}; add what they depend on to the .kunitconfig (`make menuconfig` shows it)",
        .0.join(" ")
    )]
    KunitOptions(Vec<String>),
    #[error("{what} {}: {source}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> BuildError {
    let path = path.to_path_buf();
    move |source| BuildError::Io { what, path, source }
}

/// What `vexec kconfig` and `vexec build` are asked for (see their
/// `--help`).
#[derive(Debug, Clone, Default)]
pub struct KbuildArgs {
    /// Also what gdb and drgn want.
    pub debug: bool,
    /// Also GCOV kernel coverage.
    pub gcov: bool,
    /// Also KUnit with kunit.py's default suites.
    pub kunit: bool,
    /// Also KUnit with this .kunitconfig (a file or a directory holding
    /// one); implies `kunit`.
    pub kunitconfig: Option<PathBuf>,
    /// The kernel source tree.
    pub dir: PathBuf,
}

/// `vexec kconfig [--debug] [--gcov] [DIR]`: merges vexec's options into
/// DIR/.config.
pub fn kconfig(args: &KbuildArgs) -> Result<(), BuildError> {
    let (extras, dir) = tree(args)?;
    let path = dir.join(".config");
    let existing = std::fs::read_to_string(&path).unwrap_or_default();
    let merged = merge(&existing, &fragment(&extras));
    std::fs::write(&path, merged).map_err(io("writing", &path))?;
    crate::say!(
        "vexec: merged vexec's options{} into {}; run `make olddefconfig` there (or `vexec build`)",
        extras_words(&extras),
        path.display()
    );
    Ok(())
}

/// What was asked, once the directory is known to be a kernel tree.
fn tree(args: &KbuildArgs) -> Result<(Extras, PathBuf), BuildError> {
    let kunit = match &args.kunitconfig {
        // A directory holds its .kunitconfig, as kunit.py reads it.
        Some(p) => {
            let file = if p.is_dir() {
                p.join(".kunitconfig")
            } else {
                p.clone()
            };
            Some(std::fs::read_to_string(&file).map_err(io("reading the kunitconfig", &file))?)
        }
        None => args.kunit.then(|| KUNIT_DEFAULT.to_string()),
    };
    let x = Extras {
        debug: args.debug,
        gcov: args.gcov,
        kunit,
    };
    let dir = args.dir.clone();
    if !dir.join("Kconfig").is_file() || !dir.join("Makefile").is_file() {
        return Err(BuildError::NotATree(dir));
    }
    Ok((x, dir))
}

fn make(dir: &Path, args: &[&str]) -> Result<(), BuildError> {
    let status = Command::new("make")
        .arg("-C")
        .arg(dir)
        .arg("-s")
        .args(args)
        .stdin(Stdio::null())
        .status()
        .map_err(BuildError::NoMake)?;
    if status.success() {
        Ok(())
    } else {
        Err(BuildError::Make {
            args: args.join(" "),
            dir: dir.into(),
        })
    }
}

/// `vexec build [--debug] [--gcov] [DIR]`: configures (tinyconfig when there is no
/// .config yet, then vexec's options and olddefconfig) and compiles the
/// tree with a progress line. ARCH and CROSS_COMPILE pass through to make.
pub fn build(args: &KbuildArgs) -> Result<(), BuildError> {
    let (extras, dir) = tree(args)?;
    let config = dir.join(".config");
    if !config.exists() {
        crate::say!(
            "vexec: no .config in {}: starting from tinyconfig",
            dir.display()
        );
        make(&dir, &["tinyconfig"])?;
    }
    let frag = fragment(&extras);
    let existing = std::fs::read_to_string(&config).map_err(io("reading", &config))?;
    std::fs::write(&config, merge(&existing, &frag)).map_err(io("writing", &config))?;
    make(&dir, &["olddefconfig"])?;
    let after = std::fs::read_to_string(&config).unwrap_or_default();
    // A suite that did not stick would silently not run: as kunit.py, stop.
    if let Some(k) = &extras.kunit {
        let lost = missing(&after, k);
        if !lost.is_empty() {
            return Err(BuildError::KunitOptions(lost));
        }
    }
    let lost = missing(&after, &frag);
    if !lost.is_empty() {
        crate::say!(
            "vexec: warning: these options did not stick (dependencies unmet): {}",
            lost.join(" ")
        );
    }
    let jobs = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut child = Command::new("make")
        .arg("-C")
        .arg(&dir)
        .arg(format!("-j{jobs}"))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(BuildError::NoMake)?;
    let bar = indicatif::ProgressBar::new_spinner();
    if !crate::sys::terminal::is_tty(2) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    let mut steps = 0u64;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            steps += 1;
            bar.set_message(format!("[{steps}] {}", line.trim()));
        }
    }
    let status = child.wait().map_err(BuildError::NoMake)?;
    bar.finish_and_clear();
    if !status.success() {
        return Err(BuildError::Build(dir));
    }
    let release = Command::new("make")
        .arg("-C")
        .arg(&dir)
        .args(["-s", "kernelrelease"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let how = if extras.kunit.is_some() {
        "--results ktap -- true   (KUnit runs at boot; each case is read from the kernel log)"
    } else {
        "-- COMMAND"
    };
    crate::say!(
        "vexec: built {release} in {} ({steps} steps); boot it with: vexec -k {} {how}",
        dir.display(),
        dir.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kunit_options_join_the_fragment_and_are_named() {
        let x = Extras {
            gcov: true,
            kunit: Some("CONFIG_LIST_KUNIT_TEST=y".into()),
            ..Extras::default()
        };
        let f = fragment(&x);
        assert!(
            f.contains("CONFIG_KUNIT=y\nCONFIG_RUNTIME_TESTING_MENU=y\nCONFIG_LIST_KUNIT_TEST=y\n"),
            "{f}"
        );
        assert!(f.contains("CONFIG_GCOV_KERNEL=y"));
        assert_eq!(extras_words(&x), " and the coverage and KUnit ones");
        assert_eq!(extras_words(&Extras::default()), "");
        // Set twice (the .kunitconfig says it too): one line, the last.
        let merged = merge("CONFIG_KUNIT=n\n", &(f + "CONFIG_KUNIT=y\n"));
        assert_eq!(
            missing(&merged, "CONFIG_KUNIT=y\nCONFIG_LIST_KUNIT_TEST=y"),
            Vec::<String>::new()
        );
        assert_eq!(merged.matches("CONFIG_KUNIT=").count(), 1, "{merged}");
    }

    #[test]
    fn merge_replaces_and_appends() {
        let old = "CONFIG_A=y\n# CONFIG_9P_FS is not set\nCONFIG_OVERLAY_FS=m\n# comment\n";
        let m = merge(
            old,
            "CONFIG_9P_FS=y\nCONFIG_OVERLAY_FS=y\nCONFIG_NEW=y\n# CONFIG_A is not set\n",
        );
        assert_eq!(
            m,
            "# CONFIG_A is not set\nCONFIG_9P_FS=y\nCONFIG_OVERLAY_FS=y\n# comment\nCONFIG_NEW=y\n"
        );
        assert!(missing(&m, "CONFIG_9P_FS=y\nCONFIG_X=y\n") == ["CONFIG_X=y"]);
    }

    #[test]
    fn guest_options_cover_both_transports() {
        for o in [
            "CONFIG_9P_FS=y",
            "CONFIG_VIRTIO_FS=y",
            "CONFIG_PVH=y",
            "CONFIG_OVERLAY_FS=y",
        ] {
            assert!(GUEST_OPTIONS.lines().any(|l| l == o), "{o}");
        }
    }
}
