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

pub mod container;
pub mod netns_holder;
pub mod network;
pub mod state;
pub mod state_file;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use boxlite_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest, GetOOMEventRequest,
    ListProcessesRequest, MountShareRequest, PauseContainerRequest, RemoveContainerRequest,
    ResizePtyRequest, ResumeContainerRequest, SignalProcessRequest, StartContainerRequest,
    StatsContainerRequest, StatsContainerResponse, StdioConfig, UpdateContainerRequest,
    WaitProcessRequest,
};
use boxlite_runtime::network::PodNetwork;
use boxlite_runtime::{AgentConnection, Config, Hypervisor, VmSpec};
use tokio::task::JoinHandle;

use crate::error::{Result, ShimError};
use crate::events::{EventSink, TaskEvent};
use crate::hooks::{ContainerHooks, HookKind};
use crate::rootfs::{self, MountSpec};
use crate::stdio::{Relay, StdioPaths};
pub use container::{Container, Process, ProcessStatus};
pub use network::{NetworkRecord, PodNetns};
pub use state::{ExitInfo, TaskState};
pub use state_file::{SandboxState, SHARED_DIR, SHARED_TAG};

/// Budget of ordinary agent calls.
pub const AGENT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// CreateContainer mounts and sets up a whole container.
pub const AGENT_CREATE_TIMEOUT: Duration = Duration::from_secs(60);
/// Connecting one stdio stream through the hybrid socket.
pub const STDIO_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// After the agent reported an exit: how long stdout/stderr may take to drain.
pub const OUTPUT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The same when WaitProcess failed (the streams may never end).
pub const UNKNOWN_EXIT_DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Seconds the agent gives a container to stop on RemoveContainer.
pub const REMOVE_TIMEOUT_SECS: u32 = 10;
/// Status reported when the agent cannot tell how a process ended.
pub const UNKNOWN_EXIT_STATUS: u32 = 255;

/// Makes the VM of a sandbox. Production: [`ConfigVmFactory`]; tests: a fake.
#[async_trait]
pub trait VmFactory: Send + Sync {
    /// `<state_dir>/<id>`.
    fn sandbox_dir(&self, id: &str) -> Result<PathBuf>;
    /// A VM for sandbox `id`, not started, with the `io.boxlite.*`
    /// overrides among `annotations` (of the container that boots it).
    fn new_vm(
        &self,
        id: &str,
        annotations: &HashMap<String, String>,
    ) -> Result<Box<dyn Hypervisor>>;
}

/// Builds VMs from `boxlite.toml`. A config that failed to load is kept as
/// its error, so every Create reports it clearly.
pub struct ConfigVmFactory {
    config: std::result::Result<Config, String>,
}

impl ConfigVmFactory {
    pub fn new(config: std::result::Result<Config, String>) -> Self {
        Self { config }
    }

    fn config(&self) -> Result<&Config> {
        self.config
            .as_ref()
            .map_err(|e| ShimError::FailedPrecondition(format!("boxlite config: {e}")))
    }
}

impl VmFactory for ConfigVmFactory {
    fn sandbox_dir(&self, id: &str) -> Result<PathBuf> {
        Ok(self.config()?.sandbox_dir(id))
    }

    fn new_vm(
        &self,
        id: &str,
        annotations: &HashMap<String, String>,
    ) -> Result<Box<dyn Hypervisor>> {
        let config = self
            .config()?
            .with_annotations(annotations)
            .map_err(|e| ShimError::InvalidArgument(format!("sandbox {id:?}: {e}")))?;
        let spec = VmSpec::from_config(&config, id)?;
        Ok(boxlite_runtime::new_hypervisor(&config, spec)?)
    }
}

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

/// Hooks of the booting container that run before its VM boots.
const EARLY_HOOKS: &[HookKind] = &[HookKind::Prestart, HookKind::CreateRuntime];

/// What the container that boots the VM decides about it.
struct BootSpec<'a> {
    annotations: &'a HashMap<String, String>,
    netns: PodNetns,
    /// `netns` is a namespace the shim made for early hooks.
    owned_netns: bool,
}

/// A booted VM and its agent.
struct Vm {
    hv: Box<dyn Hypervisor>,
    agent: AgentConnection,
    oom_watcher: JoinHandle<()>,
}

pub struct Sandbox {
    id: String,
    namespace: String,
    factory: Arc<dyn VmFactory>,
    events: Arc<dyn EventSink>,
    vm: tokio::sync::Mutex<Option<Arc<Vm>>>,
    containers: RwLock<HashMap<String, Arc<Container>>>,
    /// Serialises Create and Delete (mounts, table, state.json).
    table_lock: tokio::sync::Mutex<()>,
    /// The pod network wired to the VM, to tear down with it.
    network: std::sync::Mutex<Option<NetworkRecord>>,
    exit: Arc<containerd_shim::ExitSignal>,
}

