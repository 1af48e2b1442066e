//! `snapshot-net`: a template with a virtio-net device, restored onto
//! another tap under the pod's own MAC.
//!
//! The template's guest probes its NIC at boot with the template's MAC
//! (tap A). The clone gets tap B and the pod's MAC in its config; its
//! guest still has the template's MAC (the driver read it at probe), so
//! UpdateInterface finds the link by that one (`current_hw_addr`) and
//! gives it the pod's before the address. Then a TCP connection from the
//! test host's tap B to a closed port in the clone must be refused: ARP
//! and SYN went in through the restored device, answers came out with
//! the pod's MAC.

use std::net::Ipv4Addr;

use boxlite_vmm_api::config::MemoryMode;

use super::net::{expect_refused, nic_devices, CLOSED_PORT};
use super::snapshot::{restore, Template};
use crate::host_net::HostTap;
use crate::settings::Settings;
use crate::verdict::{ScenarioResult, Verdict};
use crate::vm::{vsock_support, Vm, VmOptions};

const TEMPLATE_TAP: &str = "bxsnap0";
const TEMPLATE_MAC: &str = "02:42:0a:d6:00:02";
const CLONE_TAP: &str = "bxsnap1";
const POD_MAC: &str = "02:42:0a:d7:00:02";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 215, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 215, 0, 2);
const PREFIX: u8 = 24;

pub async fn run(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (UpdateInterface goes over vsock)"
        )));
    }
    let template_tap = HostTap::create(TEMPLATE_TAP, Ipv4Addr::new(10, 214, 0, 1), PREFIX)?;
    let devices = nic_devices(&template_tap, TEMPLATE_MAC)?;
    let (template, _) = Template::take(s, "snapshot-net", &devices, &VmOptions::default()).await?;
    drop(template_tap);

    let clone_tap = HostTap::create(CLONE_TAP, HOST_IP, PREFIX)?;
    let devices = nic_devices(&clone_tap, POD_MAC)?;
    let opts = template.restore_options(MemoryMode::Auto, &VmOptions::default());
    let mut vm = Vm::start_with(s, "snapshot-net-clone", 1, &devices, &opts)?;
    // The VMM holds tap B now.
    drop(clone_tap);
    restore(&mut vm, &template.saved).await?;
    let conn = vm.connect(s.timeout).await?;
    let nic = vm
        .configure_nic(&conn, POD_MAC, Some(TEMPLATE_MAC), GUEST_IP, PREFIX)
        .await?;
    if nic.hw_addr != POD_MAC {
        return Err(vm.fail(format!(
            "the clone's NIC {} has MAC {}, want {POD_MAC}",
            nic.name, nic.hw_addr
        )));
    }
    let target = std::net::SocketAddr::from((GUEST_IP, CLOSED_PORT));
    expect_refused(&vm, target).await?;
    vm.kill();
    Ok(Verdict::Pass(format!(
        "the clone's NIC {} took the pod's MAC {POD_MAC} (the template's was {TEMPLATE_MAC}) \
         and {GUEST_IP}/{PREFIX}; TCP from tap {CLONE_TAP} to {target} refused by the guest \
         through the restored virtio-net",
        nic.name
    )))
}
