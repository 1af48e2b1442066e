//! Helpers shared by the integration tests that build a VM config.

use std::path::Path;

use boxlite_vmm::config::{CpuMode, DeviceConfig, RawImageConfig, VmConfig};

/// A 16 MiB real-mode `raw_image` guest without irqchip whose code is
/// `code` (written to `<dir>/guest.bin`, loaded at 0x1000), with `devices`.
/// Not validated.
#[allow(dead_code)] // not every test binary builds a VM
pub fn raw_config(dir: &Path, code: &[u8], devices: Vec<DeviceConfig>) -> VmConfig {
    let img = dir.join("guest.bin");
    std::fs::write(&img, code).expect("write guest");
    VmConfig {
        memory_mib: 16,
        irqchip: false,
        devices,
        raw_image: Some(RawImageConfig {
            path: img,
            load_addr: 0x1000,
            mode: CpuMode::Real,
        }),
        sandbox_dir: Some(dir.to_path_buf()),
        ..VmConfig::default()
    }
}

/// Writes `cfg` as `<dir>/vm.json` (the way the runtime writes it) and
/// returns the path.
#[allow(dead_code)] // not every test binary starts the VMM
pub fn write_config(dir: &Path, cfg: &VmConfig) -> std::path::PathBuf {
    let path = dir.join("vm.json");
    std::fs::write(&path, cfg.to_json_pretty()).expect("write vm.json");
    path
}

/// `Name:\tvalue` from `/proc/<pid>/status`.
#[allow(dead_code)] // not every test binary looks at processes
pub fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[allow(dead_code)]
pub fn same_namespace(pid: u32, ns: &str) -> bool {
    let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("our ns");
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("its ns") == ours
}
