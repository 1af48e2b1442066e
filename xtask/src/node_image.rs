//! The root filesystem of the nested test node (docs/testing-nested.md): a
//! Debian 12 system built from Debian packages by `mmdebstrap` and written
//! into an ext4 image with `mke2fs -d` (no loop mount, no root-owned
//! mount point), which QEMU gives the test-host kernel as its root disk.
//!
//! The image holds only what comes from Debian — its packages and the
//! modules of the Debian kernel the node boots ([`crate::debian_kernel`]),
//! with `kmod` to load them — plus a small bootstrap PID 1
//! (`/sbin/boxlite-node-boot`) that mounts the run's payload disk and hands
//! over to the init on it. Our own binaries and the node's init script ride
//! on that payload disk, written anew by `scripts/nested-run.sh` for every
//! run, so a code change never rebuilds the image.
//!
//! The image is cached under `<cache root>/node-<hash>/node.ext4`, where the
//! hash covers the whole recipe ([`recipe`]): packages, mmdebstrap arguments,
//! hooks, the bootstrap, the kernel package and the image size. A build goes to a temporary
//! directory beside the entry and is renamed into place when complete, under
//! an exclusive lock, so a killed build never looks finished.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::debian_kernel::DebianKernel;

/// Where the image cache lives unless `--cache-dir` says otherwise (beside
/// the tests' Debian container image).
pub const DEFAULT_CACHE_ROOT: &str = "/var/cache/boxlite/images";
pub const IMAGE_NAME: &str = "node.ext4";
/// The ext4 label of the root disk, and the one the bootstrap looks for on
/// the payload disk.
pub const ROOT_LABEL: &str = "boxlite-node";
pub const PAYLOAD_LABEL: &str = "boxlite-payload";
/// Path of the bootstrap in the image: the test host's `init=`.
pub const BOOTSTRAP_PATH: &str = "/sbin/boxlite-node-boot";

/// The node's packages on top of `--variant=minbase`: what the issue's node
/// runs (containerd, runc, busybox-static, iproute2, python3), the CRI
/// test's CNI plugins and iptables (the bridge plugin's masquerade), procps
/// and util-linux for the scripts, kmod to load the kernel's modules, and
/// QEMU for the qemu-backend rows of the side-by-side benchmark. Recommends are not installed (mmdebstrap's
/// default), which keeps QEMU's dependencies to what it links.
pub const PACKAGES: &[&str] = &[
    "containerd",
    "runc",
    "busybox-static",
    "iproute2",
    "python3",
    "containernetworking-plugins",
    "iptables",
    "procps",
    "util-linux",
    "kmod",
    "qemu-system-x86",
    "libseccomp2",
    "libcap-ng0",
];

/// The image's size: sparse, so this is room for containerd's content and
/// snapshots during a run (QEMU opens the image with `snapshot=on`: writes
/// go to a temporary overlay and the cached image never changes).
pub const IMAGE_SIZE: &str = "6G";

/// Bumped when something outside the lists here changes the result.
const RECIPE_VERSION: &str = "1";

/// The node's PID 1 until the payload's init takes over. It only mounts
/// what it needs to find the payload disk by label.
const BOOTSTRAP: &str = r#"#!/bin/sh
# BoxLite test node, PID 1 until the run's own init takes over. The run's
# init, our binaries and the files of the run are on the payload disk that
# scripts/nested-run.sh writes for every run (docs/testing-nested.md).
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
dev="$(findfs LABEL=boxlite-payload)"
if [ -n "$dev" ] && mkdir -p /payload && mount "$dev" /payload && [ -x /payload/init ]; then
    exec /payload/init
fi
echo "boxlite-node: no payload disk with an init (ext4 LABEL=boxlite-payload); halting" >/dev/console
exec /bin/busybox reboot -f
"#;

#[derive(Debug, thiserror::Error)]
pub enum NodeImageError {
    #[error("cannot prepare the node image cache at {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {program} (is it installed? scripts/common.sh installs it)")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{step} failed ({status}); its output is above")]
    Step {
        step: String,
        status: std::process::ExitStatus,
    },
}

/// The node image and whether it came from the cache.
#[derive(Debug, Clone)]
pub struct NodeImage {
    pub path: PathBuf,
    pub cached: bool,
}

/// mmdebstrap's arguments besides `--include`, the suite and the target.
fn mmdebstrap_args() -> Vec<String> {
    // Fixed host files instead of the build host's, so the image is the
    // same wherever it is built, and the mount points the bootstrap uses.
    crate::debian::mmdebstrap_slim_args(
        "directory",
        &[
            r#"echo boxlite-node > "$1/etc/hostname""#,
            r#"printf '127.0.0.1\tlocalhost boxlite-node\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$1/etc/hosts""#,
            r#": > "$1/etc/resolv.conf""#,
            r#"mkdir -p "$1/dev" "$1/payload""#,
        ],
    )
}

/// The text the cache key is the hash of: every input of the build;
/// `kernel` is the [`DebianKernel::identity`] whose modules it carries.
pub fn recipe(kernel: &str) -> String {
    format!(
        "version {RECIPE_VERSION}\nsuite bookworm\npackages {}\nmmdebstrap {}\nsize {IMAGE_SIZE}\n\
         kernel {kernel}\nroot label {ROOT_LABEL}\nbootstrap {BOOTSTRAP_PATH}\n{BOOTSTRAP}",
        PACKAGES.join(","),
        mmdebstrap_args().join(" "),
    )
}

