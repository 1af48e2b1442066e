//! The hypervisor abstraction the shim uses for every backend.
//!
//! A backend is built from the config and a [`VmSpec`] with
//! [`new_hypervisor`]; shares and taps are added before [`Hypervisor::start`];
//! [`Hypervisor::wait_ready`] waits for the agent's readiness announcement
//! ([`ready`]), then returns an [`AgentConnection`] once the guest agent
//! answers `Health.Check` through the hybrid vsock socket;
//! [`Hypervisor::stop`] asks the agent to shut the VM down and kills what is
//! left after the shutdown timeout.
//!
//! The sandbox directory (`<state_dir>/<id>/`) holds, for every backend:
//! `console.log` (guest serial console), `vsock.sock` (hybrid vsock), and the
//! backend's own files (for `qemu`: `vhost-vsock.sock`, `fs-<tag>.sock`,
//! `*.log` of each process and `*.pid`). [`cleanup_stale_processes`] uses the
//! pid files to clean up after a crashed shim.

pub mod builtin;
mod lifecycle;
pub mod process;
pub mod qemu;
pub mod ready;

use std::fmt;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::health::VersionCheckResponse;
use boxlite_protocol::health::{health_check_response::ServingStatus, CheckRequest};
use boxlite_protocol::health_ttrpc::HealthClient;
use boxlite_protocol::{AGENT_VSOCK_PORT, PROTOCOL_VERSION, READY_VSOCK_PORT};
use tokio::time::Instant;

use crate::config::{Config, ConfigError, ResolvedBackend};
use crate::fmt_duration;
use crate::hybrid_vsock::{ttrpc_client, ConsoleLogHint, HybridVsock, HybridVsockError};
use ready::{ReadyError, ReadyListener};

/// Guest serial console, in the sandbox directory.
pub const CONSOLE_LOG: &str = "console.log";
/// Hybrid vsock socket, in the sandbox directory.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// Longest sandbox id accepted (containerd's limit is 76).
pub const MAX_SANDBOX_ID_LEN: usize = 128;
/// virtio-fs tags are at most 36 bytes (virtio spec, `struct virtio_fs_config`).
pub const MAX_SHARE_TAG_LEN: usize = 36;
/// `sockaddr_un.sun_path` is 108 bytes including the NUL.
pub const MAX_SOCKET_PATH_LEN: usize = 107;
/// Per-call budget of the Health.Check calls in [`wait_for_agent`].
const HEALTH_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between readiness attempts.
const READY_RETRY_INTERVAL: Duration = Duration::from_millis(50);

