//! Rootfs and volumes: what containerd mounted for a container on the host
//! reaches the guest through the sandbox's virtio-fs share.
//!
//! The share has two views ([`prepare_share`]): `mounts/`, where the shim
//! creates directories and mounts, which the guest never sees; and
//! `shared/`, what virtiofsd serves, a read-only recursive bind of
//! `mounts/` that receives every mount made there (a slave of it). The
//! guest can write inside a container's rootfs and rw volumes (mounts of
//! their own), but cannot create, rename or replace any directory the shim
//! creates or mounts on, so it cannot swap a path component under the
//! shim's feet (the class of Kata's CVE-2020-2026).
//!
//! For container `<cid>` of sandbox `<sid>`:
//! * the CreateTask rootfs mounts (an overlay snapshot, usually) are mounted
//!   on `/run/boxlite/<sid>/mounts/<cid>/rootfs`, nosuid and nodev (the host
//!   never runs a setuid file or opens a device node the guest made; the
//!   guest still sees the bits), and the spec's `root.path` becomes the
//!   guest path of that directory in the share;
//! * each bind mount of the spec whose source is a host path is bind-mounted
//!   on `mounts/<cid>/volumes/<n>` (nosuid, nodev; read-only when the spec
//!   says `ro`), and its `source` becomes the guest path.
//!
//! [`teardown`] unmounts everything under `mounts/<cid>` (also after a
//! crash, from `/proc/self/mountinfo`) before it removes the directory, so a
//! volume's content is never deleted through a leftover mount.

use std::path::{Path, PathBuf};

use boxlite_protocol::mountinfo::{self, MOUNTINFO};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sys::statvfs::{statvfs, FsFlags};
use oci_spec::runtime::Spec;

use crate::error::{Result, ShimError};

/// A mount from containerd's CreateTask request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountSpec {
    pub kind: String,
    pub source: String,
    pub options: Vec<String>,
}

/// Host paths whose contents are the host's own devices and kernel state:
/// never shared into a VM.
const HOST_ONLY_PREFIXES: &[&str] = &["/proc", "/sys", "/dev"];

/// Sets up the share's two views: `private` (the shim's, a shared mount of
/// itself) and `shared` (the guest's: a recursive bind of it, a slave so
/// that mounts made under `private` appear in it and nothing flows back,
/// then read-only, nosuid, nodev at its top). Mounts under `private` keep
/// their own flags in `shared`. Done once per sandbox, before virtiofsd
/// starts; a share already set up is left as it is.
pub fn prepare_share(private: &Path, shared: &Path) -> Result<()> {
    for dir in [private, shared] {
        std::fs::create_dir_all(dir)
            .map_err(|e| ShimError::io("cannot create the share directory", dir, e))?;
    }
    if mounts_under(shared)?.iter().any(|m| m == shared) {
        return Ok(());
    }
    bind(private, private, false)?;
    set_propagation(private, MsFlags::MS_SHARED)?;
    bind(private, shared, true)?;
    set_propagation(shared, MsFlags::MS_SLAVE)?;
    let flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_RDONLY
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV;
    mount(None::<&str>, shared, None::<&str>, flags, None::<&str>).map_err(|e| ShimError::Mount {
        op: "cannot make the guest's view of the share read-only",
        source_desc: private.display().to_string(),
        target: shared.to_owned(),
        error: e.into(),
    })
}

fn set_propagation(target: &Path, kind: MsFlags) -> Result<()> {
    mount(None::<&str>, target, None::<&str>, kind, None::<&str>).map_err(|e| ShimError::Mount {
        op: "cannot set the mount propagation of",
        source_desc: format!("{kind:?}"),
        target: target.to_owned(),
        error: e.into(),
    })
}

/// What [`prepare`] mounted for one container.
#[derive(Debug, Default)]
pub struct ContainerMounts {
    /// `mounts/<cid>`.
    pub dir: PathBuf,
    /// Mount points in the order they were mounted.
    pub mounted: Vec<PathBuf>,
}

