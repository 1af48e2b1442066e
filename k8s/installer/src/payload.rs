//! The payload the image carries (`/payload/{bin,share,etc}`) and where it
//! goes on the node: `bin/*` and `share/*` under `/opt/boxlite`, the shim
//! linked onto containerd's PATH, and a default `/etc/boxlite/boxlite.toml`
//! when the node has none.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use crate::fsutil;
use crate::Log;

/// Everything we install lives here on the host (and goes on uninstall).
pub const OPT_DIR: &str = "opt/boxlite";
/// containerd resolves `io.containerd.boxlite.v2` to this name on its PATH.
pub const SHIM_NAME: &str = "containerd-shim-boxlite-v2";
/// The PATH entry for the shim, relative to the host root.
pub const SHIM_LINK: &str = "usr/local/bin/containerd-shim-boxlite-v2";
/// The node's runtime config, relative to the host root. The admin's file:
/// written once, never overwritten or removed.
pub const CONFIG: &str = "etc/boxlite/boxlite.toml";

#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("payload {path}: {what}: {source}")]
    Read {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
    #[error("payload {path}: missing; the image must carry {what}")]
    Missing { path: PathBuf, what: &'static str },
    #[error("{path}: cannot {what}: {source}")]
    Write {
        path: PathBuf,
        what: &'static str,
        source: io::Error,
    },
}

/// The host-side path `/<rel>` as seen under `host_root`.
pub fn host_path(host_root: &Path, rel: &str) -> PathBuf {
    host_root.join(rel)
}

/// Copies `payload/bin` and `payload/share` to `<host_root>/opt/boxlite/`,
/// links the shim into `/usr/local/bin` and writes the default config if the
/// node has none. Files already identical (content and mode) are not
/// touched, so a second install changes nothing, not even mtimes.
pub fn install(host_root: &Path, payload: &Path, log: &mut Log) -> Result<(), PayloadError> {
    let shim = payload.join("bin").join(SHIM_NAME);
    if !shim.is_file() {
        return Err(PayloadError::Missing {
            path: shim,
            what: "the shim",
        });
    }
    let opt = host_path(host_root, OPT_DIR);
    for dir in ["bin", "share"] {
        copy_tree(&payload.join(dir), &opt.join(dir), log)?;
    }
    link_shim(host_root, log)?;
    write_default_config(host_root, payload, log)
}

/// Removes `/opt/boxlite` and the shim link (only if it is our link);
/// leaves `/etc/boxlite/boxlite.toml`, the admin's file, and says so.
pub fn uninstall(host_root: &Path, log: &mut Log) -> Result<(), PayloadError> {
    let link = host_path(host_root, SHIM_LINK);
    match fs::read_link(&link) {
        Ok(target) if target == shim_target() => {
            fs::remove_file(&link).map_err(|source| PayloadError::Write {
                path: link.clone(),
                what: "remove the shim link",
                source,
            })?;
            log.action(format!("{}: removed", link.display()));
        }
        Ok(target) => log.action(format!(
            "{}: points at {}, not ours; left alone",
            link.display(),
            target.display()
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            log.action(format!("{}: absent, unchanged", link.display()))
        }
        // EINVAL: a regular file someone else installed (e.g. scripts/setup.sh).
        Err(_) => log.action(format!(
            "{}: not a symlink (installed by other means); left alone",
            link.display()
        )),
    }
    let opt = host_path(host_root, OPT_DIR);
    match fs::remove_dir_all(&opt) {
        Ok(()) => log.action(format!("{}: removed", opt.display())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            log.action(format!("{}: absent, unchanged", opt.display()))
        }
        Err(source) => {
            return Err(PayloadError::Write {
                path: opt,
                what: "remove it",
                source,
            })
        }
    }
    let config = host_path(host_root, CONFIG);
    if config.exists() {
        log.action(format!(
            "{}: kept (the node's runtime config; remove it by hand if no longer wanted)",
            config.display()
        ));
    }
    Ok(())
}

/// `/opt/boxlite/bin/containerd-shim-boxlite-v2`, as the host sees it.
fn shim_target() -> PathBuf {
    Path::new("/").join(OPT_DIR).join("bin").join(SHIM_NAME)
}

fn copy_tree(src: &Path, dst: &Path, log: &mut Log) -> Result<(), PayloadError> {
    let entries = match fs::read_dir(src) {
        Ok(entries) => entries,
        // An image without share/ (say) simply has nothing to put there.
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(PayloadError::Read {
                path: src.to_owned(),
                what: "cannot list it",
                source,
            })
        }
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| PayloadError::Read {
            path: src.to_owned(),
            what: "cannot list it",
            source,
        })?;
        names.push(entry.file_name());
    }
    // Sorted, so the log reads the same on every node.
    names.sort();
    for name in &names {
        let from = src.join(name);
        let to = dst.join(name);
        // metadata() follows symlinks: a payload may link to shared files.
        let meta = fs::metadata(&from).map_err(|source| PayloadError::Read {
            path: from.clone(),
            what: "cannot stat it",
            source,
        })?;
        if meta.is_dir() {
            copy_tree(&from, &to, log)?;
        } else {
            copy_file(&from, &to, log)?;
        }
    }
    remove_stale(dst, &names, log)
}

