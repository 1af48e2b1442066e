//! Guest-mode start-up: what PID 1 must do before it can serve.
//!
//! Order matters: `/dev` first (so the console can be opened and fds 0-2
//! exist before anything else takes those numbers), then `/proc` (the
//! kernel command line, with the log level, is read before logging starts),
//! then the rest once logging works.
//!
//! Every step is best effort: a failure is reported and start-up goes on,
//! because an agent that answers with a half-set-up guest is easier to debug
//! than a VM that rebooted.

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
    fn open_fds_are_left_alone() {
        ensure_fd_open(2).unwrap();
    }
}
