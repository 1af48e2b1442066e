//! The jail: what `boxlite-vmm` gives up before any guest code runs.
//!
//! Order (see `docs/security.md`), on the main thread, after the VM is built
//! (every file, device and socket is open) and before any other thread
//! exists:
//! 1. enter the cgroup the shim names (`cgroup`: our pid → `cgroup.procs`);
//! 2. rlimits: `RLIMIT_NOFILE` capped at [`NOFILE_LIMIT`], `RLIMIT_CORE` 0
//!    (a core dump would hold guest memory);
//! 3. `no_new_privs`;
//! 4. a landlock ruleset ([`landlock`]): read-only kernel, initramfs, raw
//!    image and read-only disks; read-write sandbox directory, socket
//!    directories, console log and writable disks; nothing else. No TCP
//!    bind/connect, no abstract unix sockets, no signals out of the domain.
//!    Threads inherit it;
//! 5. then each thread loads its kind's seccomp filter: vCPU threads in
//!    `threads::spawn_thread`, the event loop in `builder::run_vm`.
//!
//! `"jail": false` in the config or `--no-jail` skips all of it and logs a
//! loud warning.

pub mod cgroup;
pub mod landlock;

use std::path::{Path, PathBuf};

use crate::config::{DeviceConfig, VmConfig};

/// `RLIMIT_NOFILE` in the jail: the vsock muxer's 1024 connections plus
/// devices, sockets and eventfds.
pub const NOFILE_LIMIT: u64 = 4096;

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
            ..Default::default()
        };
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
                DeviceConfig::Block(b) => push_unique(&mut p.read_write, b.path.clone()),
                // Opened before the jail, or reached by connect() (not a
                // landlock-controlled file access).
                DeviceConfig::Rng(_) | DeviceConfig::Fs(_) | DeviceConfig::Net(_) => {}
            }
        }
        p
    }
}

/// Applies the process-wide layers (cgroup, rlimits, no_new_privs) and the
/// landlock ruleset on the calling thread (inherited by threads it spawns),
/// and turns seccomp on for every thread spawned from now on.
pub fn apply(policy: &JailPolicy) -> Result<(), JailError> {
    if let Some(cg) = &policy.cgroup {
        cgroup::enter(cg)?;
    }
    set_rlimits()?;
    set_no_new_privs()?;
    landlock::restrict_self(policy)?;
    crate::threads::enable_seccomp();
    tracing::info!(
        read_only = policy.read_only.len(),
        read_write = policy.read_write.len(),
        cgroup = ?policy.cgroup,
        "jail applied: cgroup, rlimits, no_new_privs, landlock; seccomp per thread next"
    );
    Ok(())
}

fn setrlimit(
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
/// `RLIMIT_CORE` = 0.
pub fn set_rlimits() -> Result<(), JailError> {
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
    use crate::config::{BlockConfig, RawImageConfig, VsockConfig};

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
    }
}
