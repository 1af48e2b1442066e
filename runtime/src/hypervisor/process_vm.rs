//! [`ProcessVm`]: a VM that is a group of processes — a VMM (QEMU or
//! boxlite-vmm) and its helper daemons (one virtiofsd per share; for QEMU
//! also the vsock backend) — and the one [`Hypervisor`] implementation of
//! both process-based backends. What differs between them is their
//! [`Launcher`].
//!
//! Guarantees: `start` checks everything it can before spawning anything,
//! and a failure on the way kills and reaps what was spawned, removes the
//! sockets and releases the jail uid lease; `stop` asks the agent
//! (DestroySandbox: the guest reboots and the VMM exits), then the
//! launcher's last resort, then kills; teardown kills the VMM first, so
//! helpers never see a live frontend lose its backend, and releases the
//! jail uid once it is reaped.

use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use boxlite_protocol::error_chain::chain;
use tokio::time::Instant;

use super::agent::{request_agent_shutdown, wait_for_agent};
use super::capped_log::{LogDrain, LogPipe};
use super::jail_ids::JailLease;
#[cfg(test)]
use super::launcher::TEST_CONSOLE_FD;
use super::launcher::{Launch, Launcher, VmSetup};
use super::process::{
    fs_socket_name, is_executable, kill_and_reap, Proc, LOG_DRAIN_TIMEOUT, POLL_INTERVAL,
};
use super::ready::{ready_socket_path, ReadyListener};
use super::spec::{check_net, check_sandbox_id};
use super::{
    validate_share_tag, AgentConnection, ExitReport, Hypervisor, HypervisorError, NetDevice, Share,
    VmSpec, BALLOON_SETTLE_TIMEOUT, CONSOLE_LOG, MAX_SOCKET_PATH_LEN, VSOCK_SOCKET,
};
use crate::cgroup::{self, PodCgroup};
use crate::network::{MacAddr, TapDevice};

/// After the VMM exits, how long helpers get to exit on their own (virtiofsd
/// and boxlite-vsock do when their frontend disconnects) before teardown
/// kills them.
const HELPER_EXIT_GRACE: Duration = Duration::from_millis(500);
/// How long a helper's clean exit waits for the VMM's before the helper is
/// reported as the process that ended the VM.
const VMM_EXIT_GRACE: Duration = Duration::from_secs(2);
/// The most a VM restored from a template gets to answer before it is
/// booted instead: a restore takes well under a second even nested (the
/// memory copy included); a boot takes seconds.
const RESTORE_READY_TIMEOUT: Duration = Duration::from_secs(15);
/// How often [`Hypervisor::set_guest_memory`] reads the balloon while the
/// guest moves pages in or out.
const BALLOON_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
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

/// What changes over a VM's life, behind one lock.
#[derive(Debug)]
pub(super) struct State {
    phase: Phase,
    shares: Vec<Share>,
    /// Taps until the VMM is spawned (it inherits them), then none.
    nets: Vec<NetDevice>,
    /// Helpers first, the VMM last.
    pub(super) procs: Vec<Proc>,
    started_at: Option<Instant>,
    /// Bound by `start`, taken by `wait_ready`.
    ready: Option<ReadyListener>,
    /// The pump of the console pipe, from start until teardown.
    console: Option<LogDrain>,
    /// The pod's cgroup, from start until teardown removes what it made.
    cgroup: Option<PodCgroup>,
    /// The jail uid the launcher leased for the VMM, from start until
    /// teardown has reaped it.
    jail: Option<JailLease>,
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
            console: None,
            cgroup: None,
            jail: None,
        }
    }
}

/// A process-based VM; `L` says how its processes are launched. Build it
/// with [`super::new_hypervisor`] (or the backends' own `new`).
#[derive(Debug)]
pub struct ProcessVm<L: Launcher> {
    pub(super) setup: VmSetup,
    pub(super) launcher: L,
    /// The VMM's pid while it runs, 0 otherwise.
    pid: AtomicU32,
    pub(super) state: tokio::sync::Mutex<State>,
}

