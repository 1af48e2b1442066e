//! The life of a VM that is a group of processes — a VMM (QEMU or
//! boxlite-vmm) and its helper daemons (one virtiofsd per share; for QEMU
//! also the vsock backend) — shared by the `qemu` and `builtin` backends.
//!
//! [`VmProcesses`] holds what both keep (phase, shares, taps, processes,
//! the readiness listener, the VMM's pid); [`Backend`] is what a backend
//! adds: its checks, the files a run leaves, how it spawns, and its own
//! last way to end a VM. The functions below are the [`Hypervisor`]
//! methods both backends delegate to, so start, stop, kill and the
//! liveness check behave the same whatever the VMM.
//!
//! Guarantees: `start` checks everything it can before spawning anything,
//! and a failure on the way kills and reaps what was spawned and removes
//! the sockets; `stop` asks the agent (DestroySandbox: the guest reboots and
//! the VMM exits), then the backend's fallback, then kills; teardown kills
//! the VMM first, so helpers never see a live frontend lose its backend.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::process::{
    check_tap, fs_socket_name, is_executable, kill_and_reap, last_line, request_agent_shutdown,
    spawn_process, virtiofsd_args, Proc, Role, POLL_INTERVAL,
};
use super::ready::{ready_socket_path, ReadyListener};
use super::{
    validate_share_tag, wait_for_agent, AgentConnection, ExitReport, Hypervisor, HypervisorError,
    MacAddr, NetDevice, Share, TapDevice, VmSpec, CONSOLE_LOG, MAX_SOCKET_PATH_LEN, VSOCK_SOCKET,
};

/// After the VMM exits, how long helpers get to exit on their own (virtiofsd
/// and boxlite-vsock do when their frontend disconnects) before teardown
/// kills them.
const HELPER_EXIT_GRACE: Duration = Duration::from_millis(500);
/// How long a helper's clean exit waits for the VMM's before the helper is
/// reported as the process that ended the VM.
const VMM_EXIT_GRACE: Duration = Duration::from_secs(2);

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    Created,
    Running,
    Stopping,
    Stopped,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Created => "not started",
            Phase::Running => "running",
            Phase::Stopping => "stopping",
            Phase::Stopped => "stopped",
        }
    }
}

#[derive(Debug)]
pub(super) struct State {
    phase: Phase,
    pub(super) shares: Vec<Share>,
    /// Taps until the VMM is spawned (it inherits them), then none.
    pub(super) nets: Vec<NetDevice>,
    /// Helpers first, the VMM last.
    pub(super) procs: Vec<Proc>,
    started_at: Option<Instant>,
    /// Bound by `start`, taken by `wait_ready`.
    ready: Option<ReadyListener>,
}

impl State {
    fn new() -> State {
        State {
            phase: Phase::Created,
            shares: Vec::new(),
            nets: Vec::new(),
            procs: Vec::new(),
            started_at: None,
            ready: None,
        }
    }
}

/// The state both process-based backends keep.
#[derive(Debug)]
pub(super) struct VmProcesses {
    pub(super) id: String,
    pub(super) dir: PathBuf,
    pub(super) kernel: PathBuf,
    pub(super) initramfs: PathBuf,
    /// Spawned once per share.
    virtiofsd_binary: PathBuf,
    /// The role of the VMM process (the last in `State::procs`).
    vmm_role: Role,
    agent_ready_timeout: Duration,
    shutdown_timeout: Duration,
    /// The VMM's pid while it runs, 0 otherwise.
    pid: AtomicU32,
    pub(super) state: tokio::sync::Mutex<State>,
}