/// Errors of the hypervisor layer. Messages name the sandbox and the object
/// (path, process, port) and include the cause.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error("{0}")]
    Config(#[from] ConfigError),
    #[error("sandbox id {id:?} is invalid: {reason}")]
    InvalidSandboxId { id: String, reason: String },
    #[error("sandbox {id}: share {tag:?} is invalid: {reason}")]
    InvalidShare {
        id: String,
        tag: String,
        reason: String,
    },
    #[error("tap device {name:?} is invalid: {reason}")]
    InvalidTap { name: String, reason: &'static str },
    #[error("MAC address {value:?} is invalid: {reason}")]
    InvalidMac { value: String, reason: &'static str },
    #[error("sandbox {id}: cannot {op} while the VM is {state}")]
    InvalidState {
        id: String,
        op: &'static str,
        state: &'static str,
    },
    #[error(
        "sandbox {id}: {what} {} (config key {key}) is missing or not a file; \
         build it with `cargo xtask guest` or set {key}",
        path.display()
    )]
    MissingAsset {
        id: String,
        what: &'static str,
        key: &'static str,
        path: PathBuf,
    },
    #[error("sandbox {id}: {what} {} does not exist or is not executable", path.display())]
    MissingBinary {
        id: String,
        what: String,
        path: PathBuf,
    },
    #[error(
        "sandbox {id}: socket path {} is {len} bytes, more than the unix socket limit of {MAX_SOCKET_PATH_LEN}; \
         use a shorter runtime.state_dir, sandbox id or share tag",
        path.display()
    )]
    SocketPathTooLong {
        id: String,
        path: PathBuf,
        len: usize,
    },
    #[error("sandbox {id}: {}: {op}: {error}", path.display())]
    Io {
        id: String,
        op: &'static str,
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("sandbox {id}: cannot start {what} ({}): {error}", binary.display())]
    Spawn {
        id: String,
        what: String,
        binary: PathBuf,
        error: std::io::Error,
    },
    /// A helper died before it created its socket.
    #[error("{0}")]
    HelperExited(Box<ExitReport>),
    #[error(
        "sandbox {id}: {what} did not create its socket {} within {}; log: {}",
        socket.display(), fmt_duration(*waited), log.display()
    )]
    HelperTimeout {
        id: String,
        what: String,
        socket: PathBuf,
        waited: Duration,
        log: PathBuf,
    },
    /// The VM or a helper exited on its own.
    #[error("{0}")]
    ProcessExited(Box<ExitReport>),
    #[error(
        "sandbox {id}: VM did not answer on vsock port {port} within {} (last attempt: {last}){console_log}",
        fmt_duration(*timeout)
    )]
    AgentTimeout {
        id: String,
        port: u32,
        timeout: Duration,
        last: String,
        console_log: ConsoleLogHint,
    },
    #[error(
        "sandbox {id}: the agent did not announce itself on vsock port {port} ({}) within {} \
         (last: {last}){console_log}",
        socket.display(),
        fmt_duration(*timeout)
    )]
    NotAnnounced {
        id: String,
        port: u32,
        socket: PathBuf,
        timeout: Duration,
        last: String,
        console_log: ConsoleLogHint,
    },
    #[error(
        "sandbox {id}: the guest agent {agent_version} speaks protocol {guest}, this host \
         speaks {host}; install a guest image built from the same release (cargo xtask guest)"
    )]
    ProtocolMismatch {
        id: String,
        agent_version: String,
        guest: u32,
        host: u32,
    },
    #[error("sandbox {id}: {error}")]
    Vsock {
        id: String,
        error: Box<HybridVsockError>,
    },
    #[error("sandbox {id}: cannot signal {what} (pid {pid}): {error}")]
    Signal {
        id: String,
        what: String,
        pid: u32,
        error: nix::Error,
    },
}

/// A process that exited when it should not have.
#[derive(Debug)]
pub struct ExitReport {
    pub id: String,
    /// "qemu", "the vsock backend", "virtiofsd for share \"rootfs\"".
    pub what: String,
    pub pid: u32,
    pub status: ExitStatus,
    /// Its stdout/stderr.
    pub log: PathBuf,
    /// The last line of `log`, if any.
    pub last_line: Option<String>,
    /// For helpers that died before they were ready: the socket they did
    /// not create.
    pub socket: Option<PathBuf>,
    pub console_log: Option<PathBuf>,
}

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (id, what, status) = (&self.id, &self.what, &self.status);
        match &self.socket {
            Some(socket) => write!(
                f,
                "sandbox {id}: {what} exited with {status} before its socket {} appeared",
                socket.display()
            )?,
            None => write!(
                f,
                "sandbox {id}: {what} (pid {}) exited unexpectedly with {status}",
                self.pid
            )?,
        }
        write!(
            f,
            "; log: {}{}",
            self.log.display(),
            LastLine(&self.last_line)
        )?;
        write!(f, "{}", ConsoleLogHint(self.console_log.clone()))
    }
}

/// Renders ` (last line: "…")` for a log excerpt.
struct LastLine<'a>(&'a Option<String>);

impl fmt::Display for LastLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, " (last line: {line:?})"),
            None => Ok(()),
        }
    }
}

/// A host directory shared with the guest over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// virtio-fs tag; the guest mounts it by this name.
    pub tag: String,
    pub host_dir: PathBuf,
    pub read_only: bool,
}

/// A tap device for a virtio-net device.
#[derive(Debug)]
pub enum TapDevice {
    /// An open tap fd (from the pod's netns); handed to the VMM process only.
    Fd(OwnedFd),
    /// A tap interface name in the VMM's network namespace.
    Name(String),
}

/// A guest network interface.
#[derive(Debug)]
pub struct NetDevice {
    pub tap: TapDevice,
    pub mac: MacAddr,
}