impl<L: Launcher> ProcessVm<L> {
    /// Takes the spec's shares and taps (checked here) into the VM's state;
    /// the rest of the spec goes into the [`VmSetup`] the launcher reads.
    pub fn with_launcher(
        mut spec: VmSpec,
        virtiofsd_binary: &Path,
        launcher: L,
    ) -> Result<Self, HypervisorError> {
        check_sandbox_id(&spec.id)?;
        let mut st = State::new();
        let shares = std::mem::take(&mut spec.shares);
        let nets = std::mem::take(&mut spec.nets);
        for share in shares {
            check_share(&spec.id, &st.shares, &share)?;
            st.shares.push(share);
        }
        for net in &nets {
            check_net(net)?;
        }
        st.nets = nets;
        Ok(ProcessVm {
            setup: VmSetup {
                spec,
                virtiofsd_binary: virtiofsd_binary.to_owned(),
            },
            launcher,
            pid: AtomicU32::new(0),
            state: tokio::sync::Mutex::new(st),
        })
    }

    /// Makes the pod's cgroup the spec names (None: the VM stays in ours).
    fn create_cgroup(&self) -> Result<Option<PodCgroup>, HypervisorError> {
        let spec = &self.setup.spec;
        let Some(relative) = &spec.cgroup else {
            return Ok(None);
        };
        let err = |error| HypervisorError::Cgroup {
            id: spec.id.clone(),
            error,
        };
        let hierarchies = cgroup::host_hierarchies().map_err(err)?;
        let cg = PodCgroup::create(&hierarchies, relative, &spec.dir).map_err(err)?;
        tracing::debug!(sandbox_id = %spec.id, leaves = ?cg.leaves(), "VM cgroup ready");
        Ok(Some(cg))
    }

    fn id(&self) -> &str {
        &self.setup.spec.id
    }

    /// Every socket a run may create.
    fn socket_paths(&self, shares: &[Share]) -> Vec<PathBuf> {
        let vsock = self.setup.path(VSOCK_SOCKET);
        let mut paths = vec![ready_socket_path(&vsock), vsock];
        paths.extend(self.launcher.own_sockets(&self.setup));
        paths.extend(
            shares
                .iter()
                .map(|s| self.setup.path(&fs_socket_name(&s.tag))),
        );
        paths
    }

    /// What a run leaves in the sandbox directory besides logs: the sockets
    /// and virtiofsd's own `<socket>.pid` lock files. Removed before a start
    /// and at teardown.
    fn transient_files(&self, shares: &[Share]) -> Vec<PathBuf> {
        let mut files = self.socket_paths(shares);
        files.extend(
            shares
                .iter()
                .map(|s| self.setup.path(&format!("{}.pid", fs_socket_name(&s.tag)))),
        );
        files
    }

