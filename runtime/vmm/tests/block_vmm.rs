//! virtio-blk wired into the VMM: the config entry, and (root + /dev/kvm)
//! the `boxlite-vmm` binary building a VM with a block device. Device
//! behaviour is tested in `src/devices/virtio/block/tests.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};

mod common;

use boxlite_vmm::config::{
    BlockConfig, BlockConfigError, ConfigError, DeviceConfig, Validate, VmConfig,
};

/// A `hlt` guest with `devices`.
fn raw_config(dir: &std::path::Path, devices: Vec<DeviceConfig>) -> VmConfig {
    common::raw_config(dir, &[0xf4], devices)
}

fn block(path: &std::path::Path, read_only: bool, id: &str) -> DeviceConfig {
    DeviceConfig::Block(BlockConfig {
        path: path.to_path_buf(),
        read_only,
        id: id.to_string(),
    })
}

#[test]
fn block_config_entry_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let ok = vec![block(&disk, true, "rootfs")];
    raw_config(dir.path(), ok).validate().expect("valid");
    let long_id = vec![block(&disk, false, &"i".repeat(21))];
    let e = raw_config(dir.path(), long_id)
        .validate()
        .expect_err("long id");
    assert!(matches!(
        e,
        ConfigError::Block(BlockConfigError::IdTooLong {
            got: 21,
            max: 20,
            ..
        })
    ));
    let missing = vec![block("/nonexistent/disk.img".as_ref(), false, "")];
    let e = raw_config(dir.path(), missing)
        .validate()
        .expect_err("missing");
    assert!(matches!(
        e,
        ConfigError::Block(BlockConfigError::MissingFile(_))
    ));
}

fn run_vmm(dir: &std::path::Path, cfg: &VmConfig) -> i32 {
    let cfg_path = common::write_config(dir, cfg);
    Command::new(env!("CARGO_BIN_EXE_boxlite-vmm"))
        .arg("--config")
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("spawn boxlite-vmm")
        .code()
        .expect("exit code")
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn vmm_builds_a_vm_with_block_devices() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk");
    let devices = vec![block(&disk, false, "rw"), block(&disk, true, "ro")];
    // The guest halts at once: exit code 3 means the VM (devices included) was built.
    assert_eq!(
        run_vmm(dir.path(), &raw_config(dir.path(), devices)),
        boxlite_vmm::exit_code::GUEST_HALTED
    );
    let missing = vec![block("/nonexistent/disk.img".as_ref(), false, "")];
    assert_eq!(
        run_vmm(dir.path(), &raw_config(dir.path(), missing)),
        boxlite_vmm::exit_code::CONFIG_ERROR
    );
}