/// Removes what an earlier image put in `dst` and this one no longer has
/// (a renamed helper, say), so /opt/boxlite holds exactly the payload.
fn remove_stale(dst: &Path, keep: &[OsString], log: &mut Log) -> Result<(), PayloadError> {
    let Ok(entries) = fs::read_dir(dst) else {
        return Ok(());
    };
    let mut stale: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| !keep.contains(&e.file_name()))
        .map(|e| e.path())
        .collect();
    stale.sort();
    for path in stale {
        let removed = if fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|source| PayloadError::Write {
            path: path.clone(),
            what: "remove it (not in the payload any more)",
            source,
        })?;
        log.action(format!(
            "{}: removed (not in the payload any more)",
            path.display()
        ));
    }
    Ok(())
}

fn copy_file(from: &Path, to: &Path, log: &mut Log) -> Result<(), PayloadError> {
    let read = |path: &Path| {
        fs::read(path).map_err(|source| PayloadError::Read {
            path: path.to_owned(),
            what: "cannot read it",
            source,
        })
    };
    let bytes = read(from)?;
    let mode = fsutil::mode_of(from).map_err(|source| PayloadError::Read {
        path: from.to_owned(),
        what: "cannot stat it",
        source,
    })?;
    let same = fs::symlink_metadata(to).is_ok_and(|m| m.is_file())
        && fsutil::mode_of(to).ok() == Some(mode)
        && fs::read(to).is_ok_and(|old| old == bytes);
    if same {
        log.action(format!("{}: unchanged", to.display()));
        return Ok(());
    }
    fsutil::write_atomic(to, &bytes, mode).map_err(|source| PayloadError::Write {
        path: to.to_owned(),
        what: "write it",
        source,
    })?;
    log.action(format!(
        "{}: installed ({} bytes, mode {mode:o})",
        to.display(),
        bytes.len()
    ));
    Ok(())
}

fn link_shim(host_root: &Path, log: &mut Log) -> Result<(), PayloadError> {
    let link = host_path(host_root, SHIM_LINK);
    let target = shim_target();
    let what = match fs::symlink_metadata(&link) {
        Ok(m) if m.file_type().is_symlink() => {
            if fs::read_link(&link).is_ok_and(|t| t == target) {
                log.action(format!(
                    "{} -> {}: unchanged",
                    link.display(),
                    target.display()
                ));
                return Ok(());
            }
            "replaced a symlink elsewhere"
        }
        // A shim copied there by scripts/setup.sh: the DaemonSet now owns
        // the name, so that copy must not shadow the one it installs.
        Ok(_) => "replaced a file installed by other means",
        Err(_) => "linked",
    };
    fsutil::symlink_atomic(&target, &link).map_err(|source| PayloadError::Write {
        path: link.clone(),
        what: "link the shim there",
        source,
    })?;
    log.action(format!(
        "{} -> {}: {what}",
        link.display(),
        target.display()
    ));
    Ok(())
}

fn write_default_config(
    host_root: &Path,
    payload: &Path,
    log: &mut Log,
) -> Result<(), PayloadError> {
    let config = host_path(host_root, CONFIG);
    if config.exists() {
        log.action(format!("{}: exists, kept as it is", config.display()));
        return Ok(());
    }
    let from = payload.join("etc").join("boxlite.toml");
    let bytes = match fs::read(&from) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(PayloadError::Missing {
                path: from,
                what: "the default boxlite.toml",
            })
        }
        Err(source) => {
            return Err(PayloadError::Read {
                path: from,
                what: "cannot read it",
                source,
            })
        }
    };
    fsutil::write_atomic(&config, &bytes, 0o644).map_err(|source| PayloadError::Write {
        path: config.clone(),
        what: "write it",
        source,
    })?;
    log.action(format!(
        "{}: written from the image's default",
        config.display()
    ));
    Ok(())
}