    /// Test access to what a start works with: runs [`Self::preflight`] on
    /// the shares and nets added so far and, if it passes, gives `f` the
    /// setup and the [`Launch`] the launcher's `spawn` would get.
    #[cfg(test)]
    pub(super) async fn with_preflighted<T>(
        &self,
        f: impl FnOnce(&VmSetup, &Launch<'_>) -> T,
    ) -> Result<T, HypervisorError> {
        let st = self.state.lock().await;
        self.preflight(&st)?;
        let mut procs = Vec::new();
        let mut jail = None;
        let launch = Launch {
            shares: &st.shares,
            nets: &st.nets,
            console: TEST_CONSOLE_FD,
            cgroup: crate::cgroup::CgroupJoiner::default(),
            procs: &mut procs,
            jail: &mut jail,
        };
        Ok(f(&self.setup, &launch))
    }

    /// Checks everything that can be checked before spawning anything: the
    /// binaries are executable, the guest assets exist, each share's
    /// directory exists, each socket path fits in `sun_path`.
    fn preflight(&self, st: &State) -> Result<(), HypervisorError> {
        let vm = &self.setup;
        let mut binaries = self.launcher.binaries();
        if !st.shares.is_empty() {
            binaries.push((
                "virtiofsd (hypervisor.virtiofsd_binary)",
                &vm.virtiofsd_binary,
            ));
        }
        for (what, path) in binaries {
            if !is_executable(path) {
                return Err(HypervisorError::MissingBinary {
                    id: vm.spec.id.clone(),
                    what: what.to_owned(),
                    path: path.to_owned(),
                });
            }
        }
        for (what, key, path) in [
            ("guest kernel", "guest.kernel", &vm.spec.kernel),
            ("guest initramfs", "guest.initramfs", &vm.spec.initramfs),
        ] {
            if !path.is_file() {
                return Err(HypervisorError::MissingAsset {
                    id: vm.spec.id.clone(),
                    what,
                    key,
                    path: path.clone(),
                });
            }
        }
        for share in &st.shares {
            if !share.host_dir.is_dir() {
                return Err(HypervisorError::InvalidShare {
                    id: vm.spec.id.clone(),
                    tag: share.tag.clone(),
                    reason: format!(
                        "host directory {} does not exist or is not a directory",
                        share.host_dir.display()
                    ),
                });
            }
        }
        // The hybrid vsock side (boxlite-vmm, boxlite-vsock) creates
        // `<vsock.sock>_<port>` for a guest connecting to any host port, so
        // the longest port must fit too, not only the readiness port.
        let mut longest_port = vm.path(VSOCK_SOCKET).into_os_string();
        longest_port.push(format!("_{}", u32::MAX));
        let paths = self.socket_paths(&st.shares);
        for path in paths.into_iter().chain([PathBuf::from(longest_port)]) {
            let len = path.as_os_str().len();
            if len > MAX_SOCKET_PATH_LEN {
                return Err(HypervisorError::SocketPathTooLong {
                    id: vm.spec.id.clone(),
                    path,
                    len,
                });
            }
        }
        Ok(())
    }

    fn not_created(&self, st: &State, op: &'static str) -> Result<(), HypervisorError> {
        if st.phase == Phase::Created {
            return Ok(());
        }
        Err(HypervisorError::InvalidState {
            id: self.id().to_owned(),
            op,
            state: st.phase.name(),
        })
    }

    /// Waits until the VMM has exited or `deadline` passes; true if it has.
    async fn wait_vmm_exit(&self, deadline: Instant) -> bool {
        loop {
            {
                let mut st = self.state.lock().await;
                match st.procs.iter_mut().find(|p| p.role == L::VMM) {
                    Some(p) => {
                        if let Some(status) = p.poll() {
                            tracing::debug!(sandbox_id = %self.id(), %status, "{} exited", L::VMM.describe());
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
                if st
                    .procs
                    .iter_mut()
                    .filter(|p| p.role != L::VMM)
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

    /// The agent shutdown did not end the VMM by the deadline: the
    /// launcher's last resort, if it has one. True if the VMM exited.
    async fn last_resort_shutdown(&self) -> bool {
        match self.launcher.last_resort_shutdown(&self.setup).await {
            Some(grace) => self.wait_vmm_exit(Instant::now() + grace).await,
            None => false,
        }
    }

    /// Kills and reaps every process (the VMM first), removes sockets and
    /// pid files, releases the jail uid. Synchronous: SIGKILLed processes
    /// exit in milliseconds, and `Drop` needs it too.
    fn teardown(&self, st: &mut State) {
        kill_and_reap(self.id(), &mut st.procs, &self.transient_files(&st.shares));
        // The VMM that ran as it is reaped: another sandbox may have it.
        st.jail = None;
        self.launcher.torn_down();
        if let Some(mut cgroup) = st.cgroup.take() {
            // On failure the record stays in the sandbox directory, for the
            // crashed-shim cleanup of a later delete.
            if let Err(e) = cgroup.remove() {
                tracing::error!(sandbox_id = %self.id(), error = %chain(&e), "cannot remove the VM's cgroup");
            }
        }
        // The console's last lines reach console.log before anyone reads
        // or archives it.
        if let Some(console) = st.console.take() {
            console.wait(LOG_DRAIN_TIMEOUT);
        }
        st.nets.clear();
        st.ready = None;
        self.pid.store(0, Ordering::SeqCst);
        st.phase = Phase::Stopped;
    }
}

impl<L: Launcher> ProcessVm<L> {
    /// Creates the console pipe and the readiness listener, has the
    /// launcher spawn the processes and records them; on failure tears
    /// everything down. The sandbox directory and the cgroup exist.
    async fn launch(&self, st: &mut State) -> Result<(), HypervisorError> {
        let vm = &self.setup;
        let console_path = self.console_log_path();
        let console = match LogPipe::create(&console_path, vm.spec.log_max_bytes) {
            Ok(c) => c,
            Err(error) => {
                self.teardown(st);
                return Err(HypervisorError::Io {
                    id: vm.spec.id.clone(),
                    op: "cannot create the console log",
                    path: console_path,
                    error,
                });
            }
        };
        // Before the VM exists, so the guest always finds it.
        match ReadyListener::bind_for_sandbox(&vm.spec.id, &self.vsock_socket_path()) {
            Ok(ready) => st.ready = Some(ready),
            Err(e) => {
                self.teardown(st);
                return Err(e);
            }
        }
        let joiner = st
            .cgroup
            .as_ref()
            .map(PodCgroup::joiner)
            .unwrap_or_default();
        // Disjoint borrows of the guarded state: the launcher reads the
        // shares and taps while it fills the process list.
        let mut launch = Launch {
            shares: &st.shares,
            nets: &st.nets,
            console: console.writer().as_raw_fd(),
            cgroup: joiner,
            procs: &mut st.procs,
            jail: &mut st.jail,
        };
        let spawned = self.launcher.spawn(vm, &mut launch).await;
        // The VMM has its copy of the console pipe (or there is no VMM):
        // ours closes here, so the pump ends when the VMM does.
        st.console = Some(console.into_drain());
        match spawned {
            Ok(()) => {
                let pid = st
                    .procs
                    .iter()
                    .rfind(|p| p.role == L::VMM)
                    .map_or(0, |p| p.pid);
                self.pid.store(pid, Ordering::SeqCst);
                // The VMM has its copies of the taps now. A restored VM
                // may still have to be booted instead: ours stay until
                // its guest runs.
                let template = self.launcher.restored();
                if template.is_none() {
                    st.nets.clear();
                }
                st.phase = Phase::Running;
                // The agent-ready timeout counts from the VMM's start.
                st.started_at = Some(Instant::now());
                tracing::info!(sandbox_id = %vm.spec.id, pid, template = template.as_deref().unwrap_or("none"), "VM started");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(sandbox_id = %vm.spec.id, error = %chain(&e), "VM start failed; cleaning up");
                self.teardown(st);
                Err(e)
            }
        }
    }

    /// A restored VM: runs it (once the VMM can be asked), then waits for
    /// its agent, which needs no announcement (it made one before the
    /// snapshot). Bounded by [`RESTORE_READY_TIMEOUT`] from `started_at`
    /// (or the agent-ready timeout if shorter): a restore that takes
    /// longer is not worth waiting for, the boot is.
    async fn run_restored(&self, started_at: Instant) -> Result<AgentConnection, HypervisorError> {
        let timeout = self
            .setup
            .spec
            .agent_ready_timeout
            .min(RESTORE_READY_TIMEOUT);
        let deadline = started_at + timeout;
        while !self.launcher.run_restored(&self.setup).await? {
            self.check_alive().await?;
            if Instant::now() >= deadline {
                return Err(HypervisorError::Restore {
                    id: self.id().to_owned(),
                    template: self.launcher.restored().unwrap_or_default(),
                    reason: format!(
                        "did not serve its control socket within {}",
                        crate::fmt_duration(timeout)
                    ),
                });
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        let conn = wait_for_agent(self, None, deadline, timeout).await?;
        tracing::info!(sandbox_id = %self.id(), elapsed_ms = started_at.elapsed().as_millis() as u64, "agent ready (restored VM)");
        Ok(conn)
    }

    /// After a failed restore: kills what runs and launches again, now
    /// booting (the launcher was told). The cgroup, the jail uid lease and
    /// the taps stay. Returns the new start time and readiness listener.
    async fn relaunch(&self) -> Result<(Instant, Option<ReadyListener>), HypervisorError> {
        let mut st = self.state.lock().await;
        if st.phase != Phase::Running {
            // Killed or stopped meanwhile: nothing to boot.
            return Err(HypervisorError::InvalidState {
                id: self.id().to_owned(),
                op: "boot the VM after a failed restore",
                state: st.phase.name(),
            });
        }
        let files = self.transient_files(&st.shares);
        kill_and_reap(self.id(), &mut st.procs, &files);
        self.pid.store(0, Ordering::SeqCst);
        if let Some(console) = st.console.take() {
            console.wait(LOG_DRAIN_TIMEOUT);
        }
        self.launch(&mut st).await?;
        let started_at = st.started_at.expect("set by launch");
        Ok((started_at, st.ready.take()))
    }
}

/// A share's checks: a valid tag not used yet, an absolute directory.
fn check_share(id: &str, existing: &[Share], share: &Share) -> Result<(), HypervisorError> {
    validate_share_tag(id, &share.tag)?;
    let invalid = |reason: String| HypervisorError::InvalidShare {
        id: id.to_owned(),
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

#[async_trait]
impl<L: Launcher> Hypervisor for ProcessVm<L> {
    fn sandbox_id(&self) -> &str {
        self.id()
    }

    async fn add_share(
        &self,
        tag: &str,
        host_dir: &Path,
        read_only: bool,
    ) -> Result<(), HypervisorError> {
        let mut st = self.state.lock().await;
        self.not_created(&st, "add a share")?;
        let share = Share {
            tag: tag.to_owned(),
            host_dir: host_dir.to_owned(),
            read_only,
        };
        check_share(self.id(), &st.shares, &share)?;
        st.shares.push(share);
        Ok(())
    }

    async fn add_net(&self, tap: TapDevice, mac: MacAddr) -> Result<(), HypervisorError> {
        let mut st = self.state.lock().await;
        self.not_created(&st, "add a network device")?;
        let net = NetDevice { tap, mac };
        check_net(&net)?;
        st.nets.push(net);
        Ok(())
    }

    async fn start(&self) -> Result<(), HypervisorError> {
        let vm = &self.setup;
        let mut st = self.state.lock().await;
        self.not_created(&st, "start")?;
        self.preflight(&st)?;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&vm.spec.dir)
            .map_err(|error| HypervisorError::Io {
                id: vm.spec.id.clone(),
                op: "cannot create the sandbox directory",
                path: vm.spec.dir.clone(),
                error,
            })?;
        // Leftovers of an earlier run would make the helpers fail (or make us
        // think they are ready).
        for file in self.transient_files(&st.shares) {
            let _ = std::fs::remove_file(file);
        }
        // Nothing after it can fail without a teardown, which removes it
        // again.
        st.cgroup = self.create_cgroup()?;
        self.launch(&mut st).await
    }

    async fn wait_ready(&self) -> Result<AgentConnection, HypervisorError> {
        let (mut started_at, mut ready) = {
            let mut st = self.state.lock().await;
            match (st.phase, st.started_at) {
                (Phase::Running, Some(at)) => (at, st.ready.take()),
                (phase, _) => {
                    return Err(HypervisorError::InvalidState {
                        id: self.id().to_owned(),
                        op: "wait for the agent",
                        state: phase.name(),
                    })
                }
            }
        };
        if self.launcher.restored().is_some() {
            match self.run_restored(started_at).await {
                Ok(conn) => {
                    self.state.lock().await.nets.clear();
                    return Ok(conn);
                }
                // Killed or stopped meanwhile (not the template's doing):
                // nothing to boot, nothing to discard.
                Err(e @ HypervisorError::InvalidState { .. }) => return Err(e),
                Err(e) => {
                    let tail = boxlite_protocol::log_tail::log_tail(&self.console_log_path(), 20);
                    tracing::warn!(
                        sandbox_id = %self.id(),
                        error = %chain(&e),
                        console_tail = tail.as_deref().unwrap_or("(empty)"),
                        "restoring the VM from its template failed; booting it instead"
                    );
                    self.launcher.restore_failed(&self.setup, &e);
                    // Closed first: dropping it removes its socket path,
                    // which the boot's listener takes over.
                    drop(ready.take());
                    (started_at, ready) = self.relaunch().await?;
                }
            }
        }
        let deadline = started_at + self.setup.spec.agent_ready_timeout;
        let conn =
            wait_for_agent(self, ready, deadline, self.setup.spec.agent_ready_timeout).await?;
        tracing::info!(sandbox_id = %self.id(), elapsed_ms = started_at.elapsed().as_millis() as u64, "agent ready");
        self.launcher.agent_ready(&self.setup).await?;
        Ok(conn)
    }

    async fn stop(&self) -> Result<(), HypervisorError> {
        {
            let mut st = self.state.lock().await;
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
        let deadline = Instant::now() + self.setup.spec.shutdown_timeout;
        let vmm_alive = {
            let mut st = self.state.lock().await;
            st.procs
                .iter_mut()
                .find(|p| p.role == L::VMM)
                .is_some_and(|p| p.poll().is_none())
        };
        if vmm_alive {
            request_agent_shutdown(
                self.id(),
                &self.hybrid_vsock(),
                self.setup.spec.shutdown_timeout,
                deadline,
            )
            .await;
        }
        let exited = self.wait_vmm_exit(deadline).await || self.last_resort_shutdown().await;
        if exited {
            self.wait_helpers_exit(HELPER_EXIT_GRACE).await;
        } else {
            tracing::warn!(
                sandbox_id = %self.id(),
                timeout_secs = self.setup.spec.shutdown_timeout.as_secs(),
                "VM did not exit within the shutdown timeout; killing it"
            );
        }
        let mut st = self.state.lock().await;
        self.teardown(&mut st);
        Ok(())
    }

    async fn kill(&self) -> Result<(), HypervisorError> {
        let mut st = self.state.lock().await;
        self.teardown(&mut st);
        Ok(())
    }

    async fn check_alive(&self) -> Result<(), HypervisorError> {
        let mut st = self.state.lock().await;
        match st.phase {
            Phase::Created => return Ok(()),
            Phase::Running => {}
            phase => {
                return Err(HypervisorError::InvalidState {
                    id: self.id().to_owned(),
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
        if st.procs[dead].role != L::VMM && st.procs[dead].poll().is_some_and(|s| s.success()) {
            let until = Instant::now() + VMM_EXIT_GRACE;
            while Instant::now() < until {
                if let Some(v) = st
                    .procs
                    .iter_mut()
                    .position(|p| p.role == L::VMM && p.poll().is_some())
                {
                    dead = v;
                    break;
                }
                tokio::time::sleep(POLL_INTERVAL).await;
            }
        }
        let p = &mut st.procs[dead];
        Err(HypervisorError::ProcessExited(Box::new(ExitReport {
            id: self.id().to_owned(),
            what: p.role.describe(),
            pid: p.pid,
            status: p.poll().expect("polled as exited above"),
            log: p.log.clone(),
            last_line: p.last_log_line(),
            socket: None,
            console_log: Some(self.console_log_path()),
        })))
    }

    async fn set_guest_memory(&self, mib: u32) -> Result<(), HypervisorError> {
        let id = self.id().to_owned();
        let total = self.setup.spec.memory_mib;
        let failed = |reason: String| HypervisorError::Balloon {
            id: id.clone(),
            reason,
        };
        if mib == 0 || mib > total {
            return Err(failed(format!(
                "cannot give the guest {mib} MiB: the VM has {total} MiB"
            )));
        }
        {
            let st = self.state.lock().await;
            if !matches!(st.phase, Phase::Running) {
                return Err(HypervisorError::InvalidState {
                    id,
                    op: "resize the guest's memory",
                    state: st.phase.name(),
                });
            }
        }
        let target = total - mib;
        let mut now = self.launcher.balloon(&self.setup, Some(target)).await?;
        let deadline = Instant::now() + BALLOON_SETTLE_TIMEOUT;
        while now.actual_mib != target {
            if Instant::now() >= deadline {
                return Err(failed(format!(
                    "the guest still holds {} MiB in its balloon {}s after the target became \
                     {target} MiB (to give it {mib} of the VM's {total} MiB)",
                    now.actual_mib,
                    BALLOON_SETTLE_TIMEOUT.as_secs()
                )));
            }
            tokio::time::sleep(BALLOON_POLL_INTERVAL).await;
            self.check_alive().await?;
            now = self.launcher.balloon(&self.setup, None).await?;
        }
        tracing::info!(sandbox_id = %self.id(), guest_mib = mib, balloon_mib = target, "guest memory resized");
        Ok(())
    }

    fn restored_nic_macs(&self) -> Option<Vec<MacAddr>> {
        self.launcher.restored_nic_macs()
    }

    fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::SeqCst) {
            0 => None,
            pid => Some(pid),
        }
    }

    fn vsock_socket_path(&self) -> PathBuf {
        self.setup.path(VSOCK_SOCKET)
    }

    fn console_log_path(&self) -> PathBuf {
        self.setup.path(CONSOLE_LOG)
    }
}

/// A VM dropped while its processes run is killed.
impl<L: Launcher> Drop for ProcessVm<L> {
    fn drop(&mut self) {
        let Ok(mut guard) = self.state.try_lock() else {
            return;
        };
        if guard.procs.is_empty() {
            return;
        }
        tracing::warn!(sandbox_id = %self.id(), "VM dropped while running; killing it");
        let mut st = std::mem::replace(&mut *guard, State::new());
        drop(guard);
        self.teardown(&mut st);
    }
}
