//! The VM configuration: a JSON file read once at start (`--config vm.json`).
//!
//! The schema (structs, field names, defaults, unknown fields refused) is
//! the contract crate's, `boxlite_vmm_api::config`, which the runtime
//! writes the file with; it is re-exported here. What this module adds is
//! the VMM's side: [`Validate`], run at load time, whose errors name the
//! field, the value and the limit.

use std::path::{Path, PathBuf};

pub use boxlite_vmm_api::config::{
    BalloonConfig, BlockConfig, CpuMode, DeviceConfig, EscapeProbe, FsConfig, JailUser, MemoryMode,
    NetConfig, RawImageConfig, RestoreConfig, RngConfig, TestHooks, VmConfig, VsockConfig,
};

pub mod block;
pub mod fs;
pub mod net;
pub mod vsock;
pub use block::BlockConfigError;
pub use net::{mac_bytes, NetConfigError};

/// Most vCPUs a VM may have (the guest kernel is built with `NR_CPUS=16`).
pub const MAX_VCPUS: u8 = 16;
/// Smallest guest memory in MiB.
pub const MIN_MEMORY_MIB: u32 = 1;
/// Largest guest memory in MiB (256 GiB).
pub const MAX_MEMORY_MIB: u32 = 256 * 1024;
/// Longest kernel command line we accept (Linux's x86 COMMAND_LINE_SIZE).
pub const MAX_CMDLINE_LEN: usize = 2048;
/// Longest unix socket path (`sun_path` is 108 bytes with the NUL).
pub const MAX_SOCKET_PATH: usize = 107;
/// Most virtio devices on the MMIO bus (one 4 KiB slot and one IRQ each).
pub const MAX_VIRTIO_DEVICES: usize = 16;

