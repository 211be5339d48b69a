//! Choosing how the host's files reach the guest: 9p (served by QEMU) or
//! virtio-fs (served by virtiofsd), from what the kernel supports, what the
//! user asked for and whether a usable virtiofsd exists.

use crate::artifacts::Support;
use crate::protocol::Transport;
use crate::vm::virtiofsd::{Virtiofsd, VirtiofsdError};

/// What `--transport` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TransportChoice {
    /// virtio-fs when the kernel has it and a virtiofsd is found, else 9p.
    Auto,
    /// virtio-9p.
    #[value(name = "9p")]
    NineP,
    /// virtio-fs.
    Virtiofs,
}

/// No transport can be used.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error(
        "--transport {wanted} is not possible: {why}; try --transport {other} or `--transport auto`"
    )]
    Unsupported {
        wanted: &'static str,
        other: &'static str,
        why: String,
    },
    #[error("the kernel can share no files with the guest: {ninep}; and {virtiofs}")]
    Neither { ninep: String, virtiofs: String },
    #[error("{0}")]
    Daemon(VirtiofsdError),
    #[error(
        "the kernel has virtio-fs but no 9p ({ninep}), and virtio-fs needs a virtiofsd: {daemon}"
    )]
    NeedDaemon {
        ninep: String,
        daemon: VirtiofsdError,
    },
}

/// The transport to use.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub transport: Transport,
    /// The daemon, for virtio-fs.
    pub virtiofsd: Option<Virtiofsd>,
    /// Why auto did not pick virtio-fs, for `-v`.
    pub note: Option<String>,
}

/// Picks the transport; `find_daemon` is called only when virtio-fs is
/// possible and wanted.
pub fn choose(
    choice: TransportChoice,
    support: &Support,
    find_daemon: impl FnOnce() -> Result<Virtiofsd, VirtiofsdError>,
) -> Result<Chosen, TransportError> {
    let ninep = |note| Chosen {
        transport: Transport::NineP,
        virtiofsd: None,
        note,
    };
    let virtiofs = |d| Chosen {
        transport: Transport::Virtiofs,
        virtiofsd: Some(d),
        note: None,
    };
    match choice {
        TransportChoice::NineP => match support.missing(Transport::NineP) {
            None => Ok(ninep(None)),
            Some(why) => Err(TransportError::Unsupported {
                wanted: "9p",
                other: "virtiofs",
                why: why.to_string(),
            }),
        },
        TransportChoice::Virtiofs => match support.missing(Transport::Virtiofs) {
            None => find_daemon().map(virtiofs).map_err(TransportError::Daemon),
            Some(why) => Err(TransportError::Unsupported {
                wanted: "virtiofs",
                other: "9p",
                why: why.to_string(),
            }),
        },
        TransportChoice::Auto => {
            match (
                support.missing(Transport::Virtiofs),
                support.missing(Transport::NineP),
            ) {
                (None, no_9p) => match (find_daemon(), no_9p) {
                    (Ok(d), _) => Ok(virtiofs(d)),
                    (Err(e), None) => Ok(ninep(Some(format!("using 9p, not virtio-fs: {e}")))),
                    (Err(daemon), Some(why)) => Err(TransportError::NeedDaemon {
                        ninep: why.to_string(),
                        daemon,
                    }),
                },
                (Some(why_not_fs), None) => Ok(ninep(Some(format!(
                    "using 9p, not virtio-fs: {why_not_fs}"
                )))),
                (Some(v), Some(n)) => Err(TransportError::Neither {
                    ninep: n.to_string(),
                    virtiofs: v.to_string(),
                }),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::virtiofsd::Flavour;

    fn daemon() -> Result<Virtiofsd, VirtiofsdError> {
        Ok(Virtiofsd {
            path: "/usr/libexec/virtiofsd".into(),
            flavour: Flavour::Rust,
        })
    }

    fn none() -> Result<Virtiofsd, VirtiofsdError> {
        Err(VirtiofsdError::NotFound {
            libexec: String::new(),
        })
    }

    fn support(ninep: bool, virtiofs: bool) -> Support {
        Support {
            ninep: (!ninep).then(|| "lacks 9p (CONFIG_9P_FS)".into()),
            virtiofs: (!virtiofs).then(|| "lacks virtio-fs (CONFIG_VIRTIO_FS)".into()),
            net: None,
            unknown: Vec::new(),
            hotplug: true,
        }
    }

    #[test]
    fn auto_prefers_virtiofs_then_9p() {
        let t = |s, f: fn() -> _| choose(TransportChoice::Auto, &s, f).map(|c| c.transport);
        assert_eq!(t(support(true, true), daemon).unwrap(), Transport::Virtiofs);
        assert_eq!(t(support(true, true), none).unwrap(), Transport::NineP);
        assert_eq!(t(support(true, false), daemon).unwrap(), Transport::NineP);
        assert_eq!(
            t(support(false, true), daemon).unwrap(),
            Transport::Virtiofs
        );
        let e = t(support(false, true), none).unwrap_err().to_string();
        assert!(e.contains("CONFIG_9P_FS") && e.contains("virtiofsd"), "{e}");
        let e = t(support(false, false), daemon).unwrap_err().to_string();
        assert!(
            e.contains("CONFIG_9P_FS") && e.contains("CONFIG_VIRTIO_FS"),
            "{e}"
        );
    }

    #[test]
    fn explicit_requests_are_checked() {
        let e = choose(TransportChoice::NineP, &support(false, true), daemon)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--transport 9p is not possible") && e.contains("CONFIG_9P_FS"),
            "{e}"
        );
        assert!(choose(TransportChoice::Virtiofs, &support(true, true), none).is_err());
        let c = choose(TransportChoice::NineP, &support(true, true), daemon).unwrap();
        assert_eq!(c.transport, Transport::NineP);
    }
}
