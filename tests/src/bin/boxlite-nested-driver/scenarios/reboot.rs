//! `reboot`: DestroySandbox ends the VM, and boxlite-vmm exits with 0.

use crate::settings::Settings;
use crate::verdict::{ScenarioResult, Verdict};
use crate::vm::{vsock_support, Device, Vm};

/// DestroySandbox makes the guest reboot, and boxlite-vmm exits with 0.
pub async fn run(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (DestroySandbox goes over vsock)"
        )));
    }
    let mut vm = Vm::start(s, "reboot", 1, &[Device::Vsock])?;
    let conn = vm.connect(s.timeout).await?;
    let (status, took) = vm.destroy(&conn).await?;
    let reason = vm
        .files
        .vmm_log_line("VM ended")
        .and_then(|l| l.split_once("reason=").map(|(_, r)| r.to_owned()))
        .unwrap_or_else(|| "?".into());
    Ok(Verdict::Pass(format!(
        "DestroySandbox → guest reboot → boxlite-vmm exited {status} {:.2}s later; reason={reason}",
        took.as_secs_f64()
    )))
}