fn ctx(timeout: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_duration(timeout)
}

/// A context without deadline, for the long-polls (WaitProcess, GetOOMEvent).
fn ctx_forever() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

fn exit_from_nanos(status: i32, nanos: i64) -> ExitInfo {
    let at = if nanos > 0 {
        UNIX_EPOCH + Duration::from_nanos(nanos.unsigned_abs())
    } else {
        SystemTime::now()
    };
    ExitInfo {
        status: u32::try_from(status).unwrap_or(UNKNOWN_EXIT_STATUS),
        at,
    }
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

    async fn agent(&self) -> Result<AgentConnection> {
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
            tracing::error!(error = %crate::error::chain(&e), "cannot save state.json");
        }
    }

    /// The booting container's prestart/createRuntime hooks run before the
    /// VM exists, so that what they set up in the pod's network namespace
    /// (nerdctl's CNI) is wired to it. Returns the holder (kept until the
    /// VM is wired), the namespace path and whether the shim made it; None
    /// when there is nothing to run early.
    async fn run_early_hooks(
        &self,
        req: &CreateRequest,
        hooks: &ContainerHooks,
        netns: &PodNetns,
    ) -> Result<Option<(netns_holder::NetnsHolder, PathBuf, bool)>> {
        let booting = self.vm.lock().await.is_none();
        if !booting || *netns == PodNetns::Host || !hooks.has_any(EARLY_HOOKS) {
            return Ok(None);
        }
        let (holder, path, owned) = self.early_netns(netns)?;
        let state = hooks.state(&req.id, "creating", holder.pid(), &req.bundle);
        for kind in EARLY_HOOKS {
            if let Err(err) = hooks.run(*kind, &state).await {
                drop(holder);
                if owned {
                    netns_holder::remove_owned_netns(&path);
                }
                return Err(err);
            }
        }
        Ok(Some((holder, path, owned)))
    }

    /// A holder process in the pod's network namespace for the early hooks:
    /// inside the namespace the spec names, or a new one the shim makes
    /// (and owns) when the spec asks for a new namespace without a path.
    fn early_netns(&self, netns: &PodNetns) -> Result<(netns_holder::NetnsHolder, PathBuf, bool)> {
        match netns {
            PodNetns::Path(path) => {
                Ok((netns_holder::NetnsHolder::enter(path)?, path.clone(), false))
            }
            PodNetns::NewEmpty => {
                let dir = self.dir()?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| ShimError::io("cannot create the sandbox directory", &dir, e))?;
                let file = dir.join(netns_holder::OWNED_NETNS_FILE);
                let (holder, path) = netns_holder::NetnsHolder::create_bound(&file)?;
                Ok((holder, path, true))
            }
            PodNetns::Host => Err(network::host_network_refused(&self.id)),
        }
    }

    /// The VM, booted on first use as `boot` says (the `io.boxlite.*`
    /// overrides and the network of the container that boots it); true when
    /// this call booted it. A container joining a running VM cannot change
    /// it, so its annotations and network are not looked at (CRI copies pod
    /// annotations onto every container).
    async fn ensure_vm(self: &Arc<Self>, boot: BootSpec<'_>) -> Result<(Arc<Vm>, bool)> {
        let mut slot = self.vm.lock().await;
        if let Some(vm) = slot.as_ref() {
            return Ok((vm.clone(), false));
        }
        let vm = Arc::new(self.boot(boot).await?);
        *slot = Some(vm.clone());
        Ok((vm, true))
    }

    /// Wires the pod network (if any), then boots; on failure the network
    /// is torn down again.
    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id))]
    async fn boot(self: &Arc<Self>, boot: BootSpec<'_>) -> Result<Vm> {
        let dir = self.dir()?;
        let shared = dir.join(SHARED_DIR);
        std::fs::create_dir_all(&shared)
            .map_err(|e| ShimError::io("cannot create the shared directory", &shared, e))?;
        let mut net = match &boot.netns {
            PodNetns::Host => return Err(network::host_network_refused(&self.id)),
            PodNetns::NewEmpty => None,
            PodNetns::Path(netns) => {
                let net = match PodNetwork::wire(&self.id, netns).await {
                    Ok(net) => net,
                    Err(e) => {
                        if boot.owned_netns {
                            netns_holder::remove_owned_netns(netns);
                        }
                        return Err(ShimError::FailedPrecondition(crate::error::chain(&e)));
                    }
                };
                *self.network.lock().expect("network lock") =
                    Some(NetworkRecord::of(netns, &net, boot.owned_netns));
                tracing::info!(netns = %netns.display(), interfaces = net.interfaces.len(), "pod network wired");
                Some(net)
            }
        };
        self.save_state(None);
        let result = self.boot_vm(&shared, boot.annotations, net.as_mut()).await;
        if result.is_err() {
            let record = self.network.lock().expect("network lock").take();
            if let Some(record) = record {
                record.teardown(&self.id).await;
            }
            self.save_state(None);
        }
        result
    }

    /// Starts the VM with the share and the pod's taps, waits for the
    /// agent, creates the sandbox in the guest and gives it the pod's
    /// interfaces and routes.
    async fn boot_vm(
        self: &Arc<Self>,
        shared: &Path,
        annotations: &HashMap<String, String>,
        mut net: Option<&mut PodNetwork>,
    ) -> Result<Vm> {
        let hv = self.factory.new_vm(&self.id, annotations)?;
        hv.add_share(SHARED_TAG, shared, false).await?;
        if let Some(net) = net.as_deref_mut() {
            for iface in &mut net.interfaces {
                let tap = iface.take_tap().ok_or_else(|| {
                    ShimError::Internal(format!("tap {} has no fd", iface.tap_name))
                })?;
                hv.add_net(tap, iface.mac).await?;
            }
        }
        hv.start().await?;
        self.save_state(hv.pid());
        let agent = match hv.wait_ready().await {
            Ok(a) => a,
            Err(e) => {
                // The sandbox directory (and the console log the error
                // names) goes with the failed create: keep the guest's last
                // words in the shim log, which containerd keeps.
                let console = hv.console_log_path();
                let tail = boxlite_runtime::hypervisor::process::log_tail(&console, 40);
                tracing::error!(
                    console_log = %console.display(),
                    console_tail = tail.as_deref().unwrap_or("(empty)"),
                    "sandbox VM did not become ready"
                );
                let _ = hv.kill().await;
                return Err(e.into());
            }
        };
        let req = CreateSandboxRequest {
            sandbox_id: self.id.clone(),
            shares: vec![MountShareRequest {
                tag: SHARED_TAG.into(),
                mount_point: Self::guest_shared_dir(),
                read_only: false,
                ..Default::default()
            }],
            ..Default::default()
        };
        if let Err(e) = agent
            .agent()
            .create_sandbox(ctx(AGENT_CALL_TIMEOUT), &req)
            .await
        {
            let _ = hv.kill().await;
            return Err(ShimError::agent(
                "CreateSandbox",
                format!("sandbox {:?}", self.id),
                e,
            ));
        }
        if let Some(net) = net.as_deref() {
            if let Err(e) =
                network::configure_guest(&self.id, &agent, net, AGENT_CALL_TIMEOUT).await
            {
                let _ = hv.kill().await;
                return Err(e);
            }
        }
        tracing::info!(pid = ?hv.pid(), "sandbox VM ready");
        let oom_watcher = tokio::spawn(watch_oom(
            Arc::downgrade(self),
            agent.clone(),
            self.events.clone(),
        ));
        Ok(Vm {
            hv,
            agent,
            oom_watcher,
        })
    }

    // ------------------------------------------------------------ create --

    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id, container_id = %req.id))]
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<u32> {
        validate_id("container", &req.id)?;
        let _table = self.table_lock.lock().await;
        if self.container(&req.id).is_ok() {
            return Err(ShimError::AlreadyExists(format!("container {:?}", req.id)));
        }
        let spec_path = req.bundle.join("config.json");
        let mut spec = oci_spec::runtime::Spec::load(&spec_path).map_err(|e| ShimError::Spec {
            path: spec_path.clone(),
            reason: e.to_string(),
        })?;
        let hooks = ContainerHooks::take_from(&mut spec);
        let no_annotations = HashMap::new();
        let mut netns = network::pod_netns(&spec);
        let early = self.run_early_hooks(&req, &hooks, &netns).await?;
        if let Some((_, path, _)) = &early {
            netns = PodNetns::Path(path.clone());
        }
        let owned_netns = early.as_ref().is_some_and(|(_, _, owned)| *owned);
        let boot = BootSpec {
            annotations: spec.annotations().as_ref().unwrap_or(&no_annotations),
            netns: netns.clone(),
            owned_netns,
        };
        let booted = self.ensure_vm(boot).await;
        // The namespace is wired (or the boot failed): the holder's job is done.
        let ran_early = early.is_some();
        drop(early);
        let (vm, booted) = booted?;
        if booted && matches!(netns, PodNetns::Path(_)) {
            network::drop_network_namespace(&mut spec);
        }
        let shared = self.shared_dir()?;
        let (id, bundle, rootfs) = (req.id.clone(), req.bundle.clone(), req.rootfs.clone());
        let mounts = tokio::task::spawn_blocking(move || {
            rootfs::prepare(
                &shared,
                &Self::guest_shared_dir(),
                &id,
                &bundle,
                &rootfs,
                &mut spec,
            )
            .map(|m| (m, spec))
        })
        .await
        .map_err(|e| ShimError::Internal(format!("rootfs task failed: {e}")))?;
        let (mounts, spec) = mounts?;
        let mount_dir = mounts.dir.clone();
        let undo_mounts = |why: &ShimError| {
            tracing::warn!(error = %crate::error::chain(why), "create failed; unmounting");
            if let Err(e) = rootfs::teardown(&mount_dir) {
                tracing::error!(error = %crate::error::chain(&e), "unmount after failed create");
            }
        };
        let state = hooks.state(&req.id, "creating", vm.hv.pid().unwrap_or(0), &req.bundle);
        for kind in [
            HookKind::Prestart,
            HookKind::CreateRuntime,
            HookKind::CreateContainer,
        ] {
            if ran_early && EARLY_HOOKS.contains(&kind) {
                continue;
            }
            if let Err(err) = hooks.run(kind, &state).await {
                undo_mounts(&err);
                return Err(err);
            }
        }
        let spec_json = match serde_json::to_vec(&spec) {
            Ok(j) => j,
            Err(e) => {
                let err = ShimError::Internal(format!("cannot encode the spec: {e}"));
                undo_mounts(&err);
                return Err(err);
            }
        };
        let object = format!("container {:?}", req.id);
        let creq = CreateContainerRequest {
            container_id: req.id.clone(),
            oci_spec_json: spec_json,
            stdio: Some(stdio_config(&req.stdio)).into(),
            ..Default::default()
        };
        if let Err(e) = vm
            .agent
            .agent()
            .create_container(ctx(AGENT_CREATE_TIMEOUT), &creq)
            .await
        {
            let err = ShimError::agent("CreateContainer", object, e);
            undo_mounts(&err);
            return Err(err);
        }
        let relay = Relay::start(
            &vm.hv.hybrid_vsock(),
            &req.id,
            "",
            &self.namespace,
            &req.stdio,
            STDIO_CONNECT_TIMEOUT,
        )
        .await;
        let relay = match relay {
            Ok(r) => r,
            Err(err) => {
                self.remove_in_guest(&vm.agent, &req.id).await;
                undo_mounts(&err);
                return Err(err);
            }
        };
        let init = Process::new(&req.id, "", req.stdio.clone(), Vec::new());
        init.set_relay(relay).await;
        let bundle = req.bundle.display().to_string();
        let container = Arc::new(Container::new(&req.id, &bundle, init, mounts, hooks));
        self.containers
            .write()
            .expect("container table lock")
            .insert(req.id.clone(), container);
        self.save_state(vm.hv.pid());
        self.events.send(TaskEvent::Create {
            container_id: req.id.clone(),
            bundle,
            stdin: req.stdio.stdin.clone(),
            stdout: req.stdio.stdout.clone(),
            stderr: req.stdio.stderr.clone(),
            terminal: req.stdio.terminal,
            pid: 0,
        });
        Ok(0)
    }

    async fn remove_in_guest(&self, agent: &AgentConnection, id: &str) {
        let req = RemoveContainerRequest {
            container_id: id.to_owned(),
            timeout_secs: REMOVE_TIMEOUT_SECS,
            ..Default::default()
        };
        if let Err(e) = agent
            .agent()
            .remove_container(ctx(AGENT_CALL_TIMEOUT), &req)
            .await
        {
            tracing::warn!(container_id = %id, error = %e, "RemoveContainer failed");
        }
    }

    // ------------------------------------------------------------- start --

    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id, container_id = %id, exec_id = %exec_id))]
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        process.check(|s, what| match s {
            TaskState::Created => Ok(()),
            other => Err(ShimError::FailedPrecondition(format!(
                "cannot start {what}: it is {other}"
            ))),
        })?;
        if !exec_id.is_empty() {
            container
                .init
                .check(|s, what| s.check_running(what, "exec in"))?;
        }
        let vm = self.running_vm().await?;
        let pid = if exec_id.is_empty() {
            let req = StartContainerRequest {
                container_id: id.to_owned(),
                ..Default::default()
            };
            vm.agent
                .agent()
                .start_container(ctx(AGENT_CALL_TIMEOUT), &req)
                .await
                .map_err(|e| ShimError::agent("StartContainer", process.what(), e))?
                .pid
        } else {
            self.start_exec(&vm, &process).await?
        };
        process.set_started(pid)?;
        if exec_id.is_empty() {
            let state = container.hooks.state(
                id,
                "running",
                vm.hv.pid().unwrap_or(0),
                Path::new(&container.bundle),
            );
            container
                .hooks
                .run_logged(HookKind::Poststart, &state)
                .await;
        }
        if process.claim_waiter() {
            tokio::spawn(wait_exit(
                vm.agent.clone(),
                process.clone(),
                self.events.clone(),
            ));
        }
        self.events.send(if exec_id.is_empty() {
            TaskEvent::Start {
                container_id: id.to_owned(),
                pid,
            }
        } else {
            TaskEvent::ExecStarted {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid,
            }
        });
        Ok(pid)
    }

    /// ExecProcess while the stdio streams connect (the agent holds a
    /// stream for an exec it has not registered yet for a while).
    async fn start_exec(&self, vm: &Vm, process: &Arc<Process>) -> Result<u32> {
        let vsock = vm.hv.hybrid_vsock();
        let (cid, eid, ns, stdio) = (
            process.container_id.clone(),
            process.exec_id.clone(),
            self.namespace.clone(),
            process.stdio.clone(),
        );
        let relay = tokio::spawn(async move {
            Relay::start(&vsock, &cid, &eid, &ns, &stdio, STDIO_CONNECT_TIMEOUT).await
        });
        let req = ExecProcessRequest {
            container_id: process.container_id.clone(),
            exec_id: process.exec_id.clone(),
            process_json: process.process_json.clone(),
            stdio: Some(stdio_config(&process.stdio)).into(),
            ..Default::default()
        };
        let started = vm
            .agent
            .agent()
            .exec_process(ctx(AGENT_CALL_TIMEOUT), &req)
            .await;
        let pid = match started {
            Ok(r) => r.pid,
            Err(e) => {
                relay.abort();
                return Err(ShimError::agent("ExecProcess", process.what(), e));
            }
        };
        match relay.await {
            Ok(Ok(relay)) => process.set_relay(relay).await,
            Ok(Err(e)) => {
                tracing::error!(error = %crate::error::chain(&e), "exec stdio failed; killing the exec");
                let _ = self
                    .signal_in_guest(&vm.agent, process, libc::SIGKILL as u32, false)
                    .await;
                return Err(e);
            }
            Err(e) => return Err(ShimError::Internal(format!("stdio task failed: {e}"))),
        }
        Ok(pid)
    }

    // ---------------------------------------------------------- signals --

    async fn signal_in_guest(
        &self,
        agent: &AgentConnection,
        process: &Process,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let req = SignalProcessRequest {
            container_id: process.container_id.clone(),
            exec_id: process.exec_id.clone(),
            signal,
            all,
            ..Default::default()
        };
        agent
            .agent()
            .signal_process(ctx(AGENT_CALL_TIMEOUT), &req)
            .await
            .map(|_| ())
            .map_err(|e| ShimError::agent("SignalProcess", process.what(), e))
    }

    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id, container_id = %id, exec_id = %exec_id, signal))]
    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let process = self.process(id, exec_id)?;
        if all {
            // kill --all reaches every process even after init exited.
            if process.state() == TaskState::Deleted {
                return Err(ShimError::FailedPrecondition(format!(
                    "cannot signal {}: it is deleted",
                    process.what()
                )));
            }
        } else {
            process.check(|s, what| s.check_kill(what))?;
        }
        let agent = self.agent().await?;
        self.signal_in_guest(&agent, &process, signal, all).await?;
        if process.state() == TaskState::Created {
            if exec_id.is_empty() {
                // A created container has its process in the guest: the
                // agent reports its exit like any other.
                if process.claim_waiter() {
                    tokio::spawn(wait_exit(agent, process.clone(), self.events.clone()));
                }
            } else {
                // An exec that never started has no guest process.
                process.set_exited(ExitInfo {
                    status: 128 + signal,
                    at: SystemTime::now(),
                });
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ delete --

    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id, container_id = %id, exec_id = %exec_id))]
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<Deleted> {
        let container = self.container(id)?;
        if !exec_id.is_empty() {
            let process = container.process(exec_id)?;
            process.check(|s, what| {
                let mut probe = *s;
                probe.delete(what)
            })?;
            let exit = process.set_exited(process.state_exit_or_now());
            process.transition(|s, what| s.delete(what))?;
            process.stop_relay().await;
            container.remove_exec(exec_id);
            return Ok(Deleted {
                pid: process.pid(),
                exit,
            });
        }
        let _table = self.table_lock.lock().await;
        let init = container.init.clone();
        init.check(|s, what| match s {
            TaskState::Created | TaskState::Exited(_) => Ok(()),
            other => Err(ShimError::FailedPrecondition(format!(
                "cannot delete {what}: it is {other}"
            ))),
        })?;
        if let Ok(agent) = self.agent().await {
            let req = RemoveContainerRequest {
                container_id: id.to_owned(),
                timeout_secs: REMOVE_TIMEOUT_SECS,
                ..Default::default()
            };
            match agent
                .agent()
                .remove_container(ctx(AGENT_CALL_TIMEOUT), &req)
                .await
            {
                Ok(_) => {}
                // A container the agent does not know, or an agent that
                // cannot remove one (dead VM, no container service), must
                // not keep containerd from deleting it.
                Err(e) => tracing::warn!(error = %e, "RemoveContainer failed; deleting anyway"),
            }
        }
        let exit = init.set_exited(init.state_exit_or_now());
        init.transition(|s, what| s.delete(what))?;
        init.stop_relay().await;
        for exec in container.execs() {
            exec.stop_relay().await;
        }
        let dir = container.mount_dir();
        tokio::task::spawn_blocking(move || rootfs::teardown(&dir))
            .await
            .map_err(|e| ShimError::Internal(format!("unmount task failed: {e}")))??;
        self.containers
            .write()
            .expect("container table lock")
            .remove(id);
        let vm_pid = self.vm.lock().await.as_ref().and_then(|v| v.hv.pid());
        self.save_state(vm_pid);
        let state = container.hooks.state(
            id,
            "stopped",
            vm_pid.unwrap_or(0),
            Path::new(&container.bundle),
        );
        container.hooks.run_logged(HookKind::Poststop, &state).await;
        self.events.send(TaskEvent::Delete {
            container_id: id.to_owned(),
            pid: init.pid(),
            exit_status: exit.status,
            exited_at: exit.at,
        });
        Ok(Deleted {
            pid: init.pid(),
            exit,
        })
    }

    // -------------------------------------------------------------- exec --

    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id, container_id = %req.container_id, exec_id = %req.exec_id))]
    pub async fn exec(&self, req: ExecRequest) -> Result<()> {
        validate_id("exec", &req.exec_id)?;
        let container = self.container(&req.container_id)?;
        container
            .init
            .check(|s, what| s.check_running(what, "exec in"))?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&req.process_json).map_err(|e| {
            ShimError::InvalidArgument(format!(
                "exec {:?}: the process spec is not a valid OCI process: {e}",
                req.exec_id
            ))
        })?;
        container.add_exec(Process::new(
            &req.container_id,
            &req.exec_id,
            req.stdio.clone(),
            req.process_json,
        ))?;
        self.events.send(TaskEvent::ExecAdded {
            container_id: req.container_id,
            exec_id: req.exec_id,
        });
        Ok(())
    }

    // ---------------------------------------------------- small requests --

    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let process = self.process(id, exec_id)?;
        if !process.stdio.terminal {
            return Err(ShimError::FailedPrecondition(format!(
                "{} has no terminal",
                process.what()
            )));
        }
        process.check(|s, what| s.check_kill(what))?;
        let req = ResizePtyRequest {
            container_id: id.to_owned(),
            exec_id: exec_id.to_owned(),
            rows: height,
            columns: width,
            ..Default::default()
        };
        self.agent()
            .await?
            .agent()
            .resize_pty(ctx(AGENT_CALL_TIMEOUT), &req)
            .await
            .map(|_| ())
            .map_err(|e| ShimError::agent("ResizePty", process.what(), e))
    }

    pub async fn close_io(&self, id: &str, exec_id: &str, stdin: bool) -> Result<()> {
        let process = self.process(id, exec_id)?;
        if !stdin || process.stdio.stdin.is_empty() {
            return Ok(());
        }
        // Only through the stream: its EOF reaches the process after every
        // byte before it. (Asking the agent to close stdin as well raced
        // with Start: a CloseIO during an exec's Start closed stdin before
        // its stream connected, and the agent then refused the stream.)
        process.close_stdin().await;
        Ok(())
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        let container = self.container(id)?;
        container.init.check(|s, what| {
            let mut probe = *s;
            probe.pause(what)
        })?;
        let req = PauseContainerRequest {
            container_id: id.to_owned(),
            ..Default::default()
        };
        self.agent()
            .await?
            .agent()
            .pause_container(ctx(AGENT_CALL_TIMEOUT), &req)
            .await
            .map_err(|e| ShimError::agent("PauseContainer", container.init.what(), e))?;
        container.init.transition(|s, what| s.pause(what))?;
        self.events.send(TaskEvent::Paused {
            container_id: id.to_owned(),
        });
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        let container = self.container(id)?;
        container.init.check(|s, what| {
            let mut probe = *s;
            probe.resume(what)
        })?;
        let req = ResumeContainerRequest {
            container_id: id.to_owned(),
            ..Default::default()
        };
        self.agent()
            .await?
            .agent()
            .resume_container(ctx(AGENT_CALL_TIMEOUT), &req)
            .await
            .map_err(|e| ShimError::agent("ResumeContainer", container.init.what(), e))?;
        container.init.transition(|s, what| s.resume(what))?;
        self.events.send(TaskEvent::Resumed {
            container_id: id.to_owned(),
        });
        Ok(())
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<GuestProcess>> {
        let container = self.container(id)?;
        let req = ListProcessesRequest {
            container_id: id.to_owned(),
            ..Default::default()
        };
        let resp = self
            .agent()
            .await?
            .agent()
            .list_processes(ctx(AGENT_CALL_TIMEOUT), &req)
            .await
            .map_err(|e| ShimError::agent("ListProcesses", container.init.what(), e))?;
        Ok(resp
            .processes
            .into_iter()
            .map(|p| GuestProcess {
                pid: p.pid,
                exec_id: p.exec_id,
            })
            .collect())
    }

    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        let container = self.container(id)?;
        container.init.check(|s, what| match s {
            TaskState::Created | TaskState::Running | TaskState::Paused => Ok(()),
            other => Err(ShimError::FailedPrecondition(format!(
                "cannot update {what}: it is {other}"
            ))),
        })?;
        serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources_json).map_err(
            |e| ShimError::InvalidArgument(format!("resources are not OCI LinuxResources: {e}")),
        )?;
        let req = UpdateContainerRequest {
            container_id: id.to_owned(),
            resources_json,
            ..Default::default()
        };
        self.agent()
            .await?
            .agent()
            .update_container(ctx(AGENT_CALL_TIMEOUT), &req)
            .await
            .map(|_| ())
            .map_err(|e| ShimError::agent("UpdateContainer", container.init.what(), e))
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        let container = self.container(id)?;
        let req = StatsContainerRequest {
            container_id: id.to_owned(),
            ..Default::default()
        };
        self.agent()
            .await?
            .agent()
            .stats_container(ctx(AGENT_CALL_TIMEOUT), &req)
            .await
            .map_err(|e| ShimError::agent("StatsContainer", container.init.what(), e))
    }

    pub fn state(&self, id: &str, exec_id: &str) -> Result<ProcessStatus> {
        let container = self.container(id)?;
        Ok(container.process(exec_id)?.status(&container.bundle))
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitInfo> {
        // containerd waits on a created task before Start: this answers once
        // the process has started and exited (or was deleted unstarted).
        let process = self.process(id, exec_id)?;
        Ok(process.wait().await)
    }

    /// (shim pid, init pid) for Connect.
    pub fn connect(&self, id: &str) -> Result<(u32, u32)> {
        let pid = self.container(id).map(|c| c.init.pid()).unwrap_or(0);
        Ok((std::process::id(), pid))
    }

    /// Shutdown: only when no container is left (or `now`). Answers at
    /// once; stopping the VM, removing the sandbox directory and letting the
    /// shim exit happen in the background, so containerd's deadline for
    /// Shutdown never races a slow guest.
    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id))]
    pub async fn shutdown(self: &Arc<Self>, now: bool) -> Result<()> {
        let table = self.table_lock.lock().await;
        if !self
            .containers
            .read()
            .expect("container table lock")
            .is_empty()
            && !now
        {
            tracing::debug!("shutdown ignored: containers remain");
            return Ok(());
        }
        drop(table);
        let sandbox = self.clone();
        tokio::spawn(async move {
            sandbox.teardown().await;
        });
        Ok(())
    }

    /// Stops the VM, removes the sandbox directory, signals the shim's exit.
    pub async fn teardown(&self) {
        let _table = self.table_lock.lock().await;
        self.stop_vm().await;
        if let Ok(dir) = self.dir() {
            archive_console(&self.id, &dir);
            cleanup_sandbox_dir(&dir).await;
        }
        tracing::info!("sandbox stopped; shim exiting");
        self.exit.signal();
    }

    async fn stop_vm(&self) {
        let vm = self.vm.lock().await.take();
        if let Some(vm) = vm {
            vm.oom_watcher.abort();
            if let Err(e) = vm.hv.stop().await {
                tracing::warn!(error = %e, "VM stop failed; killing it");
                let _ = vm.hv.kill().await;
            }
        }
        // After the VM: its taps go with its last fd, the filters do not.
        let record = self.network.lock().expect("network lock").take();
        if let Some(record) = record {
            record.teardown(&self.id).await;
        }
    }
}

