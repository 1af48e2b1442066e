//! `boot`: the guest kernel boots under boxlite-vmm and the agent starts.

use super::AGENT_READY;
use crate::settings::Settings;
use crate::verdict::{ScenarioResult, Verdict};
use crate::vm::{Device, Vm};

/// The guest kernel boots under boxlite-vmm and the agent (PID 1) starts.
pub async fn run(s: &Settings) -> ScenarioResult {
    let vm = Vm::start(s, "boot", 1, &[Device::Rng])?;
    boot_to_agent_ready(s, vm, "boxlite-vmm").await
}

/// Waits for the agent's ready line and reports the time since `vmm` was
/// spawned, the guest clock then, and the kernel release.
pub async fn boot_to_agent_ready(s: &Settings, mut vm: Vm, vmm: &str) -> ScenarioResult {
    let ready = vm.wait_console(AGENT_READY, s.timeout).await?;
    let guest_t = vm.files.guest_time_of(AGENT_READY);
    let banner = vm
        .files
        .console_line("Linux version")
        .map(|l| l.split_whitespace().nth(4).unwrap_or("?").to_owned())
        .unwrap_or_default();
    vm.kill();
    Ok(Verdict::Pass(format!(
        "kernel {banner} booted, agent ready {:.2}s after {vmm} started (guest clock {})",
        ready.as_secs_f64(),
        guest_t
            .map(|t| format!("{t:.2}s"))
            .unwrap_or_else(|| "?".into())
    )))
}
