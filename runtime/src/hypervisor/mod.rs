//! The hypervisor abstraction the shim uses for every backend.
//!
//! A backend is built from the config and a [`VmSpec`] with
//! [`new_hypervisor`]; shares and taps are added before [`Hypervisor::start`];
//! [`Hypervisor::wait_ready`] waits for the agent's readiness announcement
//! ([`ready`]), then returns an [`AgentConnection`] once the guest agent
//! answers `Health.Check` through the hybrid vsock socket ([`agent`]);
//! [`Hypervisor::stop`] asks the agent to shut the VM down and kills what is
//! left after the shutdown timeout.
//!
//! Both backends are a group of processes ([`process_vm::ProcessVm`]); what
//! differs — binaries, sockets, how the VMM is spawned, the last way to end
//! it — is a [`launcher::Launcher`]: [`qemu`] and [`builtin`].
//!
//! The sandbox directory (`<state_dir>/<id>/`) holds, for every backend:
//! `console.log` (guest serial console), `vsock.sock` (hybrid vsock), and the
//! backend's own files (for `qemu`: `vhost-vsock.sock`, `fs-<tag>.sock`,
//! `*.log` of each process and `*.pid`). [`cleanup_stale_processes`] uses the
//! pid files to clean up after a crashed shim.

pub mod agent;
pub mod builtin;
pub mod capped_log;
mod error;
pub mod jail_ids;
pub mod launcher;
mod lock_file;
pub mod process;
pub mod process_vm;
pub mod qemu;
pub mod ready;
mod spec;
mod stale;
pub mod template;
#[cfg(test)]
mod test_rig;
#[cfg(test)]
mod vmm_contract_tests;

use std::path::{Path, PathBuf};

use async_trait::async_trait;

use crate::config::{Config, ResolvedBackend};
use crate::hybrid_vsock::HybridVsock;
use crate::network;

// The module's face: what callers name as `hypervisor::X` (the files
// behind it are an implementation detail).
pub use agent::{wait_for_agent, wait_for_announcement, AgentConnection};
pub use error::{ExitReport, HypervisorError};
pub use jail_ids::{JailIdRange, JailIds, JailLease};
pub use spec::{validate_share_tag, NetDevice, Share, VmSpec};
pub use stale::cleanup_stale_processes;

/// Guest serial console, in the sandbox directory.
pub const CONSOLE_LOG: &str = "console.log";
/// Hybrid vsock socket, in the sandbox directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// virtio-fs tags are at most 36 bytes (virtio spec, `struct virtio_fs_config`).
pub const MAX_SHARE_TAG_LEN: usize = 36;
/// How long [`Hypervisor::set_guest_memory`] waits for the guest to fill
/// or empty its balloon to the new target: the guest moves a MiB per
/// request (256 pages), so even gigabytes take well under a second on an
/// idle VM; a busy or nested one gets ten times that and more.
pub const BALLOON_SETTLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);
/// `sockaddr_un.sun_path` is 108 bytes including the NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;

/// What every backend offers the shim. Methods take `&self`, so one task can
/// `kill` while another waits in `wait_ready`.
#[async_trait]
pub trait Hypervisor: Send + Sync {
    /// The sandbox this VM belongs to.
    fn sandbox_id(&self) -> &str;

    /// Shares `host_dir` under virtio-fs `tag`. Only before `start`.
    async fn add_share(
        &self,
        tag: &str,
        host_dir: &Path,
        read_only: bool,
    ) -> Result<(), HypervisorError>;

    /// Adds a virtio-net device on `tap`. Only before `start`.
    async fn add_net(
        &self,
        tap: network::TapDevice,
        mac: network::MacAddr,
    ) -> Result<(), HypervisorError>;

    /// Checks every file and binary, then starts the VM (and its helpers).
    /// On error nothing is left running and no socket is left behind.
    async fn start(&self) -> Result<(), HypervisorError>;

