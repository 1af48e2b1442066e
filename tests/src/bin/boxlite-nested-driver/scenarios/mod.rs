//! The scenarios, one file each, and [`run`], which picks one by name.
//! Each returns a [`ScenarioResult`]; `main` prints it.

mod balloon;
mod blk;
mod boot;
mod boot_qemu;
mod fs;
mod guest_connect;
mod health;
mod net;
mod reboot;
mod smp;
mod snapshot;
mod snapshot_fs;
mod snapshot_net;

use crate::settings::{Settings, ALL_SCENARIOS};
use crate::verdict::{ScenarioResult, Verdict};

/// The agent's "ready" log line (docs/agent.md, guest-mode start-up step 9).
const AGENT_READY: &str = "agent ready";

/// Runs scenario `name`.
pub async fn run(name: &str, s: &Settings) -> ScenarioResult {
    match name {
        "boot" => boot::run(s).await,
        "smp" => smp::run(s).await,
        "health" => health::run(s).await,
        "reboot" => reboot::run(s).await,
        "guest-connect" => guest_connect::run(s).await,
        "fs" => fs::run(s).await,
        "blk" => blk::run(s).await,
        "net" => net::run(s).await,
        "balloon" => balloon::run(s).await,
        "snapshot" => snapshot::run(s).await,
        "snapshot-fs" => snapshot_fs::run(s).await,
        "snapshot-net" => snapshot_net::run(s).await,
        "boot-qemu" => boot_qemu::run(s).await,
        other => Ok(Verdict::Fail(format!(
            "unknown scenario {other:?} (known: {ALL_SCENARIOS})"
        ))),
    }
}
