//! Test images built locally (no registry is reachable from here): a
//! rootfs (a directory or a tarball) and an image config become an OCI
//! image archive that `ctr image import` takes ([`oci_archive`]). The
//! busybox image ([`busybox_image`]) and the Debian image
//! (`debian_image.rs`) are its users.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `cmd` to completion, capturing its output; panics if it cannot start.
pub fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// The SHA-256 of a file, in hex (sha256sum).
pub fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    assert!(out.status.success(), "sha256sum {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_owned()
}

/// The SHA-256 of `data`, in hex (sha256sum reading stdin).
pub fn sha256_of(data: &[u8]) -> String {
    use std::io::Write as _;
    use std::process::Stdio;
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run sha256sum: {e}"));
    child.stdin.take().unwrap().write_all(data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sha256sum of {} bytes", data.len());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_owned()
}

/// What an image's config (the OCI image config's `config` object) says
/// about the container's process. containerd turns these into the spec:
/// `user` goes through its `WithUser` (names resolved in the image's
/// /etc/passwd and /etc/group, supplementary groups included), which is
/// how a test sets the init's user with ctr 1.6 (it has no `run --user`).
#[derive(Debug, Clone, Default)]
pub struct ImageConfig<'a> {
    pub env: &'a [&'a str],
    pub cmd: &'a [&'a str],
    pub user: Option<&'a str>,
    pub working_dir: Option<&'a str>,
}

impl ImageConfig<'_> {
    fn to_json(&self) -> serde_json::Value {
        let mut config = serde_json::json!({"Env": self.env, "Cmd": self.cmd});
        if let Some(user) = self.user {
            config["User"] = user.into();
        }
        if let Some(dir) = self.working_dir {
            config["WorkingDir"] = dir.into();
        }
        config
    }
}

/// Tars `dir` as an image layer: sorted, owned by root, timestamps at 0,
/// so the same tree gives the same digest.
pub fn tar_layer(dir: &Path, tarball: &Path) {
    let out = run(Command::new("tar")
        .args([
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            "--mtime=@0",
            "-C",
        ])
        .arg(dir)
        .arg("-cf")
        .arg(tarball)
        .arg("."));
    assert!(
        out.status.success(),
        "tar {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes an OCI image archive at `archive` holding one image per entry of
/// `images` (name as containerd shows it, e.g.
/// `docker.io/library/busybox:boxlite`, and its config), all made of
/// `layers` (uncompressed layer tarballs, bottom first); `ctr image import`
/// takes it and registers every name. Images in one archive share the
/// layer blobs, so a variant (another user, another command) costs a few
/// hundred bytes. `work` holds the OCI layout while it is built (the
/// layers are hard-linked into it when they are on the same filesystem:
/// the Debian layer is ~150 MB).
pub fn oci_archive(work: &Path, layers: &[&Path], images: &[(&str, ImageConfig)], archive: &Path) {
    let oci = work.join("oci");
    let blobs = oci.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let add_blob = |path: &Path| -> (String, u64) {
        let digest = sha256(path);
        let blob = blobs.join(&digest);
        if !blob.exists() && std::fs::hard_link(path, &blob).is_err() {
            std::fs::copy(path, &blob).unwrap();
        }
        (digest, std::fs::metadata(path).unwrap().len())
    };
    let layer_blobs: Vec<(String, u64)> = layers.iter().map(|l| add_blob(l)).collect();
    let diff_ids: Vec<String> = layer_blobs
        .iter()
        .map(|(d, _)| format!("sha256:{d}"))
        .collect();
    let layer_descriptors: Vec<serde_json::Value> = layer_blobs
        .iter()
        .map(|(d, size)| {
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": format!("sha256:{d}"),
                "size": size,
            })
        })
        .collect();
    let write_json = |name: &str, value: &serde_json::Value| -> (String, u64) {
        let path = work.join(name);
        std::fs::write(&path, serde_json::to_vec(value).expect("JSON serialises")).unwrap();
        let blob = add_blob(&path);
        std::fs::remove_file(&path).unwrap();
        blob
    };
    let mut manifests = Vec::new();
    for (i, (name, config)) in images.iter().enumerate() {
        let (config_digest, config_size) = write_json(
            &format!("config{i}.json"),
            &serde_json::json!({
                "architecture": "amd64",
                "os": "linux",
                "config": config.to_json(),
                "rootfs": {"type": "layers", "diff_ids": diff_ids},
            }),
        );
        let (manifest_digest, manifest_size) = write_json(
            &format!("manifest{i}.json"),
            &serde_json::json!({
                "schemaVersion": 2,
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {
                    "mediaType": "application/vnd.oci.image.config.v1+json",
                    "digest": format!("sha256:{config_digest}"),
                    "size": config_size,
                },
                "layers": layer_descriptors,
            }),
        );
        manifests.push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{manifest_digest}"),
            "size": manifest_size,
            "annotations": {
                "io.containerd.image.name": name,
                "org.opencontainers.image.ref.name": format!("boxlite{i}"),
            },
        }));
    }
    std::fs::write(
        oci.join("index.json"),
        serde_json::to_vec(&serde_json::json!({"schemaVersion": 2, "manifests": manifests}))
            .expect("JSON serialises"),
    )
    .unwrap();
    std::fs::write(oci.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let out = run(Command::new("tar")
        .arg("-C")
        .arg(&oci)
        .arg("-cf")
        .arg(archive)
        .arg("."));
    assert!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::remove_dir_all(&oci).unwrap();
}

/// An OCI image archive named `name` (e.g. `docker.io/library/busybox:boxlite`)
/// with Debian's static busybox as its only layer and `cmd` as its `Cmd`,
/// built in `dir` (no registry is reachable); `ctr image import` takes it.
pub fn busybox_image(dir: &Path, name: &str, cmd: &[&str]) -> PathBuf {
    let busybox = Path::new("/bin/busybox");
    assert!(busybox.is_file(), "install busybox-static (/bin/busybox)");
    let layer = dir.join("layer");
    for d in ["bin", "etc", "tmp", "proc", "sys", "dev"] {
        std::fs::create_dir_all(layer.join(d)).unwrap();
    }
    std::fs::copy(busybox, layer.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "echo", "cat", "ls", "sleep", "true", "false", "env", "id", "hostname", "ps", "nc",
        "ip", "grep", "head", "httpd", "wget", "dd", "seq",
    ] {
        symlink("busybox", layer.join("bin").join(applet)).unwrap();
    }
    std::fs::write(layer.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n").unwrap();
    let layer_tar = dir.join("layer.tar");
    tar_layer(&layer, &layer_tar);
    let archive = dir.join("busybox-oci.tar");
    let config = ImageConfig {
        env: &["PATH=/bin"],
        cmd,
        ..ImageConfig::default()
    };
    oci_archive(dir, &[&layer_tar], &[(name, config)], &archive);
    archive
}