/// Errors found while loading or validating a configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("Failed to read config file {0}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("Failed to parse config file {0}")]
    Parse(PathBuf, #[source] serde_json::Error),
    #[error("vcpus = {got} is out of range 1..={max}")]
    VcpuCount { got: u8, max: u8 },
    #[error("memory_mib = {got} is out of range {min}..={max}")]
    MemorySize { got: u32, min: u32, max: u32 },
    #[error(
        "Exactly one of kernel, raw_image and restore must be set (kernel: {kernel}, raw_image: {raw}, restore: {restore})"
    )]
    BootSource {
        kernel: bool,
        raw: bool,
        restore: bool,
    },
    /// A boot-only field set on a VM restored from a snapshot, where the
    /// snapshot already holds what it would set.
    #[error("{0} has no effect on a VM restored from a snapshot (its guest is already booted); leave it unset")]
    BootFieldOnRestore(&'static str),
    #[error("restore needs {0}: a restored VM runs on the control socket's restore op, and snapshots are of VMs with the in-kernel irqchip")]
    RestoreNeeds(&'static str),
    #[error("restore.memory_mode = \"private\" cannot serve the vhost-user device fs {tag:?}: its backend maps guest memory through a shared file descriptor and would not see the guest's copy-on-write pages; use \"copy\" or \"auto\"")]
    PrivateMemoryWithVhostUser { tag: String },
    #[error("The jail needs sandbox_dir: its root is a tmpfs mounted over it")]
    JailWithoutSandboxDir,
    #[error("balloon.target_mib = {target} leaves the guest nothing of memory_mib = {memory}")]
    BalloonTarget { target: u32, memory: u32 },
    #[error("jail_user {uid}:{gid} is root; the jail needs an unprivileged uid and gid")]
    JailUserIsRoot { uid: u32, gid: u32 },
    #[error("{field} = {path} does not exist or is not a regular file")]
    MissingFile { field: &'static str, path: PathBuf },
    #[error("initramfs needs a kernel; raw_image guests have none")]
    InitramfsWithoutKernel,
    #[error("cmdline is {got} bytes long, the limit is {max}")]
    CmdlineTooLong { got: usize, max: usize },
    #[error("raw_image.load_addr = {addr:#x} with {len} bytes does not fit in the range allowed for its mode (end at most {limit:#x}; see docs/vmm.md)")]
    RawImageAddr { addr: u64, len: u64, limit: u64 },
    #[error("{got} virtio devices configured (devices and the balloon), the limit is {max}")]
    TooManyDevices { got: usize, max: usize },
    /// A file or socket the VMM creates, in a directory that is missing.
    #[error("{field} = {path} has no parent directory that exists")]
    NoParentDir { field: &'static str, path: PathBuf },
    /// A unix socket path that does not fit `sun_path` (with what the VMM
    /// appends to it).
    #[error("{field} = {path} is {got} bytes long, it must be 1..={max} bytes to fit sun_path")]
    SocketPathLen {
        field: &'static str,
        path: PathBuf,
        got: usize,
        max: usize,
    },
    #[error(
        "Kernel boot needs the in-kernel irqchip (irqchip = false is for raw_image guests only)"
    )]
    KernelWithoutIrqchip,
    #[error("vsock guest_cid = {got} is out of range {min}..={max}")]
    VsockCid { got: u64, min: u64, max: u64 },
    #[error("{got} vsock devices configured, the limit is 1")]
    VsockCount { got: usize },
    #[error("fs tag = {tag:?} is {got} bytes long, it must be 1..={max} bytes without NUL")]
    FsTag { tag: String, got: usize, max: usize },
    #[error("fs tag = {0:?} is used by more than one fs device")]
    FsDuplicateTag(String),
    #[error("{field} = {path} is not a directory")]
    NotADirectory { field: &'static str, path: PathBuf },
    #[error("test_hooks.{hook} = {kind:?}: expected \"vmm\" or \"vcpu\"")]
    TestHookKind { hook: &'static str, kind: String },
    #[error("console_log and console_fd are both set; the console goes to one of them")]
    ConsoleTwice,
    #[error("console_fd = {0} is out of range 3..={max}", max = i32::MAX)]
    ConsoleFd(i32),
    #[error("snapshot_dir = {0} must be an absolute path")]
    SnapshotDirRelative(PathBuf),
    #[error("snapshot_dir needs {0}: snapshots are taken over the control socket, of a VM with the in-kernel irqchip")]
    SnapshotDirNeeds(&'static str),
    #[error("Invalid block device")]
    Block(#[from] BlockConfigError),
    #[error("Invalid net device")]
    Net(#[from] NetConfigError),
}

/// What a config file says is checked against the VMM's limits: every
/// config struct implements this (the structs are the contract crate's, the
/// limits are the VMM's). Errors name the field, the value and the limit.
pub trait Validate {
    type Error;
    fn validate(&self) -> Result<(), Self::Error>;
}

/// Reads and parses a config file, without validating it (`boxlite-vmm`
/// applies its command-line overrides first; [`crate::run_vm`] validates).
pub fn read(path: &Path) -> Result<VmConfig, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
    VmConfig::from_json(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e))
}

/// Reads, parses and validates a config file: what the VMM accepts.
pub fn load(path: &Path) -> Result<VmConfig, ConfigError> {
    let cfg = read(path)?;
    cfg.validate()?;
    Ok(cfg)
}

impl Validate for VmConfig {
    type Error = ConfigError;

    /// Checks every field against its limit.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount {
                got: self.vcpus,
                max: MAX_VCPUS,
            });
        }
        if !(MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&self.memory_mib) {
            return Err(ConfigError::MemorySize {
                got: self.memory_mib,
                min: MIN_MEMORY_MIB,
                max: MAX_MEMORY_MIB,
            });
        }
        match (&self.kernel, &self.raw_image, &self.restore) {
            (Some(k), None, None) => {
                check_file("kernel", k)?;
                if !self.irqchip {
                    return Err(ConfigError::KernelWithoutIrqchip);
                }
            }
            (None, Some(raw), None) => {
                check_file("raw_image.path", &raw.path)?;
                if self.initramfs.is_some() {
                    return Err(ConfigError::InitramfsWithoutKernel);
                }
                let len = std::fs::metadata(&raw.path).map(|m| m.len()).unwrap_or(0);
                let limit = match raw.mode {
                    CpuMode::Real => 0x1_0000,
                    CpuMode::Long => {
                        crate::arch::x86_64::layout::ram_below_gap(self.memory_bytes())
                    }
                };
                let fits = raw.load_addr
                    >= crate::arch::x86_64::layout::raw_image_min_addr(raw.mode)
                    && raw
                        .load_addr
                        .checked_add(len)
                        .is_some_and(|end| end <= limit);
                if !fits {
                    return Err(ConfigError::RawImageAddr {
                        addr: raw.load_addr,
                        len,
                        limit,
                    });
                }
            }
            (None, None, Some(restore)) => validate_restore(self, restore)?,
            (k, r, restore) => {
                return Err(ConfigError::BootSource {
                    kernel: k.is_some(),
                    raw: r.is_some(),
                    restore: restore.is_some(),
                })
            }
        }
        if let Some(initrd) = &self.initramfs {
            check_file("initramfs", initrd)?;
        }
        if self.cmdline.len() > MAX_CMDLINE_LEN {
            return Err(ConfigError::CmdlineTooLong {
                got: self.cmdline.len(),
                max: MAX_CMDLINE_LEN,
            });
        }
        // The balloon takes the MMIO slot after the devices.
        let slots = self.devices.len() + usize::from(self.balloon.is_some());
        if slots > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices {
                got: slots,
                max: MAX_VIRTIO_DEVICES,
            });
        }
        let mut vsocks = 0;
        for d in &self.devices {
            if let DeviceConfig::Vsock(v) = d {
                v.validate()?;
                vsocks += 1;
            }
        }
        if vsocks > 1 {
            return Err(ConfigError::VsockCount { got: vsocks });
        }
        let mut fs_tags = std::collections::HashSet::new();
        for d in &self.devices {
            if let DeviceConfig::Fs(f) = d {
                f.validate()?;
                if !fs_tags.insert(f.tag.as_str()) {
                    return Err(ConfigError::FsDuplicateTag(f.tag.clone()));
                }
            }
        }
        for d in &self.devices {
            match d {
                DeviceConfig::Block(b) => b.validate()?,
                DeviceConfig::Net(n) => n.validate()?,
                _ => {}
            }
        }
        if let Some(sock) = &self.control_socket {
            check_socket_path("control_socket", sock, MAX_SOCKET_PATH)?;
        }
        if let Some(d) = &self.snapshot_dir {
            if !d.is_absolute() {
                return Err(ConfigError::SnapshotDirRelative(d.clone()));
            }
            if !self.irqchip {
                return Err(ConfigError::SnapshotDirNeeds("irqchip = true"));
            }
            if self.control_socket.is_none() {
                return Err(ConfigError::SnapshotDirNeeds("control_socket"));
            }
        }
        for (field, dir) in [
            ("sandbox_dir", &self.sandbox_dir),
            ("cgroup", &self.cgroup),
            ("snapshot_dir", &self.snapshot_dir),
        ] {
            if let Some(d) = dir {
                if !d.is_dir() {
                    return Err(ConfigError::NotADirectory {
                        field,
                        path: d.clone(),
                    });
                }
            }
        }
        if let Some(hooks) = &self.test_hooks {
            for (hook, kind) in [
                ("forbidden_syscall", &hooks.forbidden_syscall),
                ("forbidden_ioctl", &hooks.forbidden_ioctl),
            ] {
                if let Some(kind) = kind.as_ref().filter(|k| *k != "vmm" && *k != "vcpu") {
                    return Err(ConfigError::TestHookKind {
                        hook,
                        kind: kind.clone(),
                    });
                }
            }
        }
        match (&self.console_log, self.console_fd) {
            (Some(_), Some(_)) => return Err(ConfigError::ConsoleTwice),
            (Some(log), None) => check_parent_dir("console_log", log)?,
            (None, Some(fd)) if fd < 3 => return Err(ConfigError::ConsoleFd(fd)),
            _ => {}
        }
        if self.jail && self.sandbox_dir.is_none() {
            return Err(ConfigError::JailWithoutSandboxDir);
        }
        if let Some(b) = self.balloon.filter(|b| b.target_mib >= self.memory_mib) {
            return Err(ConfigError::BalloonTarget {
                target: b.target_mib,
                memory: self.memory_mib,
            });
        }
        if let Some(u) = self.jail_user.filter(|u| u.uid == 0 || u.gid == 0) {
            return Err(ConfigError::JailUserIsRoot {
                uid: u.uid,
                gid: u.gid,
            });
        }
        Ok(())
    }
}

