//! Helpers shared by the container tests (`containers*.rs`): the real agent
//! binary in host mode on unix sockets with a temporary root, a busybox
//! rootfs built from Debian's busybox-static (`/bin/busybox`), a small
//! runc-like spec, and thin wrappers around the container RPCs. The
//! host-mode and netns tests start it with other ports or inside a network
//! namespace ([`Agent::spawn`]) and use [`connect_when_serving`] and
//! [`status`].

// Each test file uses a different subset.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use boxlite_protocol::agent::{
    CreateContainerRequest, ExecProcessRequest, RemoveContainerRequest, SignalProcessRequest,
    StartContainerRequest, StdioConfig, WaitProcessRequest, WaitProcessResponse,
};
use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::health::CheckRequest;
use boxlite_protocol::health_ttrpc::HealthClient;
use boxlite_protocol::stdio::{read_ack, StreamHeader, StreamKind};
use ttrpc::context::{self, Context};
use ttrpc::Code;

pub const BUSYBOX: &str = "/bin/busybox";
pub const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "id", "pwd", "sleep", "env", "true", "false", "kill", "stty", "tty",
    "head", "wc", "ls", "grep",
];

pub const AGENT_BINARY: &str = env!("CARGO_BIN_EXE_boxlite-agent");

pub struct Agent {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl Agent {
    /// The agent in host mode with its ttrpc and stdio ports.
    pub fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let ports = [("--stdio-listen", "stdio.sock")];
        Self::spawn(dir, Command::new(AGENT_BINARY), &ports, &[])
    }

    /// Starts the agent in host mode with everything in `dir`: `launcher`
    /// is the agent binary, or a wrapper ending in it (`ip netns exec <ns>
    /// <agent>`). It serves ttrpc on `agent.sock` and each other port on
    /// its socket (`ports`: flag and socket name), keeps its root in
    /// `root`, logs at debug level to `agent.stderr`, and gets `extra`
    /// last.
    pub fn spawn(
        dir: tempfile::TempDir,
        mut launcher: Command,
        ports: &[(&str, &str)],
        extra: &[String],
    ) -> Self {
        let stderr = std::fs::File::create(dir.path().join("agent.stderr")).expect("stderr");
        let unix = |name: &str| format!("unix://{}", dir.path().join(name).display());
        launcher.args(["--listen", &unix("agent.sock")]);
        for (flag, socket) in ports {
            launcher.arg(flag).arg(unix(socket));
        }
        let child = launcher
            .arg("--root")
            .arg(dir.path().join("root"))
            .args(["--log", "debug"])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {launcher:?}: {e}"));
        Agent { child, dir }
    }

