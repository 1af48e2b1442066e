//! The VM configuration: a JSON file read once at start (`--config vm.json`).
//!
//! Every struct denies unknown fields; [`VmConfig::validate`] runs at load
//! time and its errors name the field, the value and the limit.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub mod block;
pub mod fs;
pub mod net;
pub mod vsock;
pub use block::{BlockConfig, BlockConfigError};
pub use fs::FsConfig;
pub use net::{NetConfig, NetConfigError};
pub use vsock::VsockConfig;

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
        "Exactly one of kernel and raw_image must be set (kernel: {kernel}, raw_image: {raw})"
    )]
    BootSource { kernel: bool, raw: bool },
    #[error("{field} = {path} does not exist or is not a regular file")]
    MissingFile { field: &'static str, path: PathBuf },
    #[error("initramfs needs a kernel; raw_image guests have none")]
    InitramfsWithoutKernel,
    #[error("cmdline is {got} bytes long, the limit is {max}")]
    CmdlineTooLong { got: usize, max: usize },
    #[error("raw_image.load_addr = {addr:#x} with {len} bytes does not fit in the range allowed for its mode (end at most {limit:#x}; see docs/vmm.md)")]
    RawImageAddr { addr: u64, len: u64, limit: u64 },
    #[error("{got} virtio devices configured, the limit is {max}")]
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
    #[error("Invalid block device")]
    Block(#[from] BlockConfigError),
    #[error("Invalid net device")]
    Net(#[from] NetConfigError),
}

/// The whole VM description.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs, 1..=16.
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Linux kernel: an uncompressed ELF `vmlinux` (PVH entry used if present).
    #[serde(default)]
    pub kernel: Option<PathBuf>,
    /// initramfs (any format the kernel unpacks).
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended to the VMM's defaults.
    #[serde(default)]
    pub cmdline: String,
    /// File the serial console is written to (created or truncated). None: discard.
    #[serde(default)]
    pub console_log: Option<PathBuf>,
    /// Raw guest code instead of a kernel; for smoke tests and benchmarks only.
    #[serde(default)]
    pub raw_image: Option<RawImageConfig>,
    /// Create the in-kernel irqchip (IOAPIC/PIC/LAPIC) and PIT. Default true.
    /// Some nested KVMs (kvm_pvm) run tiny guests without it.
    #[serde(default = "default_true")]
    pub irqchip: bool,
    /// Virtio devices, in the order they appear on the MMIO bus.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// Unix socket for the control API (shutdown, pause, resume, status,
    /// metrics); created (a stale socket replaced) at start, removed at exit.
    #[serde(default)]
    pub control_socket: Option<PathBuf>,
    /// Apply the jail (cgroup, rlimits, no_new_privs, landlock, seccomp)
    /// before the guest runs. Default true; `false` is for debugging only
    /// and is logged loudly (same as `--no-jail`).
    #[serde(default = "default_true")]
    pub jail: bool,
    /// The sandbox directory (`/run/boxlite/<id>`): read-write in the jail.
    #[serde(default)]
    pub sandbox_dir: Option<PathBuf>,
    /// cgroup v2 directory (created by the shim) the VMM moves itself into.
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    /// Hooks for the jail's own tests; never set in production.
    #[serde(default)]
    pub test_hooks: Option<TestHooks>,
}

/// Test-only hooks that prove the jail works from the outside.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestHooks {
    /// After the jail is on, a thread of this kind (`"vmm"` or `"vcpu"`)
    /// makes a syscall its profile forbids (`getppid`): the process must die
    /// of SIGSYS.
    #[serde(default)]
    pub forbidden_syscall: Option<String>,
    /// Like `forbidden_syscall`, but the call is an `ioctl` whose request
    /// number the kind's profile does not list (`TCGETS` on stderr): the
    /// profiles allow `ioctl` only for the requests the VMM makes.
    #[serde(default)]
    pub forbidden_ioctl: Option<String>,
    /// After landlock is on (before seccomp), try to open this file and log
    /// the outcome (`test hook: open …`).
    #[serde(default)]
    pub open_after_landlock: Option<PathBuf>,
}

/// Raw guest code loaded at a fixed guest-physical address.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawImageConfig {
    /// File with the guest's code bytes.
    pub path: PathBuf,
    /// Guest-physical load address; execution starts here.
    pub load_addr: u64,
    /// CPU mode at the first instruction.
    #[serde(default)]
    pub mode: CpuMode,
}

/// The CPU mode a raw image starts in.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CpuMode {
    /// 16-bit real mode, CS = 0: `load_addr` must be below 64 KiB.
    #[default]
    Real,
    /// 64-bit long mode with the low 4 GiB identity-mapped (RAM and the MMIO hole).
    Long,
}

/// One virtio device.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeviceConfig {
    /// virtio-rng fed from the host's `/dev/urandom`.
    Rng(RngConfig),
    /// virtio-vsock with the hybrid unix-socket host side.
    Vsock(VsockConfig),
    /// virtio-fs, a vhost-user frontend to an external virtiofsd.
    Fs(FsConfig),
    /// virtio-blk over a raw image file.
    Block(BlockConfig),
    /// virtio-net over a tap.
    Net(NetConfig),
}

/// virtio-rng options.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Entropy source; default `/dev/urandom`.
    #[serde(default)]
    pub source: Option<PathBuf>,
}

fn default_vcpus() -> u8 {
    1
}
fn default_memory_mib() -> u32 {
    128
}
fn default_true() -> bool {
    true
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            kernel: None,
            initramfs: None,
            cmdline: String::new(),
            console_log: None,
            raw_image: None,
            irqchip: true,
            devices: Vec::new(),
            control_socket: None,
            jail: true,
            sandbox_dir: None,
            cgroup: None,
            test_hooks: None,
        }
    }
}

impl VmConfig {
    /// Reads, parses and validates a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| ConfigError::Read(path.to_path_buf(), e))?;
        let cfg: VmConfig =
            serde_json::from_str(&text).map_err(|e| ConfigError::Parse(path.to_path_buf(), e))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Guest memory size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }

    /// Checks every field against its limit.
    pub fn validate(&self) -> Result<(), ConfigError> {
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
        match (&self.kernel, &self.raw_image) {
            (Some(k), None) => {
                check_file("kernel", k)?;
                if !self.irqchip {
                    return Err(ConfigError::KernelWithoutIrqchip);
                }
            }
            (None, Some(raw)) => {
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
            (k, r) => {
                return Err(ConfigError::BootSource {
                    kernel: k.is_some(),
                    raw: r.is_some(),
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
        if self.devices.len() > MAX_VIRTIO_DEVICES {
            return Err(ConfigError::TooManyDevices {
                got: self.devices.len(),
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
        for (field, dir) in [("sandbox_dir", &self.sandbox_dir), ("cgroup", &self.cgroup)] {
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
        if let Some(log) = &self.console_log {
            check_parent_dir("console_log", log)?;
        }
        Ok(())
    }
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
            ..VmConfig::default()
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
                raw: true
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

        let mut cfg = raw_cfg(dir.path());
        cfg.console_log = Some("/nonexistent-dir/console.log".into());
        assert_eq!(
            cfg.validate().unwrap_err().to_string(),
            "console_log = /nonexistent-dir/console.log has no parent directory that exists"
        );
    }

    #[test]
    fn load_reports_path_on_parse_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("vm.json");
        std::fs::write(&p, "{ not json").expect("write");
        let e = VmConfig::load(&p).expect_err("parse");
        assert!(matches!(e, ConfigError::Parse(..)));
        assert!(e.to_string().contains("vm.json"));
    }
}
