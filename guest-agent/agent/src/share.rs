//! virtio-fs shares (MountShare, and the shares of CreateSandbox).
//!
//! Guest mode: `mount -t virtiofs <tag> <mount_point>` after `mkdir -p`,
//! read-only on request. Asking again for the same tag on the same mount
//! point succeeds without mounting twice.
//!
//! Host mode: there is no virtio-fs, so the share with tag `T` is the
//! directory `--root/shares/T` (it must exist), and "mounting" it makes the
//! resolved mount point a symlink to that directory. `read_only` is not
//! enforced there.

use std::path::{Path, PathBuf};

use boxlite_protocol::mountinfo::{self, MountEntry, MOUNTINFO};
use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::config::{Config, Mode};
use crate::paths::{guest_path, PathError};

/// Length of the tag field in the virtio-fs config space.
pub const MAX_TAG_LEN: usize = 36;
/// Where host mode finds the directory standing in for a share.
pub const HOST_SHARES_DIR: &str = "shares";
const VIRTIOFS: &str = "virtiofs";

#[derive(Debug, thiserror::Error)]
pub enum ShareError {
    #[error("share tag {tag:?} is invalid: {reason}")]
    InvalidTag { tag: String, reason: &'static str },
    #[error(transparent)]
    MountPoint(#[from] PathError),
    #[error("mount point {mount_point} is already in use by {fstype} {source_name:?}, not by virtiofs tag {tag}")]
    Busy {
        tag: String,
        mount_point: PathBuf,
        fstype: String,
        source_name: String,
    },
    #[error("virtiofs tag {tag} is already mounted on {mount_point} {}", if *.mounted_read_only { "read-only" } else { "read-write" })]
    ReadOnlyMismatch {
        tag: String,
        mount_point: PathBuf,
        mounted_read_only: bool,
    },
    #[error("Failed to create mount point {path}")]
    CreateMountPoint {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount virtiofs tag {tag} on {mount_point} failed")]
    Mount {
        tag: String,
        mount_point: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount virtiofs tag {tag} on {mount_point} failed: no virtio-fs device seems to have this tag")]
    NoSuchTag {
        tag: String,
        mount_point: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("unmount {mount_point} failed")]
    Unmount {
        mount_point: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to read {MOUNTINFO}")]
    ReadMountinfo(#[source] std::io::Error),
    #[error("share tag {tag} has no directory {dir} (host mode)")]
    HostShareMissing { tag: String, dir: PathBuf },
    #[error("Failed to link {link} to {target} (host mode)")]
    HostLink {
        link: PathBuf,
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A validated MountShare request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareRequest {
    pub tag: String,
    /// Guest path.
    pub mount_point: PathBuf,
    pub read_only: bool,
}

impl ShareRequest {
    /// Checks the tag and the mount point; an empty mount point means
    /// `boxlite_protocol::default_share_mount_point(tag)`.
    pub fn validate(tag: &str, mount_point: &str, read_only: bool) -> Result<Self, ShareError> {
        validate_tag(tag)?;
        let mount_point = if mount_point.is_empty() {
            PathBuf::from(boxlite_protocol::default_share_mount_point(tag))
        } else {
            guest_path("mount_point", mount_point)?
        };
        Ok(ShareRequest {
            tag: tag.to_string(),
            mount_point,
            read_only,
        })
    }
}

pub fn validate_tag(tag: &str) -> Result<(), ShareError> {
    let fail = |reason| ShareError::InvalidTag {
        tag: tag.escape_debug().to_string(),
        reason,
    };
    if tag.is_empty() {
        return Err(fail("it is empty"));
    }
    if tag.len() > MAX_TAG_LEN {
        return Err(fail("it is longer than the 36 bytes virtio-fs allows"));
    }
    if tag
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == ',')
    {
        return Err(fail("it contains a blank, a control character, '/' or ','"));
    }
    if tag == "." || tag == ".." {
        return Err(fail("it is a relative path component"));
    }
    Ok(())
}

/// What MountShare did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mounted {
    /// Guest path of the mount.
    pub mount_point: PathBuf,
    /// It was mounted already; nothing changed.
    pub already: bool,
}

pub fn mount_share(config: &Config, req: &ShareRequest) -> Result<Mounted, ShareError> {
    match config.mode {
        Mode::Guest => mount_virtiofs(req),
        Mode::Host => link_host_share(config, req),
    }
}

fn mount_virtiofs(req: &ShareRequest) -> Result<Mounted, ShareError> {
    let mounts = read_mountinfo()?;
    if let Some(m) = mounts
        .iter()
        .rev()
        .find(|m| m.mount_point == req.mount_point)
    {
        if m.fstype == VIRTIOFS && m.source == req.tag {
            if m.is_read_only() != req.read_only {
                return Err(ShareError::ReadOnlyMismatch {
                    tag: req.tag.clone(),
                    mount_point: req.mount_point.clone(),
                    mounted_read_only: m.is_read_only(),
                });
            }
            return Ok(Mounted {
                mount_point: req.mount_point.clone(),
                already: true,
            });
        }
        // A mount point that is only a directory on the root filesystem is
        // fine; anything mounted there on purpose is not ours to cover.
        if m.mount_point != Path::new("/") {
            return Err(ShareError::Busy {
                tag: req.tag.clone(),
                mount_point: req.mount_point.clone(),
                fstype: m.fstype.clone(),
                source_name: m.source.clone(),
            });
        }
    }
    let created = !req.mount_point.exists();
    std::fs::create_dir_all(&req.mount_point).map_err(|source| ShareError::CreateMountPoint {
        path: req.mount_point.clone(),
        source,
    })?;
    let mut flags = MsFlags::empty();
    if req.read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(
        Some(req.tag.as_str()),
        &req.mount_point,
        Some(VIRTIOFS),
        flags,
        None::<&str>,
    )
    .map_err(|errno| {
        if created {
            // Leave no empty mount point behind (best effort).
            let _ = std::fs::remove_dir(&req.mount_point);
        }
        let (tag, mount_point, source) = (req.tag.clone(), req.mount_point.clone(), errno.into());
        // virtio-fs refuses a tag that no device carries with EINVAL (and
        // some kernels with ENOENT); nothing else in this call does.
        if matches!(errno, Errno::EINVAL | Errno::ENOENT) {
            ShareError::NoSuchTag {
                tag,
                mount_point,
                source,
            }
        } else {
            ShareError::Mount {
                tag,
                mount_point,
                source,
            }
        }
    })?;
    Ok(Mounted {
        mount_point: req.mount_point.clone(),
        already: false,
    })
}

fn link_host_share(config: &Config, req: &ShareRequest) -> Result<Mounted, ShareError> {
    let dir = config.root.join(HOST_SHARES_DIR).join(&req.tag);
    if !dir.is_dir() {
        return Err(ShareError::HostShareMissing {
            tag: req.tag.clone(),
            dir,
        });
    }
    let link = config.resolve(&req.mount_point);
    let done = |already| {
        Ok(Mounted {
            mount_point: req.mount_point.clone(),
            already,
        })
    };
    if link == dir {
        return done(true);
    }
    match std::fs::read_link(&link) {
        Ok(target) if target == dir => return done(true),
        Ok(target) => {
            return Err(ShareError::Busy {
                tag: req.tag.clone(),
                mount_point: req.mount_point.clone(),
                fstype: "symlink".into(),
                source_name: target.display().to_string(),
            })
        }
        Err(_) if link.symlink_metadata().is_ok() => {
            return Err(ShareError::Busy {
                tag: req.tag.clone(),
                mount_point: req.mount_point.clone(),
                fstype: "existing file".into(),
                source_name: link.display().to_string(),
            })
        }
        Err(_) => {}
    }
    let link_err = |source| ShareError::HostLink {
        link: link.clone(),
        target: dir.clone(),
        source,
    };
    if let Some(parent) = link.parent() {
        std::fs::create_dir_all(parent).map_err(link_err)?;
    }
    std::os::unix::fs::symlink(&dir, &link).map_err(link_err)?;
    done(false)
}

/// Unmounts every virtiofs mount, newest first (guest mode, at shutdown).
/// A busy mount is detached instead. Returns the failures.
pub fn unmount_all_shares() -> Vec<ShareError> {
    let mounts = match read_mountinfo() {
        Ok(m) => m,
        Err(e) => return vec![e],
    };
    let mut errors = Vec::new();
    for m in mounts.iter().rev().filter(|m| m.fstype == VIRTIOFS) {
        if umount2(&m.mount_point, MntFlags::empty()).is_err() {
            if let Err(errno) = umount2(&m.mount_point, MntFlags::MNT_DETACH) {
                errors.push(ShareError::Unmount {
                    mount_point: m.mount_point.clone(),
                    source: errno.into(),
                });
            }
        }
    }
    errors
}

fn read_mountinfo() -> Result<Vec<MountEntry>, ShareError> {
    let text = std::fs::read_to_string(MOUNTINFO).map_err(ShareError::ReadMountinfo)?;
    Ok(mountinfo::parse(text.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::host_config_for_tests as host_config;

    #[test]
    fn validates_tags_and_defaults_the_mount_point() {
        let r = ShareRequest::validate("share0", "", true).unwrap();
        assert_eq!(r.mount_point, PathBuf::from("/run/boxlite/shares/share0"));
        assert!(r.read_only);
        for bad in ["", "a/b", "a b", "..", &"x".repeat(37)] {
            assert!(ShareRequest::validate(bad, "", false).is_err(), "{bad:?}");
        }
        let e = ShareRequest::validate("s", "rel/dir", false).unwrap_err();
        assert_eq!(
            e.to_string(),
            "mount_point \"rel/dir\" is not an absolute path"
        );
    }

    #[test]
    fn host_mode_links_the_share_directory() {
        let dir = tempfile::tempdir().unwrap();
        let config = host_config(dir.path());
        let req = ShareRequest::validate("vol", "/data/vol", false).unwrap();
        let e = mount_share(&config, &req).unwrap_err();
        assert!(matches!(e, ShareError::HostShareMissing { .. }), "{e}");
        std::fs::create_dir_all(dir.path().join("shares/vol")).unwrap();
        std::fs::write(dir.path().join("shares/vol/f"), "hi").unwrap();
        let m = mount_share(&config, &req).unwrap();
        assert_eq!(
            m,
            Mounted {
                mount_point: "/data/vol".into(),
                already: false
            }
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("data/vol/f")).unwrap(),
            "hi"
        );
        assert!(mount_share(&config, &req).unwrap().already);
        std::fs::create_dir_all(dir.path().join("shares/other")).unwrap();
        let other = ShareRequest::validate("other", "/data/vol", false).unwrap();
        assert!(matches!(
            mount_share(&config, &other),
            Err(ShareError::Busy { .. })
        ));
    }
}