/// What a VM started from a snapshot needs besides the common fields:
/// both files, the irqchip, no boot-only field, and shared memory if a
/// vhost-user backend must see it. The files' contents are checked when
/// they are read (`snapshot::restore`).
fn validate_restore(cfg: &VmConfig, restore: &RestoreConfig) -> Result<(), ConfigError> {
    check_file("restore.state", &restore.state)?;
    check_file("restore.memory", &restore.memory)?;
    if !cfg.irqchip {
        return Err(ConfigError::RestoreNeeds("irqchip = true"));
    }
    if cfg.control_socket.is_none() {
        return Err(ConfigError::RestoreNeeds("control_socket"));
    }
    if cfg.initramfs.is_some() {
        return Err(ConfigError::BootFieldOnRestore("initramfs"));
    }
    if !cfg.cmdline.is_empty() {
        return Err(ConfigError::BootFieldOnRestore("cmdline"));
    }
    if restore.memory_mode == MemoryMode::Private {
        if let Some(DeviceConfig::Fs(f)) = cfg
            .devices
            .iter()
            .find(|d| matches!(d, DeviceConfig::Fs(_)))
        {
            return Err(ConfigError::PrivateMemoryWithVhostUser { tag: f.tag.clone() });
        }
    }
    Ok(())
}