/// An Ethernet MAC address, `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacAddr(pub [u8; 6]);

impl FromStr for MacAddr {
    type Err = HypervisorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |reason| HypervisorError::InvalidMac {
            value: s.to_owned(),
            reason,
        };
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts
                .next()
                .ok_or_else(|| invalid("expected six hex bytes separated by ':'"))?;
            if part.len() != 2 {
                return Err(invalid("expected six hex bytes separated by ':'"));
            }
            *byte = u8::from_str_radix(part, 16)
                .map_err(|_| invalid("expected six hex bytes separated by ':'"))?;
        }
        if parts.next().is_some() {
            return Err(invalid("expected six hex bytes separated by ':'"));
        }
        if bytes[0] & 1 != 0 {
            return Err(invalid(
                "a multicast address cannot be an interface address",
            ));
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Everything a backend needs to know to boot one sandbox VM.
#[derive(Debug)]
pub struct VmSpec {
    pub id: String,
    /// `<state_dir>/<id>`: console log, sockets, helper logs and pid files.
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to the backend's own kernel command line, in order.
    pub cmdline_extra: Vec<String>,
    /// virtio-fs shares (more can be added with [`Hypervisor::add_share`]).
    pub shares: Vec<Share>,
    /// Network devices (more can be added with [`Hypervisor::add_net`]).
    pub nets: Vec<NetDevice>,
    /// From [`Hypervisor::start`] until the agent must answer.
    pub agent_ready_timeout: Duration,
    /// How long [`Hypervisor::stop`] waits for the VM to exit before killing it.
    pub shutdown_timeout: Duration,
}

impl VmSpec {
    /// The spec the config describes for sandbox `id`, with no shares or nets.
    pub fn from_config(config: &Config, id: &str) -> Result<Self, HypervisorError> {
        validate_sandbox_id(id)?;
        Ok(Self {
            id: id.to_owned(),
            dir: config.sandbox_dir(id),
            kernel: config.guest.kernel.clone(),
            initramfs: config.guest.initramfs.clone(),
            vcpus: config.guest.vcpus,
            memory_mib: config.guest.memory_mib,
            cmdline_extra: config
                .guest
                .kernel_cmdline_extra
                .split_whitespace()
                .map(str::to_owned)
                .collect(),
            shares: Vec::new(),
            nets: Vec::new(),
            agent_ready_timeout: config.timeouts.agent_ready(),
            shutdown_timeout: config.timeouts.shutdown(),
        })
    }

    pub fn console_log_path(&self) -> PathBuf {
        self.dir.join(CONSOLE_LOG)
    }

    pub fn vsock_socket_path(&self) -> PathBuf {
        self.dir.join(VSOCK_SOCKET)
    }
}

/// Sandbox ids become directory names: `[A-Za-z0-9_.-]`, not starting with
/// `.`, at most [`MAX_SANDBOX_ID_LEN`] bytes.
pub fn validate_sandbox_id(id: &str) -> Result<(), HypervisorError> {
    let invalid = |reason: &str| HypervisorError::InvalidSandboxId {
        id: id.to_owned(),
        reason: reason.to_owned(),
    };
    if id.is_empty() {
        return Err(invalid("it is empty"));
    }
    if id.len() > MAX_SANDBOX_ID_LEN {
        return Err(invalid(&format!(
            "it is {} bytes long, more than {MAX_SANDBOX_ID_LEN}",
            id.len()
        )));
    }
    if id.starts_with('.') {
        return Err(invalid("it starts with '.'"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(invalid(&format!(
            "character {c:?} is not allowed (use A-Z a-z 0-9 _ - .)"
        )));
    }
    Ok(())
}

/// virtio-fs tags: 1..=36 bytes of `[A-Za-z0-9_.-]` (they end up in socket
/// names and QEMU option strings).
pub fn validate_share_tag(id: &str, tag: &str) -> Result<(), HypervisorError> {
    let invalid = |reason: String| HypervisorError::InvalidShare {
        id: id.to_owned(),
        tag: tag.to_owned(),
        reason,
    };
    if tag.is_empty() || tag.len() > MAX_SHARE_TAG_LEN {
        return Err(invalid(format!(
            "a tag must be 1..={MAX_SHARE_TAG_LEN} bytes long"
        )));
    }
    if let Some(c) = tag
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(invalid(format!(
            "character {c:?} is not allowed in a tag (use A-Z a-z 0-9 _ - .)"
        )));
    }
    Ok(())
}

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
    async fn add_net(&self, tap: TapDevice, mac: MacAddr) -> Result<(), HypervisorError>;

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
    validate_sandbox_id(&spec.id)?;
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
        ResolvedBackend::Builtin => Ok(Box::new(builtin::BuiltinHypervisor::new(spec, resolved)?)),
    }
}