    /// The agent's pid (its zombie children show up with this PPid).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.stderr")).unwrap_or_default()
    }

    /// The ttrpc socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("agent.sock")
    }

    pub async fn connect(&self) -> (HealthClient, AgentClient) {
        connect_when_serving(&self.socket(), Duration::from_secs(10), ctx, || {
            self.stderr()
        })
        .await
    }

    /// A busybox rootfs at guest path `/rootfs/<name>`.
    pub fn rootfs(&self, name: &str) -> String {
        let dir = self.root().join("rootfs").join(name);
        for d in ["bin", "proc", "dev", "tmp", "etc", "sys"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::copy(BUSYBOX, dir.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).unwrap();
        }
        std::fs::write(dir.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        format!("/rootfs/{name}")
    }

    /// Opens one stdio stream; returns the connection after its ack.
    pub fn stream(&self, id: &str, exec: &str, kind: StreamKind) -> Result<UnixStream, String> {
        open_stream(self.dir.path(), id, exec, kind)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects to the agent listening on `sock` once it serves: the socket
/// file appears at bind, so an attempt counts only when a health check
/// (with the context `ctx()`) answers. Retries every 20 ms; after
/// `timeout` it panics with the agent's `stderr()`.
pub async fn connect_when_serving(
    sock: &Path,
    timeout: Duration,
    ctx: fn() -> Context,
    stderr: impl Fn() -> String,
) -> (HealthClient, AgentClient) {
    let addr = format!("unix://{}", sock.display());
    let deadline = Instant::now() + timeout;
    loop {
        if sock.exists() {
            if let Ok(c) = ttrpc::asynchronous::Client::connect(&addr).await {
                let health = HealthClient::new(c.clone());
                if health.check(ctx(), &CheckRequest::new()).await.is_ok() {
                    return (health, AgentClient::new(c));
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "agent did not come up; stderr:\n{}",
            stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn ctx() -> Context {
    context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

/// The status code and message of a failed call.
pub fn status<T: std::fmt::Debug>(result: ttrpc::Result<T>) -> (Code, String) {
    match result {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

pub fn process_json(args: &[&str], extra: &str) -> serde_json::Value {
    let mut p = serde_json::json!({
        "cwd": "/",
        "args": args,
        "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0},
    });
    if !extra.is_empty() {
        let extra: serde_json::Value = serde_json::from_str(extra).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
    }
    p
}

/// A small runc-like spec: new pid, mount, ipc and uts namespaces, proc and
/// a tmpfs /dev, a cgroup per test under /boxlite-test.
pub fn spec(id: &str, rootfs: &str, process: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": rootfs, "readonly": false},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        ],
        "linux": {
            "cgroupsPath": format!("/boxlite-test/{id}-{}", std::process::id()),
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
        },
    }))
    .unwrap()
}

pub fn stdio(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> StdioConfig {
    StdioConfig {
        stdin,
        stdout,
        stderr,
        terminal,
        ..Default::default()
    }
}

pub async fn create(
    client: &AgentClient,
    id: &str,
    spec: Vec<u8>,
    io: StdioConfig,
) -> ttrpc::Result<()> {
    let req = CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec,
        stdio: Some(io).into(),
        ..Default::default()
    };
    client.create_container(ctx(), &req).await.map(|_| ())
}

pub async fn start(client: &AgentClient, id: &str) -> ttrpc::Result<u32> {
    let req = StartContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    client.start_container(ctx(), &req).await.map(|r| r.pid)
}

pub async fn wait(
    client: &AgentClient,
    id: &str,
    exec: &str,
) -> ttrpc::Result<WaitProcessResponse> {
    let req = WaitProcessRequest {
        container_id: id.into(),
        exec_id: exec.into(),
        ..Default::default()
    };
    client.wait_process(ctx(), &req).await
}

pub async fn remove(client: &AgentClient, id: &str) {
    let req = RemoveContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    client.remove_container(ctx(), &req).await.unwrap();
}

pub async fn signal(
    client: &AgentClient,
    id: &str,
    exec: &str,
    sig: u32,
    all: bool,
) -> ttrpc::Result<()> {
    let req = SignalProcessRequest {
        container_id: id.into(),
        exec_id: exec.into(),
        signal: sig,
        all,
        ..Default::default()
    };
    client.signal_process(ctx(), &req).await.map(|_| ())
}

pub async fn exec(
    client: &AgentClient,
    id: &str,
    exec_id: &str,
    process: serde_json::Value,
    io: StdioConfig,
) -> ttrpc::Result<u32> {
    let req = ExecProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        process_json: serde_json::to_vec(&process).unwrap(),
        stdio: Some(io).into(),
        ..Default::default()
    };
    client.exec_process(ctx(), &req).await.map(|r| r.pid)
}

pub fn read_all(mut s: UnixStream) -> String {
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Runs `args` as a container's init with stdout and stderr streams;
/// returns (stdout, stderr, exit status).
pub async fn run(
    agent: &Agent,
    client: &AgentClient,
    id: &str,
    process: serde_json::Value,
) -> (String, String, i32) {
    let rootfs = agent.rootfs(id);
    run_spec(agent, client, id, spec(id, &rootfs, process)).await
}

/// Creates a container from `spec` with stdout and stderr streams, starts
/// it, waits for its init and removes it; returns (stdout, stderr, exit
/// status).
pub async fn run_spec(
    agent: &Agent,
    client: &AgentClient,
    id: &str,
    spec: Vec<u8>,
) -> (String, String, i32) {
    create(client, id, spec, stdio(false, true, true, false))
        .await
        .unwrap_or_else(|e| panic!("create {id}: {e:?}\n{}", agent.stderr()));
    let out = agent.stream(id, "", StreamKind::Stdout).unwrap();
    let err = agent.stream(id, "", StreamKind::Stderr).unwrap();
    let readers = (
        std::thread::spawn(move || read_all(out)),
        std::thread::spawn(move || read_all(err)),
    );
    start(client, id)
        .await
        .unwrap_or_else(|e| panic!("start {id}: {e:?}\n{}", agent.stderr()));
    let w = wait(client, id, "").await.unwrap();
    let stdout = readers.0.join().unwrap();
    let stderr = readers.1.join().unwrap();
    remove(client, id).await;
    (stdout, stderr, w.exit_status)
}

/// Stream opener usable from a thread.
pub struct AgentStreams {
    pub dir: PathBuf,
}

impl AgentStreams {
    pub fn stream(&self, id: &str, exec: &str, kind: StreamKind) -> Result<UnixStream, String> {
        open_stream(&self.dir, id, exec, kind)
    }
}

/// Opens the stream `kind` of process `exec` in container `id` on the
/// stdio socket of the agent started in `dir`; returns the connection
/// (30 s read timeout) after the agent's ack, or the ack's error.
fn open_stream(dir: &Path, id: &str, exec: &str, kind: StreamKind) -> Result<UnixStream, String> {
    let mut s = UnixStream::connect(dir.join("stdio.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let header = StreamHeader {
        stream: kind,
        container_id: id.into(),
        exec_id: exec.into(),
    };
    s.write_all(&header.encode().unwrap()).unwrap();
    read_ack(&mut s).map_err(|e| e.to_string())?;
    Ok(s)
}