/// A unix socket the VMM binds or connects to, named by the config key
/// `field`: 1..=`max` bytes long (`max` leaves room for what the VMM
/// appends and the NUL of `sun_path`), in a directory that exists.
fn check_socket_path(field: &'static str, path: &Path, max: usize) -> Result<(), ConfigError> {
    let got = path.as_os_str().len();
    if got == 0 || got > max {
        return Err(ConfigError::SocketPathLen {
            field,
            path: path.to_path_buf(),
            got,
            max,
        });
    }
    check_parent_dir(field, path)
}

/// The directory `path` is to be created in exists. A bare file name (no
/// parent, or an empty one) means the working directory, which does.
fn check_parent_dir(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    let missing = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .is_some_and(|p| !p.is_dir());
    if missing {
        return Err(ConfigError::NoParentDir {
            field,
            path: path.to_path_buf(),
        });
    }
    Ok(())
}

fn check_file(field: &'static str, path: &Path) -> Result<(), ConfigError> {
    if path.is_file() {
        Ok(())
    } else {
        Err(ConfigError::MissingFile {
            field,
            path: path.to_path_buf(),
        })
    }
}

/// Test helpers for the device config modules: a `vm.json` with one
/// device, parsed as the VMM parses it.
#[cfg(test)]
pub(crate) mod test_json {
    use super::{DeviceConfig, VmConfig};

