//! The host's side of the guest agent: [`AgentConnection`] (ttrpc clients
//! over one hybrid vsock connection to port 1024), the readiness wait every
//! backend uses ([`wait_for_announcement`], then [`wait_for_agent`]), and
//! the shutdown request `stop` sends ([`request_agent_shutdown`]).

use std::fmt;
use std::time::Duration;

use boxlite_protocol::agent::DestroySandboxRequest;
use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::error_chain::chain;
use boxlite_protocol::health::VersionCheckResponse;
use boxlite_protocol::health::{health_check_response::ServingStatus, CheckRequest};
use boxlite_protocol::health_ttrpc::HealthClient;
use boxlite_protocol::{AGENT_VSOCK_PORT, PROTOCOL_VERSION, READY_VSOCK_PORT};
use tokio::time::Instant;

use super::ready::{ReadyError, ReadyListener};
use super::{Hypervisor, HypervisorError};
use crate::hybrid_vsock::{ttrpc_client, ConsoleLogHint, HybridVsock, HybridVsockError};

/// Per-call budget of the Health.Check calls in [`wait_for_agent`].
const HEALTH_CALL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between readiness attempts.
const READY_RETRY_INTERVAL: Duration = Duration::from_millis(50);
/// Budget for connecting to the agent in `stop`.
const STOP_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

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
            if ready.awaiting_line().await {
                last = "a connection (the VM's, made at its start), but no announcement line on it"
                    .into();
            }
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
                tracing::warn!(sandbox_id = %id, error = %chain(&e), "bad readiness announcement; still waiting");
                last = chain(&e);
            }
        }
    }
}

/// The readiness loop shared by backends: first the agent's announcement
/// on `ready` (the backends always pass it; see [`super::ready`] for why no
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

/// Asks the agent to shut the sandbox down (it answers, then reboots the
/// guest, which ends the VMM process). Failures are logged: `stop` kills anyway.
pub async fn request_agent_shutdown(
    id: &str,
    vsock: &HybridVsock,
    shutdown_timeout: Duration,
    deadline: Instant,
) {
    let remaining = || deadline.saturating_duration_since(Instant::now());
    let budget = STOP_CONNECT_TIMEOUT.min(remaining());
    let conn = match AgentConnection::connect(vsock, budget).await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(sandbox_id = %id, error = %chain(&e), "cannot reach the agent to shut down; killing the VM");
            return;
        }
    };
    // Half the budget for the containers, the rest for the guest's own
    // shutdown.
    let req = DestroySandboxRequest {
        timeout_secs: u32::try_from((shutdown_timeout.as_secs() / 2).max(1)).unwrap_or(u32::MAX),
        ..Default::default()
    };
    // The ttrpc deadline only starts once the request is queued; the
    // host's own timer bounds the whole call, so an agent that accepts
    // and never reads cannot hold the stop past its deadline.
    let budget = remaining().max(Duration::from_millis(1));
    let ctx = ttrpc::context::with_duration(budget);
    match tokio::time::timeout(budget, conn.agent().destroy_sandbox(ctx, &req)).await {
        Ok(Ok(_)) => {}
        // The guest may reboot before the answer leaves: not an error
        // as long as the VMM exits.
        Ok(Err(e)) => {
            tracing::debug!(sandbox_id = %id, error = %chain(&e), "DestroySandbox did not answer")
        }
        Err(_) => {
            tracing::warn!(sandbox_id = %id, "DestroySandbox got no answer by the shutdown deadline")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::{ready, CONSOLE_LOG, VSOCK_SOCKET};
    use crate::network::{MacAddr, TapDevice};
    use async_trait::async_trait;
    use boxlite_test_support::fake_guest::{serve_agent, spawn_vsock_proxy};
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use tokio::io::AsyncWriteExt;
    use tokio::net::{UnixListener, UnixStream};

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
        async fn set_guest_memory(&self, _: u32) -> Result<(), HypervisorError> {
            unreachable!("the agent's connection never resizes the VM")
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

    /// Starts the fake agent (ttrpc server on agent.sock) and, after
    /// `delay`, the hybrid vsock front (vsock.sock); then writes `announce`
    /// to the readiness socket, as the agent does.
    async fn fake_guest(
        dir: &Path,
        delay: Duration,
        announce: Option<&'static [u8]>,
    ) -> ttrpc::r#async::Server {
        let agent_sock = dir.join("agent.sock");
        let server = serve_agent(&agent_sock, "test", []).await;
        let front = dir.join(VSOCK_SOCKET);
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let listener = UnixListener::bind(&front).unwrap();
            if let Some(line) = announce {
                let path = ready::ready_socket_path(&front);
                let mut c = UnixStream::connect(path).await.unwrap();
                c.write_all(line).await.unwrap();
            }
            spawn_vsock_proxy(listener, 1024, agent_sock);
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
