//! A real distribution for the tests to run: Debian 12 (bookworm) with
//! python3, built offline from Debian packages by `mmdebstrap` (no image
//! registry is reachable here, the Debian mirror is) and wrapped as an OCI
//! image archive by [`crate::oci_image::oci_archive`].
//!
//! The archive is cached under `/var/cache/boxlite/images/<hash>/` (or
//! `$BOXLITE_IMAGE_CACHE/<hash>/`), where the hash covers everything that
//! shapes the image: the package list, every mmdebstrap argument and hook,
//! the image names and configs. Changing any of them builds a new image;
//! an unchanged recipe reuses the cached one. A build goes to a temporary
//! directory beside the cache entry and is renamed into place when
//! complete, under an exclusive lock on `<hash>.lock`, so two tests (or two
//! test binaries) wanting it at once build it once, and a build killed
//! half-way leaves nothing that looks finished.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::oci_image::{oci_archive, run, ImageConfig};

/// The image: Debian 12 with python3, `Cmd` bash, running as root.
pub const DEBIAN_IMAGE: &str = "docker.io/library/debian:boxlite-difftest";
/// The same layer with `User: app` in its config: containerd resolves it in
/// the image's /etc/passwd and /etc/group (uid, gid and supplementary
/// groups), as `ctr run --user app` would in later containerd releases.
pub const DEBIAN_APP_IMAGE: &str = "docker.io/library/debian:boxlite-difftest-app";
/// `User: 4242`, a uid the image's /etc/passwd does not know.
pub const DEBIAN_UID_IMAGE: &str = "docker.io/library/debian:boxlite-difftest-4242";

/// Packages on top of `--variant=minbase` (which has bash, coreutils,
/// passwd for useradd, …). Only what the cases use: python3 (with its
/// standard library: http.server, multiprocessing, sqlite3, threading).
const PACKAGES: &[&str] = &["python3"];

/// The user the cases run as besides root: uid 1000, primary group `app`
/// (1000), supplementary groups `difftest` (1500) and `users` (100).
pub const APP_USER: &str = "app";

/// Bumped when something outside the lists below changes the result (the
/// archive layout, the layer's post-processing).
const RECIPE_VERSION: &str = "1";

const IMAGE_ENV: &[&str] = &[
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
];

/// mmdebstrap's arguments besides the package list, suite and target.
fn mmdebstrap_args() -> Vec<String> {
    // mmdebstrap copies the build host's /etc/hostname and resolv.conf:
    // fixed contents instead, so the image is the same on every host and
    // the cases can print these files (ctr, unlike CRI, mounts no hosts,
    // hostname or resolv.conf of its own: the container sees the image's).
    xtask::debian::mmdebstrap_slim_args(
        "tar",
        &[
            r#"echo difftest-image > "$1/etc/hostname""#,
            r#"printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' > "$1/etc/hosts""#,
            r#"printf 'nameserver 192.0.2.53\nsearch difftest.example\noptions ndots:2\n' > "$1/etc/resolv.conf""#,
            r#"chroot "$1" groupadd --gid 1500 difftest"#,
            r#"chroot "$1" useradd --uid 1000 --user-group --groups difftest,users --shell /bin/bash --create-home app"#,
            r#"chroot "$1" useradd --uid 1001 --user-group --shell /bin/sh --no-create-home worker"#,
        ],
    )
}

fn images() -> Vec<(&'static str, ImageConfig<'static>)> {
    vec![
        (
            DEBIAN_IMAGE,
            ImageConfig {
                env: IMAGE_ENV,
                cmd: &["bash"],
                ..ImageConfig::default()
            },
        ),
        (
            DEBIAN_APP_IMAGE,
            ImageConfig {
                env: IMAGE_ENV,
                cmd: &["bash"],
                user: Some(APP_USER),
                working_dir: Some("/home/app"),
            },
        ),
        (
            DEBIAN_UID_IMAGE,
            ImageConfig {
                env: IMAGE_ENV,
                cmd: &["bash"],
                user: Some("4242"),
                ..ImageConfig::default()
            },
        ),
    ]
}

/// The text the cache key is the hash of: every input of the build.
fn recipe() -> String {
    let images: Vec<String> = images()
        .iter()
        .map(|(name, config)| format!("{name} {config:?}"))
        .collect();
    format!(
        "version {RECIPE_VERSION}\nsuite bookworm\npackages {}\nmmdebstrap {}\nimages {}\n",
        PACKAGES.join(","),
        mmdebstrap_args().join(" "),
        images.join("; ")
    )
}

fn cache_root() -> PathBuf {
    std::env::var_os("BOXLITE_IMAGE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/boxlite/images"))
}

/// An exclusive `flock` on `path`, held until the returned file is dropped.
fn lock(path: &Path) -> File {
    xtask::artefact::lock_exclusive(path)
        .unwrap_or_else(|e| panic!("cannot lock {}: {e}", path.display()))
}

/// The Debian test images' OCI archive ([`DEBIAN_IMAGE`],
/// [`DEBIAN_APP_IMAGE`]), built on first use (about two minutes: the
/// packages come from the Debian mirror) and cached by the hash of its
/// recipe. Needs root and `mmdebstrap` (scripts/common.sh installs it).
pub fn debian_image_archive() -> PathBuf {
    let recipe = recipe();
    let hash = crate::oci_image::sha256_of(recipe.as_bytes());
    let root = cache_root();
    std::fs::create_dir_all(&root)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", root.display()));
    let entry = root.join(&hash);
    let archive = entry.join("image.tar");
    if archive.is_file() {
        return archive;
    }
    let _lock = lock(&root.join(format!("{hash}.lock")));
    // Another process may have finished the build while this one waited.
    if archive.is_file() {
        return archive;
    }
    // Under the lock, a temporary directory of this hash is what a killed
    // build left behind.
    let tmp_prefix = format!(".{hash}.tmp-");
    for stale in std::fs::read_dir(&root).unwrap().flatten() {
        if stale.file_name().to_string_lossy().starts_with(&tmp_prefix) {
            let _ = std::fs::remove_dir_all(stale.path());
        }
    }
    let tmp = root.join(format!("{tmp_prefix}{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let started = Instant::now();
    let rootfs = tmp.join("rootfs.tar");
    let out = run(Command::new("mmdebstrap")
        .arg(format!("--include={}", PACKAGES.join(",")))
        .args(mmdebstrap_args())
        .arg("bookworm")
        .arg(&rootfs));
    assert!(
        out.status.success(),
        "mmdebstrap failed (is it installed, and the Debian mirror reachable?):\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    oci_archive(&tmp, &[&rootfs], &images(), &tmp.join("image.tar"));
    std::fs::remove_file(&rootfs).unwrap();
    std::fs::write(tmp.join("recipe.txt"), &recipe).unwrap();
    std::fs::rename(&tmp, &entry)
        .unwrap_or_else(|e| panic!("rename {} to {}: {e}", tmp.display(), entry.display()));
    eprintln!(
        "built the Debian test image in {:?}: {}",
        started.elapsed(),
        archive.display()
    );
    archive
}