    /// `{"devices": [<device>]}` parsed; its only device.
    pub fn only_device(device: &str) -> DeviceConfig {
        let cfg: VmConfig = serde_json::from_str(&format!(r#"{{"devices": [{device}]}}"#))
            .unwrap_or_else(|e| panic!("{device}: {e}"));
        cfg.devices.into_iter().next().expect("one device")
    }

    /// Parsing `{"devices": [<device>]}` fails, naming `what`.
    pub fn refused(device: &str, what: &str) {
        let err = serde_json::from_str::<VmConfig>(&format!(r#"{{"devices": [{device}]}}"#))
            .expect_err(device);
        assert!(err.to_string().contains(what), "{device}: {err}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw_cfg(dir: &Path) -> VmConfig {
        let img = dir.join("guest.bin");
        std::fs::write(&img, [0xf4u8]).expect("write image");
        VmConfig {
            raw_image: Some(RawImageConfig {
                path: img,
                load_addr: 0x1000,
                mode: CpuMode::Real,
            }),
            irqchip: false,
            sandbox_dir: Some(dir.to_path_buf()),
            ..VmConfig::default()
        }
    }

    #[test]
    fn the_jail_needs_a_sandbox_dir_and_a_user_other_than_root() {
        let dir = tempfile::tempdir().expect("tempdir");
        raw_cfg(dir.path()).validate().expect("valid");
        let mut cfg = raw_cfg(dir.path());
        cfg.sandbox_dir = None;
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::JailWithoutSandboxDir)
        ));
        cfg.jail = false;
        cfg.validate().expect("no jail, no root needed");
        for (uid, gid) in [(0, 5), (5, 0)] {
            let mut cfg = raw_cfg(dir.path());
            cfg.jail_user = Some(JailUser { uid, gid });
            let err = cfg.validate().expect_err("root");
            assert!(err.to_string().contains("is root"), "{err}");
        }
    }

    #[test]
    fn a_restore_names_two_files_and_sets_nothing_a_boot_would() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (state, memory) = (dir.path().join("vm.state"), dir.path().join("vm.mem"));
        std::fs::write(&state, b"s").unwrap();
        std::fs::write(&memory, b"m").unwrap();
        let restore = RestoreConfig {
            state,
            memory,
            memory_mode: MemoryMode::Auto,
        };
        let fs = DeviceConfig::Fs(FsConfig {
            tag: "share0".into(),
            socket_path: dir.path().join("fs.sock"),
        });
        type Edit = fn(&mut VmConfig);
        let with = |f: Edit| {
            let mut cfg = raw_cfg(dir.path());
            cfg.raw_image = None;
            cfg.irqchip = true;
            cfg.control_socket = Some(dir.path().join("control.sock"));
            cfg.restore = Some(restore.clone());
            f(&mut cfg);
            cfg.validate().map_err(|e| e.to_string())
        };
        with(|_| {}).expect("valid");
        let mut copy_with_fs = raw_cfg(dir.path());
        copy_with_fs.raw_image = None;
        copy_with_fs.irqchip = true;
        copy_with_fs.control_socket = Some(dir.path().join("control.sock"));
        copy_with_fs.devices = vec![fs.clone()];
        for mode in [MemoryMode::Auto, MemoryMode::Copy] {
            copy_with_fs.restore = Some(RestoreConfig {
                memory_mode: mode,
                ..restore.clone()
            });
            copy_with_fs
                .validate()
                .expect("shared memory serves virtio-fs");
        }
        copy_with_fs.restore = Some(RestoreConfig {
            memory_mode: MemoryMode::Private,
            ..restore.clone()
        });
        let err = copy_with_fs
            .validate()
            .expect_err("private + fs")
            .to_string();
        assert!(
            err.starts_with("restore.memory_mode = \"private\" cannot serve the vhost-user device fs \"share0\""),
            "{err}"
        );
        let cases: [(Edit, &str); 7] = [
            (
                |c| c.kernel = Some("/vmlinux".into()),
                "Exactly one of kernel, raw_image and restore must be set (kernel: true, raw_image: false, restore: true)",
            ),
            (|c| c.irqchip = false, "restore needs irqchip = true"),
            (|c| c.control_socket = None, "restore needs control_socket"),
            (
                |c| c.cmdline = "quiet".into(),
                "cmdline has no effect on a VM restored from a snapshot",
            ),
            (
                |c| c.initramfs = Some("/initrd".into()),
                "initramfs has no effect on a VM restored from a snapshot",
            ),
            (
                |c| c.restore.as_mut().unwrap().state = "/nonexistent/vm.state".into(),
                "restore.state = /nonexistent/vm.state does not exist",
            ),
            (
                |c| c.restore.as_mut().unwrap().memory = "/nonexistent/vm.mem".into(),
                "restore.memory = /nonexistent/vm.mem does not exist",
            ),
        ];
        for (edit, want) in cases {
            let err = with(edit).expect_err(want);
            assert!(
                err.starts_with(want),
                "{err:?} does not start with {want:?}"
            );
        }
    }

    #[test]
    fn a_snapshot_dir_is_absolute_with_an_irqchip_and_a_control_socket() {
        let dir = tempfile::tempdir().expect("tempdir");
        let snaps = dir.path().join("snaps");
        std::fs::create_dir(&snaps).unwrap();
        type Edit = fn(&mut VmConfig);
        let with = |f: Edit| {
            let mut cfg = raw_cfg(dir.path());
            cfg.irqchip = true;
            cfg.control_socket = Some(dir.path().join("control.sock"));
            cfg.snapshot_dir = Some(snaps.clone());
            f(&mut cfg);
            cfg.validate().map_err(|e| e.to_string())
        };
        with(|_| {}).expect("valid");
        let cases: [(Edit, &str); 4] = [
            (
                |c| c.snapshot_dir = Some("snaps".into()),
                "snapshot_dir = snaps must be an absolute path",
            ),
            (|c| c.irqchip = false, "snapshot_dir needs irqchip = true"),
            (
                |c| c.control_socket = None,
                "snapshot_dir needs control_socket",
            ),
            (
                |c| c.snapshot_dir = Some("/nonexistent/snaps".into()),
                "snapshot_dir = /nonexistent/snaps is not a directory",
            ),
        ];
        for (edit, want) in cases {
            let err = with(edit).expect_err(want);
            assert!(err.starts_with(want), "{err}");
        }
    }

    #[test]
    fn parses_full_config() {
        let json = r#"{
            "vcpus": 2, "memory_mib": 256, "kernel": "/k", "initramfs": "/i",
            "cmdline": "quiet", "console_log": "/tmp/c.log", "irqchip": true,
            "devices": [{"kind": "rng"}, {"kind": "rng", "source": "/dev/random"}]
        }"#;
        let cfg: VmConfig = serde_json::from_str(json).expect("parse");
        assert_eq!(cfg.vcpus, 2);
        assert_eq!(cfg.devices.len(), 2);
        assert_eq!(
            cfg.devices[1],
            DeviceConfig::Rng(RngConfig {
                source: Some("/dev/random".into())
            })
        );
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<VmConfig>(r#"{"vcpu": 2}"#).expect_err("unknown");
        assert!(err.to_string().contains("unknown field `vcpu`"), "{err}");
        let err = serde_json::from_str::<VmConfig>(r#"{"devices": [{"kind": "rng", "x": 1}]}"#)
            .expect_err("unknown device field");
        assert!(err.to_string().contains("unknown field"), "{err}");
        let err = serde_json::from_str::<VmConfig>(r#"{"devices": [{"kind": "gpu"}]}"#)
            .expect_err("unknown kind");
        assert!(err.to_string().contains("gpu"), "{err}");
    }

    #[test]
    fn validation_names_field_value_and_limit() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut cfg = raw_cfg(dir.path());
        cfg.validate().expect("valid");

        cfg.vcpus = 17;
        assert_eq!(
            cfg.validate().expect_err("vcpus").to_string(),
            "vcpus = 17 is out of range 1..=16"
        );
        cfg.vcpus = 1;
        cfg.memory_mib = 0;
        assert_eq!(
            cfg.validate().expect_err("mem").to_string(),
            "memory_mib = 0 is out of range 1..=262144"
        );
        cfg.memory_mib = 16;
        cfg.kernel = Some(dir.path().join("vmlinux"));
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::BootSource {
                kernel: true,
                raw: true,
                restore: false,
            })
        ));
        cfg.raw_image = None;
        let e = cfg.validate().expect_err("missing kernel").to_string();
        assert!(
            e.starts_with("kernel = ") && e.contains("does not exist"),
            "{e}"
        );