impl VmProcesses {
    /// Takes the spec's shares and taps (checked here); the backend keeps
    /// the rest of the spec (vCPUs, memory, command line).
    pub(super) fn new(
        spec: &mut VmSpec,
        vmm_role: Role,
        virtiofsd_binary: &Path,
    ) -> Result<Self, HypervisorError> {
        super::validate_sandbox_id(&spec.id)?;
        let this = VmProcesses {
            id: spec.id.clone(),
            dir: spec.dir.clone(),
            kernel: spec.kernel.clone(),
            initramfs: spec.initramfs.clone(),
            virtiofsd_binary: virtiofsd_binary.to_owned(),
            vmm_role,
            agent_ready_timeout: spec.agent_ready_timeout,
            shutdown_timeout: spec.shutdown_timeout,
            pid: AtomicU32::new(0),
            state: tokio::sync::Mutex::new(State::new()),
        };
        {
            let mut st = this.state.try_lock().expect("new state is unlocked");
            for share in std::mem::take(&mut spec.shares) {
                this.check_share(&st.shares, &share)?;
                st.shares.push(share);
            }
            for net in &spec.nets {
                check_tap(&net.tap)?;
            }
            st.nets = std::mem::take(&mut spec.nets);
        }
        Ok(this)
    }

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub(super) fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    /// Records the VMM's pid once it is spawned.
    pub(super) fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::SeqCst);
    }

    pub(super) fn vsock_socket_path(&self) -> PathBuf {
        self.path(VSOCK_SOCKET)
    }

    pub(super) fn console_log_path(&self) -> PathBuf {
        self.path(CONSOLE_LOG)
    }

    fn check_share(&self, existing: &[Share], share: &Share) -> Result<(), HypervisorError> {
        validate_share_tag(&self.id, &share.tag)?;
        let invalid = |reason: String| HypervisorError::InvalidShare {
            id: self.id.clone(),
            tag: share.tag.clone(),
            reason,
        };
        if existing.iter().any(|s| s.tag == share.tag) {
            return Err(invalid("a share with this tag was already added".into()));
        }
        if !share.host_dir.is_absolute() {
            return Err(invalid(format!(
                "host directory {} is not an absolute path",
                share.host_dir.display()
            )));
        }
        Ok(())
    }

    /// Waits until the VMM has exited or `deadline` passes; true if it has.
    pub(super) async fn wait_vmm_exit(&self, deadline: Instant) -> bool {
        loop {
            {
                let mut st = self.state.lock().await;
                match st.procs.iter_mut().find(|p| p.role == self.vmm_role) {
                    Some(p) => {
                        if let Some(status) = p.poll() {
                            tracing::debug!(sandbox_id = %self.id, %status, "{} exited", self.vmm_role.describe());
                            return true;
                        }
                    }
                    // Someone else (kill) tore it down.
                    None => return true,
                }
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(POLL_INTERVAL * 5).await;
        }
    }

    /// Gives the helpers a moment to exit on their own after the VMM is
    /// gone; teardown kills whatever is left (e.g. a vhost-device-vsock
    /// configured instead of boxlite-vsock, which waits for a new frontend).
    async fn wait_helpers_exit(&self, grace: Duration) {
        let until = Instant::now() + grace;
        loop {
            {
                let mut st = self.state.lock().await;
                let vmm = &self.vmm_role;
                if st
                    .procs
                    .iter_mut()
                    .filter(|p| p.role != *vmm)
                    .all(|p| p.poll().is_some())
                {
                    return;
                }
            }
            if Instant::now() >= until {
                return;
            }
            tokio::time::sleep(POLL_INTERVAL * 2).await;
        }
    }
}

/// What a backend adds to [`VmProcesses`].
#[async_trait]
pub(super) trait Backend: Hypervisor {
    fn vm(&self) -> &VmProcesses;

