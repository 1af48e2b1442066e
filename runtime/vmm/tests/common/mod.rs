//! Helpers shared by the integration tests that build a VM config.

use std::path::Path;

use boxlite_vmm::config::{CpuMode, RawImageConfig, VmConfig};

/// A 16 MiB real-mode `raw_image` guest without irqchip whose code is
/// `code` (written to `<dir>/guest.bin`, loaded at 0x1000), with the JSON
/// array `devices` as its device list. Not validated.
pub fn raw_config(dir: &Path, code: &[u8], devices: &str) -> VmConfig {
    let img = dir.join("guest.bin");
    std::fs::write(&img, code).expect("write guest");
    let json = format!(r#"{{"memory_mib": 16, "irqchip": false, "devices": {devices}}}"#);
    let mut cfg: VmConfig = serde_json::from_str(&json).expect("parse");
    cfg.raw_image = Some(RawImageConfig {
        path: img,
        load_addr: 0x1000,
        mode: CpuMode::Real,
    });
    cfg
}