/// The share of one sandbox, as the shim sees it: see [`prepare_share`].
#[derive(Debug, Clone, Copy)]
pub struct ShareViews<'a> {
    /// `mounts/`: where the shim creates and mounts.
    pub private: &'a Path,
    /// `shared/`: what virtiofsd serves to the guest.
    pub guest: &'a Path,
}

/// Mounts the rootfs and volumes of container `cid` in the share's private
/// view (see [`prepare_share`]), sets the flags of the copies the guest's
/// view receives too (a remount does not propagate), and rewrites `spec`
/// to the guest paths under `guest_shared`. On error, whatever was mounted
/// is unmounted and the directory removed.
pub fn prepare(
    share: ShareViews<'_>,
    guest_shared: &str,
    cid: &str,
    bundle: &Path,
    rootfs: &[MountSpec],
    spec: &mut Spec,
) -> Result<ContainerMounts> {
    let dir = share.private.join(cid);
    let view = share.guest.join(cid);
    if dir.exists() {
        // A leftover of a crashed shim with the same container id.
        teardown(&dir)?;
    }
    let mut done = ContainerMounts {
        dir: dir.clone(),
        mounted: Vec::new(),
    };
    match prepare_inner(&mut done, &view, guest_shared, cid, bundle, rootfs, spec) {
        Ok(()) => Ok(done),
        Err(e) => {
            if let Err(cleanup) = teardown(&dir) {
                tracing::error!(error = %boxlite_protocol::error_chain::chain(&cleanup), "cleanup after a failed rootfs set-up failed");
            }
            Err(e)
        }
    }
}

fn prepare_inner(
    done: &mut ContainerMounts,
    view: &Path,
    guest_shared: &str,
    cid: &str,
    bundle: &Path,
    rootfs: &[MountSpec],
    spec: &mut Spec,
) -> Result<()> {
    let dir = done.dir.clone();
    let target = dir.join("rootfs");
    std::fs::create_dir_all(&target)
        .map_err(|e| ShimError::io("cannot create rootfs mount point", &target, e))?;
    if rootfs.is_empty() {
        // A bundle with a ready rootfs directory (no snapshot mounts).
        let root = spec
            .root()
            .as_ref()
            .map(|r| r.path().clone())
            .ok_or_else(|| ShimError::Spec {
                path: bundle.join("config.json"),
                reason: "no rootfs mounts and no root.path".into(),
            })?;
        let host_root = if root.is_absolute() {
            root
        } else {
            bundle.join(root)
        };
        if !host_root.is_dir() {
            return Err(ShimError::InvalidArgument(format!(
                "rootfs {} does not exist or is not a directory",
                host_root.display()
            )));
        }
        bind(&host_root, &target, true)?;
        done.mounted.push(target.clone());
    } else {
        for m in rootfs {
            let options = with_host_guard(&m.options);
            containerd_shim::mount::mount_rootfs(
                Some(m.kind.as_str()).filter(|k| !k.is_empty()),
                Some(m.source.as_str()).filter(|s| !s.is_empty()),
                &options,
                &target,
            )
            .map_err(|e| ShimError::Mount {
                op: "cannot mount rootfs",
                source_desc: format!("{} ({})", m.source, m.kind),
                target: target.clone(),
                error: std::io::Error::other(e),
            })?;
            done.mounted.push(target.clone());
        }
    }
    restrict(&target, false)?;
    restrict(&view.join("rootfs"), false)?;
    let guest_dir = format!("{guest_shared}/{cid}");
    let mut root = spec.root().clone().unwrap_or_default();
    root.set_path(PathBuf::from(format!("{guest_dir}/rootfs")));
    spec.set_root(Some(root));

    let Some(mut mounts) = spec.mounts().clone() else {
        return Ok(());
    };
    for (n, m) in mounts.iter_mut().enumerate() {
        let options = m.options().clone().unwrap_or_default();
        let is_bind = m.typ().as_deref() == Some("bind")
            || options.iter().any(|o| o == "bind" || o == "rbind");
        let Some(source) = m.source().clone() else {
            continue;
        };
        if !is_bind || !source.is_absolute() {
            continue;
        }
        if HOST_ONLY_PREFIXES.iter().any(|p| source.starts_with(p)) {
            tracing::debug!(source = %source.display(), "host-only bind mount left to the guest");
            continue;
        }
        let meta = std::fs::metadata(&source).map_err(|e| {
            let what = format!(
                "bind mount source {} for {}",
                source.display(),
                m.destination().display()
            );
            ShimError::invalid(what, e)
        })?;
        let volumes = dir.join("volumes");
        std::fs::create_dir_all(&volumes)
            .map_err(|e| ShimError::io("cannot create volume directory", &volumes, e))?;
        let host_target = volumes.join(n.to_string());
        if meta.is_dir() {
            std::fs::create_dir_all(&host_target)
                .map_err(|e| ShimError::io("cannot create volume mount point", &host_target, e))?;
        } else {
            std::fs::write(&host_target, b"")
                .map_err(|e| ShimError::io("cannot create volume mount point", &host_target, e))?;
        }
        let recursive = options.iter().any(|o| o == "rbind");
        bind(&source, &host_target, recursive)?;
        done.mounted.push(host_target.clone());
        // A bind mount keeps its source mount's nosuid/nodev/noexec, which
        // a container under runc sees; the guest's bind of the share would
        // not, so the flags travel as mount options. Read before
        // `restrict` adds the host's own guard.
        let host_flags = statvfs(&host_target)
            .map_err(|e| ShimError::io("cannot read the mount flags of", &host_target, e.into()))?
            .flags();
        let read_only = options.iter().any(|o| o == "ro");
        restrict(&host_target, read_only)?;
        restrict(&view.join("volumes").join(n.to_string()), read_only)?;
        m.set_options(Some(with_source_flags(options, host_flags)));
        m.set_source(Some(PathBuf::from(format!("{guest_dir}/volumes/{n}"))));
    }
    spec.set_mounts(Some(mounts));
    Ok(())
}