    /// The VMM and the helpers a start needs besides virtiofsd, as
    /// (description naming its config key, path).
    fn binaries(&self) -> Vec<(&'static str, &Path)>;

    /// The sockets this backend makes besides the hybrid vsock socket, its
    /// readiness listener and one vhost-user socket per share.
    fn own_sockets(&self) -> Vec<PathBuf>;

    /// Spawns the helpers (virtiofsd with [`spawn_virtiofsd`]), waits for
    /// their sockets, then spawns the VMM (last in `st.procs`, handed the
    /// fds of [`tap_fds`]) and records its pid.
    async fn spawn_all(&self, st: &mut State) -> Result<(), HypervisorError>;

    /// The VMM has not exited by the agent shutdown's deadline: the
    /// backend's own way to end it, if it has one. True if the VMM exited.
    async fn shutdown_fallback(&self) -> bool {
        false
    }
}

/// Every socket a run of `b` may create.
pub(super) fn socket_paths<B: Backend>(b: &B, shares: &[Share]) -> Vec<PathBuf> {
    let vm = b.vm();
    let vsock = vm.vsock_socket_path();
    let mut paths = vec![ready_socket_path(&vsock), vsock];
    paths.extend(b.own_sockets());
    paths.extend(shares.iter().map(|s| vm.path(&fs_socket_name(&s.tag))));
    paths
}

/// What a run leaves in the sandbox directory besides logs: the sockets and
/// virtiofsd's own `<socket>.pid` lock files. Removed before a start and at
/// teardown.
fn transient_files<B: Backend>(b: &B, shares: &[Share]) -> Vec<PathBuf> {
    let mut files = socket_paths(b, shares);
    files.extend(
        shares
            .iter()
            .map(|s| b.vm().path(&format!("{}.pid", fs_socket_name(&s.tag)))),
    );
    files
}

/// Checks everything that can be checked before spawning anything: the
/// binaries are executable, the guest assets exist, each share's directory
/// exists, each socket path fits in `sun_path`.
fn preflight<B: Backend>(b: &B, st: &State) -> Result<(), HypervisorError> {
    let vm = b.vm();
    let mut binaries = b.binaries();
    if !st.shares.is_empty() {
        binaries.push((
            "virtiofsd (hypervisor.virtiofsd_binary)",
            &vm.virtiofsd_binary,
        ));
    }
    for (what, path) in binaries {
        if !is_executable(path) {
            return Err(HypervisorError::MissingBinary {
                id: vm.id.clone(),
                what: what.to_owned(),
                path: path.to_owned(),
            });
        }
    }
    for (what, key, path) in [
        ("guest kernel", "guest.kernel", &vm.kernel),
        ("guest initramfs", "guest.initramfs", &vm.initramfs),
    ] {
        if !path.is_file() {
            return Err(HypervisorError::MissingAsset {
                id: vm.id.clone(),
                what,
                key,
                path: path.clone(),
            });
        }
    }
    for share in &st.shares {
        if !share.host_dir.is_dir() {
            return Err(HypervisorError::InvalidShare {
                id: vm.id.clone(),
                tag: share.tag.clone(),
                reason: format!(
                    "host directory {} does not exist or is not a directory",
                    share.host_dir.display()
                ),
            });
        }
    }
    for path in socket_paths(b, &st.shares) {
        let len = path.as_os_str().len();
        if len > MAX_SOCKET_PATH_LEN {
            return Err(HypervisorError::SocketPathTooLong {
                id: vm.id.clone(),
                path,
                len,
            });
        }
    }
    Ok(())
}

/// Spawns one virtiofsd per share (sockets not awaited yet).
pub(super) fn spawn_virtiofsd(vm: &VmProcesses, st: &mut State) -> Result<(), HypervisorError> {
    for share in &st.shares {
        let socket = vm.path(&fs_socket_name(&share.tag));
        let args = virtiofsd_args(&socket, share);
        let p = spawn_process(
            &vm.id,
            &vm.dir,
            Role::Fs(share.tag.clone()),
            &vm.virtiofsd_binary,
            args,
            Some(socket),
            Vec::new(),
        )?;
        st.procs.push(p);
    }
    Ok(())
}

/// The raw fd of each tap the VMM inherits, in order (None: a tap the VMM
/// opens by name).
pub(super) fn tap_fds(nets: &[NetDevice]) -> Vec<Option<RawFd>> {
    nets.iter()
        .map(|n| match &n.tap {
            TapDevice::Fd(fd) => Some(fd.as_raw_fd()),
            TapDevice::Name(_) => None,
        })
        .collect()
}

fn not_created<B: Backend>(b: &B, st: &State, op: &'static str) -> Result<(), HypervisorError> {
    if st.phase == Phase::Created {
        return Ok(());
    }
    Err(HypervisorError::InvalidState {
        id: b.vm().id.clone(),
        op,
        state: st.phase.name(),
    })
}

pub(super) async fn add_share<B: Backend>(
    b: &B,
    tag: &str,
    host_dir: &Path,
    read_only: bool,
) -> Result<(), HypervisorError> {
    let vm = b.vm();
    let mut st = vm.state.lock().await;
    not_created(b, &st, "add a share")?;
    let share = Share {
        tag: tag.to_owned(),
        host_dir: host_dir.to_owned(),
        read_only,
    };
    vm.check_share(&st.shares, &share)?;
    st.shares.push(share);
    Ok(())
}

pub(super) async fn add_net<B: Backend>(
    b: &B,
    tap: TapDevice,
    mac: MacAddr,
) -> Result<(), HypervisorError> {
    let mut st = b.vm().state.lock().await;
    not_created(b, &st, "add a network device")?;
    check_tap(&tap)?;
    st.nets.push(NetDevice { tap, mac });
    Ok(())
}

pub(super) async fn start<B: Backend>(b: &B) -> Result<(), HypervisorError> {
    let vm = b.vm();
    let mut st = vm.state.lock().await;
    not_created(b, &st, "start")?;
    preflight(b, &st)?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&vm.dir)
        .map_err(|error| HypervisorError::Io {
            id: vm.id.clone(),
            op: "cannot create the sandbox directory",
            path: vm.dir.clone(),
            error,
        })?;
    // Leftovers of an earlier run would make the helpers fail (or make us
    // think they are ready).
    for file in transient_files(b, &st.shares) {
        let _ = std::fs::remove_file(file);
    }
    let console = vm.console_log_path();
    File::create(&console).map_err(|error| HypervisorError::Io {
        id: vm.id.clone(),
        op: "cannot create the console log",
        path: console.clone(),
        error,
    })?;
    // Before the VM exists, so the guest always finds it.
    st.ready = Some(ReadyListener::bind_for_sandbox(
        &vm.id,
        &vm.vsock_socket_path(),
    )?);
    let started_at = Instant::now();
    match b.spawn_all(&mut st).await {
        Ok(()) => {
            st.phase = Phase::Running;
            st.started_at = Some(started_at);
            tracing::info!(sandbox_id = %vm.id, pid = vm.pid.load(Ordering::SeqCst), "VM started");
            Ok(())
        }
        Err(e) => {
            tracing::warn!(sandbox_id = %vm.id, error = %e, "VM start failed; cleaning up");
            teardown(b, &mut st);
            Err(e)
        }
    }
}