/// ttrpc clients for the agent's services, over one hybrid vsock connection
/// to port 1024. Cheap to clone.
#[derive(Clone)]
pub struct AgentConnection {
    health: HealthClient,
    agent: AgentClient,
}

impl fmt::Debug for AgentConnection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentConnection")
    }
}

impl AgentConnection {
    /// Wraps an established ttrpc client.
    pub fn new(client: ttrpc::r#async::Client) -> Self {
        Self {
            health: HealthClient::new(client.clone()),
            agent: AgentClient::new(client),
        }
    }

    /// Connects through `vsock` to the agent port, retrying until `timeout`.
    /// Does not call Health; see [`wait_for_agent`] for that.
    pub async fn connect(vsock: &HybridVsock, timeout: Duration) -> Result<Self, HybridVsockError> {
        Ok(Self::new(
            vsock.connect_ttrpc(AGENT_VSOCK_PORT, timeout).await?,
        ))
    }

    pub fn health(&self) -> &HealthClient {
        &self.health
    }

    pub fn agent(&self) -> &AgentClient {
        &self.agent
    }

    /// `Health.Check` with a deadline.
    pub async fn check(&self, timeout: Duration) -> Result<ServingStatus, ttrpc::Error> {
        let req = CheckRequest {
            service: "boxlite-runtime".into(),
            ..Default::default()
        };
        let resp = self
            .health
            .check(ttrpc::context::with_duration(timeout), &req)
            .await?;
        Ok(resp.status.enum_value_or_default())
    }

    /// `Health.Version` with a deadline.
    pub async fn version(&self, timeout: Duration) -> Result<VersionCheckResponse, ttrpc::Error> {
        let req = CheckRequest {
            service: "boxlite-runtime".into(),
            ..Default::default()
        };
        self.health
            .version(ttrpc::context::with_duration(timeout), &req)
            .await
    }
}

/// How often [`wait_for_announcement`] checks that the VM is still alive.
const ALIVE_CHECK_INTERVAL: Duration = Duration::from_millis(200);

/// Until `deadline`, checks that `vm` is alive and waits for the agent's
/// announcement on `ready`; an agent of another protocol version is an
/// error at once. `timeout` is only used in the error message.
pub async fn wait_for_announcement<H: Hypervisor + ?Sized>(
    vm: &H,
    ready: &ReadyListener,
    deadline: Instant,
    timeout: Duration,
) -> Result<(), HypervisorError> {
    let id = vm.sandbox_id();
    let mut last = String::from("no connection");
    loop {
        vm.check_alive().await?;
        let now = Instant::now();
        if now >= deadline {
            return Err(HypervisorError::NotAnnounced {
                id: id.to_owned(),
                port: READY_VSOCK_PORT,
                socket: ready.path().to_owned(),
                timeout,
                last,
                console_log: ConsoleLogHint(Some(vm.console_log_path())),
            });
        }
        match ready
            .accept_until((now + ALIVE_CHECK_INTERVAL).min(deadline))
            .await
        {
            Ok(a) if a.protocol_version == PROTOCOL_VERSION => {
                tracing::debug!(sandbox_id = %id, agent_version = %a.agent_version, "agent announced itself");
                return Ok(());
            }
            Ok(a) => {
                return Err(HypervisorError::ProtocolMismatch {
                    id: id.to_owned(),
                    agent_version: a.agent_version,
                    guest: a.protocol_version,
                    host: PROTOCOL_VERSION,
                })
            }
            Err(ReadyError::NotYet) => {}
            Err(e) => {
                tracing::warn!(sandbox_id = %id, error = %e, "bad readiness announcement; still waiting");
                last = e.to_string();
            }
        }
    }
}

