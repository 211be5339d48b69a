//! Kernels from an OCI image in a real registry running locally (Debian's
//! docker-registry), pushed with skopeo from an OCI layout built here: a
//! manifest list (amd64 and arm64), a gzip layer with the kernel, a zstd
//! layer with its modules and a whiteout.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use sha2::Digest;

struct Registry(Child);

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// Writes `data` as a blob of the layout; returns its descriptor.
fn blob(layout: &Path, media_type: &str, data: &[u8]) -> serde_json::Value {
    let digest: String = sha2::Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    std::fs::write(layout.join("blobs/sha256").join(&digest), data).unwrap();
    serde_json::json!({ "mediaType": media_type, "digest": format!("sha256:{digest}"), "size": data.len() })
}

fn tar_of(root: &Path, entries: &[(&str, &Path)], extra: &[(&str, &[u8])]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    b.follow_symlinks(true);
    for (name, path) in entries {
        if path.is_dir() {
            b.append_dir_all(name, path).unwrap();
        } else {
            b.append_path_with_name(path, name).unwrap();
        }
    }
    for (name, data) in extra {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, *data).unwrap();
    }
    let _ = root;
    b.into_inner().unwrap()
}

#[test]
fn fetch_a_kernel_image_from_a_local_registry() {
    if !have("docker-registry") || !have("skopeo") {
        eprintln!(
            "skipped: needs docker-registry and skopeo (Debian: apt-get install docker-registry skopeo)"
        );
        return;
    }
    let work = workdir("oci");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = work.path().join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            work.path().join("registry").display()
        ),
    )
    .unwrap();
    let _registry = Registry(
        Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    // The OCI layout: Debian's cloud kernel in two layers.
    let cloud = kernels_dir().join("6.1-cloud");
    let image = kernel("6.1-cloud");
    let rel = release_of(&image);
    let modules = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|d| cloud.join(d).join(&rel))
        .find(|p| p.is_dir())
        .unwrap();
    let layout = work.path().join("layout");
    std::fs::create_dir_all(layout.join("blobs/sha256")).unwrap();
    std::fs::write(
        layout.join("oci-layout"),
        r#"{"imageLayoutVersion":"1.0.0"}"#,
    )
    .unwrap();
    let l1 = {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar_of(
            &cloud,
            &[("boot/vmlinuz", &image)],
            &[("boot/stale-file", b"removed by the next layer")],
        ))
        .unwrap();
        gz.finish().unwrap()
    };
    let mods_path = format!("lib/modules/{rel}");
    let l2 = zstd::encode_all(
        &tar_of(
            &cloud,
            &[(&mods_path, &modules)],
            &[("boot/.wh.stale-file", b"")],
        )[..],
        1,
    )
    .unwrap();
    let layers = [
        blob(&layout, "application/vnd.oci.image.layer.v1.tar+gzip", &l1),
        blob(&layout, "application/vnd.oci.image.layer.v1.tar+zstd", &l2),
    ];
    let image_config = |arch: &str| {
        serde_json::to_vec(&serde_json::json!({
            "architecture": arch, "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [] }
        }))
        .unwrap()
    };
    let manifest = |config: serde_json::Value, layers: &[serde_json::Value]| {
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": layers,
        }))
        .unwrap()
    };
    let amd64 = manifest(
        blob(
            &layout,
            "application/vnd.oci.image.config.v1+json",
            &image_config("amd64"),
        ),
        &layers,
    );
    let arm_layer = blob(
        &layout,
        "application/vnd.oci.image.layer.v1.tar",
        &tar_of(&cloud, &[], &[("boot/vmlinuz", b"not for this host")]),
    );
    let arm64 = manifest(
        blob(
            &layout,
            "application/vnd.oci.image.config.v1+json",
            &image_config("arm64"),
        ),
        &[arm_layer],
    );
    let mut amd = blob(
        &layout,
        "application/vnd.oci.image.manifest.v1+json",
        &amd64,
    );
    amd["platform"] = serde_json::json!({ "architecture": "amd64", "os": "linux" });
    let mut arm = blob(
        &layout,
        "application/vnd.oci.image.manifest.v1+json",
        &arm64,
    );
    arm["platform"] = serde_json::json!({ "architecture": "arm64", "os": "linux" });
    let list = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [arm, amd],
    }))
    .unwrap();
    let mut list_desc = blob(&layout, "application/vnd.oci.image.index.v1+json", &list);
    list_desc["annotations"] = serde_json::json!({ "org.opencontainers.image.ref.name": "6.1" });
    std::fs::write(
        layout.join("index.json"),
        serde_json::to_vec(&serde_json::json!({ "schemaVersion": 2, "manifests": [list_desc] }))
            .unwrap(),
    )
    .unwrap();

    let reference = format!("127.0.0.1:{port}/vexec/kernel:6.1");
    let mut pushed = false;
    for _ in 0..50 {
        let out = Command::new("skopeo")
            .args(["copy", "--all", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:6.1", layout.display()))
            .arg(format!("docker://{reference}"))
            .output()
            .unwrap();
        if out.status.success() {
            pushed = true;
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert!(pushed, "skopeo could not push to the local registry");

    let cache = work.path().join("cache");
    let out = Command::new(env!("CARGO_BIN_EXE_vexec"))
        .env("XDG_CACHE_HOME", &cache)
        .args(["kernel", "fetch", &reference])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(err.contains("2 layers"), "{err}");
    let entry = cache.join("vexec/kernels").join(&rel);
    assert!(entry.join("boot").join(format!("vmlinuz-{rel}")).is_file());
    assert!(entry.join("lib/modules").join(&rel).join("kernel").is_dir());
    assert_eq!(
        std::fs::read_to_string(entry.join("source"))
            .unwrap()
            .trim(),
        format!("oci:{reference}")
    );
    // Layers are kept by digest: fetching again downloads nothing.
    let blobs = std::fs::read_dir(cache.join("vexec/oci-blobs"))
        .unwrap()
        .count();
    assert_eq!(blobs, 2);

    // And it boots.
    assert_boots_by_release(&cache, &rel);
}
