//! Host-mode tests: the real `boxlite-agent` binary as a child process on
//! temporary unix sockets, driven by the generated ttrpc clients. No root,
//! VM or vsock needed.

mod common;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::{Duration, Instant};

use boxlite_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, DestroySandboxRequest, GuestInfoRequest,
    HostEntry, MountShareRequest, ReadFileRequest, SetDnsRequest, SetHostnameRequest,
    SetHostsRequest, UpdateInterfaceRequest, WaitProcessRequest,
};
use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::health::health_check_response::ServingStatus;
use boxlite_protocol::health::CheckRequest;
use boxlite_protocol::health_ttrpc::HealthClient;
use boxlite_protocol::stdio::{read_ack, StreamHeader, StreamKind};
use boxlite_protocol::{PROTOCOL_VERSION, READ_FILE_MAX_LEN};
use common::{connect_when_serving, status};
use ttrpc::context::{self, Context};
use ttrpc::Code;

const START_TIMEOUT: Duration = Duration::from_secs(10);

/// The agent with all its ports (ttrpc, log, stdio) on unix sockets.
struct AgentProcess(common::Agent);

impl AgentProcess {
    fn start() -> Self {
        Self::spawn(tempfile::tempdir().expect("tempdir"), &[])
    }

    /// Also `--announce unix://<dir>/ready.sock`, bound here first (as the
    /// host binds `vsock.sock_1027` before the VM starts).
    fn start_announcing() -> (Self, std::os::unix::net::UnixListener) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("ready.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).expect("bind ready.sock");
        let arg = format!("--announce=unix://{}", path.display());
        (Self::spawn(dir, &[arg]), listener)
    }

    fn spawn(dir: tempfile::TempDir, extra: &[String]) -> Self {
        let launcher = Command::new(common::AGENT_BINARY);
        let ports = [
            ("--log-listen", "log.sock"),
            ("--stdio-listen", "stdio.sock"),
        ];
        AgentProcess(common::Agent::spawn(dir, launcher, &ports, extra))
    }

    fn root(&self) -> PathBuf {
        self.0.root()
    }

    fn socket(&self, name: &str) -> PathBuf {
        self.0.dir.path().join(name)
    }

    fn stderr(&self) -> String {
        self.0.stderr()
    }

