//! `health`: the agent answers through the hybrid vsock socket, and
//! GuestInfo lists one virtio device of each kind the VMM has.

use boxlite_protocol::health::health_check_response::ServingStatus;
use virtio_bindings::virtio_ids::{
    VIRTIO_ID_BLOCK, VIRTIO_ID_FS, VIRTIO_ID_NET, VIRTIO_ID_RNG, VIRTIO_ID_VSOCK,
};

use super::blk::{write_disk_image, DISK_ID};
use super::fs::{Virtiofsd, FS_TAG};
use super::net::{GUEST_MAC, HOST_IP, NET_PREFIX, TAP_NAME};
use crate::host_net;
use crate::settings::Settings;
use crate::verdict::{ScenarioResult, Verdict};
use crate::vm::{vsock_support, Device, Vm, RPC_TIMEOUT};

/// Through the hybrid vsock socket: Health.Check SERVING, Version, and
/// GuestInfo lists every virtio device the VMM gave the guest — one of each
/// kind: net, blk, rng, vsock, fs.
pub async fn run(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(reason));
    }
    let _fsd = Virtiofsd::start(s)?;
    write_disk_image(s)?;
    let tap = host_net::HostTap::create(TAP_NAME, HOST_IP, NET_PREFIX)?;
    let devices = [
        Device::Rng,
        Device::Vsock,
        Device::Fs { tag: FS_TAG },
        Device::Block { id: DISK_ID },
        Device::Net {
            tap_fd: tap.inheritable_fd()?,
            mac: GUEST_MAC,
        },
    ];
    let mut vm = Vm::start(s, "health", 1, &devices)?;
    drop(tap);
    let conn = vm.connect(s.timeout).await?;
    let answered = vm.started.elapsed();
    let status = conn
        .check(RPC_TIMEOUT)
        .await
        .map_err(|e| vm.fail(format!("Health.Check failed: {e}")))?;
    if status != ServingStatus::SERVING {
        return Err(vm.fail(format!("Health.Check answered {status:?}")));
    }
    let version = conn
        .version(RPC_TIMEOUT)
        .await
        .map_err(|e| vm.fail(format!("Health.Version failed: {e}")))?;
    let info = vm.guest_info(&conn).await?;
    let mut ids: Vec<u32> = info.virtio_devices.iter().map(|d| d.device_id).collect();
    ids.sort_unstable();
    let want = [
        VIRTIO_ID_NET,
        VIRTIO_ID_BLOCK,
        VIRTIO_ID_RNG,
        VIRTIO_ID_VSOCK,
        VIRTIO_ID_FS,
    ];
    if ids != want {
        return Err(vm.fail(format!(
            "GuestInfo lists virtio device ids {ids:?}, want {want:?} (net, blk, rng, vsock, fs)"
        )));
    }
    let devices = info
        .virtio_devices
        .iter()
        .map(|d| format!("{}={}", d.name, d.device_id))
        .collect::<Vec<_>>()
        .join(",");
    vm.destroy(&conn).await?;
    Ok(Verdict::Pass(format!(
        "Health SERVING {:.2}s after boxlite-vmm started; agent {} protocol {}; kernel {}; virtio {devices}",
        answered.as_secs_f64(),
        version.agent_version,
        version.protocol_version,
        info.kernel_release
    )))
}
