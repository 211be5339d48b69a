//! Building the [`RunSpec`] from the command line, the project's
//! `.vexec.toml` and facts about the host. Command-line flags override the
//! file; list-valued settings (shares, kernel and QEMU arguments) add up,
//! the file's first.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::ValueEnum;

use crate::cli::config::{ConfigError, Loaded};
use crate::cli::{self, Cli};
use crate::launch::shares::ShareRequest;
use crate::modes::spec::{EnvChanges, RunSpec, TtyMode};
use crate::protocol::ShareMode;

/// How long output may still arrive after the command exited, by default.
pub const DEFAULT_OUTPUT_GRACE: Duration = Duration::from_secs(2);
use crate::launch::transport::TransportChoice;
use crate::vm::accel::AccelChoice;

/// What vexec learns about the caller and the host before a run.
#[derive(Debug, Clone)]
pub struct Host {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
    pub hostname: String,
    pub cwd: PathBuf,
    pub env: Vec<(OsString, OsString)>,
    pub cache_dir: PathBuf,
    pub running_release: Option<String>,
    pub path_var: Option<OsString>,
    /// The caller's resource limits.
    pub limits: Vec<crate::protocol::Rlimit>,
}

fn invalid(config: &Loaded, key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        path: config.path.clone(),
        message: format!("key `{key}`: {message}; see docs/config.md"),
    }
}

fn enum_value<T: ValueEnum>(config: &Loaded, key: &str, v: &str) -> Result<T, ConfigError> {
    T::from_str(v, true).map_err(|_| {
        let names: Vec<String> = T::value_variants()
            .iter()
            .filter_map(|v| v.to_possible_value().map(|p| p.get_name().to_string()))
            .collect();
        invalid(
            config,
            key,
            format!("`{v}` is not one of {}", names.join(", ")),
        )
    })
}

/// A choice (`accel`, `transport`) from the file, if it sets one.
fn file_choice<T: ValueEnum>(
    config: Option<&Loaded>,
    key: &str,
    field: impl Fn(&crate::cli::config::Config) -> &Option<String>,
) -> Result<Option<T>, ConfigError> {
    match config {
        Some(c) => field(&c.config)
            .as_deref()
            .map(|v| enum_value::<T>(c, key, v))
            .transpose(),
        None => Ok(None),
    }
}

fn duration(
    config: &Loaded,
    key: &str,
    v: &Option<String>,
) -> Result<Option<Duration>, ConfigError> {
    v.as_deref()
        .map(|s| cli::parse_duration(s).map_err(|e| invalid(config, key, e)))
        .transpose()
}