pub(super) async fn wait_ready<B: Backend>(b: &B) -> Result<AgentConnection, HypervisorError> {
    let vm = b.vm();
    let (started_at, ready) = {
        let mut st = vm.state.lock().await;
        match (st.phase, st.started_at) {
            (Phase::Running, Some(at)) => (at, st.ready.take()),
            (phase, _) => {
                return Err(HypervisorError::InvalidState {
                    id: vm.id.clone(),
                    op: "wait for the agent",
                    state: phase.name(),
                })
            }
        }
    };
    let deadline = started_at + vm.agent_ready_timeout;
    let result = wait_for_agent(b, ready, deadline, vm.agent_ready_timeout).await;
    if result.is_ok() {
        tracing::info!(sandbox_id = %vm.id, elapsed_ms = started_at.elapsed().as_millis() as u64, "agent ready");
    }
    result
}

pub(super) async fn stop<B: Backend>(b: &B) -> Result<(), HypervisorError> {
    let vm = b.vm();
    {
        let mut st = vm.state.lock().await;
        match st.phase {
            Phase::Created => {
                st.nets.clear();
                st.phase = Phase::Stopped;
                return Ok(());
            }
            Phase::Stopping | Phase::Stopped => return Ok(()),
            Phase::Running => st.phase = Phase::Stopping,
        }
    }
    let deadline = Instant::now() + vm.shutdown_timeout;
    let vmm_alive = {
        let mut st = vm.state.lock().await;
        st.procs
            .iter_mut()
            .find(|p| p.role == vm.vmm_role)
            .is_some_and(|p| p.poll().is_none())
    };
    if vmm_alive {
        request_agent_shutdown(&vm.id, &b.hybrid_vsock(), vm.shutdown_timeout, deadline).await;
    }
    let exited = vm.wait_vmm_exit(deadline).await || b.shutdown_fallback().await;
    if exited {
        vm.wait_helpers_exit(HELPER_EXIT_GRACE).await;
    } else {
        tracing::warn!(
            sandbox_id = %vm.id,
            timeout_secs = vm.shutdown_timeout.as_secs(),
            "VM did not exit within the shutdown timeout; killing it"
        );
    }
    let mut st = vm.state.lock().await;
    teardown(b, &mut st);
    Ok(())
}

pub(super) async fn kill<B: Backend>(b: &B) -> Result<(), HypervisorError> {
    let mut st = b.vm().state.lock().await;
    teardown(b, &mut st);
    Ok(())
}

