//! `blk`: a read-only virtio-blk disk with an id, as the guest sees it;
//! and its image (the `health` scenario's too).

use std::fs;

use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;

use crate::disk;
use crate::settings::Settings;
use crate::verdict::{Failure, ScenarioResult, Verdict};
use crate::vm::{vsock_support, Device, Vm};

/// The disk: its size, its one partition, its serial.
const DISK_SECTORS: u64 = 2048;
const DISK_PARTITION: disk::Partition = disk::Partition {
    start: 64,
    sectors: 1000,
};
pub const DISK_ID: &str = "nested-disk0";

/// A read-only virtio-blk disk with an id: the guest kernel finds the
/// image's MBR partition (data read through the queue), the disk's size,
/// its read-only flag and its serial (GET_ID), as the agent reads them
/// from sysfs.
pub async fn run(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (ReadFile goes over vsock)"
        )));
    }
    write_disk_image(s)?;
    let mut vm = Vm::start(
        s,
        "blk",
        1,
        &[Device::Rng, Device::Vsock, Device::Block { id: DISK_ID }],
    )?;
    let conn = vm.connect(s.timeout).await?;
    let want = [
        ("/sys/block/vda/size", DISK_SECTORS.to_string()),
        ("/sys/block/vda/ro", "1".to_owned()),
        ("/sys/block/vda/serial", DISK_ID.to_owned()),
        (
            "/sys/block/vda/vda1/start",
            DISK_PARTITION.start.to_string(),
        ),
        (
            "/sys/block/vda/vda1/size",
            DISK_PARTITION.sectors.to_string(),
        ),
    ];
    for (path, value) in &want {
        let got = vm.read_guest_file(&conn, path).await?;
        if got.trim() != value {
            return Err(vm.fail(format!(
                "guest {path} reads {:?}, want {value:?}",
                got.trim()
            )));
        }
    }
    vm.expect_virtio_device(&conn, VIRTIO_ID_BLOCK, "virtio-blk")
        .await?;
    vm.destroy(&conn).await?;
    Ok(Verdict::Pass(format!(
        "guest sees vda: {DISK_SECTORS} sectors, read-only, serial {DISK_ID:?} (GET_ID), and \
         the image's MBR partition vda1 at {} + {} sectors (sector 0 read through the queue)",
        DISK_PARTITION.start, DISK_PARTITION.sectors
    )))
}

/// The `blk` scenario's image at [`Settings::disk_image`].
pub fn write_disk_image(s: &Settings) -> Result<(), Failure> {
    fs::create_dir_all(&s.work)?;
    disk::write_mbr_image(&s.disk_image(), DISK_SECTORS, DISK_PARTITION)
        .map_err(|e| Failure::from(format!("cannot write {}: {e}", s.disk_image().display())))
}
