//! The inner VMs the scenarios boot: one running VMM ([`Vm`]) and what the
//! scenarios do with it — wait for its console, connect to its agent, make
//! the few agent calls they check, end it. Started by [`boxlite_vmm`]
//! (the VMM under test) or [`qemu`] (the benchmark's comparison row).

mod boxlite_vmm;
mod files;
mod qemu;

pub use boxlite_vmm::{vsock_support, Device, VmOptions};
pub use files::VmFiles;

use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use boxlite_protocol::agent::{
    DestroySandboxRequest, GuestInfoRequest, GuestInfoResponse, Interface, IpAddress,
    ReadFileRequest, UpdateInterfaceRequest,
};
use boxlite_protocol::health::health_check_response::ServingStatus;
use boxlite_protocol::ready::Announcement;
use boxlite_runtime::hypervisor::ready::{ReadyError, ReadyListener};
use boxlite_runtime::{AgentConnection, HybridVsock};

use crate::verdict::Failure;

/// Guest RAM for each inner VM.
const GUEST_MEMORY_MIB: u32 = 256;
/// How long one agent RPC of a scenario may take.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a guest may take to end the VM after DestroySandbox replied.
const REBOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// One running boxlite-vmm.
pub struct Vm {
    pub files: VmFiles,
    child: Child,
    /// When the VMM was spawned: the zero of every reported time.
    pub started: Instant,
    vsock: Option<HybridVsock>,
    /// `<uds>_1027`, bound before the VMM starts (as the runtime does).
    ready: Option<ReadyListener>,
    /// Started with its jail: the VM then runs in the spawned process's
    /// child (docs/vmm.md, "Running it").
    jailed: bool,
}

impl Vm {
    pub fn fail(&self, reason: String) -> Failure {
        Failure {
            reason,
            vm: Some(self.files.clone()),
        }
    }

    /// One line per VMM thread: name, state, user/system/guest ticks and the
    /// kernel function it sleeps in — tells a spinning guest from a vCPU
    /// blocked in the host. Written to the VMM log, printed with a FAIL.
    fn record_threads(&self) {
        let pid = self.child.id();
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        let mut out = String::from(
            "boxlite-nested-driver: VMM threads (name state utime stime guest_time wchan):\n",
        );
        for t in tasks.flatten() {
            let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let wchan = fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            // comm is in parentheses; the fields after it are space-separated.
            let (comm, rest) = match (stat.find('('), stat.rfind(')')) {
                (Some(a), Some(b)) if b > a => (&stat[a + 1..b], &stat[b + 1..]),
                _ => continue,
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After comm: state=0, utime=11, stime=12, guest_time=40.
            let get = |i: usize| f.get(i).copied().unwrap_or("?");
            let _ = writeln!(
                out,
                "  {comm} {} utime={} stime={} guest={} wchan={wchan}",
                get(0),
                get(11),
                get(12),
                get(40)
            );
        }
        if let Ok(mut f) = fs::OpenOptions::new()
            .append(true)
            .open(&self.files.vmm_log)
        {
            let _ = f.write_all(out.as_bytes());
        }
    }

    /// The pid of the process that runs the VM: the spawned one, or with
    /// the jail its child (`boxlite_vmm_api::process::vm_pids`).
    pub fn vm_pid(&self) -> Result<u32, Failure> {
        let spawned = self.child.id();
        if !self.jailed {
            return Ok(spawned);
        }
        boxlite_vmm_api::process::vm_pids(spawned)
            .first()
            .copied()
            .ok_or_else(|| {
                self.fail(format!(
                    "the jailed boxlite-vmm {spawned} has no VM process"
                ))
            })
    }

    /// The VM process's resident memory in KiB (`VmRSS`): its own pages and
    /// the guest RAM it has mapped (the memfd's pages count as `RssShmem`).
    pub fn rss_kib(&self) -> Result<u64, Failure> {
        let pid = self.vm_pid()?;
        let path = format!("/proc/{pid}/status");
        let status =
            fs::read_to_string(&path).map_err(|e| self.fail(format!("cannot read {path}: {e}")))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| self.fail(format!("{path} has no VmRSS line")))
    }

