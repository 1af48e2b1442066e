//! A fake guest for the shim's tests: a ttrpc server with the agent's
//! `Agent` service (and boxlite-test-support's fake `Health`), a
//! hybrid-vsock front that serves stdio streams on port 1025 like the agent
//! does, and a fake [`Hypervisor`] plus [`VmFactory`] around them.
//!
//! Fake processes: StartContainer/ExecProcess give pids from 100 up; a
//! process exits when SignalProcess sends SIGKILL/SIGTERM/SIGINT (status
//! 128 + signal), when [`FakeAgent::exit`] is called, or at once with
//! `auto_exit`. Its stdout stream gets the scripted output, then — after the
//! exit and a drain delay — a last line `bye <cid>/<eid>`, then EOF; stderr
//! gets `err <cid>/<eid>`; stdin is collected until EOF.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use boxlite_protocol::agent::*;
use boxlite_protocol::agent_ttrpc::{create_agent, Agent};
use boxlite_protocol::stdio::{encode_ack, StreamHeader, StreamKind, FIXED_LEN};
use boxlite_runtime::network::{MacAddr, TapDevice};
use boxlite_runtime::{AgentConnection, Hypervisor, HypervisorError};
use boxlite_test_support::fake_guest::{self, read_connect_line, serve_agent, OK_REPLY};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};
use ttrpc::r#async::TtrpcContext;

use crate::error::Result;
use crate::sandbox::{VmFactory, VmRequest};

type Key = (String, String);

fn status(code: ttrpc::Code, msg: &str) -> ttrpc::Error {
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, msg))
}

struct FakeProc {
    pid: u32,
    exit: watch::Sender<Option<i32>>,
}

/// Every call the fake agent received, and its scripted behaviour.
#[derive(Default)]
pub struct FakeAgent {
    /// Container RPCs answer UNIMPLEMENTED, as the agent core does today.
    pub unimplemented: AtomicBool,
    /// Processes exit with this status right after they start.
    pub auto_exit: Mutex<Option<i32>>,
    /// Stdio streams are refused with this reason.
    pub refuse_stdio: Mutex<Option<String>>,
    pub drain_delay: Mutex<Duration>,
    pub calls: Mutex<Vec<String>>,
    pub specs: Mutex<HashMap<String, serde_json::Value>>,
    pub stdin: Mutex<HashMap<Key, Vec<u8>>>,
    pub signals: Mutex<Vec<(String, String, u32, bool)>>,
    pub resizes: Mutex<Vec<(String, u32, u32)>>,
    pub updates: Mutex<Vec<serde_json::Value>>,
    pub sandbox_requests: Mutex<Vec<CreateSandboxRequest>>,
    procs: Mutex<HashMap<Key, FakeProc>>,
    containers: Mutex<Vec<String>>,
    next_pid: AtomicU32,
    oom_tx: Mutex<Option<mpsc::Sender<String>>>,
    oom_rx: tokio::sync::Mutex<Option<mpsc::Receiver<String>>>,
}

impl FakeAgent {
    pub fn new() -> Arc<Self> {
        let (tx, rx) = mpsc::channel(8);
        let agent = FakeAgent {
            next_pid: AtomicU32::new(100),
            drain_delay: Mutex::new(Duration::from_millis(200)),
            ..Default::default()
        };
        *agent.oom_tx.lock().unwrap() = Some(tx);
        *agent.oom_rx.try_lock().unwrap() = Some(rx);
        Arc::new(agent)
    }

    fn record(&self, call: impl Into<String>) {
        self.calls.lock().unwrap().push(call.into());
    }

    pub fn calls(&self) -> Vec<String> {
        self.calls.lock().unwrap().clone()
    }

    fn check_implemented(&self, rpc: &str) -> ttrpc::Result<()> {
        if self.unimplemented.load(Ordering::SeqCst) {
            return Err(status(
                ttrpc::Code::UNIMPLEMENTED,
                &format!("container service not implemented yet: {rpc}"),
            ));
        }
        Ok(())
    }

    fn known(&self, cid: &str) -> ttrpc::Result<()> {
        if self.containers.lock().unwrap().iter().any(|c| c == cid) {
            Ok(())
        } else {
            Err(status(
                ttrpc::Code::NOT_FOUND,
                &format!("container {cid} not found"),
            ))
        }
    }