/// Merges the command line over the config file.
///
/// `separator` tells whether the command line had a `--`, which makes a
/// lone `shell` a program rather than the interactive shell.
pub fn build(
    cli: Cli,
    config: Option<&Loaded>,
    host: Host,
    separator: bool,
) -> Result<RunSpec, ConfigError> {
    let file = config.map(|c| &c.config);
    let (memory, cpus) = machine_size(&cli, config)?;
    let accel = (cli.machine.accel.map(Some))
        .map_or_else(|| file_choice(config, "accel", |f| &f.accel), Ok)?
        .unwrap_or(AccelChoice::Auto);
    let tcg_threads = (cli.machine.tcg_threads.map(Some)).map_or_else(
        || file_choice(config, "tcg-threads", |f| &f.tcg_threads),
        Ok,
    )?;
    if let Some(why) = crate::vm::accel::threads_conflict(Some(accel), tcg_threads) {
        return Err(ConfigError::Conflict(why.into()));
    }
    let transport = (cli.transport.map(Some))
        .map_or_else(|| file_choice(config, "transport", |f| &f.transport), Ok)?
        .unwrap_or(TransportChoice::Auto);
    let (timeout, boot_timeout, output_grace) = timeouts(&cli, config)?;
    let env_changes = env_changes(file, &cli);
    let env = env_changes.apply(host.env.clone());
    let shares = share_requests(&cli, config);
    let share_cwd = match (cli.cwd, cli.no_cwd) {
        (true, _) => true,
        (false, true) => false,
        (false, false) => file.and_then(|f| f.cwd).unwrap_or(true),
    };
    let (kernel_args, qemu_args) = arguments(&cli, file)?;
    let (net, forwards) = network(&cli, config)?;
    let shell = cli.command.is_empty() || (cli.command == ["shell"] && !separator);
    let argv = match shell {
        true => login_shell(&env),
        false => cli.command.clone(),
    };
    let tty = match (cli.how.tty, cli.how.no_tty) {
        (true, _) => TtyMode::Always,
        (false, true) => TtyMode::Never,
        (false, false) => TtyMode::Auto,
    };
    Ok(RunSpec {
        kernel: cli
            .kernel
            .first()
            .cloned()
            .or_else(|| config.and_then(|c| c.kernel())),
        modules: cli
            .machine
            .modules
            .or_else(|| config.and_then(|c| c.config.modules.as_deref().map(|m| c.path(m)))),
        argv,
        env,
        env_changes,
        tty,
        shell,
        sudo: cli.how.sudo || file.and_then(|f| f.sudo).unwrap_or(false),
        setup: file.map(|f| f.setup.clone()).unwrap_or_default(),
        teardown: file.map(|f| f.teardown.clone()).unwrap_or_default(),
        cwd: host.cwd,
        uid: host.uid,
        gid: host.gid,
        groups: host.groups,
        limits: host.limits,
        hostname: host.hostname,
        share_cwd,
        shares,
        transport,
        virtiofsd: cli.virtiofsd.or_else(|| {
            config.and_then(|c| c.config.virtiofsd.as_deref().map(|p| resolve_program(c, p)))
        }),
        memory,
        cpus,
        accel,
        timeout,
        boot_timeout,
        output_grace: output_grace.unwrap_or(DEFAULT_OUTPUT_GRACE),
        hang_reports: cli.hang_reports.clone(),
        qemu: cli.machine.qemu,
        kernel_args,
        qemu_args,
        console_log: cli.console_log,
        fail_on_oops: cli.fail_on_oops || file.and_then(|f| f.fail_on_oops).unwrap_or(false),
        results: cli.results,
        cases_out: cli.cases_out,
        output: cli.output,
        gdb: cli.machine.gdb,
        root: cli.root,
        busybox: cli.busybox,
        dump_on_panic: cli.dump_on_panic,
        cold: cli.machine.cold || file.and_then(|f| f.cold) == Some(true),
        tcg_threads: tcg_threads.unwrap_or_default(),
        snapshot_cap: snapshot_cap(cli.machine.snapshot_cap, config)?,
        net,
        forwards,
        verbose: cli.machine.verbose,
        quiet: cli.machine.quiet,
        dry_run: cli.dry_run,
        cache_dir: host.cache_dir,
        running_release: host.running_release,
        path_var: host.path_var,
    })
}

/// The caller's login shell (`$SHELL -l`, else `/bin/sh -l`), for a run
/// given no command.
fn login_shell(env: &[(OsString, OsString)]) -> Vec<OsString> {
    let sh = (env.iter())
        .find(|(k, _)| k == "SHELL")
        .map(|(_, v)| v.clone())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "/bin/sh".into());
    vec![sh, "-l".into()]
}

/// What the file's `[env]`, then `--unset-env` and `--env`, change of the
/// caller's environment (each stage's removals before its settings).
fn env_changes(file: Option<&crate::cli::config::Config>, cli: &Cli) -> EnvChanges {
    let mut steps: Vec<(OsString, Option<OsString>)> = Vec::new();
    if let Some(f) = file {
        steps.extend(f.env.unset.iter().map(|k| (k.into(), None)));
        steps.extend(f.env.set.iter().map(|(k, v)| (k.into(), Some(v.into()))));
    }
    steps.extend(cli.how.unset_env.iter().map(|k| (k.clone(), None)));
    steps.extend(
        cli.how
            .env
            .iter()
            .map(|(k, v)| (k.clone(), Some(v.clone()))),
    );
    EnvChanges(steps)
}

/// Whether the guest gets a network, and its TCP forwards (the file's
/// first); a forward implies the network.
fn network(cli: &Cli, config: Option<&Loaded>) -> Result<(bool, Vec<(u16, u16)>), ConfigError> {
    let mut forwards = Vec::new();
    if let Some(c) = config {
        for f in &c.config.forward {
            forwards.push(cli::parse_forward(f).map_err(|e| invalid(c, "forward", e))?);
        }
    }
    forwards.extend(cli.forwards.iter().copied());
    let file_net = config.and_then(|c| c.config.net).unwrap_or(false);
    Ok((cli.net || !forwards.is_empty() || file_net, forwards))
}