    /// Guest RAM the host holds for the VM, in KiB: the blocks allocated
    /// to boxlite-vmm's guest RAM memfd (found among the VM process's fds
    /// by its name). Unlike `VmRSS`, which only counts what the VMM has
    /// mapped, this is what the host really keeps: a memfd page the VMM
    /// merely unmapped (`MADV_DONTNEED` on shared memory) still counts.
    pub fn guest_ram_kib(&self) -> Result<u64, Failure> {
        use std::os::unix::fs::MetadataExt;
        let pid = self.vm_pid()?;
        let dir = format!("/proc/{pid}/fd");
        let fds = fs::read_dir(&dir).map_err(|e| self.fail(format!("cannot list {dir}: {e}")))?;
        for fd in fds.flatten() {
            let is_ram = fs::read_link(fd.path())
                .is_ok_and(|t| t.to_string_lossy().starts_with("/memfd:boxlite-guest-ram"));
            if is_ram {
                // stat through the /proc link reaches the memfd's inode.
                let m = fs::metadata(fd.path())
                    .map_err(|e| self.fail(format!("cannot stat {}: {e}", fd.path().display())))?;
                return Ok(m.blocks() / 2);
            }
        }
        Err(self.fail(format!("no guest RAM memfd among {dir}")))
    }

    /// Proportional set size of the VM process in KiB (`Pss` of
    /// `smaps_rollup`): its resident memory with each page shared with
    /// other processes counted as a share of it.
    pub fn pss_kib(&self) -> Result<u64, Failure> {
        let pid = self.vm_pid()?;
        let path = format!("/proc/{pid}/smaps_rollup");
        let text =
            fs::read_to_string(&path).map_err(|e| self.fail(format!("cannot read {path}: {e}")))?;
        text.lines()
            .find_map(|l| l.strip_prefix("Pss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| self.fail(format!("{path} has no Pss line")))
    }

    /// Sends `request` on the control socket (the VM must have been
    /// started with [`VmOptions::control_socket`]), waiting for the
    /// socket to appear and the reply up to `timeout`; an error reply is
    /// a failure.
    pub async fn control(
        &mut self,
        request: boxlite_vmm_api::control::Request,
        timeout: Duration,
    ) -> Result<boxlite_vmm_api::control::Reply, Failure> {
        use boxlite_vmm_api::control::Reply;
        use std::io::{BufRead as _, BufReader};
        let socket = self.files.control_socket();
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match std::os::unix::net::UnixStream::connect(&socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(self.fail(format!(
                        "cannot connect to {} within {}s: {e}",
                        socket.display(),
                        timeout.as_secs()
                    )))
                }
                Err(_) => {}
            }
            if let Some(why) = self.exited() {
                return Err(self.fail(format!("{why} before its control socket answered")));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let failed = |e: std::io::Error| format!("{request} on {}: {e}", socket.display());
        let asked = (|| {
            stream.set_read_timeout(Some(timeout))?;
            (&stream).write_all(request.to_line().as_bytes())?;
            let mut line = String::new();
            BufReader::new(&stream).read_line(&mut line)?;
            Ok(line)
        })();
        let line = asked.map_err(|e| self.fail(failed(e)))?;
        match Reply::from_line(&line) {
            Ok(Reply::Error { error }) => Err(self.fail(format!(
                "{request} refused by {}: {error}",
                socket.display()
            ))),
            Ok(reply) => Ok(reply),
            Err(e) => Err(self.fail(format!(
                "{request}: {} answered {:?}: {e}",
                socket.display(),
                line.trim_end()
            ))),
        }
    }

    /// The VMM's counters through its control socket (the VM must have
    /// been started with [`VmOptions::control_socket`]).
    pub fn metrics(&self) -> Result<boxlite_vmm_api::control::Metrics, Failure> {
        use boxlite_vmm_api::control::{Reply, Request};
        let socket = self.files.control_socket();
        match boxlite_runtime::hypervisor::builtin::control_request(&socket, Request::Metrics) {
            Ok(Reply::Metrics { metrics }) => Ok(metrics),
            Ok(other) => {
                Err(self.fail(format!("{}: metrics answered {other:?}", socket.display())))
            }
            Err(e) => Err(self.fail(format!("{}: metrics failed: {e}", socket.display()))),
        }
    }

    /// The VMM's exit, if it has ended, as a failure reason.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(format!("boxlite-vmm exited early ({st})")),
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait for boxlite-vmm: {e}")),
        }
    }

