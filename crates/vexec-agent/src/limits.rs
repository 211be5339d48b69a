//! The caller's resource limits, given to the programs the agent starts
//! for the user, and the default set for those with no caller of their
//! own (the QEMU guest agent's `guest-exec`: whoever started the VM).

use std::sync::Mutex;

use vexec_protocol::Rlimit;

/// A limit ready for `setrlimit` in a forked child.
#[derive(Clone, Copy)]
pub struct Fitted {
    resource: u32,
    value: libc::rlimit,
}

static DEFAULT: Mutex<Vec<Fitted>> = Mutex::new(Vec::new());

/// Sets the limits of programs with no caller of their own.
pub fn set_default(limits: &[Rlimit]) {
    let fitted = fit(limits);
    *DEFAULT.lock().unwrap_or_else(|p| p.into_inner()) = fitted;
}

/// The limits set by [`set_default`].
pub fn default() -> Vec<Fitted> {
    DEFAULT.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// `limits` as this kernel can take them: the open-file limit no higher
/// than `fs.nr_open` (the one limit root cannot raise past the kernel's
/// maximum), each clamp said on the console with `vexec -v`.
pub fn fit(limits: &[Rlimit]) -> Vec<Fitted> {
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    limits
        .iter()
        .map(|l| {
            let (mut soft, mut hard) = (l.soft, l.hard.max(l.soft));
            if l.resource == libc::RLIMIT_NOFILE
                && let Some(max) = nr_open
                && hard > max
            {
                super::step(&format!(
                    "open-file limit {} clamped to the guest kernel's fs.nr_open {max}",
                    shown(hard)
                ));
                hard = max;
                soft = soft.min(max);
            }
            Fitted {
                resource: l.resource,
                value: libc::rlimit {
                    rlim_cur: soft,
                    rlim_max: hard,
                },
            }
        })
        .collect()
}

fn shown(v: u64) -> String {
    if v == Rlimit::INFINITY {
        "unlimited".into()
    } else {
        v.to_string()
    }
}

/// Sets `limits` on the calling process: between fork and exec, so only
/// async-signal-safe calls. Root (the agent's child before it drops its
/// identity) may raise any limit, so call it before `setuid`.
pub fn apply(limits: &[Fitted]) -> std::io::Result<()> {
    for l in limits {
        // SAFETY: setrlimit with a valid pointer; async-signal-safe.
        if unsafe { libc::setrlimit(l.resource as _, &l.value) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hard_limit_below_the_soft_one_is_raised_to_it() {
        let f = fit(&[Rlimit {
            resource: libc::RLIMIT_CORE,
            soft: 10,
            hard: 5,
        }]);
        assert_eq!((f[0].value.rlim_cur, f[0].value.rlim_max), (10, 10));
    }

    #[test]
    fn open_files_stay_within_nr_open() {
        let Ok(max) = std::fs::read_to_string("/proc/sys/fs/nr_open") else {
            return;
        };
        let max: u64 = max.trim().parse().unwrap();
        let f = fit(&[Rlimit {
            resource: libc::RLIMIT_NOFILE,
            soft: 1024,
            hard: Rlimit::INFINITY,
        }]);
        assert_eq!((f[0].value.rlim_cur, f[0].value.rlim_max), (1024, max));
    }
}