impl Process {
    /// The exit if there was one, else "now, status 0" (a created process
    /// that is deleted without ever running).
    fn state_exit_or_now(&self) -> ExitInfo {
        self.state().exit_info().unwrap_or(ExitInfo {
            status: 0,
            at: SystemTime::now(),
        })
    }
}

/// The single waiter of a process: WaitProcess (long-poll), then drain its
/// output, then record the exit and publish TaskExit.
async fn wait_exit(agent: AgentConnection, process: Arc<Process>, events: Arc<dyn EventSink>) {
    let req = WaitProcessRequest {
        container_id: process.container_id.clone(),
        exec_id: process.exec_id.clone(),
        ..Default::default()
    };
    let (info, drain) = match agent.agent().wait_process(ctx_forever(), &req).await {
        Ok(r) => (
            exit_from_nanos(r.exit_status, r.exited_at_unix_nanos),
            OUTPUT_DRAIN_TIMEOUT,
        ),
        Err(e) => {
            tracing::error!(what = %process.what(), error = %e, "WaitProcess failed; reporting exit status 255");
            let info = ExitInfo {
                status: UNKNOWN_EXIT_STATUS,
                at: SystemTime::now(),
            };
            // The agent could not report the exit: its streams may never end.
            (info, UNKNOWN_EXIT_DRAIN_TIMEOUT)
        }
    };
    process.drain_output(drain).await;
    let info = process.set_exited(info);
    let id = if process.exec_id.is_empty() {
        process.container_id.clone()
    } else {
        process.exec_id.clone()
    };
    events.send(TaskEvent::Exit {
        container_id: process.container_id.clone(),
        id,
        pid: process.pid(),
        exit_status: info.status,
        exited_at: info.at,
    });
}