        let mut cfg = raw_cfg(dir.path());
        cfg.cmdline = "x".repeat(MAX_CMDLINE_LEN + 1);
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::CmdlineTooLong { got: 2049, .. })
        ));

        let mut cfg = raw_cfg(dir.path());
        if let Some(r) = cfg.raw_image.as_mut() {
            r.load_addr = 0x1_0000;
        }
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::RawImageAddr { addr: 0x1_0000, .. })
        ));

        let mut cfg = raw_cfg(dir.path());
        cfg.devices = vec![DeviceConfig::Rng(RngConfig::default()); 17];
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::TooManyDevices { got: 17, max: 16 })
        ));
        // The balloon needs a slot of its own.
        let mut cfg = raw_cfg(dir.path());
        cfg.devices = vec![DeviceConfig::Rng(RngConfig::default()); 16];
        cfg.validate().expect("16 devices fit");
        cfg.balloon = Some(BalloonConfig::default());
        assert_eq!(
            cfg.validate().expect_err("no slot left").to_string(),
            "17 virtio devices configured (devices and the balloon), the limit is 16"
        );
        cfg.devices.pop();
        cfg.validate().expect("15 devices and the balloon fit");
        // A balloon that would start holding all of the guest's memory.
        cfg.memory_mib = 256;
        cfg.balloon = Some(BalloonConfig {
            target_mib: 256,
            ..BalloonConfig::default()
        });
        assert_eq!(
            cfg.validate().expect_err("target = memory").to_string(),
            "balloon.target_mib = 256 leaves the guest nothing of memory_mib = 256"
        );
        cfg.balloon = Some(BalloonConfig {
            target_mib: 255,
            ..BalloonConfig::default()
        });
        cfg.validate().expect("a target below memory_mib");

        let mut cfg = raw_cfg(dir.path());
        cfg.console_log = Some("/nonexistent-dir/console.log".into());
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "console_log = /nonexistent-dir/console.log has no parent directory that exists"
        );

        let mut cfg = raw_cfg(dir.path());
        cfg.console_fd = Some(2);
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "console_fd = 2 is out of range 3..=2147483647"
        );
        cfg.console_fd = Some(3);
        cfg.validate().expect("an inherited console fd");
        cfg.console_log = Some(dir.path().join("console.log"));
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "console_log and console_fd are both set; the console goes to one of them"
        );
    }

    #[test]
    fn balloon_section_loads() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("guest.bin");
        std::fs::write(&img, [0xf4u8]).expect("write image");
        let p = dir.path().join("vm.json");
        std::fs::write(
            &p,
            format!(
                r#"{{"irqchip": false, "jail": false,
                    "raw_image": {{"path": "{}", "load_addr": 4096}},
                    "balloon": {{"deflate_on_oom": true, "free_page_reporting": true}}}}"#,
                img.display()
            ),
        )
        .expect("write");
        let cfg = load(&p).expect("valid");
        assert_eq!(
            cfg.balloon,
            Some(BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: true,
                target_mib: 0,
            })
        );
        std::fs::write(
            &p,
            format!(
                r#"{{"irqchip": false, "jail": false,
                    "raw_image": {{"path": "{}", "load_addr": 4096}},
                    "balloon": {{"deflate_on_oom": true, "stats_polling": 1}}}}"#,
                img.display()
            ),
        )
        .expect("write");
        let e = load(&p).expect_err("unknown balloon field");
        assert!(matches!(e, ConfigError::Parse(..)), "{e}");
        let source = std::error::Error::source(&e).expect("cause").to_string();
        assert!(source.contains("unknown field `stats_polling`"), "{source}");
    }

    #[test]
    fn load_reports_path_on_parse_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("vm.json");
        std::fs::write(&p, "{ not json").expect("write");
        let e = load(&p).expect_err("parse");
        assert!(matches!(e, ConfigError::Parse(..)));
        assert!(e.to_string().contains("vm.json"));
    }
}