/// `options` plus `nosuid`, `nodev` and `noexec` where the host mount of
/// a bind mount's source has them and the options do not say so already.
fn with_source_flags(mut options: Vec<String>, host: FsFlags) -> Vec<String> {
    for (flag, option) in [
        (FsFlags::ST_NOSUID, "nosuid"),
        (FsFlags::ST_NODEV, "nodev"),
        (FsFlags::ST_NOEXEC, "noexec"),
    ] {
        if host.contains(flag) && !options.iter().any(|o| o == option) {
            options.push(option.to_owned());
        }
    }
    options
}

fn bind(source: &Path, target: &Path, recursive: bool) -> Result<()> {
    let mut flags = MsFlags::MS_BIND;
    if recursive {
        flags |= MsFlags::MS_REC;
    }
    mount(Some(source), target, None::<&str>, flags, None::<&str>).map_err(|e| ShimError::Mount {
        op: "cannot bind-mount",
        source_desc: source.display().to_string(),
        target: target.to_owned(),
        error: e.into(),
    })
}

/// Remounts the bind mount at `target` nosuid and nodev (and read-only if
/// asked), keeping the flags it already has (a bind remount replaces them
/// all).
fn restrict(target: &Path, read_only: bool) -> Result<()> {
    let have = statvfs(target)
        .map_err(|e| ShimError::io("cannot read the mount flags of", target, e.into()))?
        .flags();
    let mut flags = MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
    for (have_flag, flag) in [
        (FsFlags::ST_RDONLY, MsFlags::MS_RDONLY),
        (FsFlags::ST_NOEXEC, MsFlags::MS_NOEXEC),
        (FsFlags::ST_NOATIME, MsFlags::MS_NOATIME),
        (FsFlags::ST_NODIRATIME, MsFlags::MS_NODIRATIME),
        (FsFlags::ST_RELATIME, MsFlags::MS_RELATIME),
    ] {
        if have.contains(have_flag) {
            flags |= flag;
        }
    }
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    mount(None::<&str>, target, None::<&str>, flags, None::<&str>).map_err(|e| ShimError::Mount {
        op: "cannot remount nosuid,nodev",
        source_desc: "bind mount".into(),
        target: target.to_owned(),
        error: e.into(),
    })
}