/// `--memory` and `--cpus`, else the file's, else the defaults.
fn machine_size(cli: &Cli, config: Option<&Loaded>) -> Result<(String, u32), ConfigError> {
    let memory = match (&cli.machine.memory, config) {
        (Some(m), _) => m.clone(),
        (None, Some(c)) if c.config.memory.is_some() => {
            let m = c.config.memory.as_deref().unwrap_or_default();
            cli::parse_memory(m).map_err(|e| invalid(c, "memory", e))?
        }
        _ => cli::DEFAULT_MEMORY.to_string(),
    };
    let cpus = match (cli.machine.cpus, config.and_then(|c| c.config.cpus)) {
        (Some(n), _) => n,
        (None, Some(n)) if (1..=256).contains(&n) => n,
        (None, Some(n)) => {
            return Err(invalid(
                config.expect("cpus came from the file"),
                "cpus",
                format!("{n} is not in 1..=256"),
            ));
        }
        (None, None) => cli::DEFAULT_CPUS,
    };
    Ok((memory, cpus))
}

/// `--timeout`, `--boot-timeout` and `--output-grace`, else the file's.
type Timeouts = (Option<Duration>, Option<Duration>, Option<Duration>);
fn timeouts(cli: &Cli, config: Option<&Loaded>) -> Result<Timeouts, ConfigError> {
    let m = &cli.machine;
    Ok(match config {
        Some(c) => (
            m.timeout.or(duration(c, "timeout", &c.config.timeout)?),
            (m.boot_timeout).or(duration(c, "boot-timeout", &c.config.boot_timeout)?),
            (cli.output_grace).or(duration(c, "output-grace", &c.config.output_grace)?),
        ),
        None => (m.timeout, m.boot_timeout, cli.output_grace),
    })
}

/// `--snapshot-cap`, else the file's, else the default.
fn snapshot_cap(flag: Option<u64>, config: Option<&Loaded>) -> Result<u64, ConfigError> {
    let file = match config.and_then(|c| c.config.snapshot_cap.as_deref().map(|v| (c, v))) {
        Some((c, v)) => Some(cli::parse_bytes(v).map_err(|e| invalid(c, "snapshot-cap", e))?),
        None => None,
    };
    Ok(flag.or(file).unwrap_or(crate::launch::warm::DEFAULT_CAP))
}

/// The file's shares, then the command line's, in the order given.
fn share_requests(cli: &Cli, config: Option<&Loaded>) -> Vec<ShareRequest> {
    let mut shares = Vec::new();
    if let Some(c) = config {
        for (paths, mode) in [
            (&c.config.rw, ShareMode::ReadWrite),
            (&c.config.ro, ShareMode::ReadOnly),
            (&c.config.overlay, ShareMode::Overlay),
        ] {
            shares.extend(paths.iter().map(|p| ShareRequest {
                path: c.path(p),
                mode,
            }));
        }
    }
    for (paths, mode) in [
        (&cli.rw, ShareMode::ReadWrite),
        (&cli.ro, ShareMode::ReadOnly),
        (&cli.overlay, ShareMode::Overlay),
    ] {
        shares.extend(paths.iter().map(|path| ShareRequest {
            path: path.clone(),
            mode,
        }));
    }
    shares
}

/// Kernel and QEMU arguments, the file's first; a control character in a
/// kernel argument would split it in two on the kernel's command line.
fn arguments(
    cli: &Cli,
    file: Option<&crate::cli::config::Config>,
) -> Result<(Vec<String>, Vec<OsString>), ConfigError> {
    let mut kernel_args: Vec<String> = file.map(|f| f.kernel_args.clone()).unwrap_or_default();
    kernel_args.extend(cli.machine.kernel_args.iter().cloned());
    if let Some(bad) = (kernel_args.iter()).find(|a| a.chars().any(|c| c.is_control())) {
        return Err(ConfigError::KernelArg(bad.clone()));
    }
    let mut qemu_args: Vec<OsString> = file
        .map(|f| f.qemu_args.iter().map(OsString::from).collect())
        .unwrap_or_default();
    qemu_args.extend(cli.qemu_args.iter().cloned());
    Ok((kernel_args, qemu_args))
}

