//! `net`: virtio-net over a tap in the test host; frames cross both ways.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;

use tokio::net::TcpStream;

use crate::host_net;
use crate::settings::Settings;
use crate::verdict::{Failure, ScenarioResult, Verdict};
use crate::vm::{vsock_support, Device, Vm};

/// The test host's tap and address, the guest's.
pub const TAP_NAME: &str = "bxnested0";
pub const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
pub const NET_PREFIX: u8 = 24;
pub const GUEST_MAC: &str = "02:42:0a:d5:00:02";
/// A TCP port nothing in the guest listens on: the guest kernel answers
/// the SYN with a RST.
pub const CLOSED_PORT: u16 = 9;

/// The devices of a VM with one NIC: rng, vsock (the agent) and
/// virtio-net on `tap` (its fd inherited by the VMM) with `mac`.
pub fn nic_devices(tap: &host_net::HostTap, mac: &'static str) -> Result<[Device; 3], Failure> {
    Ok([
        Device::Rng,
        Device::Vsock,
        Device::Net {
            tap_fd: tap.inheritable_fd()?,
            mac,
        },
    ])
}

/// Connects from the test host to `target`, a closed port in `vm`'s
/// guest, and expects the guest kernel's refusal (ARP and SYN went in,
/// its answers and RST came out) within 20 s; returns how long it took.
pub async fn expect_refused(vm: &Vm, target: SocketAddr) -> Result<Duration, Failure> {
    let t = Instant::now();
    let attempt = tokio::time::timeout(Duration::from_secs(20), TcpStream::connect(target)).await;
    match attempt {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(t.elapsed()),
        Ok(Err(e)) => Err(vm.fail(format!("TCP connect to {target}: {e}, want refused"))),
        Ok(Ok(_)) => Err(vm.fail(format!(
            "TCP connect to {target} succeeded: something listens there, want refused"
        ))),
        Err(_) => Err(vm.fail(format!(
            "TCP connect to {target} got no answer within 20s (no frames through the tap?)"
        ))),
    }
}

/// virtio-net over a tap: the agent gives the guest NIC (found by MAC) an
/// address, and a TCP connection from the test host to a closed port in
/// the guest is refused: an ARP exchange and a SYN went in, the guest
/// kernel's answers and RST came out.
pub async fn run(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (UpdateInterface goes over vsock)"
        )));
    }
    let tap = host_net::HostTap::create(TAP_NAME, HOST_IP, NET_PREFIX)?;
    let mut vm = Vm::start(s, "net", 1, &nic_devices(&tap, GUEST_MAC)?)?;
    // The VMM holds the tap now; the tap goes when the VMM does.
    drop(tap);
    let conn = vm.connect(s.timeout).await?;
    vm.configure_nic(&conn, GUEST_MAC, None, GUEST_IP, NET_PREFIX)
        .await?;
    let target = std::net::SocketAddr::from((GUEST_IP, CLOSED_PORT));
    let refused_after = expect_refused(&vm, target).await?;
    vm.expect_virtio_device(&conn, VIRTIO_ID_NET, "virtio-net")
        .await?;
    vm.destroy(&conn).await?;
    let tap_gone = !Path::new("/sys/class/net").join(TAP_NAME).exists();
    if !tap_gone {
        return Err(Failure::from(format!(
            "tap {TAP_NAME} still exists after boxlite-vmm exited"
        )));
    }
    Ok(Verdict::Pass(format!(
        "guest NIC {GUEST_MAC} got {GUEST_IP}/{NET_PREFIX}; TCP from the test host's tap \
         ({HOST_IP}) to {target} refused by the guest after {:.0} ms (ARP + SYN in, RST out); \
         tap gone with the VMM",
        refused_after.as_secs_f64() * 1000.0
    )))
}