/// The readiness loop shared by backends: first the agent's announcement
/// on `ready` (the backends always pass it; see [`ready`] for why no
/// connection may be made before), then, until `deadline`, check that `vm`
/// is alive, connect to the agent port through the hybrid socket and call
/// `Health.Check`; return the connection once it answers `SERVING`.
/// `timeout` is only used in error messages.
pub async fn wait_for_agent<H: Hypervisor + ?Sized>(
    vm: &H,
    ready: Option<ReadyListener>,
    deadline: Instant,
    timeout: Duration,
) -> Result<AgentConnection, HypervisorError> {
    if let Some(ready) = ready {
        wait_for_announcement(vm, &ready, deadline, timeout).await?;
        // Closed now: nothing in the guest may reach it later.
        drop(ready);
    }
    let id = vm.sandbox_id().to_owned();
    let vsock = vm.hybrid_vsock();
    let mut last = String::from("none made");
    loop {
        vm.check_alive().await?;
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(HypervisorError::AgentTimeout {
                id,
                port: AGENT_VSOCK_PORT,
                timeout,
                last,
                console_log: ConsoleLogHint(Some(vm.console_log_path())),
            });
        }
        let budget = remaining.min(crate::hybrid_vsock::DEFAULT_ATTEMPT_TIMEOUT);
        match vsock.try_connect(AGENT_VSOCK_PORT, budget).await {
            Ok(stream) => {
                let conn = AgentConnection::new(ttrpc_client(stream));
                let budget = remaining.min(HEALTH_CALL_TIMEOUT);
                match conn.check(budget).await {
                    Ok(ServingStatus::SERVING) => {
                        tracing::debug!(sandbox_id = %id, "agent is ready");
                        return Ok(conn);
                    }
                    Ok(status) => last = format!("Health.Check answered {status:?}"),
                    Err(e) => last = format!("Health.Check failed: {e}"),
                }
            }
            Err(cause) if !cause.is_retryable() => {
                return Err(HypervisorError::Vsock {
                    id,
                    error: Box::new(HybridVsockError::Failed {
                        socket: vsock.socket_path().to_owned(),
                        port: AGENT_VSOCK_PORT,
                        cause,
                        console_log: ConsoleLogHint(Some(vm.console_log_path())),
                    }),
                });
            }
            Err(cause) => last = cause.to_string(),
        }
        let pause = READY_RETRY_INTERVAL.min(deadline.saturating_duration_since(Instant::now()));
        tokio::time::sleep(pause).await;
    }
}

