//! The jail: what `boxlite-vmm` gives up before any guest code runs,
//! point by point what Firecracker's jailer does (see `docs/security.md`).
//!
//! In `main`, before anything is opened ([`isolate_process`]):
//! 1. enter the cgroup the runtime names (`cgroup`), so the VMM and its
//!    waiting parent are both accounted there;
//! 2. fork into a new pid namespace ([`pidns`]): the VMM is pid 1 there and
//!    sees no other process; the parent only waits.
//!
//! Then on the main thread, after the VM is built (every file, device and
//! socket is open) and before any other thread exists ([`apply`]):
//! 3. the landlock ruleset is prepared (it opens its paths now);
//! 4. new mount, ipc, uts and network namespaces and `pivot_root` into an
//!    empty read-only tmpfs ([`root`]): everything the VMM uses is open,
//!    bound or connected by now;
//! 5. rlimits: `RLIMIT_NOFILE` capped at [`NOFILE_LIMIT`], `RLIMIT_CORE` 0
//!    (a core dump would hold guest memory), `RLIMIT_FSIZE` at the largest
//!    file the VMM may write (its writable disks);
//! 6. an unprivileged uid/gid, no supplementary groups, no capabilities in
//!    any set ([`privileges`]);
//! 7. `no_new_privs` and the landlock ruleset ([`landlock`]): read-only boot
//!    files and disks, read-write writable disks; no TCP, no abstract unix
//!    sockets, no signals out of the domain (kernel permitting). Threads
//!    inherit it;
//! 8. then each thread loads its kind's seccomp filter: vCPU threads in
//!    `threads::spawn_thread`, the event loop in `builder::run_vm`.
//!
//! `"jail": false` in the config or `--no-jail` skips all of it and logs a
//! loud warning.

pub mod cgroup;
pub mod escape_probe;
pub mod landlock;
pub mod pidns;
pub mod privileges;
pub mod root;

use std::path::{Path, PathBuf};

use crate::config::JailUser;

use crate::config::{DeviceConfig, VmConfig};

/// `RLIMIT_NOFILE` in the jail: the vsock muxer's 1024 connections plus
/// devices, sockets and eventfds.
pub const NOFILE_LIMIT: u64 = 4096;

/// `RLIMIT_FSIZE` share of a `console_log` file (tests and debugging; the
/// runtime passes a pipe): past it console writes fail (SIGXFSZ is ignored).
pub const CONSOLE_FILE_LIMIT: u64 = 64 << 20;