    /// Waits until the agent answers `Health.Check` on vsock port 1024,
    /// at most the agent-ready timeout counted from `start`. Fails at once if
    /// the VM or a helper process dies.
    async fn wait_ready(&self) -> Result<AgentConnection, HypervisorError>;

    /// Graceful shutdown: `Agent.DestroySandbox`, then wait for the VM
    /// process to exit within the shutdown timeout, then kill what is left.
    /// Idempotent.
    async fn stop(&self) -> Result<(), HypervisorError>;

    /// Kills the VM and its helpers at once and removes their sockets.
    /// Idempotent.
    async fn kill(&self) -> Result<(), HypervisorError>;

    /// Fails when the VM or one of its helpers has exited on its own.
    async fn check_alive(&self) -> Result<(), HypervisorError>;
    /// Gives the running guest `mib` of the VM's memory: the balloon holds
    /// the rest (`VmSpec::balloon_mib` of it from boot), so a lower target
    /// hands memory to the guest and a higher one takes it back. Returns
    /// once the guest's balloon holds the new target, and fails, saying
    /// what it holds, if the guest has not got there within
    /// [`BALLOON_SETTLE_TIMEOUT`].
    async fn set_guest_memory(&self, mib: u32) -> Result<(), HypervisorError>;

    /// For a VM restored from a template, the MAC each NIC has in the
    /// guest now (the template's, in device order): the shim has the agent
    /// give each the pod's (UpdateInterface's `current_hw_addr`). None for
    /// a booted VM, whose NICs have the pod's MACs from the start.
    fn restored_nic_macs(&self) -> Option<Vec<network::MacAddr>> {
        None
    }

    /// Pid of the VM process while it runs.
    fn pid(&self) -> Option<u32>;

    /// The hybrid vsock unix socket of this VM.
    fn vsock_socket_path(&self) -> PathBuf;

    /// The guest serial console log.
    fn console_log_path(&self) -> PathBuf;

    /// A connector for the hybrid vsock socket, naming the console log in
    /// its errors. Use it for the stdio (1025) and log (1026) ports.
    fn hybrid_vsock(&self) -> HybridVsock {
        HybridVsock::new(self.vsock_socket_path()).with_console_log(self.console_log_path())
    }
}

/// Builds the backend the config selects for `spec`. Resolves the backend,
/// the accelerator and every helper binary first, so a missing binary is
/// reported before anything is created or spawned.
pub fn new_hypervisor(
    config: &Config,
    spec: VmSpec,
) -> Result<Box<dyn Hypervisor>, HypervisorError> {
    spec::check_sandbox_id(&spec.id)?;
    let resolved = config.resolve_hypervisor()?;
    tracing::info!(
        sandbox_id = %spec.id,
        backend = ?resolved.backend,
        accel = %resolved.accel,
        reason = %resolved.accel_reason,
        "hypervisor selected"
    );
    match resolved.backend {
        ResolvedBackend::Qemu => Ok(Box::new(qemu::QemuHypervisor::new(spec, resolved)?)),
        ResolvedBackend::Builtin => {
            let templates = config
                .templates
                .enabled
                .then(|| template::TemplateStore::new(config.templates.dir.clone()));
            Ok(Box::new(builtin::BuiltinHypervisor::with_templates(
                spec, resolved, templates,
            )?))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_backend_resolves_its_vmm_binary() {
        let mut config = Config::default();
        config.hypervisor.backend = crate::config::Backend::Builtin;
        config.hypervisor.vmm_binary = "/nonexistent/boxlite-vmm".into();
        let spec = VmSpec::from_config(&config, "x").unwrap();
        let err = new_hypervisor(&config, spec).err().unwrap().to_string();
        if Path::new("/dev/kvm").exists() {
            assert!(err.contains("hypervisor.vmm_binary"), "{err}");
        } else {
            assert!(err.contains("needs KVM"), "{err}");
        }
    }
}