    async fn connect(&self) -> (HealthClient, AgentClient) {
        let sock = self.socket("agent.sock");
        connect_when_serving(&sock, START_TIMEOUT, ctx, || self.stderr()).await
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.0.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn ctx() -> Context {
    context::with_timeout(Duration::from_secs(5).as_nanos() as i64)
}

#[tokio::test]
async fn health_check_and_version() {
    let agent = AgentProcess::start();
    let (health, _) = agent.connect().await;
    let r = health.check(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(r.status.enum_value(), Ok(ServingStatus::SERVING));
    let v = health.version(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(v.agent_version, env!("CARGO_PKG_VERSION"));
    assert_eq!(v.protocol_version, PROTOCOL_VERSION);
}

/// The readiness line arrives once the agent serves: the first connection
/// after it is answered without retrying.
#[tokio::test]
async fn announces_readiness_once_serving() {
    let (agent, listener) = AgentProcess::start_announcing();
    let (mut conn, _) = listener.accept().expect("the agent connects");
    conn.set_read_timeout(Some(START_TIMEOUT)).unwrap();
    let mut line = Vec::new();
    conn.read_to_end(&mut line)
        .expect("the agent closes after its line");
    let a = boxlite_protocol::ready::Announcement::parse(&line).expect("a readiness line");
    assert_eq!(a.protocol_version, PROTOCOL_VERSION);
    assert_eq!(a.agent_version, env!("CARGO_PKG_VERSION"));
    let addr = format!("unix://{}", agent.socket("agent.sock").display());
    let client = ttrpc::asynchronous::Client::connect(&addr)
        .await
        .expect("serving when announced");
    let resp = HealthClient::new(client)
        .check(ctx(), &CheckRequest::default())
        .await
        .unwrap();
    assert_eq!(resp.status.enum_value_or_default(), ServingStatus::SERVING);
    assert!(
        agent.stderr().contains("readiness announced to the host"),
        "{}",
        agent.stderr()
    );
}

#[tokio::test]
async fn guest_info_reports_host_values_in_host_mode() {
    let agent = AgentProcess::start();
    let (_, client) = agent.connect().await;
    let info = client
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .unwrap();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(info.kernel_release, release.trim());
    let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(info.boot_id, boot_id.trim());
    assert!(info.online_cpus >= 1);
    assert!(info.mem_total_kib > 0);
    assert!(info.agent_uptime_ms < 60_000, "{}", info.agent_uptime_ms);
    assert!(info.agent_started_at_ms > 0);
}

#[tokio::test]
async fn read_file_content_truncation_and_errors() {
    let agent = AgentProcess::start();
    let (_, client) = agent.connect().await;
    std::fs::create_dir_all(agent.root().join("etc")).unwrap();
    std::fs::write(agent.root().join("etc/motd"), "hello agent\n").unwrap();

    let mut req = ReadFileRequest::new();
    req.path = "/etc/motd".into();
    let r = client.read_file(ctx(), &req).await.unwrap();
    assert_eq!(r.data, b"hello agent\n");
    assert!(!r.truncated);

    req.max_len = 5;
    let r = client.read_file(ctx(), &req).await.unwrap();
    assert_eq!(r.data, b"hello");
    assert!(r.truncated);

    // More than the protocol allows comes back cut at the limit.
    let big = vec![b'x'; READ_FILE_MAX_LEN as usize + 10];
    std::fs::write(agent.root().join("big"), &big).unwrap();
    req.path = "/big".into();
    req.max_len = 0;
    let r = client.read_file(ctx(), &req).await.unwrap();
    assert_eq!(r.data.len(), READ_FILE_MAX_LEN as usize);
    assert!(r.truncated);

    req.path = "/no/such/file".into();
    let (code, msg) = status(client.read_file(ctx(), &req).await);
    assert_eq!(code, Code::NOT_FOUND);
    assert!(msg.contains("/no/such/file"), "{msg}");

    req.path = "relative".into();
    let (code, msg) = status(client.read_file(ctx(), &req).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("not an absolute path"), "{msg}");

    req.path = "/../../etc/passwd".into();
    assert_eq!(
        status(client.read_file(ctx(), &req).await).0,
        Code::INVALID_ARGUMENT
    );

    req.path = "/etc".into();
    let (code, msg) = status(client.read_file(ctx(), &req).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("directory"), "{msg}");
}

#[tokio::test]
async fn set_hostname_writes_root_etc_hostname_only() {
    let agent = AgentProcess::start();
    let (_, client) = agent.connect().await;
    let host_before = nix::unistd::gethostname().unwrap();

    let mut req = SetHostnameRequest::new();
    req.hostname = "pod-a.example".into();
    client.set_hostname(ctx(), &req).await.unwrap();
    assert_eq!(
        std::fs::read_to_string(agent.root().join("etc/hostname")).unwrap(),
        "pod-a.example\n"
    );
    assert_eq!(nix::unistd::gethostname().unwrap(), host_before);

    req.hostname = "bad host".into();
    let (code, msg) = status(client.set_hostname(ctx(), &req).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("bad host"), "{msg}");
}

#[tokio::test]
async fn dns_and_hosts_files() {
    let agent = AgentProcess::start();
    let (_, client) = agent.connect().await;

    let mut dns = SetDnsRequest::new();
    dns.nameservers = vec!["10.96.0.10".into()];
    dns.searches = vec!["default.svc.cluster.local".into()];
    dns.options = vec!["ndots:5".into()];
    client.set_dns(ctx(), &dns).await.unwrap();
    let text = std::fs::read_to_string(agent.root().join("etc/resolv.conf")).unwrap();
    assert!(text.contains("nameserver 10.96.0.10\n"), "{text}");
    assert!(
        text.contains("search default.svc.cluster.local\n"),
        "{text}"
    );
    assert!(text.contains("options ndots:5\n"), "{text}");

    dns.nameservers = vec!["not-an-ip".into()];
    assert_eq!(
        status(client.set_dns(ctx(), &dns).await).0,
        Code::INVALID_ARGUMENT
    );

    let mut hosts = SetHostsRequest::new();
    let mut entry = HostEntry::new();
    entry.ip = "127.0.0.1".into();
    entry.names = vec!["localhost".into(), "pod".into()];
    hosts.entries.push(entry);
    client.set_hosts(ctx(), &hosts).await.unwrap();
    let text = std::fs::read_to_string(agent.root().join("etc/hosts")).unwrap();
    assert!(text.contains("127.0.0.1\tlocalhost pod\n"), "{text}");
}

#[tokio::test]
async fn sandbox_with_a_share_and_mount_share() {
    let agent = AgentProcess::start();
    let (_, client) = agent.connect().await;
    std::fs::create_dir_all(agent.root().join("shares/share0")).unwrap();
    std::fs::write(agent.root().join("shares/share0/data"), "shared").unwrap();

    let mut share = MountShareRequest::new();
    share.tag = "share0".into();
    let mut req = CreateSandboxRequest::new();
    req.sandbox_id = "sb-1".into();
    req.hostname = "sb-1".into();
    req.shares.push(share.clone());
    client.create_sandbox(ctx(), &req).await.unwrap();
    // The share is reachable at its default mount point.
    let mut read = ReadFileRequest::new();
    read.path = "/run/boxlite/shares/share0/data".into();
    assert_eq!(
        client.read_file(ctx(), &read).await.unwrap().data,
        b"shared"
    );

    let (code, msg) = status(client.create_sandbox(ctx(), &req).await);
    assert_eq!(code, Code::ALREADY_EXISTS);
    assert!(msg.contains("sb-1"), "{msg}");

    // Same tag again: idempotent, same answer.
    let r = client.mount_share(ctx(), &share).await.unwrap();
    assert_eq!(r.mount_point, "/run/boxlite/shares/share0");

    share.tag = "nope".into();
    let (code, msg) = status(client.mount_share(ctx(), &share).await);
    assert_eq!(code, Code::NOT_FOUND);
    assert!(msg.contains("nope"), "{msg}");

    share.tag = "bad/tag".into();
    assert_eq!(
        status(client.mount_share(ctx(), &share).await).0,
        Code::INVALID_ARGUMENT
    );
}

#[tokio::test]
async fn empty_requests_are_refused_not_unimplemented() {
    let agent = AgentProcess::start();
    let (_, client) = agent.connect().await;
    // The container RPCs exist now: an empty request is a caller mistake.
    let (code, msg) = status(
        client
            .create_container(ctx(), &CreateContainerRequest::new())
            .await,
    );
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(msg.contains("container_id"), "{msg}");
    let (code, msg) = status(client.wait_process(ctx(), &WaitProcessRequest::new()).await);
    assert_eq!(code, Code::NOT_FOUND);
    assert!(msg.contains("not found"), "{msg}");
    let (code, msg) = status(
        client
            .update_interface(ctx(), &UpdateInterfaceRequest::new())
            .await,
    );
    // Networking too (tests/network_netns.rs has the rest, as root in a
    // throwaway namespace): an empty request names no link.
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(
        msg.contains("UpdateInterface") && msg.contains("interface is missing"),
        "{msg}"
    );
}

#[tokio::test]
async fn destroy_sandbox_ends_the_process_with_exit_0() {
    let mut agent = AgentProcess::start();
    let (_, client) = agent.connect().await;
    let mut req = DestroySandboxRequest::new();
    req.timeout_secs = 1000;
    assert_eq!(
        status(client.destroy_sandbox(ctx(), &req).await).0,
        Code::INVALID_ARGUMENT
    );
    req.timeout_secs = 1;
    client.destroy_sandbox(ctx(), &req).await.unwrap();
    let exit = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(exit.code(), Some(0), "stderr:\n{}", agent.stderr());
    // Its sockets are cleaned up.
    assert!(!agent.socket("agent.sock").exists());
}

#[tokio::test]
async fn log_stream_delivers_earlier_and_live_lines() {
    let agent = AgentProcess::start();
    let (_, client) = agent.connect().await;
    let mut req = SetHostnameRequest::new();
    req.hostname = "before-the-reader".into();
    client.set_hostname(ctx(), &req).await.unwrap();

    let mut log = UnixStream::connect(agent.socket("log.sock")).unwrap();
    log.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let seen = read_until(&mut log, "before-the-reader");
    assert!(seen.contains("agent ready"), "{seen}");

    req.hostname = "after-the-reader".into();
    client.set_hostname(ctx(), &req).await.unwrap();
    read_until(&mut log, "after-the-reader");
}

/// Reads the stream until `needle` shows up (or fails after the timeout).
fn read_until(stream: &mut UnixStream, needle: &str) -> String {
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        match stream.read(&mut buf) {
            Ok(0) => panic!("log stream closed before {needle:?}; got:\n{seen}"),
            Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) => panic!("no {needle:?} in the log stream ({e}); got:\n{seen}"),
        }
    }
    seen
}

#[tokio::test]
async fn stdio_streams_for_unknown_containers_are_refused_with_a_reason() {
    let agent = AgentProcess::start();
    agent.connect().await;
    let mut s = UnixStream::connect(agent.socket("stdio.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let header = StreamHeader {
        stream: StreamKind::Stdout,
        container_id: "c1".into(),
        exec_id: String::new(),
    };
    std::io::Write::write_all(&mut s, &header.encode().unwrap()).unwrap();
    let err = read_ack(&mut s).unwrap_err().to_string();
    assert!(err.contains("container \"c1\" not found"), "{err}");
}

#[test]
fn bad_arguments_exit_2_with_a_message() {
    let out = Command::new(env!("CARGO_BIN_EXE_boxlite-agent"))
        .arg("--listen")
        .arg("/not/a/url")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--listen"), "{err}");
    assert!(Path::new(env!("CARGO_BIN_EXE_boxlite-agent")).exists());
}