/// Errors of setting up the jail. Every one is fatal.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    #[error("Failed to enter cgroup {0}")]
    Cgroup(PathBuf, #[source] std::io::Error),
    #[error("Failed to set {0}")]
    Rlimit(&'static str, #[source] std::io::Error),
    #[error("Failed to set no_new_privs")]
    NoNewPrivs(#[source] std::io::Error),
    #[error("Landlock path {0} cannot be opened")]
    LandlockPath(PathBuf, #[source] std::io::Error),
    #[error("Failed to build or apply the landlock ruleset")]
    Landlock(#[source] ::landlock::RulesetError),
    #[error("Landlock is not enforced by this kernel (needs Linux 5.13 with CONFIG_SECURITY_LANDLOCK and landlock in lsm=); run with the jail off only for debugging")]
    LandlockNotEnforced,
    #[error("Failed to load a seccomp filter")]
    Seccomp(#[from] crate::seccomp::SeccompError),
    #[error("Failed to spawn a jailed thread")]
    Thread(#[source] std::io::Error),
    #[error("Failed to enter a pid namespace of its own: {0}")]
    PidNamespace(&'static str, #[source] std::io::Error),
    #[error("The jailed VMM must be pid 1 of its own pid namespace (boxlite-vmm's main forks into one); it is pid {0}")]
    NotNamespaceInit(u32),
    #[error("The jail's root is mounted over sandbox_dir, which the config does not set")]
    NoSandboxDir,
    #[error("Failed to set up the jail's root: {0}")]
    Root(String, #[source] std::io::Error),
    #[error("Failed to drop privileges: {0}")]
    Privileges(&'static str, #[source] std::io::Error),
    #[error("jail_user {0}:{1} is root; the jail needs an unprivileged uid and gid")]
    RootUser(u32, u32),
}

/// What the jail allows; built from the VM config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JailPolicy {
    /// Files and directories the VMM may only read.
    pub read_only: Vec<PathBuf>,
    /// Files and directories the VMM may read, write, create and remove in.
    pub read_write: Vec<PathBuf>,
    /// cgroup v2 directory to enter.
    pub cgroup: Option<PathBuf>,
    /// Where the jail's root tmpfs is mounted (the sandbox directory).
    pub mount_point: Option<PathBuf>,
    /// `RLIMIT_FSIZE`: the largest regular file the VMM may write.
    pub max_file_size: u64,
    /// The uid/gid to become (None: [`privileges::DEFAULT_USER`]).
    pub user: Option<JailUser>,
}

fn parent(p: &Path) -> Option<PathBuf> {
    match p.parent() {
        Some(d) if d.as_os_str().is_empty() => Some(PathBuf::from(".")),
        Some(d) => Some(d.to_path_buf()),
        None => None,
    }
}

fn push_unique(v: &mut Vec<PathBuf>, p: PathBuf) {
    if !v.contains(&p) {
        v.push(p);
    }
}

impl JailPolicy {
    /// The policy for `cfg`: read-only boot files and read-only disks;
    /// read-write sandbox dir, the directories of the sockets the VMM owns
    /// (it removes them at exit), the console log and writable disks.
    pub fn from_config(cfg: &VmConfig) -> Self {
        let mut p = JailPolicy {
            cgroup: cfg.cgroup.clone(),
            mount_point: cfg.sandbox_dir.clone(),
            user: cfg.jail_user,
            ..Default::default()
        };
        if cfg.console_log.is_some() {
            p.max_file_size = CONSOLE_FILE_LIMIT;
        }
        for f in [&cfg.kernel, &cfg.initramfs].into_iter().flatten() {
            push_unique(&mut p.read_only, f.clone());
        }
        if let Some(raw) = &cfg.raw_image {
            push_unique(&mut p.read_only, raw.path.clone());
        }
        if let Some(d) = &cfg.sandbox_dir {
            push_unique(&mut p.read_write, d.clone());
        }
        if let Some(c) = &cfg.console_log {
            push_unique(&mut p.read_write, c.clone());
        }
        if let Some(dir) = cfg.control_socket.as_deref().and_then(parent) {
            push_unique(&mut p.read_write, dir);
        }
        if let Some(dir) = &cfg.snapshot_dir {
            // The `snapshot` op writes a memory file of 4 KiB plus guest
            // memory, and a state file of at most the body's limit.
            push_unique(&mut p.read_write, dir.clone());
            let memory_file = crate::snapshot::memory_file::HEADER_PAGE + cfg.memory_bytes();
            let state_file = crate::snapshot::state_file::MAX_BODY_LEN + 4096;
            p.max_file_size = p.max_file_size.max(memory_file).max(state_file);
        }
        for d in &cfg.devices {
            match d {
                DeviceConfig::Vsock(v) => {
                    if let Some(dir) = parent(&v.uds_path) {
                        push_unique(&mut p.read_write, dir);
                    }
                }
                DeviceConfig::Block(b) if b.read_only => {
                    push_unique(&mut p.read_only, b.path.clone())
                }
                DeviceConfig::Block(b) => {
                    push_unique(&mut p.read_write, b.path.clone());
                    let len = std::fs::metadata(&b.path).map(|m| m.len()).unwrap_or(0);
                    p.max_file_size = p.max_file_size.max(len);
                }
                // Opened or connected before the jail.
                DeviceConfig::Rng(_) | DeviceConfig::Net(_) | DeviceConfig::Fs(_) => {}
            }
        }
        p
    }
}

/// Steps 1–2 (see the module docs), in `main` before anything is opened:
/// the cgroup, then the pid namespace. Returns in the VMM, with its tie to
/// the parent for [`apply`]; the process that called it stays behind
/// waiting and never returns.
pub fn isolate_process(cfg: &VmConfig) -> Result<pidns::ParentLink, JailError> {
    if let Some(cg) = &cfg.cgroup {
        cgroup::enter(cg)?;
    }
    pidns::enter()
}

/// Steps 3–7 on the calling thread (inherited by the threads it spawns),
/// and seccomp on for every thread spawned from now on. `parent` is
/// re-armed after the uid change (which clears the parent-death signal).
pub fn apply(policy: &JailPolicy, parent: Option<&pidns::ParentLink>) -> Result<(), JailError> {
    let pid = std::process::id();
    // The seccomp profiles allow tgkill only to tgid 1.
    let (Some(parent), 1) = (parent, pid) else {
        return Err(JailError::NotNamespaceInit(pid));
    };
    let mount_point = policy
        .mount_point
        .as_deref()
        .ok_or(JailError::NoSandboxDir)?;
    let ruleset = landlock::prepare(policy)?;
    root::pivot(mount_point)?;
    set_rlimits(policy.max_file_size)?;
    let user = policy.user.unwrap_or_else(|| {
        tracing::info!(
            uid = privileges::DEFAULT_USER.uid,
            gid = privileges::DEFAULT_USER.gid,
            "no jail_user in the config; running as nobody"
        );
        privileges::DEFAULT_USER
    });
    privileges::become_user(user)?;
    parent.rearm()?;
    set_no_new_privs()?;
    landlock::enforce(ruleset)?;
    crate::threads::enable_seccomp();
    tracing::info!(
        uid = user.uid,
        gid = user.gid,
        root = %mount_point.display(),
        max_file_size = policy.max_file_size,
        "jail applied: pid/mount/ipc/uts/net namespaces, pivot_root, rlimits, no capabilities, no_new_privs, landlock; seccomp per thread next"
    );
    Ok(())
}

pub(crate) fn setrlimit(
    name: &'static str,
    res: libc::__rlimit_resource_t,
    soft: u64,
    hard: u64,
) -> Result<(), JailError> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit that outlives the call.
    if unsafe { libc::setrlimit(res, &lim) } != 0 {
        return Err(JailError::Rlimit(name, std::io::Error::last_os_error()));
    }
    Ok(())
}

fn getrlimit(res: libc::__rlimit_resource_t) -> libc::rlimit {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `lim` is a valid, writable rlimit.
    unsafe { libc::getrlimit(res, &mut lim) };
    lim
}

/// `RLIMIT_NOFILE` = min(hard, [`NOFILE_LIMIT`]) for both soft and hard;
/// `RLIMIT_CORE` = 0; `RLIMIT_FSIZE` = `max_file_size`, with SIGXFSZ
/// ignored so a write past it fails instead of killing the VM.
pub fn set_rlimits(max_file_size: u64) -> Result<(), JailError> {
    let hard = getrlimit(libc::RLIMIT_NOFILE).rlim_max;
    let n = hard.min(NOFILE_LIMIT);
    if n < NOFILE_LIMIT {
        tracing::warn!(
            hard,
            want = NOFILE_LIMIT,
            "RLIMIT_NOFILE hard limit is low; vsock connections may be refused"
        );
    }
    setrlimit("RLIMIT_NOFILE", libc::RLIMIT_NOFILE, n, n)?;
    setrlimit("RLIMIT_CORE", libc::RLIMIT_CORE, 0, 0)?;
    // SAFETY: setting a signal's disposition to ignore.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    setrlimit(
        "RLIMIT_FSIZE",
        libc::RLIMIT_FSIZE,
        max_file_size,
        max_file_size,
    )?;
    Ok(())
}

/// `prctl(PR_SET_NO_NEW_PRIVS, 1)`: no setuid/file-capability gain on exec.
pub fn set_no_new_privs() -> Result<(), JailError> {
    // SAFETY: prctl with integer arguments only.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(JailError::NoNewPrivs(std::io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BlockConfig, FsConfig, RawImageConfig, VsockConfig};

    #[test]
    fn policy_from_config() {
        let cfg = VmConfig {
            kernel: Some("/a/vmlinux".into()),
            initramfs: Some("/a/initramfs".into()),
            console_log: Some("/run/s/console.log".into()),
            control_socket: Some("/run/s/control.sock".into()),
            sandbox_dir: Some("/run/s".into()),
            cgroup: Some("/sys/fs/cgroup/boxlite/s".into()),
            devices: vec![
                DeviceConfig::Vsock(VsockConfig {
                    guest_cid: 3,
                    uds_path: "/run/s/vsock.sock".into(),
                    host_ports: Vec::new(),
                }),
                DeviceConfig::Block(BlockConfig {
                    path: "/img/ro.img".into(),
                    read_only: true,
                    id: String::new(),
                }),
                DeviceConfig::Block(BlockConfig {
                    path: "/img/rw.img".into(),
                    read_only: false,
                    id: String::new(),
                }),
                DeviceConfig::Fs(FsConfig {
                    tag: "share".into(),
                    socket_path: "/run/s/fs/share.sock".into(),
                }),
            ],
            ..VmConfig::default()
        };
        let p = JailPolicy::from_config(&cfg);
        let v = |s: &[&str]| s.iter().map(PathBuf::from).collect::<Vec<_>>();
        assert_eq!(
            p.read_only,
            v(&["/a/vmlinux", "/a/initramfs", "/img/ro.img"])
        );
        assert_eq!(
            p.read_write,
            v(&["/run/s", "/run/s/console.log", "/img/rw.img"])
        );
        assert_eq!(
            p.cgroup.as_deref(),
            Some(Path::new("/sys/fs/cgroup/boxlite/s"))
        );
        assert_eq!(p.mount_point.as_deref(), Some(Path::new("/run/s")));
        // A console file, and a writable disk that does not exist (size 0).
        assert_eq!(p.max_file_size, CONSOLE_FILE_LIMIT);

        let raw = VmConfig {
            raw_image: Some(RawImageConfig {
                path: "guest.bin".into(),
                load_addr: 0x1000,
                mode: Default::default(),
            }),
            ..VmConfig::default()
        };
        let p = JailPolicy::from_config(&raw);
        assert_eq!(p.read_only, v(&["guest.bin"]));
        assert!(p.read_write.is_empty());
        assert_eq!(p.max_file_size, 0, "nothing to write");

        // Snapshots: their directory is writable, and a memory file of
        // 4 KiB plus guest RAM fits under RLIMIT_FSIZE.
        let snaps = VmConfig {
            memory_mib: 512,
            snapshot_dir: Some("/var/lib/boxlite/templates/t.partial".into()),
            ..raw
        };
        let p = JailPolicy::from_config(&snaps);
        assert_eq!(p.read_write, v(&["/var/lib/boxlite/templates/t.partial"]));
        assert_eq!(p.max_file_size, 4096 + (512 << 20));
    }
}