/// Long-polls GetOOMEvent for the life of the VM.
async fn watch_oom(
    sandbox: std::sync::Weak<Sandbox>,
    agent: AgentConnection,
    events: Arc<dyn EventSink>,
) {
    loop {
        match agent
            .agent()
            .get_oom_event(ctx_forever(), &GetOOMEventRequest::new())
            .await
        {
            Ok(ev) => {
                let Some(sb) = sandbox.upgrade() else { return };
                if sb.container(&ev.container_id).is_ok() {
                    events.send(TaskEvent::Oom {
                        container_id: ev.container_id,
                    });
                }
            }
            Err(ttrpc::Error::RpcStatus(s)) if s.code() == ttrpc::Code::UNIMPLEMENTED => {
                tracing::info!("agent has no OOM events yet: {}", s.message());
                return;
            }
            Err(e) => {
                if sandbox.upgrade().is_none() {
                    return;
                }
                tracing::debug!(error = %e, "GetOOMEvent failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

fn stdio_config(stdio: &StdioPaths) -> StdioConfig {
    let (stdin, stdout, stderr) = stdio.wants();
    StdioConfig {
        stdin,
        stdout,
        stderr,
        terminal: stdio.terminal,
        ..Default::default()
    }
}

/// containerd ids: 1..=76 bytes of `[A-Za-z0-9_.-]`, not starting with
/// `.` (they become directory names and stdio header fields).
pub fn validate_id(what: &str, id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 76
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
    if ok {
        Ok(())
    } else {
        Err(ShimError::InvalidArgument(format!(
            "{what} id {id:?} is invalid: expected 1..=76 characters of A-Z a-z 0-9 _ - . not starting with '.'"
        )))
    }
}

/// Debugging aid: with `BOXLITE_CONSOLE_ARCHIVE=<dir>` in the shim's
/// environment, the guest console log (kernel and agent lines) is copied to
/// `<dir>/<sandbox>.console.log` before the sandbox directory is removed.
pub const CONSOLE_ARCHIVE_ENV: &str = "BOXLITE_CONSOLE_ARCHIVE";

fn archive_console(id: &str, dir: &Path) {
    let Some(archive) = std::env::var_os(CONSOLE_ARCHIVE_ENV) else {
        return;
    };
    let from = dir.join(boxlite_runtime::hypervisor::CONSOLE_LOG);
    let to = Path::new(&archive).join(format!("{id}.console.log"));
    match std::fs::create_dir_all(&archive).and_then(|()| std::fs::copy(&from, &to)) {
        Ok(_) => tracing::info!(to = %to.display(), "guest console log archived"),
        Err(e) => {
            tracing::warn!(to = %to.display(), error = %e, "cannot archive the guest console log")
        }
    }
}

/// After a crash or at shutdown: kills what the pid files name, unmounts
/// everything under `dir`, and removes it.
pub async fn cleanup_sandbox_dir(dir: &Path) {
    let killed = boxlite_runtime::hypervisor::cleanup_stale_processes(dir);
    if !killed.is_empty() {
        tracing::info!(?killed, "killed leftover VM processes");
    }
    // A crashed shim's pod network (taps, tc filters in the pod's netns).
    if let Ok(SandboxState {
        sandbox_id,
        network: Some(record),
        ..
    }) = SandboxState::load(dir)
    {
        record.teardown(&sandbox_id).await;
    }
    if let Err(e) = rootfs::teardown(dir) {
        tracing::error!(error = %crate::error::chain(&e), "sandbox directory cleanup failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_factory_refuses_annotations_the_config_does_not_allow() {
        let mut config = Config::default();
        config.runtime.allowed_annotations = vec!["io.boxlite.guest.memory_mib".into()];
        let factory = ConfigVmFactory::new(Ok(config));
        let annotations: HashMap<String, String> =
            [("io.boxlite.guest.vcpus".to_string(), "2".to_string())].into();
        let err = match factory.new_vm("pod1", &annotations) {
            Ok(_) => panic!("a VM was made"),
            Err(e) => e,
        };
        assert!(matches!(err, ShimError::InvalidArgument(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "sandbox \"pod1\": annotation io.boxlite.guest.vcpus is not allowed on this node: \
             the admin can add it to runtime.allowed_annotations in boxlite.toml"
        );
    }
}
