//! vexec: run a command inside a throwaway VM booted with any Linux kernel.
//!
//! The same binary is the host tool and, as PID 1 in the guest, the agent.

mod artifacts;
mod cache;
mod caps;
mod cli;
mod guest;
mod host;
mod initramfs;
mod kernel;
mod protocol;
mod run;
mod shares;
mod spec;
mod transport;
mod vm;

use clap::Parser;

fn main() {
    if std::process::id() == 1 {
        guest::run();
    }
    let cli = cli::Cli::parse();
    let relay = match host::session::SignalRelay::install() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vexec: error: installing signal handlers: {e}");
            std::process::exit(run::STATUS_FAILED);
        }
    };
    let spec = spec_from_cli(cli);
    match run::run(&spec, &relay) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("vexec: error: {e}");
            std::process::exit(run::STATUS_FAILED);
        }
    }
}

/// The only place that reads the process environment.
fn spec_from_cli(cli: cli::Cli) -> spec::RunSpec {
    // SAFETY: plain queries of the process's credentials and hostname.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let groups = {
        let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
        let mut g = vec![0 as libc::gid_t; n.max(0) as usize];
        let n = unsafe { libc::getgroups(g.len() as i32, g.as_mut_ptr()) };
        g.truncate(n.max(0) as usize);
        g
    };
    let hostname = {
        let mut buf = [0u8; 256];
        unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    };
    let running_release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .ok()
        .map(|s| s.trim().to_string());
    let cwd = std::env::current_dir().unwrap_or_else(|_| "/".into());
    spec::RunSpec {
        kernel: cli.kernel,
        modules: cli.modules,
        argv: cli.command,
        env: std::env::vars_os().collect(),
        cwd,
        uid,
        gid,
        groups,
        hostname,
        share_cwd: !cli.no_cwd,
        shares: [
            (cli.rw, protocol::ShareMode::ReadWrite),
            (cli.ro, protocol::ShareMode::ReadOnly),
            (cli.overlay, protocol::ShareMode::Overlay),
        ]
        .into_iter()
        .flat_map(|(paths, mode)| {
            paths
                .into_iter()
                .map(move |path| shares::ShareRequest { path, mode })
        })
        .collect(),
        transport: cli.transport,
        virtiofsd: cli.virtiofsd,
        memory: cli.memory,
        cpus: cli.cpus,
        accel: cli.accel,
        timeout: cli.timeout,
        boot_timeout: cli.boot_timeout,
        qemu: cli.qemu,
        kernel_args: cli.kernel_args,
        qemu_args: cli.qemu_args,
        console_log: cli.console_log,
        verbose: cli.verbose,
        quiet: cli.quiet,
        dry_run: cli.dry_run,
        cache_dir: cache::Cache::default_root(
            std::env::var_os("XDG_CACHE_HOME").map(Into::into),
            std::env::var_os("HOME").map(Into::into),
        ),
        running_release,
        path_var: std::env::var_os("PATH"),
    }
}