pub fn cache_key(kernel: &str) -> String {
    format!("{:x}", Sha256::digest(recipe(kernel).as_bytes()))
}

fn run(cmd: &mut Command, step: &str) -> Result<(), NodeImageError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let status = cmd
        .status()
        .map_err(|source| NodeImageError::Spawn { program, source })?;
    if status.success() {
        Ok(())
    } else {
        Err(NodeImageError::Step {
            step: step.to_owned(),
            status,
        })
    }
}

/// The node image, built on first use (a few minutes: the packages come
/// from the Debian mirror) and then taken from `cache_root`. Needs root,
/// `mmdebstrap` and `mke2fs`. `kernel`'s modules go to `/lib/modules`.
pub fn build(cache_root: &Path, kernel: &DebianKernel) -> Result<NodeImage, NodeImageError> {
    let cache_err = |path: &Path| {
        let path = path.to_owned();
        move |source| NodeImageError::Cache { path, source }
    };
    let key = cache_key(&kernel.identity());
    let entry = cache_root.join(format!("node-{key}"));
    let image = entry.join(IMAGE_NAME);
    if image.is_file() {
        return Ok(NodeImage {
            path: image,
            cached: true,
        });
    }
    std::fs::create_dir_all(cache_root).map_err(cache_err(cache_root))?;
    let lock_path = cache_root.join(format!("node-{key}.lock"));
    let _lock = crate::artefact::lock_exclusive(&lock_path).map_err(cache_err(&lock_path))?;
    if image.is_file() {
        return Ok(NodeImage {
            path: image,
            cached: true,
        });
    }
    // Under the lock, a temporary directory of this key is what a killed
    // build left behind.
    let tmp = cache_root.join(format!(".node-{key}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(cache_err(&tmp))?;
    }
    let rootfs = tmp.join("rootfs");
    std::fs::create_dir_all(&tmp).map_err(cache_err(&tmp))?;
    let started = Instant::now();
    eprintln!(
        "node-image {key}: mmdebstrap bookworm with {}",
        PACKAGES.join(",")
    );
    run(
        Command::new("mmdebstrap")
            .arg(format!("--include={}", PACKAGES.join(",")))
            .args(mmdebstrap_args())
            .arg("bookworm")
            .arg(&rootfs),
        "mmdebstrap",
    )?;
    let boot = rootfs.join(BOOTSTRAP_PATH.trim_start_matches('/'));
    crate::artefact::write_atomic(&boot, 0o755, |f| {
        io::Write::write_all(f, BOOTSTRAP.as_bytes())
    })
    .map_err(|e| NodeImageError::Cache {
        path: boot.clone(),
        source: io::Error::other(e),
    })?;
    let modules = rootfs.join("lib/modules").join(&kernel.release);
    eprintln!(
        "node-image {key}: modules of {} into {}",
        kernel.identity(),
        modules.display()
    );
    std::fs::create_dir_all(rootfs.join("lib/modules")).map_err(cache_err(&rootfs))?;
    run(
        Command::new("cp")
            .arg("-a")
            .arg(kernel.modules_dir())
            .arg(&modules),
        "copying the kernel modules",
    )?;
    run(
        Command::new("chroot")
            .arg(&rootfs)
            .args(["/sbin/depmod", &kernel.release]),
        "depmod in the node image",
    )?;
    let built = tmp.join(IMAGE_NAME);
    eprintln!("node-image {key}: mke2fs -d into {}", built.display());
    run(
        Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-L", ROOT_LABEL, "-d"])
            .arg(&rootfs)
            .arg(&built)
            .arg(IMAGE_SIZE),
        "mke2fs",
    )?;
    std::fs::remove_dir_all(&rootfs).map_err(cache_err(&rootfs))?;
    std::fs::write(tmp.join("recipe.txt"), recipe(&kernel.identity())).map_err(cache_err(&tmp))?;
    std::fs::rename(&tmp, &entry).map_err(cache_err(&entry))?;
    eprintln!(
        "node-image {key}: built in {:.0?}: {}",
        started.elapsed(),
        image.display()
    );
    Ok(NodeImage {
        path: image,
        cached: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_recipe_names_every_package_and_the_bootstrap() {
        let r = recipe("linux-image-6.1.0-57-cloud-amd64=6.1.192-3");
        assert!(r.contains("kernel linux-image-6.1.0-57-cloud-amd64=6.1.192-3\n"));
        for p in PACKAGES {
            assert!(r.contains(p), "{p} missing from the recipe");
        }
        assert!(r.contains(BOOTSTRAP));
        assert!(r.contains(IMAGE_SIZE));
    }

    #[test]
    fn the_bootstrap_looks_for_the_payload_label() {
        assert!(BOOTSTRAP.contains(&format!("LABEL={PAYLOAD_LABEL}")));
        assert!(BOOTSTRAP.contains("exec /payload/init"));
    }

    #[test]
    fn the_key_is_the_hash_of_the_recipe() {
        assert_eq!(
            cache_key("k=1"),
            format!("{:x}", Sha256::digest(recipe("k=1")))
        );
        assert_ne!(
            cache_key("k=1"),
            cache_key("k=2"),
            "a new kernel makes a new image"
        );
    }
}
