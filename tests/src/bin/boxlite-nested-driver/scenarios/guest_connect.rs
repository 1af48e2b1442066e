//! `guest-connect`: a connection from the guest reaches the host.

use crate::settings::Settings;
use crate::verdict::{ScenarioResult, Verdict};
use crate::vm::{vsock_support, Device, Vm};

/// The guest connects to the host: the agent's readiness announcement
/// (host port 1027) crosses boxlite-vmm's vsock device to the
/// `<uds>_1027` unix listener; host→guest still works after it.
pub async fn run(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(reason));
    }
    let mut vm = Vm::start(s, "guest-connect", 1, &[Device::Rng, Device::Vsock])?;
    let announcement = vm.announcement(s.timeout).await?;
    let announced = vm.started.elapsed();
    if announcement.protocol_version != boxlite_protocol::PROTOCOL_VERSION {
        return Err(vm.fail(format!("the agent announced {announcement:?}")));
    }
    let conn = vm.connect(s.timeout).await?;
    vm.destroy(&conn).await?;
    Ok(Verdict::Pass(format!(
        "guest → host port {} arrived on the <uds>_{} listener {:.2}s after boxlite-vmm started \
         (agent {}); host → guest Health answered after it",
        boxlite_protocol::READY_VSOCK_PORT,
        boxlite_protocol::READY_VSOCK_PORT,
        announced.as_secs_f64(),
        announcement.agent_version
    )))
}