pub(super) async fn check_alive<B: Backend>(b: &B) -> Result<(), HypervisorError> {
    let vm = b.vm();
    let mut st = vm.state.lock().await;
    match st.phase {
        Phase::Created => return Ok(()),
        Phase::Running => {}
        phase => {
            return Err(HypervisorError::InvalidState {
                id: vm.id.clone(),
                op: "use the VM",
                state: phase.name(),
            })
        }
    }
    let Some(mut dead) = st.procs.iter_mut().position(|p| p.poll().is_some()) else {
        return Ok(());
    };
    // The VMM's exit is the cause worth reporting (a guest panic, a bad
    // kernel): its helpers end cleanly once it is gone, and one may be
    // reaped a moment before the VMM itself.
    if st.procs[dead].role != vm.vmm_role && st.procs[dead].poll().is_some_and(|s| s.success()) {
        let until = Instant::now() + VMM_EXIT_GRACE;
        while Instant::now() < until {
            if let Some(v) = st
                .procs
                .iter_mut()
                .position(|p| p.role == vm.vmm_role && p.poll().is_some())
            {
                dead = v;
                break;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
    let p = &mut st.procs[dead];
    Err(HypervisorError::ProcessExited(Box::new(ExitReport {
        id: vm.id.clone(),
        what: p.role.describe(),
        pid: p.pid,
        status: p.poll().expect("polled as exited above"),
        log: p.log.clone(),
        last_line: last_line(&p.log),
        socket: None,
        console_log: Some(vm.console_log_path()),
    })))
}

/// Kills and reaps every process (the VMM first), removes sockets and pid
/// files. Synchronous: SIGKILLed processes exit in milliseconds, and `Drop`
/// needs it too.
fn teardown<B: Backend>(b: &B, st: &mut State) {
    let vm = b.vm();
    kill_and_reap(&vm.id, &mut st.procs, &transient_files(b, &st.shares));
    st.nets.clear();
    st.ready = None;
    vm.pid.store(0, Ordering::SeqCst);
    st.phase = Phase::Stopped;
}

/// For the backends' `Drop`: a VM dropped while its processes run is killed.
pub(super) fn teardown_on_drop<B: Backend>(b: &B) {
    let Ok(mut guard) = b.vm().state.try_lock() else {
        return;
    };
    if guard.procs.is_empty() {
        return;
    }
    tracing::warn!(sandbox_id = %b.vm().id, "VM dropped while running; killing it");
    let mut st = std::mem::replace(&mut *guard, State::new());
    drop(guard);
    teardown(b, &mut st);
}

/// Implements [`Hypervisor`] (and `Drop`) for a [`Backend`] by delegating
/// to this module: what makes a backend is its `Backend` impl.
macro_rules! delegate_hypervisor {
    ($backend:ty) => {
        #[async_trait::async_trait]
        impl $crate::hypervisor::Hypervisor for $backend {
            fn sandbox_id(&self) -> &str {
                &self.vm.id
            }

            async fn add_share(
                &self,
                tag: &str,
                host_dir: &std::path::Path,
                read_only: bool,
            ) -> Result<(), $crate::hypervisor::HypervisorError> {
                $crate::hypervisor::lifecycle::add_share(self, tag, host_dir, read_only).await
            }

            async fn add_net(
                &self,
                tap: $crate::hypervisor::TapDevice,
                mac: $crate::hypervisor::MacAddr,
            ) -> Result<(), $crate::hypervisor::HypervisorError> {
                $crate::hypervisor::lifecycle::add_net(self, tap, mac).await
            }

            async fn start(&self) -> Result<(), $crate::hypervisor::HypervisorError> {
                $crate::hypervisor::lifecycle::start(self).await
            }

            async fn wait_ready(
                &self,
            ) -> Result<$crate::hypervisor::AgentConnection, $crate::hypervisor::HypervisorError>
            {
                $crate::hypervisor::lifecycle::wait_ready(self).await
            }

            async fn stop(&self) -> Result<(), $crate::hypervisor::HypervisorError> {
                $crate::hypervisor::lifecycle::stop(self).await
            }

            async fn kill(&self) -> Result<(), $crate::hypervisor::HypervisorError> {
                $crate::hypervisor::lifecycle::kill(self).await
            }

            async fn check_alive(&self) -> Result<(), $crate::hypervisor::HypervisorError> {
                $crate::hypervisor::lifecycle::check_alive(self).await
            }

            fn pid(&self) -> Option<u32> {
                self.vm.pid()
            }

            fn vsock_socket_path(&self) -> std::path::PathBuf {
                self.vm.vsock_socket_path()
            }

            fn console_log_path(&self) -> std::path::PathBuf {
                self.vm.console_log_path()
            }
        }

        impl Drop for $backend {
            fn drop(&mut self) {
                $crate::hypervisor::lifecycle::teardown_on_drop(self);
            }
        }
    };
}
pub(super) use delegate_hypervisor;
