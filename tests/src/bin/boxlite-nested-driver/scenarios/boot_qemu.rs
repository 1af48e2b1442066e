//! `boot-qemu`: not a test but the benchmark's QEMU row
//! (scripts/bench-nested.sh).

use super::boot::boot_to_agent_ready;
use crate::settings::Settings;
use crate::verdict::{ScenarioResult, Verdict};
use crate::vm::Vm;

/// The benchmark's QEMU row (not a test): the same guest under QEMU
/// microvm with KVM, as the runtime's qemu backend runs it, with the rng
/// device only, like `boot`. Needs a test host built `--with-qemu`.
pub async fn run(s: &Settings) -> ScenarioResult {
    if !s.qemu().is_file() {
        return Ok(Verdict::Skip(format!(
            "no {} in this test host (cargo xtask testhost --with-qemu)",
            s.qemu().display()
        )));
    }
    let vm = Vm::start_qemu(s, "boot-qemu")?;
    boot_to_agent_ready(s, vm, "qemu-system-x86_64").await
}