/// A program path from the file: relative to the file when it has a slash.
fn resolve_program(c: &Loaded, p: &Path) -> PathBuf {
    if p.components().count() > 1 || p.is_absolute() {
        c.path(p)
    } else {
        p.to_path_buf()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn host() -> Host {
        Host {
            uid: 1000,
            gid: 1000,
            groups: vec![1000],
            hostname: "h".into(),
            cwd: "/work/p".into(),
            env: vec![
                ("HOME".into(), "/home/u".into()),
                ("HISTFILE".into(), "x".into()),
            ],
            cache_dir: "/c".into(),
            running_release: None,
            path_var: None,
            limits: vec![],
        }
    }

    fn loaded(text: &str) -> Loaded {
        Loaded {
            path: "/work/p/.vexec.toml".into(),
            config: crate::cli::config::parse(text).unwrap(),
        }
    }

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("vexec").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_without_a_file() {
        let s = build(cli(&["true"]), None, host(), false).unwrap();
        assert_eq!(s.memory, "1024M");
        assert_eq!(s.cpus, 2);
        assert_eq!(s.accel, AccelChoice::Auto);
        assert!(s.share_cwd);
        assert!(!s.sudo);
    }

    #[test]
    fn file_values_and_flags_over_them() {
        let c = loaded(
            "kernel = \"build/bzImage\"\nmemory = \"2G\"\ncpus = 4\naccel = \"tcg\"\ntransport = \"9p\"\ncwd = false\nrw = [\"out\"]\nkernel-args = [\"a\"]\nsetup = [\"echo s\"]\ntimeout = \"1m\"\n[env]\nset = { RUST_LOG = \"debug\" }\nunset = [\"HISTFILE\"]\n",
        );
        let s = build(cli(&["true"]), Some(&c), host(), false).unwrap();
        assert_eq!(s.kernel.as_deref(), Some("/work/p/build/bzImage"));
        assert_eq!(s.memory, "2048M");
        assert_eq!(s.cpus, 4);
        assert_eq!(s.accel, AccelChoice::Tcg);
        assert_eq!(s.transport, TransportChoice::NineP);
        assert!(!s.share_cwd);
        assert_eq!(s.shares[0].path, Path::new("/work/p/out"));
        assert_eq!(s.setup, ["echo s"]);
        assert_eq!(s.timeout, Some(Duration::from_secs(60)));
        assert!(s.env.contains(&("RUST_LOG".into(), "debug".into())));
        assert!(!s.env.iter().any(|(k, _)| k == "HISTFILE"));

        let s = build(
            cli(&[
                "-m",
                "512M",
                "--cpus",
                "1",
                "--accel",
                "auto",
                "--cwd",
                "-e",
                "RUST_LOG=info",
                "--kernel-arg",
                "b",
                "-k",
                "/k",
                "true",
            ]),
            Some(&c),
            host(),
            false,
        )
        .unwrap();
        assert_eq!(s.memory, "512M");
        assert_eq!(s.cpus, 1);
        assert_eq!(s.accel, AccelChoice::Auto);
        assert!(s.share_cwd);
        assert_eq!(s.kernel.as_deref(), Some("/k"));
        assert_eq!(s.kernel_args, ["a", "b"]);
        assert!(s.env.contains(&("RUST_LOG".into(), "info".into())));
        assert_eq!(s.env.iter().filter(|(k, _)| k == "RUST_LOG").count(), 1);
    }

    #[test]
    fn shell_when_no_command() {
        let s = build(cli(&[]), None, host(), false).unwrap();
        assert!(s.shell);
        assert_eq!(s.argv, ["/bin/sh", "-l"]);
        let mut h = host();
        h.env.push(("SHELL".into(), "/bin/bash".into()));
        let s = build(cli(&["shell"]), None, h.clone(), false).unwrap();
        assert_eq!(s.argv, ["/bin/bash", "-l"]);
        let s = build(cli(&["--", "shell"]), None, h, true).unwrap();
        assert!(!s.shell);
        assert_eq!(s.argv, ["shell"]);
        let s = build(cli(&["-t", "ls"]), None, host(), false).unwrap();
        assert_eq!(s.tty, TtyMode::Always);
    }

    #[test]
    fn bad_values_name_the_file_and_key() {
        for (text, key) in [
            ("memory = \"lots\"\n", "memory"),
            ("accel = \"warp\"\n", "accel"),
            ("transport = \"nfs\"\n", "transport"),
            ("cpus = 0\n", "cpus"),
            ("timeout = \"soon\"\n", "timeout"),
        ] {
            let e = build(cli(&["true"]), Some(&loaded(text)), host(), false).unwrap_err();
            let e = e.to_string();
            assert!(e.starts_with("/work/p/.vexec.toml: key `"), "{e}");
            assert!(e.contains(key), "{e}");
        }
    }
}