    /// Waits until the console shows `needle`; fails on a guest panic, a
    /// VMM exit or the timeout. Returns the time since the VMM started.
    pub async fn wait_console(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<Duration, Failure> {
        loop {
            let text = self.files.console_text();
            if text.contains(needle) {
                return Ok(self.started.elapsed());
            }
            if let Some(l) = text.lines().find(|l| l.contains("Kernel panic")) {
                let reason = format!("guest kernel panic: {}", l.trim());
                self.kill();
                return Err(self.fail(reason));
            }
            if let Some(why) = self.exited() {
                return Err(self.fail(format!("{why} before the console showed {needle:?}")));
            }
            if self.started.elapsed() > timeout {
                self.record_threads();
                self.kill();
                return Err(self.fail(format!(
                    "the console did not show {needle:?} within {}s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the agent's connection to host port 1027 and its line.
    pub async fn announcement(&mut self, timeout: Duration) -> Result<Announcement, Failure> {
        let deadline = self.started + timeout;
        let mut last = String::from("no connection");
        loop {
            if let Some(why) = self.exited() {
                return Err(self.fail(format!(
                    "{why} before the agent announced itself (last: {last})"
                )));
            }
            if Instant::now() > deadline {
                self.record_threads();
                self.kill();
                return Err(self.fail(format!(
                    "the agent did not announce itself on host port 1027 within {}s (last: {last})",
                    timeout.as_secs()
                )));
            }
            let ready = self.ready.as_ref().expect("a VM with a vsock device");
            let until = tokio::time::Instant::now() + Duration::from_millis(200);
            match ready.accept_until(until).await {
                Ok(a) => return Ok(a),
                Err(ReadyError::NotYet) => {}
                Err(e) => last = boxlite_protocol::error_chain::chain(&e),
            }
        }
    }

    /// Connects to the agent through the hybrid socket and waits for SERVING.
    pub async fn connect(&mut self, timeout: Duration) -> Result<AgentConnection, Failure> {
        let vsock = self.vsock.clone().expect("a VM with a vsock device");
        let deadline = self.started + timeout;
        let mut last = String::from("no attempt");
        loop {
            if let Some(why) = self.exited() {
                return Err(self.fail(format!("{why} before the agent answered (last: {last})")));
            }
            if Instant::now() > deadline {
                self.record_threads();
                self.kill();
                return Err(self.fail(format!(
                    "the agent did not answer Health.Check through {} within {}s (last: {last})",
                    vsock.socket_path().display(),
                    timeout.as_secs()
                )));
            }
            match vsock
                .try_connect(boxlite_protocol::AGENT_VSOCK_PORT, Duration::from_secs(2))
                .await
            {
                Ok(stream) => {
                    let conn =
                        AgentConnection::new(boxlite_runtime::hybrid_vsock::ttrpc_client(stream));
                    match conn.check(Duration::from_secs(5)).await {
                        Ok(ServingStatus::SERVING) => return Ok(conn),
                        Ok(st) => last = format!("Health.Check answered {st:?}"),
                        Err(e) => last = format!("Health.Check failed: {e}"),
                    }
                }
                Err(e) => last = boxlite_protocol::error_chain::chain(&e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn guest_info(&self, conn: &AgentConnection) -> Result<GuestInfoResponse, Failure> {
        conn.agent()
            .guest_info(
                ttrpc::context::with_duration(RPC_TIMEOUT),
                &GuestInfoRequest::default(),
            )
            .await
            .map_err(|e| self.fail(format!("GuestInfo failed: {e}")))
    }

    /// UpdateInterface: the guest NIC with MAC `mac` — found by
    /// `current_mac` when it has that one now (a clone of a template) —
    /// gets `mac` and `ip/prefix`; returns the NIC as the agent left it.
    pub async fn configure_nic(
        &self,
        conn: &AgentConnection,
        mac: &str,
        current_mac: Option<&str>,
        ip: std::net::Ipv4Addr,
        prefix: u8,
    ) -> Result<Interface, Failure> {
        let req = UpdateInterfaceRequest {
            interface: Some(Interface {
                hw_addr: mac.into(),
                addresses: vec![IpAddress {
                    address: ip.to_string(),
                    prefix_len: prefix.into(),
                    ..Default::default()
                }],
                ..Default::default()
            })
            .into(),
            current_hw_addr: current_mac.unwrap_or_default().into(),
            ..Default::default()
        };
        let from = current_mac.map(|m| format!("{m} → ")).unwrap_or_default();
        conn.agent()
            .update_interface(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
            .await
            .map_err(|e| {
                self.fail(format!(
                    "UpdateInterface {from}{mac} {ip}/{prefix} failed: {e}"
                ))
            })
    }

    /// A guest file's text, read by the agent (ReadFile).
    pub async fn read_guest_file(
        &self,
        conn: &AgentConnection,
        path: &str,
    ) -> Result<String, Failure> {
        let req = ReadFileRequest {
            path: path.to_owned(),
            ..Default::default()
        };
        let read = conn
            .agent()
            .read_file(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
            .await
            .map_err(|e| self.fail(format!("ReadFile {path} failed: {e}")))?;
        Ok(String::from_utf8_lossy(&read.data).into_owned())
    }

    /// GuestInfo lists a virtio device with this id.
    pub async fn expect_virtio_device(
        &self,
        conn: &AgentConnection,
        id: u32,
        what: &str,
    ) -> Result<(), Failure> {
        let info = self.guest_info(conn).await?;
        if info.virtio_devices.iter().any(|d| d.device_id == id) {
            return Ok(());
        }
        let ids: Vec<u32> = info.virtio_devices.iter().map(|d| d.device_id).collect();
        Err(self.fail(format!(
            "GuestInfo lists no {what} device ({id}); it lists {ids:?}"
        )))
    }

    /// DestroySandbox, then waits for boxlite-vmm to exit with 0. Returns the
    /// exit status and the time from the call to the exit.
    pub async fn destroy(
        &mut self,
        conn: &AgentConnection,
    ) -> Result<(ExitStatus, Duration), Failure> {
        let t = Instant::now();
        let req = DestroySandboxRequest {
            timeout_secs: 1,
            ..Default::default()
        };
        // The connection may drop right after the reply (docs/agent.md).
        if let Err(e) = conn
            .agent()
            .destroy_sandbox(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
            .await
        {
            if self.exited().is_none() {
                return Err(self.fail(format!("DestroySandbox failed: {e}")));
            }
        }
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok((st, t.elapsed())),
                Ok(Some(st)) => {
                    return Err(self.fail(format!(
                        "after DestroySandbox boxlite-vmm exited with {st}, want 0 (docs/vmm.md: guest reset/triple fault)"
                    )))
                }
                Ok(None) if t.elapsed() > REBOOT_TIMEOUT => {
                    self.kill();
                    return Err(self.fail(format!(
                        "boxlite-vmm still running {}s after DestroySandbox",
                        REBOOT_TIMEOUT.as_secs()
                    )));
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return Err(self.fail(format!("cannot wait for boxlite-vmm: {e}"))),
            }
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
        let _ = &self.files.dir;
    }
}
