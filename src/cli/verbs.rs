//! The verbs beside the plain run, each a clap subcommand with its own
//! `--help` and examples. `vexec VERB ...` is parsed here when VERB names
//! one of them (the names come from these definitions); any other first
//! word is the command of a plain run, and `shell` opens the login shell
//! with the run options ([`shell_command`]).

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, CommandFactory, Parser, Subcommand};

use super::Cli;
use super::rundir::RunDirCli;

/// `vexec VERB ...`.
#[derive(Debug, Parser)]
#[command(name = "vexec", bin_name = "vexec", disable_help_subcommand = true)]
pub struct VerbCli {
    #[command(subcommand)]
    pub verb: Verb,
}

/// What a verb was asked to do.
#[derive(Debug, Subcommand)]
pub enum Verb {
    /// Keep, fetch, list and remove kernels in vexec's kernel store
    /// (~/.cache/vexec/kernels, one directory per release).
    #[command(
        subcommand,
        after_help = "Examples:\n  vexec kernel add ~/src/linux\n  vexec kernel fetch linux-image-6.12.57+deb13-amd64\n  vexec kernel fetch ghcr.io/cilium/ci-kernels:6.6\n  vexec kernel fetch --arch arm64 linux-image-arm64\n  vexec kernel list\n  vexec -k 6.12.57+deb13-amd64 -- uname -r"
    )]
    Kernel(KernelCli),

    /// List or remove what vexec keeps in its cache (~/.cache/vexec): boot
    /// artifacts built per kernel, and saved booted guests (warm start).
    /// The kernel store is `vexec kernel`'s.
    #[command(
        subcommand,
        after_help = "Examples:\n  vexec cache list\n  vexec cache clean --kind snapshot\n  vexec cache clean"
    )]
    Cache(CacheCli),

    /// Run every executable of DIR in an initramfs-only guest (x86_64 or
    /// arm64), one after the other, and report each.
    RunDir(Box<RunDirCli>),

    /// Merge the options vexec needs (all built in) into a kernel tree's
    /// .config; run `make olddefconfig` (or `vexec build`) after.
    #[command(
        after_help = "Examples:\n  vexec kconfig ~/src/linux\n  vexec kconfig --debug --gcov ."
    )]
    Kconfig(KbuildCli),

    /// Configure (tinyconfig plus vexec's options when there is no
    /// .config) and build a kernel tree, leaving one `-k DIR` boots.
    #[command(
        after_help = "Examples:\n  vexec build ~/src/linux\n  vexec build --debug .\n  vexec build --kunitconfig lib/kunit . && vexec -k . --results ktap -- true"
    )]
    Build(KbuildCli),

    /// Find the first bad commit of the repository in the working directory:
    /// each step is built (`make` in a kernel tree, or --build), booted and
    /// runs COMMAND; a build failure or a kernel that does not boot is
    /// skipped. Run options (-k, --accel, --timeout...) go before `--`.
    #[command(
        after_help = "Examples:\n  vexec bisect --good v6.1 --bad v6.2 -k . -- ./test.sh\n  vexec bisect --good A --bad B --build 'make -j8 bzImage' --timeout 5m -- ./t.sh"
    )]
    Bisect(BisectCli),

    /// Run a command in a VM started with `vexec up`, or in the guest of a
    /// plain run still going (`run-PID`, see `vexec ps`): its streams,
    /// input, signals, terminal and exit status as in a plain run. Many may
    /// run at once. `vexec shell NAME` is your login shell that way.
    #[command(
        after_help = "Examples:\n  vexec exec dev -- modprobe -v veth\n  vexec exec dev --sudo -- dmesg\n  vexec exec dev -t -- top\n  vexec exec run-4242 -- cat /proc/1234/stack   # into a hung test"
    )]
    Exec(Box<super::vms::ExecCli>),

    /// List your VMs started with `vexec up` and your plain runs going on
    /// now (`run-PID`): name, state, kernel, uptime, memory, QEMU's
    /// resident memory, the owning vexec process, the socket, the command.
    Ps,

    /// Shut down VMs started with `vexec up` (or clean up after dead ones);
    /// on a plain run (`run-PID`), stop it as Ctrl-C would.
    #[command(after_help = "Examples:\n  vexec down dev\n  vexec down --all")]
    Down(super::vms::DownCli),

    /// Print shell completions for vexec.
    #[command(
        after_help = "Example:\n  vexec completions bash > ~/.local/share/bash-completion/completions/vexec"
    )]
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },

    /// Print vexec's man page (roff).
    #[command(after_help = "Example:\n  vexec manpage | man -l -")]
    Manpage,
}