/// After a crashed shim: kills every process recorded in a `*.pid` file of
/// `dir` whose command line still mentions `dir` (so a recycled pid is left
/// alone), then removes the pid files and every `*.sock` file. Returns the
/// pids it killed. Logs and skips what it cannot read.
pub fn cleanup_stale_processes(dir: &Path) -> Vec<u32> {
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return killed;
    };
    let needle = dir.to_string_lossy().into_owned();
    for entry in entries.flatten() {
        let path = entry.path();
        let ext = path.extension().and_then(|e| e.to_str());
        match ext {
            Some("pid") => {
                let pid = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                    .filter(|p| *p > 1);
                if let Some(pid) = pid {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    let cmdline = String::from_utf8_lossy(&cmdline);
                    if cmdline.contains(needle.as_str()) {
                        let target = nix::unistd::Pid::from_raw(pid);
                        match nix::sys::signal::kill(target, nix::sys::signal::Signal::SIGKILL) {
                            Ok(()) => killed.push(pid.unsigned_abs()),
                            Err(e) => tracing::warn!(pid, error = %e, "cannot kill stale process"),
                        }
                    }
                }
                let _ = std::fs::remove_file(&path);
            }
            Some("sock") => {
                let _ = std::fs::remove_file(&path);
            }
            _ => {}
        }
    }
    killed
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_protocol::health::HealthCheckResponse;
    use boxlite_protocol::health_ttrpc::{create_health, Health};
    use std::os::unix::process::CommandExt;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{UnixListener, UnixStream};

    #[test]
    fn sandbox_ids() {
        for ok in ["3f2a", "a-b_c.d", &"f".repeat(64)] {
            validate_sandbox_id(ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("..", "starts with '.'"),
            ("a/b", "'/'"),
            ("a b", "' '"),
            ("a,b", "','"),
        ] {
            let err = validate_sandbox_id(bad).unwrap_err().to_string();
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let err = validate_sandbox_id(&"x".repeat(129))
            .unwrap_err()
            .to_string();
        assert!(err.contains("129 bytes long"), "{err}");
    }

    #[test]
    fn share_tags() {
        validate_share_tag("s", "rootfs").unwrap();
        validate_share_tag("s", &"t".repeat(36)).unwrap();
        assert!(validate_share_tag("s", "").is_err());
        assert!(validate_share_tag("s", &"t".repeat(37)).is_err());
        let err = validate_share_tag("s", "a,b").unwrap_err().to_string();
        assert_eq!(
            err,
            "sandbox s: share \"a,b\" is invalid: character ',' is not allowed in a tag (use A-Z a-z 0-9 _ - .)"
        );
    }

    #[test]
    fn mac_addresses() {
        let mac: MacAddr = "02:42:AC:11:00:02".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0x42, 0xac, 0x11, 0, 2]);
        assert_eq!(mac.to_string(), "02:42:ac:11:00:02");
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "0g:42:ac:11:00:02",
            "2:42:ac:11:00:02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let err = "01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap_err()
            .to_string();
        assert!(err.contains("multicast"), "{err}");
    }

    #[test]
    fn spec_from_config() {
        let mut config = Config::default();
        config.guest.kernel_cmdline_extra = " quiet  loglevel=3 ".into();
        let spec = VmSpec::from_config(&config, "3f2a").unwrap();
        assert_eq!(spec.dir, Path::new("/run/boxlite/3f2a"));
        assert_eq!(
            spec.console_log_path(),
            Path::new("/run/boxlite/3f2a/console.log")
        );
        assert_eq!(
            spec.vsock_socket_path(),
            Path::new("/run/boxlite/3f2a/vsock.sock")
        );
        assert_eq!(spec.cmdline_extra, ["quiet", "loglevel=3"]);
        assert_eq!(spec.agent_ready_timeout, Duration::from_secs(30));
        assert!(VmSpec::from_config(&config, "../etc").is_err());
    }

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

    #[test]
    fn stale_cleanup_kills_only_our_processes() {
        let dir = tempfile::tempdir().unwrap();
        // A process that mentions the dir, one that does not.
        // argv[0] carries the dir, as our helpers carry it in their arguments.
        let mut ours = std::process::Command::new("sleep")
            .arg0(dir.path().join("sleep"))
            .arg("30")
            .spawn()
            .unwrap();
        let mut theirs = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        // spawn() returns once the child is in exec, but the kernel lets the
        // parent go before it sets up the new argv: /proc/<pid>/cmdline
        // reads empty for a moment. Stale processes are long past that.
        wait_for_cmdline(ours.id(), &dir.path().to_string_lossy());
        std::fs::write(dir.path().join("ours.pid"), ours.id().to_string()).unwrap();
        std::fs::write(dir.path().join("theirs.pid"), theirs.id().to_string()).unwrap();
        std::fs::write(dir.path().join("garbage.pid"), "not a pid").unwrap();
        std::fs::write(dir.path().join("vsock.sock"), "").unwrap();
        std::fs::write(dir.path().join("console.log"), "kept").unwrap();

        let killed = cleanup_stale_processes(dir.path());
        assert_eq!(killed, [ours.id()]);
        assert!(ours.wait().unwrap().code().is_none());
        assert!(theirs.try_wait().unwrap().is_none());
        theirs.kill().unwrap();
        theirs.wait().unwrap();
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(left, ["console.log"]);
    }

    fn wait_for_cmdline(pid: u32, needle: &str) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pid {pid}: cmdline never showed {needle}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A fake VM: a hybrid vsock peer that proxies to a real ttrpc Health
    /// server, like the vsock backend in front of the agent.
    struct FakeVm {
        dir: PathBuf,
        dead: AtomicBool,
    }

    #[async_trait]
    impl Hypervisor for FakeVm {
        fn sandbox_id(&self) -> &str {
            "fake"
        }
        async fn add_share(&self, _: &str, _: &Path, _: bool) -> Result<(), HypervisorError> {
            Ok(())
        }
        async fn add_net(&self, _: TapDevice, _: MacAddr) -> Result<(), HypervisorError> {
            Ok(())
        }
        async fn start(&self) -> Result<(), HypervisorError> {
            Ok(())
        }
        async fn wait_ready(&self) -> Result<AgentConnection, HypervisorError> {
            unimplemented!()
        }
        async fn stop(&self) -> Result<(), HypervisorError> {
            Ok(())
        }
        async fn kill(&self) -> Result<(), HypervisorError> {
            Ok(())
        }
        async fn check_alive(&self) -> Result<(), HypervisorError> {
            if self.dead.load(Ordering::SeqCst) {
                return Err(HypervisorError::InvalidState {
                    id: "fake".into(),
                    op: "wait",
                    state: "dead",
                });
            }
            Ok(())
        }
        fn pid(&self) -> Option<u32> {
            None
        }
        fn vsock_socket_path(&self) -> PathBuf {
            self.dir.join(VSOCK_SOCKET)
        }
        fn console_log_path(&self) -> PathBuf {
            self.dir.join(CONSOLE_LOG)
        }
    }

    struct FakeHealth;

    #[async_trait]
    impl Health for FakeHealth {
        async fn check(
            &self,
            _ctx: &ttrpc::r#async::TtrpcContext,
            _req: CheckRequest,
        ) -> ttrpc::Result<HealthCheckResponse> {
            let mut resp = HealthCheckResponse::new();
            resp.status = ServingStatus::SERVING.into();
            Ok(resp)
        }
        async fn version(
            &self,
            _ctx: &ttrpc::r#async::TtrpcContext,
            _req: CheckRequest,
        ) -> ttrpc::Result<VersionCheckResponse> {
            Ok(VersionCheckResponse {
                agent_version: "test".into(),
                protocol_version: boxlite_protocol::PROTOCOL_VERSION,
                ..Default::default()
            })
        }
    }

    /// Starts the fake agent (ttrpc server on agent.sock) and, after
    /// `delay`, the hybrid vsock front (vsock.sock); then writes `announce`
    /// to the readiness socket, as the agent does.
    async fn fake_guest(
        dir: &Path,
        delay: Duration,
        announce: Option<&'static [u8]>,
    ) -> ttrpc::r#async::Server {
        let agent_sock = dir.join("agent.sock");
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", agent_sock.display()))
            .unwrap()
            .register_service(create_health(Arc::new(FakeHealth)));
        server.start().await.unwrap();
        let front = dir.join(VSOCK_SOCKET);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let listener = UnixListener::bind(&front).unwrap();
            if let Some(line) = announce {
                let path = ready::ready_socket_path(&front);
                let mut c = UnixStream::connect(path).await.unwrap();
                c.write_all(line).await.unwrap();
            }
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let agent_sock = agent_sock.clone();
                tokio::spawn(async move {
                    let mut line = Vec::new();
                    let mut b = [0u8; 1];
                    while s.read(&mut b).await.unwrap() == 1 && b[0] != b'\n' {
                        line.push(b[0]);
                    }
                    assert_eq!(line, b"CONNECT 1024");
                    let mut agent = UnixStream::connect(&agent_sock).await.unwrap();
                    s.write_all(b"OK 1073741824\n").await.unwrap();
                    let _ = tokio::io::copy_bidirectional(&mut s, &mut agent).await;
                });
            }
        });
        server
    }

    #[tokio::test]
    async fn wait_for_agent_reaches_a_fake_guest() {
        let dir = tempfile::tempdir().unwrap();
        let line = b"BOXLITE-READY 1 test\n";
        let mut server = fake_guest(dir.path(), Duration::from_millis(300), Some(line)).await;
        let vm = FakeVm {
            dir: dir.path().to_owned(),
            dead: AtomicBool::new(false),
        };
        let ready = ReadyListener::bind(&vm.vsock_socket_path()).unwrap();
        let ready_path = ready.path().to_owned();
        let deadline = Instant::now() + Duration::from_secs(10);
        let conn = wait_for_agent(&vm, Some(ready), deadline, Duration::from_secs(10))
            .await
            .unwrap();
        assert!(!ready_path.exists(), "the readiness socket is closed");
        let version = conn.version(Duration::from_secs(2)).await.unwrap();
        assert_eq!(version.agent_version, "test");
        assert_eq!(version.protocol_version, boxlite_protocol::PROTOCOL_VERSION);
        // A second, independent connection works too.
        let again = AgentConnection::connect(&vm.hybrid_vsock(), Duration::from_secs(2))
            .await
            .unwrap();
        assert_eq!(
            again.check(Duration::from_secs(2)).await.unwrap(),
            ServingStatus::SERVING
        );
        server.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn wait_for_agent_times_out_with_the_right_message() {
        let dir = tempfile::tempdir().unwrap();
        let vm = FakeVm {
            dir: dir.path().to_owned(),
            dead: AtomicBool::new(false),
        };
        let started = std::time::Instant::now();
        let err = wait_for_agent(
            &vm,
            None,
            Instant::now() + Duration::from_millis(500),
            Duration::from_millis(500),
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_millis(1500));
        assert_eq!(
            err.to_string(),
            format!(
                "sandbox fake: VM did not answer on vsock port 1024 within 500ms \
                 (last attempt: the socket does not exist); console log: {}",
                dir.path().join("console.log").display()
            )
        );
    }

    #[tokio::test]
    async fn wait_for_agent_fails_fast_when_the_vm_dies() {
        let dir = tempfile::tempdir().unwrap();
        let vm = Arc::new(FakeVm {
            dir: dir.path().to_owned(),
            dead: AtomicBool::new(false),
        });
        let killer = vm.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            killer.dead.store(true, Ordering::SeqCst);
        });
        let ready = ReadyListener::bind(&vm.vsock_socket_path()).unwrap();
        let started = std::time::Instant::now();
        let err = wait_for_agent(
            vm.as_ref(),
            Some(ready),
            Instant::now() + Duration::from_secs(30),
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(err.to_string().contains("dead"), "{err}");
    }

    /// A fake guest that announces `line` (or nothing), and the error
    /// wait_for_agent gives for it within `timeout`.
    async fn wait_error(
        line: Option<&'static [u8]>,
        timeout: Duration,
    ) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let mut server = fake_guest(dir.path(), Duration::ZERO, line).await;
        let vm = FakeVm {
            dir: dir.path().to_owned(),
            dead: AtomicBool::new(false),
        };
        let ready = ReadyListener::bind(&vm.vsock_socket_path()).unwrap();
        let err = wait_for_agent(&vm, Some(ready), Instant::now() + timeout, timeout)
            .await
            .unwrap_err();
        server.shutdown().await.unwrap();
        (dir, err.to_string())
    }

    #[tokio::test]
    async fn no_announcement_times_out_naming_the_port_and_socket() {
        // The agent serves but never announces: no connection is made.
        let (dir, err) = wait_error(None, Duration::from_millis(500)).await;
        assert_eq!(
            err,
            format!(
                "sandbox fake: the agent did not announce itself on vsock port 1027 ({}) \
                 within 500ms (last: no connection); console log: {}",
                dir.path().join("vsock.sock_1027").display(),
                dir.path().join("console.log").display()
            )
        );
    }

    #[tokio::test]
    async fn agent_of_another_protocol_is_refused_at_once() {
        let started = std::time::Instant::now();
        let (_dir, err) =
            wait_error(Some(b"BOXLITE-READY 99 9.0.0\n"), Duration::from_secs(10)).await;
        assert!(started.elapsed() < Duration::from_secs(5), "not at once");
        assert_eq!(
            err,
            "sandbox fake: the guest agent 9.0.0 speaks protocol 99, this host speaks 1; \
             install a guest image built from the same release (cargo xtask guest)"
        );
    }
}
