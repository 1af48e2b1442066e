//! Guest-mode start-up: what PID 1 must do before it can serve.
//!
//! Order matters: first the root moves off the initramfs onto a tmpfs
//! ([`switch_root`]), then `/dev` (so the console can be opened and fds 0-2
//! exist before anything else takes those numbers), then `/proc` (the
//! kernel command line, with the log level, is read before logging starts),
//! then the rest once logging works.
//!
//! Every step is best effort: a failure is reported and start-up goes on,
//! because an agent that answers with a half-set-up guest is easier to debug
//! than a VM that rebooted.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, MsFlags};

#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("Failed to create {path}")]
    Mkdir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount {fstype} on {target} failed")]
    Mount {
        fstype: &'static str,
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to open {path} for fd {fd}")]
    Console {
        path: &'static str,
        fd: i32,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to create symlink {link} -> {target}")]
    Symlink {
        link: &'static str,
        target: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to read {path}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to move the root off the initramfs: {step} {path}")]
    SwitchRoot {
        step: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Failed to enable cgroup controller {controller}")]
    CgroupController {
        controller: String,
        #[source]
        source: std::io::Error,
    },
}

/// One filesystem PID 1 mounts.
struct PseudoFs {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

const DEV: PseudoFs = PseudoFs {
    fstype: "devtmpfs",
    target: "/dev",
    flags: MsFlags::MS_NOSUID,
    data: Some("mode=0755"),
};

const PROC: PseudoFs = PseudoFs {
    fstype: "proc",
    target: "/proc",
    flags: NOSUID_NODEV_NOEXEC,
    data: None,
};

/// Mounted after logging is up, in this order.
const LATER: &[PseudoFs] = &[
    PseudoFs {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    PseudoFs {
        fstype: "devpts",
        target: "/dev/pts",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC),
        data: Some("newinstance,ptmxmode=0666,mode=0620,gid=5"),
    },
    PseudoFs {
        fstype: "tmpfs",
        target: "/dev/shm",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    PseudoFs {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
    PseudoFs {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    PseudoFs {
        fstype: "cgroup2",
        target: "/sys/fs/cgroup",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
];

/// Symlinks in /dev that programs expect.
const DEV_LINKS: &[(&str, &str)] = &[
    ("/dev/ptmx", "pts/ptmx"),
    ("/dev/fd", "/proc/self/fd"),
    ("/dev/stdin", "/proc/self/fd/0"),
    ("/dev/stdout", "/proc/self/fd/1"),
    ("/dev/stderr", "/proc/self/fd/2"),
];

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CONSOLE: &str = "/dev/console";
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Where the new root is mounted while the initramfs is copied into it.
pub const NEW_ROOT: &str = "/newroot";

/// Step 0, before anything else: moves `/` off the initramfs onto a tmpfs,
/// like `switch_root`. The initramfs is the kernel's `rootfs`, the root of
/// the mount tree, which `pivot_root(2)` refuses to move (EINVAL: the root
/// must have a parent mount); libcontainer `pivot_root`s into every
/// container with a mount namespace, so without this step container
/// creation fails. A tmpfs moved over `/` has `rootfs` as its parent, as on
/// any system booted through an initramfs, and `pivot_root` works.
///
/// Steps: mount a tmpfs on [`NEW_ROOT`], copy the initramfs into it (the
/// agent as `/init`, `/dev/console` and empty directories), delete the
/// initramfs' files (their memory is freed; only the running agent's inode
/// lives on until the agent exits, `/proc/self/exe` still executes it),
/// `MS_MOVE` the tmpfs onto `/`, `chroot` into it. Runs only when `/` is an
/// in-memory filesystem (ramfs or tmpfs); returns whether it switched.
/// A failure before the deletion leaves the initramfs as it was.
pub fn switch_root() -> Result<bool, InitError> {
    use nix::sys::statfs::{statfs, FsType, TMPFS_MAGIC};
    // linux/magic.h; neither libc nor nix names it.
    const RAMFS_MAGIC: FsType = FsType(0x8584_58f6);
    let (step, errno) = (step_io, step_errno);
    let root = Path::new("/");
    let new_root = Path::new(NEW_ROOT);
    let fs_type = statfs(root)
        .map_err(errno("statfs", root))?
        .filesystem_type();
    if fs_type != RAMFS_MAGIC && fs_type != TMPFS_MAGIC {
        return Ok(false);
    }
    let root_dev = std::fs::symlink_metadata(root)
        .map_err(step("stat", root))?
        .dev();
    std::fs::create_dir_all(new_root).map_err(step("mkdir", new_root))?;
    mount(
        Some("tmpfs"),
        new_root,
        Some("tmpfs"),
        MsFlags::empty(),
        Some("mode=0755"),
    )
    .map_err(errno("mount tmpfs on", new_root))?;
    if let Err(e) = copy_tree(root, new_root, root_dev) {
        let _ = nix::mount::umount(new_root);
        return Err(e);
    }
    std::env::set_current_dir(new_root).map_err(step("chdir", new_root))?;
    // Best effort: what cannot be deleted only costs memory.
    remove_tree(root, root_dev);
    mount(
        Some("."),
        root,
        None::<&str>,
        MsFlags::MS_MOVE,
        None::<&str>,
    )
    .map_err(errno("move the new root onto", root))?;
    nix::unistd::chroot(".").map_err(errno("chroot", new_root))?;
    std::env::set_current_dir(root).map_err(step("chdir", root))?;
    Ok(true)
}

fn step_io(step: &'static str, path: &Path) -> impl Fn(std::io::Error) -> InitError {
    let path = path.to_path_buf();
    move |source| InitError::SwitchRoot {
        step,
        path: path.clone(),
        source,
    }
}

fn step_errno(step: &'static str, path: &Path) -> impl Fn(Errno) -> InitError {
    let io = step_io(step, path);
    move |e: Errno| io(e.into())
}

/// Copies directories, files, symlinks and device nodes of `from` (only
/// entries on device `dev`, so no mount point is crossed) into `to`.
fn copy_tree(from: &Path, to: &Path, dev: u64) -> Result<(), InitError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let err = step_io;
    for entry in std::fs::read_dir(from).map_err(err("read", from))? {
        let entry = entry.map_err(err("read", from))?;
        let src = entry.path();
        let dst = to.join(entry.file_name());
        let meta = std::fs::symlink_metadata(&src).map_err(err("stat", &src))?;
        if meta.dev() != dev {
            continue;
        }
        let ft = meta.file_type();
        let mode = meta.mode() & 0o7777;
        if ft.is_dir() {
            std::fs::create_dir(&dst).map_err(err("mkdir", &dst))?;
            copy_tree(&src, &dst, dev)?;
            std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(mode))
                .map_err(err("chmod", &dst))?;
        } else if ft.is_file() {
            std::fs::copy(&src, &dst).map_err(err("copy", &src))?;
        } else if ft.is_symlink() {
            let target = std::fs::read_link(&src).map_err(err("readlink", &src))?;
            std::os::unix::fs::symlink(target, &dst).map_err(err("symlink", &dst))?;
        } else if ft.is_char_device() || ft.is_block_device() {
            let kind = if ft.is_char_device() {
                libc::S_IFCHR
            } else {
                libc::S_IFBLK
            };
            let path = std::ffi::CString::new(dst.as_os_str().as_encoded_bytes())
                .map_err(|e| err("mknod", &dst)(std::io::Error::other(e)))?;
            // SAFETY: a valid NUL-terminated path; mknod only creates a node.
            if unsafe { libc::mknod(path.as_ptr(), kind | mode, meta.rdev()) } < 0 {
                return Err(err("mknod", &dst)(std::io::Error::last_os_error()));
            }
        }
        // FIFOs and sockets: none in the initramfs, nothing to carry over.
    }
    Ok(())
}

/// Deletes everything under `dir` on device `dev`, leaving mount points
/// (and the directories that hold them) in place.
fn remove_tree(dir: &Path, dev: u64) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = std::fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_tree(&path, dev);
            let _ = std::fs::remove_dir(&path);
        } else {
            let _ = std::fs::remove_file(&path);
        }
    }
}

/// Step 1, before anything opens a file: `/dev` and fds 0, 1, 2 on the
/// console (the kernel leaves them closed when the initramfs has no
/// /dev/console). Also sets umask and PATH while still single-threaded.
pub fn early() -> Vec<InitError> {
    let mut errors = Vec::new();
    // SAFETY: umask(2) cannot fail.
    unsafe { libc::umask(0o022) };
    if std::env::var_os("PATH").is_none() {
        std::env::set_var("PATH", DEFAULT_PATH);
    }
    if let Err(e) = mount_pseudo(&DEV) {
        errors.push(e);
    }
    for fd in 0..=2 {
        if let Err(e) = ensure_fd_open(fd) {
            errors.push(e);
        }
    }
    if let Err(e) = mount_pseudo(&PROC) {
        errors.push(e);
    }
    errors
}

/// Step 2, with logging up: the other pseudo filesystems, /dev links and
/// cgroup controllers.
pub fn filesystems() -> Vec<InitError> {
    let mut errors: Vec<InitError> = LATER
        .iter()
        .filter_map(|fs| mount_pseudo(fs).err())
        .collect();
    for (link, target) in DEV_LINKS {
        if let Err(e) = dev_link(link, target) {
            errors.push(e);
        }
    }
    errors.extend(enable_cgroup_controllers(Path::new(CGROUP_ROOT)));
    errors
}

fn mount_pseudo(fs: &PseudoFs) -> Result<(), InitError> {
    std::fs::create_dir_all(fs.target).map_err(|source| InitError::Mkdir {
        path: fs.target.into(),
        source,
    })?;
    match mount(
        Some(fs.fstype),
        fs.target,
        Some(fs.fstype),
        fs.flags,
        fs.data,
    ) {
        // Already mounted (e.g. devtmpfs with CONFIG_DEVTMPFS_MOUNT).
        Ok(()) | Err(Errno::EBUSY) => Ok(()),
        Err(errno) => Err(InitError::Mount {
            fstype: fs.fstype,
            target: fs.target,
            source: errno.into(),
        }),
    }
}

/// Opens the console on `fd` if it is closed, creating the /dev/console
/// node if devtmpfs is missing; failing that /dev/null, failing that `/`
/// (a descriptor that refuses writes), so that fds 0-2 are never handed
/// out to sockets or files that log lines would then corrupt.
fn ensure_fd_open(fd: i32) -> Result<(), InitError> {
    // SAFETY: F_GETFD only queries the descriptor table.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0 {
        return Ok(());
    }
    if !Path::new(CONSOLE).exists() {
        // SAFETY: a valid NUL-terminated path; mknod only creates a node.
        unsafe {
            libc::mknod(
                c"/dev/console".as_ptr(),
                libc::S_IFCHR | 0o600,
                libc::makedev(5, 1),
            )
        };
    }
    let mut first_error = None;
    for (path, flags) in [
        (c"/dev/console", libc::O_RDWR | libc::O_NOCTTY),
        (c"/dev/null", libc::O_RDWR),
        (c"/", libc::O_RDONLY | libc::O_DIRECTORY),
    ] {
        // SAFETY: path is a valid NUL-terminated string; the result is checked.
        let opened = unsafe { libc::open(path.as_ptr(), flags) };
        if opened < 0 {
            first_error.get_or_insert(std::io::Error::last_os_error());
            continue;
        }
        if opened != fd {
            // SAFETY: both are valid descriptors; dup2 fills the closed fd.
            let r = unsafe { libc::dup2(opened, fd) };
            let err = std::io::Error::last_os_error();
            // SAFETY: opened is ours and no longer needed.
            unsafe { libc::close(opened) };
            if r < 0 {
                first_error.get_or_insert(err);
                continue;
            }
        }
        if path != c"/dev/console" {
            // Worth reporting: log lines written to this fd are lost.
            return Err(InitError::Console {
                path: CONSOLE,
                fd,
                source: first_error.unwrap_or_else(|| std::io::Error::from(Errno::ENOENT)),
            });
        }
        return Ok(());
    }
    Err(InitError::Console {
        path: CONSOLE,
        fd,
        source: first_error.unwrap_or_else(|| std::io::Error::from(Errno::ENOENT)),
    })
}

fn dev_link(link: &'static str, target: &'static str) -> Result<(), InitError> {
    if let Ok(existing) = std::fs::read_link(link) {
        if existing == Path::new(target) {
            return Ok(());
        }
    }
    // devtmpfs has a /dev/ptmx node of the initial devpts instance; the
    // symlink points at the newinstance mount instead.
    let _ = std::fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).map_err(|source| InitError::Symlink {
        link,
        target,
        source,
    })
}

/// Enables every available controller for child cgroups, one at a time so
/// one refusal does not block the others.
pub fn enable_cgroup_controllers(root: &Path) -> Vec<InitError> {
    let available = match std::fs::read_to_string(root.join("cgroup.controllers")) {
        Ok(text) => text,
        Err(source) => {
            return vec![InitError::Read {
                path: "/sys/fs/cgroup/cgroup.controllers",
                source,
            }]
        }
    };
    available
        .split_whitespace()
        .filter_map(|c| {
            std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}"))
                .err()
                .map(|source| InitError::CgroupController {
                    controller: c.to_string(),
                    source,
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enables_each_listed_controller() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), "cpu memory pids\n").unwrap();
        // A plain file keeps only the last write, which is enough to see
        // that every controller was written separately and in order.
        assert!(enable_cgroup_controllers(dir.path()).is_empty());
        assert_eq!(
            std::fs::read_to_string(dir.path().join("cgroup.subtree_control")).unwrap(),
            "+pids"
        );
        let e = enable_cgroup_controllers(Path::new("/nonexistent"));
        assert_eq!(e.len(), 1);
        assert!(e[0].to_string().contains("cgroup.controllers"));
    }

    #[test]
    fn copies_then_removes_a_tree() {
        use std::os::unix::fs::PermissionsExt;
        let from = tempfile::tempdir().unwrap();
        let to = tempfile::tempdir().unwrap();
        let f = from.path();
        std::fs::create_dir_all(f.join("dev")).unwrap();
        std::fs::create_dir(f.join("tmp")).unwrap();
        std::fs::set_permissions(f.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
        std::fs::write(f.join("init"), b"agent").unwrap();
        std::fs::set_permissions(f.join("init"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink("init", f.join("link")).unwrap();
        let dev = std::fs::metadata(f).unwrap().dev();

        copy_tree(f, to.path(), dev).unwrap();
        let t = to.path();
        assert_eq!(std::fs::read(t.join("init")).unwrap(), b"agent");
        let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
        assert_eq!(mode(&t.join("init")), 0o755);
        assert_eq!(mode(&t.join("tmp")), 0o1777);
        assert!(t.join("dev").is_dir());
        assert_eq!(
            std::fs::read_link(t.join("link")).unwrap(),
            Path::new("init")
        );

        // Another device (a mount point) is neither copied nor removed.
        assert!(copy_tree(f, t, dev + 1).is_ok());
        remove_tree(f, dev + 1);
        assert!(f.join("init").exists());
        remove_tree(f, dev);
        assert_eq!(std::fs::read_dir(f).unwrap().count(), 0);
    }

    #[test]
    fn open_fds_are_left_alone() {
        ensure_fd_open(2).unwrap();
    }
}
