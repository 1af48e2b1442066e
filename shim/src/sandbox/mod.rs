//! The sandbox manager: one VM per sandbox, the container table, and the
//! work behind every Task call.
//!
//! The VM is booted by the first Create (the pod sandbox container, or the
//! only container of a plain `ctr run`), with the sandbox's `shared/`
//! directory given to it as virtio-fs tag [`SHARED_TAG`] and mounted by
//! `CreateSandbox`. Containers are created in the guest by the agent; the
//! shim keeps each process's [`TaskState`] and checks every transition
//! before it asks the agent. The VM stops when the last container is gone
//! and containerd calls Shutdown.
//!
//! This file holds the [`Sandbox`] itself and what every part shares; the
//! work is split by job:
//!
//! | module | job |
//! |---|---|
//! | [`vm_factory`] | making a sandbox's VM from `boxlite.toml` |
//! | [`lifecycle`] | booting the VM, watching OOM, stopping it, Shutdown |
//! | [`create`] | Create: rootfs, hooks, the container in the guest |
//! | [`process_calls`] | Start, Exec, Kill, Delete, Wait and the exit waiter |
//! | [`container_calls`] | the small calls: pause, resume, update, stats, … |
//! | [`cleanup`] | the sandbox directory after a crash or at shutdown |
//! | [`rollback`] | undoing a half-done Create or boot |

pub mod cleanup;
pub mod container;
mod container_calls;
mod create;
mod lifecycle;
pub mod netns_holder;
pub mod network;
mod process_calls;
mod rollback;
pub mod state;
pub mod state_file;
pub mod vm_factory;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use boxlite_protocol::error_chain::chain;
use boxlite_runtime::Hypervisor;
use tokio::task::JoinHandle;

use crate::agent_client::GuestAgent;
use crate::error::{Result, ShimError};
use crate::events::EventSink;
use crate::rootfs::MountSpec;
use crate::stdio::StdioPaths;
pub use cleanup::{cleanup_sandbox_dir, CONSOLE_ARCHIVE_ENV};
pub use container::{Container, Process, ProcessStatus};
pub use network::{NetworkRecord, PodNetns};
pub use state::{ExitInfo, TaskState};
pub use state_file::{SandboxState, MOUNTS_DIR, SHARED_DIR, SHARED_TAG};
pub use vm_factory::{ConfigVmFactory, VmFactory, VmRequest};

/// Connecting one stdio stream through the hybrid socket.
pub const STDIO_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After the agent reported an exit: how long stdout/stderr may take to drain.
pub const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The same when WaitProcess failed (the streams may never end).
pub const UNKNOWN_EXIT_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Status reported when the agent cannot tell how a process ended.
pub const UNKNOWN_EXIT_STATUS: u32 = 255;

/// What Create needs, converted from containerd's request.
#[derive(Debug, Clone, Default)]
pub struct CreateRequest {
    pub id: String,
    pub bundle: PathBuf,
    pub rootfs: Vec<MountSpec>,
    pub stdio: StdioPaths,
}

/// What Exec needs.
#[derive(Debug, Clone, Default)]
pub struct ExecRequest {
    pub container_id: String,
    pub exec_id: String,
    pub stdio: StdioPaths,
    pub process_json: Vec<u8>,
}

/// Delete's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deleted {
    pub pid: u32,
    pub exit: ExitInfo,
}

/// One guest process of a container, for Pids.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestProcess {
    pub pid: u32,
    pub exec_id: String,
}

/// A booted VM and its agent.
struct Vm {
    hv: Box<dyn Hypervisor>,
    agent: GuestAgent,
    oom_watcher: JoinHandle<()>,
    /// Its size at boot ([`boxlite_runtime::sizing`]).
    size: boxlite_runtime::sizing::VmSize,
    /// vCPUs online now: from `size.vcpus` up to `size.present_vcpus`,
    /// grown by updates that ask for more CPU.
    online_vcpus: std::sync::atomic::AtomicU32,
    /// The guest's memory now, in MiB: from `size.memory_mib` up to
    /// `size.present_memory_mib`, grown by updates that ask for more. The
    /// lock makes one update at a time resize it.
    guest_memory_mib: tokio::sync::Mutex<u32>,
}