    fn spawn_proc(&self, cid: &str, eid: &str) -> u32 {
        let pid = self.next_pid.fetch_add(1, Ordering::SeqCst);
        let (tx, _) = watch::channel(None);
        self.procs
            .lock()
            .unwrap()
            .insert((cid.to_owned(), eid.to_owned()), FakeProc { pid, exit: tx });
        if let Some(code) = *self.auto_exit.lock().unwrap() {
            self.exit(cid, eid, code);
        }
        pid
    }

    /// Makes a fake process exit with `code`.
    pub fn exit(&self, cid: &str, eid: &str, code: i32) {
        if let Some(p) = self
            .procs
            .lock()
            .unwrap()
            .get(&(cid.to_owned(), eid.to_owned()))
        {
            p.exit.send_replace(Some(code));
        }
    }

    pub async fn send_oom(&self, cid: &str) {
        let tx = self.oom_tx.lock().unwrap().clone().unwrap();
        tx.send(cid.to_owned()).await.unwrap();
    }

    fn exit_rx(&self, key: &Key) -> Option<watch::Receiver<Option<i32>>> {
        self.procs
            .lock()
            .unwrap()
            .get(key)
            .map(|p| p.exit.subscribe())
    }

    async fn wait_for_proc(&self, key: &Key) -> Option<watch::Receiver<Option<i32>>> {
        for _ in 0..500 {
            if let Some(rx) = self.exit_rx(key) {
                return Some(rx);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        None
    }
}

async fn wait_exit(mut rx: watch::Receiver<Option<i32>>) -> i32 {
    loop {
        if let Some(code) = *rx.borrow_and_update() {
            return code;
        }
        if rx.changed().await.is_err() {
            return 255;
        }
    }
}

#[async_trait]
impl Agent for FakeAgent {
    async fn create_sandbox(
        &self,
        _: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.record("CreateSandbox");
        self.sandbox_requests.lock().unwrap().push(req);
        Ok(Empty::new())
    }
    async fn destroy_sandbox(
        &self,
        _: &TtrpcContext,
        _: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.record("DestroySandbox");
        Ok(Empty::new())
    }
    async fn create_container(
        &self,
        _: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.record(format!("CreateContainer {}", req.container_id));
        self.check_implemented("CreateContainer")?;
        let spec: serde_json::Value = serde_json::from_slice(&req.oci_spec_json)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, &e.to_string()))?;
        self.specs
            .lock()
            .unwrap()
            .insert(req.container_id.clone(), spec);
        self.containers.lock().unwrap().push(req.container_id);
        Ok(Empty::new())
    }
    async fn start_container(
        &self,
        _: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<ProcessStarted> {
        self.record(format!("StartContainer {}", req.container_id));
        self.check_implemented("StartContainer")?;
        self.known(&req.container_id)?;
        Ok(ProcessStarted {
            pid: self.spawn_proc(&req.container_id, ""),
            ..Default::default()
        })
    }
    async fn exec_process(
        &self,
        _: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<ProcessStarted> {
        self.record(format!("ExecProcess {} {}", req.container_id, req.exec_id));
        self.check_implemented("ExecProcess")?;
        self.known(&req.container_id)?;
        Ok(ProcessStarted {
            pid: self.spawn_proc(&req.container_id, &req.exec_id),
            ..Default::default()
        })
    }
    async fn signal_process(
        &self,
        _: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.record(format!(
            "SignalProcess {} {} {}",
            req.container_id, req.exec_id, req.signal
        ));
        self.check_implemented("SignalProcess")?;
        self.known(&req.container_id)?;
        self.signals.lock().unwrap().push((
            req.container_id.clone(),
            req.exec_id.clone(),
            req.signal,
            req.all,
        ));
        if [libc::SIGKILL, libc::SIGTERM, libc::SIGINT].contains(&(req.signal as i32)) {
            self.exit(&req.container_id, &req.exec_id, 128 + req.signal as i32);
        }
        Ok(Empty::new())
    }
    async fn wait_process(
        &self,
        _: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        self.check_implemented("WaitProcess")?;
        let key = (req.container_id.clone(), req.exec_id.clone());
        let rx = self
            .exit_rx(&key)
            .ok_or_else(|| status(ttrpc::Code::NOT_FOUND, "no such process"))?;
        let code = wait_exit(rx).await;
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i64;
        Ok(WaitProcessResponse {
            exit_status: code,
            exited_at_unix_nanos: nanos,
            ..Default::default()
        })
    }
    async fn remove_process(
        &self,
        _: &TtrpcContext,
        req: RemoveProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.record(format!(
            "RemoveProcess {} {}",
            req.container_id, req.exec_id
        ));
        self.check_implemented("RemoveProcess")?;
        let key = (req.container_id, req.exec_id);
        match self.procs.lock().unwrap().remove(&key) {
            Some(_) => Ok(Empty::new()),
            None => Err(status(ttrpc::Code::NOT_FOUND, "no such exec")),
        }
    }

    async fn remove_container(
        &self,
        _: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.record(format!("RemoveContainer {}", req.container_id));
        self.check_implemented("RemoveContainer")?;
        self.known(&req.container_id)?;
        self.containers
            .lock()
            .unwrap()
            .retain(|c| *c != req.container_id);
        Ok(Empty::new())
    }
    async fn list_processes(
        &self,
        _: &TtrpcContext,
        req: ListProcessesRequest,
    ) -> ttrpc::Result<ListProcessesResponse> {
        self.check_implemented("ListProcesses")?;
        self.known(&req.container_id)?;
        let mut processes: Vec<ProcessInfo> = self
            .procs
            .lock()
            .unwrap()
            .iter()
            .filter(|((cid, _), _)| *cid == req.container_id)
            .map(|((_, eid), p)| ProcessInfo {
                pid: p.pid,
                exec_id: eid.clone(),
                ..Default::default()
            })
            .collect();
        processes.sort_by_key(|p| p.pid);
        Ok(ListProcessesResponse {
            processes,
            ..Default::default()
        })
    }
    async fn resize_pty(&self, _: &TtrpcContext, req: ResizePtyRequest) -> ttrpc::Result<Empty> {
        self.check_implemented("ResizePty")?;
        self.resizes
            .lock()
            .unwrap()
            .push((req.exec_id.clone(), req.rows, req.columns));
        Ok(Empty::new())
    }
    async fn close_stdin(&self, _: &TtrpcContext, req: CloseStdinRequest) -> ttrpc::Result<Empty> {
        self.record(format!("CloseStdin {} {}", req.container_id, req.exec_id));
        Ok(Empty::new())
    }
    async fn stats_container(
        &self,
        _: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        self.check_implemented("StatsContainer")?;
        self.known(&req.container_id)?;
        Ok(StatsContainerResponse {
            cpu: Some(CpuStats {
                usage_usec: 1234,
                ..Default::default()
            })
            .into(),
            memory: Some(MemoryStats {
                usage: 4096,
                usage_limit: 64 << 20,
                ..Default::default()
            })
            .into(),
            pids: Some(PidsStats {
                current: 2,
                limit: 10,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        })
    }
    async fn pause_container(
        &self,
        _: &TtrpcContext,
        req: PauseContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.record(format!("PauseContainer {}", req.container_id));
        self.check_implemented("PauseContainer")?;
        Ok(Empty::new())
    }
    async fn resume_container(
        &self,
        _: &TtrpcContext,
        req: ResumeContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.record(format!("ResumeContainer {}", req.container_id));
        self.check_implemented("ResumeContainer")?;
        Ok(Empty::new())
    }
    async fn update_container(
        &self,
        _: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.check_implemented("UpdateContainer")?;
        let v = serde_json::from_slice(&req.resources_json)
            .map_err(|e| status(ttrpc::Code::INVALID_ARGUMENT, &e.to_string()))?;
        self.updates.lock().unwrap().push(v);
        Ok(Empty::new())
    }
    async fn get_oom_event(
        &self,
        _: &TtrpcContext,
        _: GetOOMEventRequest,
    ) -> ttrpc::Result<OOMEvent> {
        let mut guard = self.oom_rx.lock().await;
        let rx = guard
            .as_mut()
            .ok_or_else(|| status(ttrpc::Code::INTERNAL, "gone"))?;
        match rx.recv().await {
            Some(container_id) => Ok(OOMEvent {
                container_id,
                ..Default::default()
            }),
            None => Err(status(ttrpc::Code::UNAVAILABLE, "closed")),
        }
    }
}

/// The fake agent served on `<dir>/agent.sock`, and the hybrid vsock front
/// on `<dir>/vsock.sock` for stdio streams.
pub struct FakeGuest {
    pub agent: Arc<FakeAgent>,
    pub agent_sock: PathBuf,
    _server: ttrpc::r#async::Server,
}

impl FakeGuest {
    pub async fn start(dir: &Path) -> Self {
        let agent = FakeAgent::new();
        let agent_sock = dir.join("agent.sock");
        let server = serve_agent(&agent_sock, "fake", [create_agent(agent.clone())]).await;
        Self {
            agent,
            agent_sock,
            _server: server,
        }
    }
}

/// A unix-socket proxy in front of the fake agent that can be made to stop:
/// after [`StallProxy::stall`] it reads nothing more from the shim and
/// forwards nothing either way — an agent that accepts and never reads.
pub struct StallProxy {
    pub socket: PathBuf,
    stalled: Arc<AtomicBool>,
}

impl StallProxy {
    /// Listens on `socket`, forwarding each connection to `upstream`.
    pub fn start(socket: PathBuf, upstream: PathBuf) -> Self {
        let stalled = Arc::new(AtomicBool::new(false));
        let listener = UnixListener::bind(&socket).expect("bind the stall proxy");
        let flag = stalled.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = UnixStream::connect(&upstream).await else {
                    continue;
                };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::spawn(forward_until_stalled(cr, sw, flag.clone()));
                tokio::spawn(forward_until_stalled(sr, cw, flag.clone()));
            }
        });
        StallProxy { socket, stalled }
    }

    /// From now on nothing more is read or forwarded.
    pub fn stall(&self) {
        self.stalled.store(true, Ordering::SeqCst);
    }
}

/// Copies `from` to `to` until end of file, or forever nothing once
/// `stalled` is set (the bytes read at that moment are dropped, and the
/// connection stays open).
async fn forward_until_stalled(
    mut from: tokio::net::unix::OwnedReadHalf,
    mut to: tokio::net::unix::OwnedWriteHalf,
    stalled: Arc<AtomicBool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if stalled.load(Ordering::SeqCst) {
            // Hold both halves open, never reading again.
            let _hold = (from, to);
            std::future::pending::<()>().await;
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Serves stdio streams like the agent, on a hybrid vsock socket.
pub fn spawn_vsock_front(socket: PathBuf, agent: Arc<FakeAgent>) {
    let listener = UnixListener::bind(&socket).expect("bind fake vsock front");
    tokio::spawn(async move {
        loop {
            let Ok((conn, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(serve_stdio(conn, agent.clone()));
        }
    });
}

async fn serve_stdio(mut s: UnixStream, agent: Arc<FakeAgent>) {
    if read_connect_line(&mut s).await != "CONNECT 1025" {
        return;
    }
    if s.write_all(OK_REPLY).await.is_err() {
        return;
    }
    let mut fixed = [0u8; FIXED_LEN];
    if s.read_exact(&mut fixed).await.is_err() {
        return;
    }
    let Ok(fixed) = StreamHeader::parse_fixed(&fixed) else {
        return;
    };
    let mut ids = vec![0u8; fixed.ids_len()];
    if s.read_exact(&mut ids).await.is_err() {
        return;
    }
    let Ok(header) = StreamHeader::from_parts(fixed, &ids) else {
        return;
    };
    let refusal = agent.refuse_stdio.lock().unwrap().clone();
    if let Some(reason) = refusal {
        let _ = s.write_all(&encode_ack(Err(&reason))).await;
        return;
    }
    let key = (header.container_id.clone(), header.exec_id.clone());
    let known = agent.known(&header.container_id).is_ok();
    // Init streams come before Start: the container must exist. Exec
    // streams may come before ExecProcess registers the exec.
    if !known {
        let _ = s.write_all(&encode_ack(Err("unknown container"))).await;
        return;
    }
    if s.write_all(&encode_ack(Ok(()))).await.is_err() {
        return;
    }
    let tag = format!("{}/{}", header.container_id, header.exec_id);
    match header.stream {
        StreamKind::Stdin => {
            let mut data = Vec::new();
            let _ = s.read_to_end(&mut data).await;
            agent.stdin.lock().unwrap().insert(key, data);
        }
        StreamKind::Stdout | StreamKind::Stderr => {
            let Some(rx) = agent.wait_for_proc(&key).await else {
                return;
            };
            if header.stream == StreamKind::Stderr {
                let _ = s.write_all(format!("err {tag}\n").as_bytes()).await;
                return;
            }
            let _ = s.write_all(format!("hello {tag}\n").as_bytes()).await;
            wait_exit(rx).await;
            let delay = *agent.drain_delay.lock().unwrap();
            tokio::time::sleep(delay).await;
            let _ = s.write_all(format!("bye {tag}\n").as_bytes()).await;
        }
    }
}

/// A hybrid vsock front that passes stdio streams (port 1025) through to
/// a real agent's `--stdio-listen` socket (host mode).
pub fn spawn_vsock_proxy(socket: PathBuf, stdio_sock: PathBuf) {
    let listener = UnixListener::bind(&socket).expect("bind vsock proxy");
    fake_guest::spawn_vsock_proxy(listener, 1025, stdio_sock);
}

/// What the fake VMs did, shared with the test.
#[derive(Default)]
pub struct VmLog {
    pub started: AtomicU32,
    pub stopped: AtomicU32,
    pub shares: Mutex<Vec<(String, PathBuf, bool)>>,
    pub fail_start: AtomicBool,
    /// Every `set_guest_memory` asked, in MiB.
    pub guest_memory: Mutex<Vec<u32>>,
}

pub struct FakeVm {
    id: String,
    dir: PathBuf,
    agent_sock: PathBuf,
    agent: Arc<FakeAgent>,
    stdio_proxy: Option<PathBuf>,
    log: Arc<VmLog>,
}

#[async_trait]
impl Hypervisor for FakeVm {
    fn sandbox_id(&self) -> &str {
        &self.id
    }
    async fn add_share(
        &self,
        tag: &str,
        host_dir: &Path,
        read_only: bool,
    ) -> Result<(), HypervisorError> {
        self.log
            .shares
            .lock()
            .unwrap()
            .push((tag.to_owned(), host_dir.to_owned(), read_only));
        Ok(())
    }
    async fn add_net(&self, _: TapDevice, _: MacAddr) -> Result<(), HypervisorError> {
        Ok(())
    }
    async fn start(&self) -> Result<(), HypervisorError> {
        if self.log.fail_start.load(Ordering::SeqCst) {
            return Err(HypervisorError::MissingAsset {
                id: self.id.clone(),
                what: "guest kernel",
                key: "guest.kernel",
                path: "/nonexistent/vmlinux".into(),
            });
        }
        match &self.stdio_proxy {
            Some(stdio) => spawn_vsock_proxy(self.vsock_socket_path(), stdio.clone()),
            None => spawn_vsock_front(self.vsock_socket_path(), self.agent.clone()),
        }
        self.log.started.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn wait_ready(&self) -> Result<AgentConnection, HypervisorError> {
        let client =
            ttrpc::r#async::Client::connect(&format!("unix://{}", self.agent_sock.display()))
                .await
                .expect("connect fake agent");
        Ok(AgentConnection::new(client))
    }
    async fn stop(&self) -> Result<(), HypervisorError> {
        self.log.stopped.fetch_add(1, Ordering::SeqCst);
        let _ = std::fs::remove_file(self.vsock_socket_path());
        Ok(())
    }
    async fn kill(&self) -> Result<(), HypervisorError> {
        self.stop().await
    }
    async fn check_alive(&self) -> Result<(), HypervisorError> {
        Ok(())
    }
    async fn set_guest_memory(&self, mib: u32) -> Result<(), HypervisorError> {
        self.log.guest_memory.lock().unwrap().push(mib);
        Ok(())
    }
    fn pid(&self) -> Option<u32> {
        Some(4242)
    }
    fn vsock_socket_path(&self) -> PathBuf {
        self.dir.join("vsock.sock")
    }
    fn console_log_path(&self) -> PathBuf {
        self.dir.join("console.log")
    }
}

pub struct FakeFactory {
    pub root: PathBuf,
    pub guest: Arc<FakeAgent>,
    pub agent_sock: PathBuf,
    /// Stdio streams go to this real agent socket instead of the fake front.
    pub stdio_proxy: Option<PathBuf>,
    pub log: Arc<VmLog>,
    /// `timeouts.agent_call_secs` of this factory's sandboxes.
    pub agent_call_timeout: Duration,
}

impl VmFactory for FakeFactory {
    fn sandbox_dir(&self, id: &str) -> Result<PathBuf> {
        Ok(self.root.join(id))
    }
    fn new_vm(
        &self,
        id: &str,
        _req: VmRequest<'_>,
    ) -> Result<(Box<dyn Hypervisor>, boxlite_runtime::sizing::VmSize)> {
        let size = boxlite_runtime::sizing::VmSize {
            vcpus: 1,
            present_vcpus: 2,
            memory_mib: 512,
            present_memory_mib: 1024,
            reserved_mib: 128,
        };
        let vm: Box<dyn Hypervisor> = Box::new(FakeVm {
            id: id.to_owned(),
            dir: self.root.join(id),
            agent_sock: self.agent_sock.clone(),
            agent: self.guest.clone(),
            stdio_proxy: self.stdio_proxy.clone(),
            log: self.log.clone(),
        });
        Ok((vm, size))
    }
    fn agent_call_timeout(&self) -> Duration {
        self.agent_call_timeout
    }
}
