//! Starting a VM under boxlite-vmm (the VMM under test): its JSON config
//! from a list of devices, and whether this boxlite-vmm has vsock at all.

use std::fs;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use boxlite_runtime::hypervisor::ready::ReadyListener;
use boxlite_runtime::HybridVsock;
use boxlite_vmm_api::config::{
    BalloonConfig, BlockConfig, DeviceConfig, FsConfig, NetConfig, RestoreConfig, RngConfig,
    VmConfig, VsockConfig,
};

use super::{Vm, VmFiles, GUEST_MEMORY_MIB};
use crate::settings::Settings;
use crate::verdict::{one_line, Failure};

/// A virtio device of the VM.
#[derive(Clone, Copy)]
pub enum Device {
    Rng,
    Vsock,
    /// virtio-fs with this tag, backed by [`Settings::fs_socket`].
    Fs {
        tag: &'static str,
    },
    /// virtio-blk, read-only, on [`Settings::disk_image`] with this id.
    Block {
        id: &'static str,
    },
    /// virtio-net on this inherited tap fd, with this guest MAC.
    Net {
        tap_fd: RawFd,
        mac: &'static str,
    },
}

/// Does this boxlite-vmm know the vsock device? Decided by its config
/// schema: a config with a vsock entry and `vcpus = 0` either fails to
/// parse (`unknown variant`) or parses and fails validation on `vcpus`.
/// `Ok(Err(reason))`: not supported. Memoised per process.
pub fn vsock_support(s: &Settings) -> Result<Result<(), String>, Failure> {
    static ANSWER: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    if let Some(a) = ANSWER.get() {
        return Ok(a.clone());
    }
    let dir = s.work.join("probe");
    fs::create_dir_all(&dir)?;
    let cfg = VmConfig {
        vcpus: 0,
        kernel: Some(s.guest_kernel()),
        devices: vec![DeviceConfig::Vsock(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("v.sock"),
            host_ports: Vec::new(),
        })],
        ..VmConfig::default()
    };
    let path = dir.join("vm.json");
    fs::write(&path, cfg.to_json_pretty())?;
    let out = Command::new(s.vmm())
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", s.vmm().display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let answer = if stderr.contains("unknown variant `vsock`") {
        Err("vsock device not in boxlite-vmm yet (its config refuses a vsock entry)".to_owned())
    } else if stderr.contains("vcpus = 0") {
        Ok(())
    } else {
        return Err(Failure::from(format!(
            "vsock probe: unexpected answer from boxlite-vmm ({}): {}",
            out.status,
            one_line(&stderr)
        )));
    };
    Ok(ANSWER.get_or_init(|| answer).clone())
}

/// What a scenario may change about a VM beyond its devices.
#[derive(Clone, Default)]
pub struct VmOptions {
    /// Guest RAM; None: [`GUEST_MEMORY_MIB`].
    pub memory_mib: Option<u32>,
    /// The guest initramfs; None: [`Settings::guest_initramfs`].
    pub initramfs: Option<PathBuf>,
    /// The `balloon` section of vm.json.
    pub balloon: Option<BalloonConfig>,
    /// Serve the control socket (`control.sock` in the VM's directory).
    pub control_socket: bool,
    /// The directory the `snapshot` op writes to (needs the control
    /// socket; writable by the jail's user).
    pub snapshot_dir: Option<PathBuf>,
    /// Start from this snapshot instead of booting the guest kernel
    /// (needs the control socket: the VM runs on the `restore` op).
    pub restore: Option<RestoreConfig>,
    /// The virtiofsd socket of [`Device::Fs`]; None:
    /// [`Settings::fs_socket`].
    pub fs_socket: Option<PathBuf>,
}

impl Vm {
    pub fn start(s: &Settings, name: &str, vcpus: u8, devices: &[Device]) -> Result<Vm, Failure> {
        Vm::start_with(s, name, vcpus, devices, &VmOptions::default())
    }

    pub fn start_with(
        s: &Settings,
        name: &str,
        vcpus: u8,
        devices: &[Device],
        opts: &VmOptions,
    ) -> Result<Vm, Failure> {
        let dir = s.work.join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let files = VmFiles::in_dir(&dir);
        let uds = dir.join("vsock.sock");
        let devs: Vec<DeviceConfig> = devices
            .iter()
            .map(|d| match *d {
                Device::Rng => DeviceConfig::Rng(RngConfig::default()),
                Device::Vsock => DeviceConfig::Vsock(VsockConfig {
                    guest_cid: 3,
                    uds_path: uds.clone(),
                    host_ports: vec![boxlite_protocol::READY_VSOCK_PORT],
                }),
                Device::Fs { tag } => DeviceConfig::Fs(FsConfig {
                    tag: tag.to_owned(),
                    socket_path: opts.fs_socket.clone().unwrap_or_else(|| s.fs_socket()),
                }),
                Device::Block { id } => DeviceConfig::Block(BlockConfig {
                    path: s.disk_image(),
                    read_only: true,
                    id: id.to_owned(),
                }),
                Device::Net { tap_fd, mac } => {
                    DeviceConfig::Net(NetConfig::with_tap_fd(tap_fd, Some(mac.to_owned())))
                }
            })
            .collect();
        let boot = VmConfig {
            kernel: Some(s.guest_kernel()),
            initramfs: Some(
                opts.initramfs
                    .clone()
                    .unwrap_or_else(|| s.guest_initramfs()),
            ),
            cmdline: s.guest_cmdline.clone(),
            ..VmConfig::default()
        };
        let cfg = VmConfig {
            vcpus,
            memory_mib: opts.memory_mib.unwrap_or(GUEST_MEMORY_MIB),
            console_log: Some(files.console.clone()),
            devices: devs,
            balloon: opts.balloon,
            control_socket: opts.control_socket.then(|| files.control_socket()),
            sandbox_dir: Some(dir.clone()),
            snapshot_dir: opts.snapshot_dir.clone(),
            restore: opts.restore.clone(),
            // A restored guest was booted already: no kernel, initramfs
            // or command line.
            ..if opts.restore.is_some() {
                VmConfig::default()
            } else {
                boot
            }
        };
        let has_vsock = devices.iter().any(|d| matches!(d, Device::Vsock));
        let ready = if has_vsock {
            Some(
                ReadyListener::bind(&uds)
                    .map_err(|e| format!("cannot bind {}_1027: {e}", uds.display()))?,
            )
        } else {
            None
        };
        let cfg_path = dir.join("vm.json");
        fs::write(&cfg_path, cfg.to_json_pretty())?;
        let log = fs::File::create(&files.vmm_log)?;
        let started = Instant::now();
        let mut cmd = Command::new(s.vmm());
        cmd.arg("--config").arg(&cfg_path);
        if !s.jail {
            cmd.arg("--no-jail");
        }
        let child = cmd
            .env("RUST_LOG", &s.vmm_log)
            // Plain log lines: they are printed on the console on failure.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", s.vmm().display()))?;
        let vsock = has_vsock.then(|| HybridVsock::new(&uds).with_console_log(&files.console));
        Ok(Vm {
            files,
            child,
            started,
            vsock,
            ready,
            jailed: s.jail,
        })
    }
}
