//! The keys of `boxlite.toml`: one struct per table, with the defaults an
//! absent key takes.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The whole `boxlite.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    pub guest: GuestConfig,
    pub timeouts: TimeoutsConfig,
    pub runtime: RuntimeConfig,
    pub templates: TemplatesConfig,
}

/// `[hypervisor]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    pub backend: Backend,
    pub accel: Accel,
    /// Name (looked up, see [`super::find_binary`]) or absolute path.
    pub qemu_binary: String,
    pub virtiofsd_binary: String,
    pub vhost_vsock_binary: String,
    /// The built-in VMM, for backend `builtin`.
    pub vmm_binary: String,
    /// First uid (and gid) of the range the jailed `boxlite-vmm` of each
    /// sandbox runs as (`docs/security.md`, "The VMM jail").
    pub jail_id_base: u32,
    /// How many uids the range holds: each live sandbox leases one of its
    /// own, probing from the hash of its id (`hypervisor::jail_ids`).
    pub jail_id_count: u32,
}

/// 0x7000_0000: above the ranges distributions hand to users and to
/// rootless containers' subordinate ids, below 2^31 (which some tools
/// read as negative) and below systemd's dynamic users (0x7ffe_0000).
pub const DEFAULT_JAIL_ID_BASE: u32 = 0x7000_0000;
pub const DEFAULT_JAIL_ID_COUNT: u32 = 65536;

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            accel: Accel::Auto,
            qemu_binary: "qemu-system-x86_64".into(),
            virtiofsd_binary: "virtiofsd".into(),
            vhost_vsock_binary: "boxlite-vsock".into(),
            vmm_binary: "boxlite-vmm".into(),
            jail_id_base: DEFAULT_JAIL_ID_BASE,
            jail_id_count: DEFAULT_JAIL_ID_COUNT,
        }
    }
}

/// `hypervisor.backend`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `builtin` where KVM can boot Linux (VMX/SVM, `/dev/kvm`, no `kvm_pvm`), else `qemu`.
    Auto,
    /// `boxlite-vmm`, the built-in VMM.
    Builtin,
    /// QEMU's microvm machine with vhost-user helper daemons.
    Qemu,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Builtin => "builtin",
            Backend::Qemu => "qemu",
        })
    }
}

/// `hypervisor.accel`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when the host can run a standard Linux guest on it, else TCG
    /// (see [`super::decide_accel`]).
    Auto,
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// `[guest]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestConfig {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The VM's size when the pod sets no limit ([`crate::sizing`]).
    pub vcpus: u32,
    pub memory_mib: u32,
    /// The most a pod's limits may make a VM; a pod asking more is refused.
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    /// Added to a pod's memory limit: what the guest kernel, the agent and
    /// the initramfs root take, so the containers get the limit itself.
    pub reserved_memory_mib: u32,
    /// Memory a VM is built with beyond its pod's, held by the balloon from
    /// boot: what an update asking for more memory can give the guest
    /// ([`crate::sizing::VmSize::present_memory_mib`]). 0: memory is fixed.
    pub memory_headroom_mib: u32,
    /// The guest reports the pages it frees through the balloon and the VMM
    /// returns them to the host (both backends); off, a guest keeps on the
    /// host every page it ever touched.
    pub free_page_reporting: bool,
    /// Appended to the backend's own command line (`console=ttyS0 reboot=t
    /// panic=-1`).
    pub kernel_cmdline_extra: String,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            kernel: "/usr/share/boxlite/vmlinux".into(),
            initramfs: "/usr/share/boxlite/initramfs".into(),
            vcpus: 1,
            memory_mib: 512,
            max_vcpus: 16,
            max_memory_mib: 65536,
            reserved_memory_mib: 128,
            memory_headroom_mib: 0,
            free_page_reporting: true,
            kernel_cmdline_extra: String::new(),
        }
    }
}

/// `[timeouts]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// From VM start until the agent answers Health.Check. TCG boots are slow.
    pub agent_ready_secs: u64,
    /// From DestroySandbox until the VM process must have exited.
    pub shutdown_secs: u64,
    /// The host-side bound of each agent call (CreateContainer gets twice
    /// it); the long-polls (WaitProcess, GetOOMEvent) have none.
    pub agent_call_secs: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            agent_ready_secs: 30,
            shutdown_secs: 10,
            agent_call_secs: 30,
        }
    }
}

impl TimeoutsConfig {
    pub fn agent_ready(&self) -> Duration {
        Duration::from_secs(self.agent_ready_secs)
    }
    pub fn shutdown(&self) -> Duration {
        Duration::from_secs(self.shutdown_secs)
    }
    pub fn agent_call(&self) -> Duration {
        Duration::from_secs(self.agent_call_secs)
    }
}

/// `[templates]`: pod VMs restored from a snapshot of an agent-ready VM
/// instead of booted (builtin backend only; docs/templates.md).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TemplatesConfig {
    /// Restore sandboxes of the builtin backend from templates, building
    /// each on first use. Off: every sandbox cold-boots.
    pub enabled: bool,
    /// Where templates live: `<dir>/<key>/` per VM shape, with its
    /// `<key>.lock` beside it. Absolute.
    pub dir: PathBuf,
}

impl Default for TemplatesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            dir: "/var/lib/boxlite/templates".into(),
        }
    }
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Each sandbox gets `<state_dir>/<sandbox id>/`.
    pub state_dir: PathBuf,
    /// `RUST_LOG`-style filter: `info` or `warn,boxlite_runtime=debug`.
    pub log_level: String,
    /// `io.boxlite.*` annotations a pod may use to override settings (see
    /// [`crate::annotations`]). Empty: none.
    pub allowed_annotations: Vec<String>,
    /// The most each log of a sandbox (the guest console, the VMM's and
    /// each helper's output) may hold on the host, in KiB; past it the
    /// older half is dropped. At least 16.
    pub sandbox_log_max_kib: u64,
    /// The cgroup a sandbox's VM processes go under when its spec names
    /// none: `<cgroup_parent>/<sandbox id>` (cgroupfs form, absolute).
    pub cgroup_parent: String,
    /// Host memory (MiB of `MemAvailable`) a sandbox boot must leave free,
    /// or it is refused ([`crate::sizing::check_host_memory`]).
    pub host_memory_floor_mib: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            state_dir: "/run/boxlite".into(),
            log_level: "info".into(),
            allowed_annotations: Vec::new(),
            sandbox_log_max_kib: 4096,
            cgroup_parent: "/boxlite".into(),
            host_memory_floor_mib: 256,
        }
    }
}
