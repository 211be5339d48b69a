//! Kernels from OCI images (vimto's layout): the image's layers, merged in
//! order with whiteouts applied, hold `/boot/vmlinuz*` (or `vmlinux*`) and
//! the modules under `/lib/modules` or `/usr/lib/modules`.
//!
//! Pulls speak the registry API through oci-client: anonymous access, or
//! $VEXEC_REGISTRY_USERNAME/$VEXEC_REGISTRY_PASSWORD (basic credentials,
//! traded for a bearer token when the registry asks); manifest lists
//! resolve to linux/amd64; gzip, zstd and plain tar layers. Every blob is
//! checked against its digest while it downloads and kept by digest in the
//! cache, so an interrupted pull restarts cleanly and reuses what it had.

use std::io::Read;
use std::path::{Path, PathBuf};

use oci_client::client::{ClientConfig, ClientProtocol, linux_amd64_resolver};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};

/// Why an image could not be pulled.
#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("`{image}` is not an image reference: {detail}")]
    Reference { image: String, detail: String },
    #[error(
        "{what}: {detail}; check the reference, the network and, for a private registry, VEXEC_REGISTRY_USERNAME and VEXEC_REGISTRY_PASSWORD"
    )]
    Registry { what: String, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl OciError {
    fn io(what: impl Into<String>, source: std::io::Error) -> OciError {
        OciError::Io {
            what: what.into(),
            source,
        }
    }
}

/// True when `s` names an OCI image rather than an apt package.
pub fn is_reference(s: &str) -> bool {
    s.starts_with("oci://") || s.contains('/')
}

fn auth() -> RegistryAuth {
    match (
        std::env::var("VEXEC_REGISTRY_USERNAME"),
        std::env::var("VEXEC_REGISTRY_PASSWORD"),
    ) {
        (Ok(u), Ok(p)) => RegistryAuth::Basic(u, p),
        _ => RegistryAuth::Anonymous,
    }
}

/// Local registries speak plain HTTP, as with docker and podman.
fn is_local(registry: &str) -> bool {
    let host = registry.rsplit_once(':').map_or(registry, |(h, _)| h);
    host == "localhost" || host.starts_with("127.") || host == "[::1]"
}

/// Pulls `image` and merges its layers into `root`; `blobs` keeps the
/// downloaded layers by digest.
pub fn pull(image: &str, root: &Path, blobs: &Path) -> Result<(), OciError> {
    let reference: Reference =
        image
            .trim_start_matches("oci://")
            .parse()
            .map_err(|e: oci_client::ParseError| OciError::Reference {
                image: image.into(),
                detail: e.to_string(),
            })?;
    let registry = reference.resolve_registry().to_string();
    let protocol = if is_local(&registry) {
        ClientProtocol::HttpsExcept(vec![registry.clone()])
    } else {
        ClientProtocol::Https
    };
    let client = Client::new(ClientConfig {
        protocol,
        platform_resolver: Some(Box::new(linux_amd64_resolver)),
        ..Default::default()
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| OciError::io("starting the download runtime", e))?;
    std::fs::create_dir_all(blobs)
        .map_err(|e| OciError::io(format!("creating {}", blobs.display()), e))?;
    let auth = auth();
    let (manifest, digest) = rt
        .block_on(client.pull_image_manifest(&reference, &auth))
        .map_err(|e| OciError::Registry {
            what: format!("fetching the manifest of {image} from {registry}"),
            detail: e.to_string(),
        })?;
    crate::say!(
        "vexec: {image}: {} layers ({digest})",
        manifest.layers.len()
    );
    for layer in &manifest.layers {
        let path = blobs.join(layer.digest.replace(':', "-"));
        if !path.exists() {
            download(&rt, &client, &reference, layer, &path)?;
        }
        unpack(&path, &layer.media_type, root)
            .map_err(|e| OciError::io(format!("unpacking layer {}", layer.digest), e))?;
    }
    Ok(())
}

fn download(
    rt: &tokio::runtime::Runtime,
    client: &Client,
    reference: &Reference,
    layer: &oci_client::manifest::OciDescriptor,
    path: &Path,
) -> Result<(), OciError> {
    let bar = indicatif::ProgressBar::new(layer.size.max(0) as u64);
    if !crate::sys::terminal::is_tty(2) {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg} {bar:30} {bytes}/{total_bytes} {bytes_per_sec}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    bar.set_message(layer.digest.chars().take(19).collect::<String>());
    let partial = path.with_extension("partial");
    let result = rt.block_on(async {
        let file = tokio::fs::File::create(&partial).await?;
        let counted = Counted {
            inner: file,
            bar: bar.clone(),
        };
        // pull_blob checks the digest as the bytes arrive.
        client
            .pull_blob(reference, layer, counted)
            .await
            .map_err(std::io::Error::other)
    });
    bar.finish_and_clear();
    match result {
        Ok(()) => std::fs::rename(&partial, path)
            .map_err(|e| OciError::io(format!("storing layer {}", layer.digest), e)),
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            Err(OciError::Registry {
                what: format!("downloading layer {}", layer.digest),
                detail: e.to_string(),
            })
        }
    }
}

/// An AsyncWrite that advances a progress bar.
struct Counted {
    inner: tokio::fs::File,
    bar: indicatif::ProgressBar,
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            self.bar.inc(*n as u64);
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Applies one layer (a tar, maybe gzip or zstd compressed) to `root`:
/// whiteouts (`.wh.NAME`, `.wh..wh..opq`) delete what lower layers put.
pub fn unpack(blob: &Path, media_type: &str, root: &Path) -> std::io::Result<()> {
    let file = std::fs::File::open(blob)?;
    let reader: Box<dyn Read> = if media_type.ends_with("gzip") {
        Box::new(flate2::read::GzDecoder::new(file))
    } else if media_type.ends_with("zstd") {
        Box::new(zstd::Decoder::new(file)?)
    } else {
        Box::new(file)
    };
    std::fs::create_dir_all(root)?;
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        if path
            .components()
            .any(|c| matches!(c, std::path::Component::ParentDir))
        {
            continue;
        }
        match name.as_deref() {
            Some(".wh..wh..opq") => {
                for e in std::fs::read_dir(root.join(&parent))
                    .into_iter()
                    .flatten()
                    .flatten()
                {
                    remove(&e.path());
                }
            }
            Some(n) if n.starts_with(".wh.") => {
                remove(&root.join(&parent).join(&n[4..]));
            }
            _ => {
                entry.unpack_in(root)?;
            }
        }
    }
    Ok(())
}

fn remove(p: &Path) {
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            let _ = std::fs::remove_dir_all(p);
        }
        Ok(_) => {
            let _ = std::fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// The kernel image in a merged image root.
pub fn image_in(root: &Path) -> Option<PathBuf> {
    let mut found = crate::kernel::resolve::image_files(&root.join("boot"), false);
    // A compressed image boots faster to find than a huge vmlinux.
    found.sort_by_key(|p| !p.to_string_lossy().contains("vmlinuz"));
    found.into_iter().next()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whiteouts_remove_lower_files() {
        let d = tempfile::tempdir().unwrap();
        let mk = |entries: &[(&str, &[u8])]| {
            let mut b = tar::Builder::new(Vec::new());
            for (name, data) in entries {
                let mut h = tar::Header::new_gnu();
                h.set_size(data.len() as u64);
                h.set_mode(0o644);
                h.set_cksum();
                b.append_data(&mut h, name, *data).unwrap();
            }
            b.into_inner().unwrap()
        };
        let l1 = d.path().join("l1");
        std::fs::write(
            &l1,
            mk(&[
                ("boot/vmlinuz", b"k"),
                ("boot/junk", b"j"),
                ("etc/a/b", b"b"),
            ]),
        )
        .unwrap();
        let l2 = d.path().join("l2");
        std::fs::write(
            &l2,
            mk(&[
                ("boot/.wh.junk", b""),
                ("etc/a/.wh..wh..opq", b""),
                ("etc/a/c", b"c"),
            ]),
        )
        .unwrap();
        let root = d.path().join("root");
        unpack(&l1, "application/vnd.oci.image.layer.v1.tar", &root).unwrap();
        unpack(&l2, "application/vnd.oci.image.layer.v1.tar", &root).unwrap();
        assert!(root.join("boot/vmlinuz").exists());
        assert!(!root.join("boot/junk").exists());
        assert!(!root.join("etc/a/b").exists());
        assert!(root.join("etc/a/c").exists());
        assert_eq!(image_in(&root).unwrap(), root.join("boot/vmlinuz"));
    }

    #[test]
    fn references_and_local_registries() {
        assert!(is_reference("ghcr.io/cilium/ci-kernels:6.1"));
        assert!(is_reference("oci://localhost:5000/k:1"));
        assert!(!is_reference("linux-image-cloud-amd64"));
        assert!(is_local("localhost:5000"));
        assert!(is_local("127.0.0.1:5000"));
        assert!(!is_local("ghcr.io"));
    }
}
