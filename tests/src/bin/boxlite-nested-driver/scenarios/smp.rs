//! `smp`: a guest with two vCPUs brings both up.

use std::fmt::Write as _;

use super::AGENT_READY;
use crate::settings::Settings;
use crate::verdict::{ScenarioResult, Verdict};
use crate::vm::{vsock_support, Device, Vm};

/// Two vCPUs come up: the kernel brings up 2 CPUs, and GuestInfo (when the
/// VMM has vsock) reports 2 online.
pub async fn run(s: &Settings) -> ScenarioResult {
    let vsock = vsock_support(s)?;
    let devices: &[Device] = if vsock.is_ok() {
        &[Device::Rng, Device::Vsock]
    } else {
        &[Device::Rng]
    };
    let mut vm = Vm::start(s, "smp", 2, devices)?;
    let ready = vm.wait_console(AGENT_READY, s.timeout).await?;
    let brought_up = vm.files.console_line("smp: Brought up");
    if !brought_up.as_deref().is_some_and(|l| l.contains(" 2 CPUs")) {
        return Err(vm.fail(format!(
            "the guest did not bring up 2 CPUs (console: {})",
            brought_up
                .as_deref()
                .unwrap_or("no \"smp: Brought up\" line")
        )));
    }
    let mut detail = format!(
        "guest brought up 2 CPUs, agent ready {:.2}s after start",
        ready.as_secs_f64()
    );
    if vsock.is_ok() {
        let conn = vm.connect(s.timeout).await?;
        let info = vm.guest_info(&conn).await?;
        if info.online_cpus != 2 {
            return Err(vm.fail(format!(
                "GuestInfo online_cpus = {}, want 2",
                info.online_cpus
            )));
        }
        let _ = write!(detail, "; GuestInfo online_cpus=2");
        vm.destroy(&conn).await?;
    } else {
        vm.kill();
    }
    Ok(Verdict::Pass(detail))
}
