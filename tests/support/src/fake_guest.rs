//! The guest side of a hybrid vsock socket (the Firecracker-style
//! `CONNECT <port>\n` / `OK <port>\n` handshake the VMM or the vsock
//! backend serves) and a fake agent `Health` service, for tests that stand
//! in for a VM.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use boxlite_protocol::health::{
    health_check_response::ServingStatus, CheckRequest, HealthCheckResponse, VersionCheckResponse,
};
use boxlite_protocol::health_ttrpc::{create_health, Health};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

/// The reply the guest side sends once a port is connected.
pub const OK_REPLY: &[u8] = b"OK 1073741824\n";

/// Reads the `CONNECT <port>` line (without its newline) byte by byte, as
/// a peer would, so that nothing after it is consumed; stops at EOF or on
/// an error.
pub async fn read_connect_line(stream: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while stream.read(&mut b).await.unwrap_or(0) == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

/// Accepts the next connection and reads its `CONNECT` line.
pub async fn accept_connect(listener: &UnixListener) -> (UnixStream, String) {
    let (mut s, _) = listener.accept().await.unwrap();
    let line = read_connect_line(&mut s).await;
    (s, line)
}

/// Serves `port` on `listener` by passing every connection through to the
/// unix socket `target` (after [`OK_REPLY`]), as the vsock backend does in
/// front of the agent; connections to other ports, or when `target` does
/// not answer, are closed.
pub fn spawn_vsock_proxy(listener: UnixListener, port: u32, target: PathBuf) {
    let connect = format!("CONNECT {port}");
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let (target, connect) = (target.clone(), connect.clone());
            tokio::spawn(async move {
                if read_connect_line(&mut conn).await != connect {
                    return;
                }
                let Ok(mut agent) = UnixStream::connect(&target).await else {
                    return;
                };
                if conn.write_all(OK_REPLY).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut agent).await;
            });
        }
    });
}

/// The agent's `Health` service: always SERVING, reporting
/// `agent_version` and this build's protocol version.
pub struct FakeHealth {
    pub agent_version: &'static str,
}

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
            agent_version: self.agent_version.into(),
            protocol_version: boxlite_protocol::PROTOCOL_VERSION,
            ..Default::default()
        })
    }
}

/// A started ttrpc server on the unix socket `sock` with [`FakeHealth`]
/// (reporting `agent_version`) and `services` (say the agent's, from
/// `create_agent`).
pub async fn serve_agent(
    sock: &Path,
    agent_version: &'static str,
    services: impl IntoIterator<Item = std::collections::HashMap<String, ttrpc::r#async::Service>>,
) -> ttrpc::r#async::Server {
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", sock.display()))
        .expect("bind the fake agent")
        .register_service(create_health(Arc::new(FakeHealth { agent_version })));
    for service in services {
        server = server.register_service(service);
    }
    server.start().await.expect("start the fake agent");
    server
}
