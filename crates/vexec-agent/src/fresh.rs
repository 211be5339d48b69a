//! Making the guest a new machine for each run: the host's entropy mixed
//! into the kernel's random pool (then reseeded) and the host's wall clock.
//! A guest restored from a snapshot shares its pool and its clock with
//! every other run of that snapshot until this is done.

use std::os::fd::AsRawFd;

use vexec_protocol::Fresh;

/// `RNDADDENTROPY`: `_IOW('R', 0x03, int[2])`.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG`: `_IO('R', 0x07)` (Linux 4.17+).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Applies `fresh`; the first failure is returned, after trying the rest.
pub fn apply(fresh: &Fresh) -> Result<(), String> {
    let clock = set_clock(fresh.wall_clock_ns);
    let pool = if fresh.entropy.is_empty() {
        Ok(())
    } else {
        add_entropy(&fresh.entropy)
    };
    clock.and(pool)
}

fn set_clock(ns: u64) -> Result<(), String> {
    if ns == 0 {
        return Ok(());
    }
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: a valid timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        return Err(format!(
            "setting the clock: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Mixes `bytes` into the pool, crediting them (they come from the
/// host's own pool), and has the kernel reseed its generator from it.
fn add_entropy(bytes: &[u8]) -> Result<(), String> {
    let err = |what: &str| format!("{what}: {}", std::io::Error::last_os_error());
    let random = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")
        .map_err(|e| format!("opening /dev/urandom: {e}"))?;
    // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // u32-aligned storage for the kernel's struct.
    let mut words = vec![0u32; info.len().div_ceil(4)];
    // SAFETY: `words` holds at least info.len() bytes.
    unsafe {
        std::ptr::copy_nonoverlapping(info.as_ptr(), words.as_mut_ptr().cast(), info.len());
    }
    let fd = random.as_raw_fd();
    // SAFETY: the struct is complete and outlives the call.
    if unsafe { libc::ioctl(fd, RNDADDENTROPY as _, words.as_ptr()) } != 0 {
        return Err(err("adding entropy"));
    }
    // SAFETY: an ioctl without argument.
    if unsafe { libc::ioctl(fd, RNDRESEEDCRNG as _) } != 0 {
        return Err(err("reseeding the random generator"));
    }
    Ok(())
}