pub struct Sandbox {
    id: String,
    namespace: String,
    factory: Arc<dyn VmFactory>,
    events: Arc<dyn EventSink>,
    vm: tokio::sync::Mutex<Option<Arc<Vm>>>,
    containers: RwLock<HashMap<String, Arc<Container>>>,
    /// Serialises Create and Delete (mounts, table, the sandbox record).
    table_lock: tokio::sync::Mutex<()>,
    /// The pod network wired to the VM, to tear down with it.
    network: std::sync::Mutex<Option<NetworkRecord>>,
    exit: Arc<containerd_shim::ExitSignal>,
}

impl Sandbox {
    pub fn new(
        id: &str,
        namespace: &str,
        factory: Arc<dyn VmFactory>,
        events: Arc<dyn EventSink>,
        exit: Arc<containerd_shim::ExitSignal>,
    ) -> Arc<Self> {
        Arc::new(Self {
            id: id.to_owned(),
            namespace: namespace.to_owned(),
            factory,
            events,
            vm: tokio::sync::Mutex::new(None),
            containers: RwLock::new(HashMap::new()),
            table_lock: tokio::sync::Mutex::new(()),
            network: std::sync::Mutex::new(None),
            exit,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    fn dir(&self) -> Result<PathBuf> {
        self.factory.sandbox_dir(&self.id)
    }

    /// Where the shim mounts containers' rootfs and volumes (not the
    /// guest's view: see [`MOUNTS_DIR`]).
    fn mounts_dir(&self) -> Result<PathBuf> {
        Ok(self.dir()?.join(MOUNTS_DIR))
    }

    /// The guest's view of the share: what virtiofsd serves.
    fn shared_dir(&self) -> Result<PathBuf> {
        Ok(self.dir()?.join(SHARED_DIR))
    }

    /// The guest path of the shared directory.
    pub fn guest_shared_dir() -> String {
        boxlite_protocol::default_share_mount_point(SHARED_TAG)
    }

    pub fn container(&self, id: &str) -> Result<Arc<Container>> {
        self.containers
            .read()
            .expect("container table lock")
            .get(id)
            .cloned()
            .ok_or_else(|| ShimError::NotFound(format!("container {id:?}")))
    }

    pub fn process(&self, id: &str, exec_id: &str) -> Result<Arc<Process>> {
        self.container(id)?.process(exec_id)
    }

    fn container_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .containers
            .read()
            .expect("container table lock")
            .keys()
            .cloned()
            .collect();
        ids.sort();
        ids
    }

    async fn running_vm(&self) -> Result<Arc<Vm>> {
        self.vm.lock().await.clone().ok_or_else(|| {
            ShimError::FailedPrecondition(format!("sandbox {:?} has no running VM", self.id))
        })
    }

    async fn agent(&self) -> Result<GuestAgent> {
        Ok(self.running_vm().await?.agent.clone())
    }

    fn save_state(&self, vm_pid: Option<u32>) {
        let Ok(dir) = self.dir() else { return };
        let state = SandboxState {
            sandbox_id: self.id.clone(),
            namespace: self.namespace.clone(),
            shim_pid: std::process::id(),
            vm_pid,
            containers: self.container_ids(),
            network: self.network.lock().expect("network lock").clone(),
        };
        if let Err(e) = state.save(&dir) {
            tracing::error!(error = %chain(&e), "cannot save the sandbox record");
        }
    }
}

/// Refuses an id containerd's rule refuses; `op` says what was asked
/// ("create the container", …).
pub(crate) fn check_id(op: &'static str, kind: &'static str, id: &str) -> Result<()> {
    boxlite_protocol::ids::validate(kind, id).map_err(|error| ShimError::InvalidId { op, error })
}