/// `vexec cache ...`.
#[derive(Debug, Subcommand)]
pub enum CacheCli {
    /// Each entry: kind, size, last use, key.
    List,
    /// Remove entries (all of them, or those of one kind); the next run
    /// builds what it needs again.
    Clean {
        /// Only entries of this kind (as `list` names them: snapshot,
        /// vmlinux, initramfs...).
        #[arg(long, value_name = "KIND")]
        kind: Option<String>,
    },
}

/// `vexec kernel ...`.
#[derive(Debug, Clone, Subcommand)]
pub enum KernelCli {
    /// Keep a kernel: an image, a build tree, an unpacked package, a
    /// tarball or a linux-image-*.deb.
    Add {
        #[arg(value_name = "PATH")]
        path: PathBuf,
    },
    /// Download a kernel: a Debian package name (with apt-get download) or
    /// an OCI image REGISTRY/REPO:TAG laid out as vimto's.
    Fetch {
        #[arg(value_name = "PACKAGE|IMAGE")]
        source: String,
        /// The package's architecture (amd64, arm64; aarch64 and x86_64
        /// also work). Fetched from the archive the host's apt sources
        /// name, through vexec's own apt configuration and package lists:
        /// needs no root, and the host's package state is not touched.
        #[arg(long, value_name = "ARCH")]
        arch: Option<String>,
    },
    /// List the stored kernels: release, size, source, what they support.
    List,
    /// Print the image path of a stored release.
    Path {
        #[arg(value_name = "RELEASE")]
        release: String,
    },
    /// Remove stored releases.
    Rm {
        #[arg(value_name = "RELEASE", required = true)]
        releases: Vec<String>,
    },
}

/// `vexec kconfig` / `vexec build`.
#[derive(Debug, Args)]
pub struct KbuildCli {
    /// Also what gdb and drgn want (debug info, frame pointers, no KASLR).
    #[arg(long)]
    pub debug: bool,
    /// Also GCOV kernel coverage (for `vexec run-dir --output`).
    #[arg(long)]
    pub gcov: bool,
    /// Also KUnit, with the suites of kunit.py's default .kunitconfig
    /// (the example and every test whose subsystem is built): they run at
    /// boot, and `vexec -k DIR --results ktap -- true` reports each case.
    #[arg(long)]
    pub kunit: bool,
    /// Also KUnit, with the options of this .kunitconfig (a file, or a
    /// directory holding one, as kunit.py takes it); implies --kunit.
    #[arg(long, value_name = "FILE")]
    pub kunitconfig: Option<PathBuf>,
    /// The kernel source tree.
    #[arg(value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
}

impl CacheCli {
    /// The action as `vexec cache` runs it.
    pub fn plain(&self) -> crate::modes::cache::CacheAction {
        use crate::modes::cache::CacheAction as A;
        match self {
            CacheCli::List => A::List,
            CacheCli::Clean { kind } => A::Clean { kind: kind.clone() },
        }
    }
}

impl KernelCli {
    /// The action as the kernel store runs it.
    pub fn plain(&self) -> crate::store::KernelAction {
        use crate::store::KernelAction as A;
        match self.clone() {
            KernelCli::Add { path } => A::Add { path },
            KernelCli::Fetch { source, arch } => A::Fetch { source, arch },
            KernelCli::List => A::List,
            KernelCli::Path { release } => A::Path { release },
            KernelCli::Rm { releases } => A::Rm { releases },
        }
    }
}