/// A rootfs mount's options plus `nosuid` and `nodev`: the host never
/// honours a setuid bit or a device node in what the guest writes.
fn with_host_guard(options: &[String]) -> Vec<String> {
    let mut options = options.to_vec();
    for guard in ["nosuid", "nodev"] {
        if !options.iter().any(|o| o == guard) {
            options.push(guard.to_owned());
        }
    }
    options
}

/// Mount points at or under `dir`, deepest first. A mountinfo that cannot be
/// read is an error, never "no mounts": the caller removes `dir` only when
/// nothing is mounted under it, and must not walk into a live volume.
pub fn mounts_under(dir: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read(MOUNTINFO).map_err(|e| ShimError::io("cannot read", MOUNTINFO, e))?;
    Ok(mountinfo::mount_points_under(&text, dir))
}

/// Unmounts everything at or under `dir` (stacked mounts included), then
/// removes `dir`. Refuses to remove a directory that still has a mount.
pub fn teardown(dir: &Path) -> Result<()> {
    for _round in 0..16 {
        let mounts = mounts_under(dir)?;
        if mounts.is_empty() {
            break;
        }
        for m in mounts {
            if let Err(e) = umount2(&m, MntFlags::MNT_DETACH) {
                tracing::warn!(mount = %m.display(), error = %e, "unmount failed");
            }
        }
    }
    let left = mounts_under(dir)?;
    if let Some(first) = left.first() {
        return Err(ShimError::Mount {
            op: "cannot unmount",
            source_desc: format!("{} mount(s)", left.len()),
            target: first.clone(),
            error: std::io::Error::from_raw_os_error(libc::EBUSY),
        });
    }
    match std::fs::remove_dir_all(dir) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(ShimError::io("cannot remove", dir, e)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn source_mount_flags_become_options() {
        use super::{with_source_flags, FsFlags};
        let opts = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            with_source_flags(
                opts(&["rbind", "rw"]),
                FsFlags::ST_NOSUID | FsFlags::ST_NODEV
            ),
            opts(&["rbind", "rw", "nosuid", "nodev"])
        );
        assert_eq!(
            with_source_flags(
                opts(&["rbind", "nosuid"]),
                FsFlags::ST_NOSUID | FsFlags::ST_NOEXEC
            ),
            opts(&["rbind", "nosuid", "noexec"])
        );
        assert_eq!(
            with_source_flags(opts(&["rbind", "ro"]), FsFlags::ST_RDONLY),
            opts(&["rbind", "ro"])
        );
    }

    use super::*;
    use oci_spec::runtime::{MountBuilder, RootBuilder, SpecBuilder};

    fn spec_with(root: &Path, volume: &Path, file: &Path) -> Spec {
        SpecBuilder::default()
            .root(
                RootBuilder::default()
                    .path(root)
                    .readonly(false)
                    .build()
                    .unwrap(),
            )
            .mounts(vec![
                MountBuilder::default()
                    .destination("/proc")
                    .typ("proc")
                    .source("proc")
                    .build()
                    .unwrap(),
                MountBuilder::default()
                    .destination("/data")
                    .typ("bind")
                    .source(volume)
                    .options(vec!["rbind".to_string(), "ro".to_string()])
                    .build()
                    .unwrap(),
                MountBuilder::default()
                    .destination("/etc/hostname")
                    .typ("bind")
                    .source(file)
                    .options(vec!["rbind".to_string(), "rw".to_string()])
                    .build()
                    .unwrap(),
                MountBuilder::default()
                    .destination("/dev/shm")
                    .typ("bind")
                    .source("/dev/shm")
                    .options(vec!["rbind".to_string()])
                    .build()
                    .unwrap(),
            ])
            .build()
            .unwrap()
    }

    /// Real mounts: needs root.
    #[test]
    #[ignore = "needs root for mount(2)"]
    fn bundle_rootfs_and_volumes_reach_the_share_and_go_away() {
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
        std::fs::write(bundle.join("rootfs/bin/hello"), "hi").unwrap();
        let volume = tmp.path().join("vol");
        std::fs::create_dir_all(&volume).unwrap();
        std::fs::write(volume.join("data.txt"), "precious").unwrap();
        let file = tmp.path().join("hostname");
        std::fs::write(&file, "pod\n").unwrap();
        let private = tmp.path().join("mounts");
        let shared = tmp.path().join("shared");
        prepare_share(&private, &shared).unwrap();
        prepare_share(&private, &shared).expect("a second call leaves it as it is");

        let mut spec = spec_with(Path::new("rootfs"), &volume, &file);
        let views = ShareViews {
            private: &private,
            guest: &shared,
        };
        let mounts = prepare(views, "/g/shared", "c1", &bundle, &[], &mut spec).unwrap();
        assert_eq!(mounts.mounted.len(), 3);
        // What the shim mounted in its view shows in the guest's.
        assert_eq!(
            std::fs::read_to_string(shared.join("c1/rootfs/bin/hello")).unwrap(),
            "hi"
        );
        assert_eq!(
            std::fs::read_to_string(shared.join("c1/volumes/1/data.txt")).unwrap(),
            "precious"
        );
        assert_eq!(
            std::fs::read_to_string(shared.join("c1/volumes/2")).unwrap(),
            "pod\n"
        );
        // ro honoured on the host side already.
        let err = std::fs::write(shared.join("c1/volumes/1/new"), "x").unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EROFS));
        // The guest cannot touch what the shim creates or mounts on …
        let erofs = |r: std::io::Result<()>| r.unwrap_err().raw_os_error();
        assert_eq!(
            erofs(std::fs::create_dir(shared.join("c2"))),
            Some(libc::EROFS)
        );
        assert_eq!(
            erofs(std::fs::rename(shared.join("c1"), shared.join("c1.old"))),
            Some(libc::EROFS)
        );
        assert_eq!(
            erofs(std::os::unix::fs::symlink("/", shared.join("c1/volumes/9"))),
            Some(libc::EROFS)
        );
        // … but writes inside a container's rootfs, which the host mounts
        // nosuid and nodev.
        std::fs::write(shared.join("c1/rootfs/bin/new"), "ok").unwrap();
        let flags = statvfs(&shared.join("c1/rootfs")).unwrap().flags();
        assert!(
            flags.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV),
            "{flags:?}"
        );
        for view in [&private, &shared] {
            let flags = statvfs(&view.join("c1/volumes/1")).unwrap().flags();
            assert!(flags.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV | FsFlags::ST_RDONLY));
            let flags = statvfs(&view.join("c1/volumes/2")).unwrap().flags();
            assert!(flags.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV));
            assert!(!flags.contains(FsFlags::ST_RDONLY));
        }
        // The spec now names guest paths; /proc and /dev/shm are untouched.
        assert_eq!(
            spec.root().as_ref().unwrap().path(),
            Path::new("/g/shared/c1/rootfs")
        );
        let m = spec.mounts().as_ref().unwrap();
        assert_eq!(m[0].source().as_deref(), Some(Path::new("proc")));
        assert_eq!(
            m[1].source().as_deref(),
            Some(Path::new("/g/shared/c1/volumes/1"))
        );
        assert_eq!(
            m[2].source().as_deref(),
            Some(Path::new("/g/shared/c1/volumes/2"))
        );
        assert_eq!(m[3].source().as_deref(), Some(Path::new("/dev/shm")));

        teardown(&mounts.dir).unwrap();
        assert!(!mounts.dir.exists());
        assert!(!shared.join("c1").exists());
        // Only the share's own two views are left, and then nothing.
        let mut left = mounts_under(tmp.path()).unwrap();
        left.sort();
        assert_eq!(left, [private.clone(), shared.clone()]);
        teardown(&private).unwrap();
        teardown(&shared).unwrap();
        assert!(mounts_under(tmp.path()).unwrap().is_empty());
        // The volume's content survived the removal of the mount point.
        assert_eq!(
            std::fs::read_to_string(volume.join("data.txt")).unwrap(),
            "precious"
        );
    }

    /// A share's two views under `tmp`, torn down on drop.
    struct TestShare {
        private: PathBuf,
        guest: PathBuf,
    }

    impl TestShare {
        fn new(tmp: &Path) -> Self {
            let share = TestShare {
                private: tmp.join("mounts"),
                guest: tmp.join("shared"),
            };
            prepare_share(&share.private, &share.guest).unwrap();
            share
        }

        fn views(&self) -> ShareViews<'_> {
            ShareViews {
                private: &self.private,
                guest: &self.guest,
            }
        }
    }

    impl Drop for TestShare {
        fn drop(&mut self) {
            let _ = teardown(&self.guest);
            let _ = teardown(&self.private);
        }
    }

    #[test]
    #[ignore = "needs root for mount(2)"]
    fn missing_volume_source_fails_and_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let bundle = tmp.path().join("bundle");
        std::fs::create_dir_all(bundle.join("rootfs")).unwrap();
        let share = TestShare::new(tmp.path());
        let shared = share.guest.clone();
        let mut spec = spec_with(
            Path::new("rootfs"),
            &tmp.path().join("nope"),
            &tmp.path().join("nope2"),
        );
        let err = prepare(share.views(), "/g", "c1", &bundle, &[], &mut spec).unwrap_err();
        assert!(
            err.to_string().contains("bind mount source") && err.to_string().contains("/data"),
            "{err}"
        );
        assert!(!shared.join("c1").exists());
        assert_eq!(
            mounts_under(&shared).unwrap(),
            std::slice::from_ref(&shared)
        );
    }

    #[test]
    #[ignore = "needs root for mount(2)"]
    fn missing_rootfs_is_invalid_argument() {
        let tmp = tempfile::tempdir().unwrap();
        let share = TestShare::new(tmp.path());
        let shared = share.guest.clone();
        let mut spec = SpecBuilder::default()
            .root(RootBuilder::default().path("rootfs").build().unwrap())
            .mounts(vec![])
            .build()
            .unwrap();
        let err = prepare(share.views(), "/g", "c1", tmp.path(), &[], &mut spec).unwrap_err();
        assert!(matches!(err, ShimError::InvalidArgument(_)), "{err}");
        assert!(!shared.join("c1").exists());
    }

    #[test]
    #[ignore = "needs root for mount(2)"]
    fn overlay_snapshot_mounts_are_mounted() {
        let tmp = tempfile::tempdir().unwrap();
        for d in ["lower", "upper", "work"] {
            std::fs::create_dir_all(tmp.path().join(d)).unwrap();
        }
        std::fs::write(tmp.path().join("lower/base"), "layer").unwrap();
        let share = TestShare::new(tmp.path());
        let shared = share.guest.clone();
        let rootfs = [MountSpec {
            kind: "overlay".into(),
            source: "overlay".into(),
            options: vec![
                format!("workdir={}", tmp.path().join("work").display()),
                format!("upperdir={}", tmp.path().join("upper").display()),
                format!("lowerdir={}", tmp.path().join("lower").display()),
            ],
        }];
        let mut spec = SpecBuilder::default().build().unwrap();
        let mounts = prepare(share.views(), "/g", "c2", tmp.path(), &rootfs, &mut spec).unwrap();
        assert_eq!(
            std::fs::read_to_string(shared.join("c2/rootfs/base")).unwrap(),
            "layer"
        );
        // Both views of the overlay: nosuid, nodev, writable.
        for view in [&share.private, &shared] {
            let flags = statvfs(&view.join("c2/rootfs")).unwrap().flags();
            assert!(
                flags.contains(FsFlags::ST_NOSUID | FsFlags::ST_NODEV),
                "{flags:?}"
            );
            assert!(!flags.contains(FsFlags::ST_RDONLY));
        }
        teardown(&mounts.dir).unwrap();
        assert!(!shared.join("c2").exists());
    }
}