impl KbuildCli {
    /// What the build is asked for.
    pub fn plain(&self) -> crate::kernel::build::KbuildArgs {
        crate::kernel::build::KbuildArgs {
            debug: self.debug,
            gcov: self.gcov,
            kunit: self.kunit,
            kunitconfig: self.kunitconfig.clone(),
            dir: self.dir.clone(),
        }
    }
}

/// `vexec bisect`. Run options before `--` are passed to every step as
/// they were written (each step is a plain vexec run). This describes the
/// verb (help, completions, man page); the words themselves are split by
/// `bisect::parse`, which also takes bisect's options after run options.
#[derive(Debug, Args)]
pub struct BisectCli {
    /// A commit known to pass (repeatable).
    #[arg(long, value_name = "COMMIT", required = true)]
    pub good: Vec<OsString>,
    /// A commit known to fail.
    #[arg(long, value_name = "COMMIT")]
    pub bad: OsString,
    /// Shell command that builds each step [default: make, in a kernel tree].
    #[arg(long, value_name = "CMD")]
    pub build: Option<OsString>,
    /// Options of a plain run for every step (-k, --accel, --timeout...),
    /// then `--` and the test: exit 0 good, 125 skip, anything else bad.
    #[arg(
        value_name = "[RUN OPTIONS] -- COMMAND",
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    pub rest: Vec<OsString>,
}

/// True when `word` names a verb of [`VerbCli`].
pub fn is_verb(word: &str) -> bool {
    VerbCli::command()
        .get_subcommands()
        .any(|s| s.get_name() == word)
}

/// `vexec shell [RUN OPTIONS]` (or `vexec shell NAME`: a shell in that
/// VM): the plain run's options, no command.
pub fn shell_command() -> clap::Command {
    Cli::command()
        .name("shell")
        .bin_name("vexec shell")
        .about("Open your login shell in the guest, on a real terminal (the same as `vexec` with no command).")
        .long_about(None)
        .mut_arg("command", |a| a.hide(true))
        .after_help("Examples:\n  vexec shell\n  vexec shell -k 6.12.57+deb13-amd64 --sudo\n  vexec shell dev      (a shell in the VM `vexec up --name dev` started)")
}

/// Every verb, the shell and the plain run in one command: what the
/// completions and the man page describe.
pub fn everything() -> clap::Command {
    let verbs = VerbCli::command();
    let mut all = Cli::command().args_conflicts_with_subcommands(true);
    for sub in verbs.get_subcommands() {
        all = all.subcommand(sub.clone());
    }
    all.subcommand(shell_command())
        .subcommand(super::vms::up_command())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verb(args: &[&str]) -> Verb {
        VerbCli::try_parse_from(std::iter::once("vexec").chain(args.iter().copied()))
            .unwrap()
            .verb
    }

    #[test]
    fn the_definitions_hold_together() {
        VerbCli::command().debug_assert();
        shell_command().debug_assert();
        super::super::vms::up_command().debug_assert();
        everything().debug_assert();
    }

    #[test]
    fn kernel_actions() {
        assert!(matches!(
            verb(&["kernel", "rm", "a", "b"]),
            Verb::Kernel(KernelCli::Rm { releases }) if releases == ["a", "b"]
        ));
        assert!(VerbCli::try_parse_from(["vexec", "kernel", "rm"]).is_err());
        assert!(VerbCli::try_parse_from(["vexec", "kernel", "frob"]).is_err());
    }

    #[test]
    fn bisect_takes_run_options_and_the_command_as_they_come() {
        let Verb::Bisect(b) = verb(&[
            "bisect", "--good", "A", "--bad", "B", "-k", ".", "--", "./t.sh", "-x",
        ]) else {
            panic!()
        };
        assert_eq!(
            (b.good, b.bad),
            (vec![OsString::from("A")], OsString::from("B"))
        );
        assert_eq!(b.rest, ["-k", ".", "--", "./t.sh", "-x"]);
    }

    #[test]
    fn verbs_are_known_by_name() {
        for v in [
            "kernel",
            "run-dir",
            "kconfig",
            "build",
            "bisect",
            "completions",
            "manpage",
        ] {
            assert!(is_verb(v), "{v}");
        }
        assert!(!is_verb("make") && !is_verb("shell"));
    }
}
