//! Tells the host the agent serves: one connection to the announce address
//! (host vsock port [`READY_VSOCK_PORT`] in the guest) carrying the line of
//! [`boxlite_protocol::ready`]. The host makes no connection into the guest
//! before it has read that line; see the module docs there for why.
//!
//! [`READY_VSOCK_PORT`]: boxlite_protocol::READY_VSOCK_PORT

use std::time::Duration;

use boxlite_protocol::ready::Announcement;
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio_vsock::{VsockAddr, VsockStream};

use crate::listener::{BoxConn, ListenAddr};

/// Attempts before giving up. The host binds its listener before the VM
/// starts, so a refusal means something is badly wrong; a few retries
/// cover a host that is merely slow.
const ATTEMPTS: u32 = 5;
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Budget of one connect + write.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
#[error("Failed to announce readiness to {addr} after {ATTEMPTS} attempts")]
pub struct AnnounceError {
    addr: String,
    #[source]
    last: std::io::Error,
}

/// Connects to `addr`, writes the announcement and closes.
pub async fn announce(addr: &ListenAddr) -> Result<(), AnnounceError> {
    let line = Announcement {
        protocol_version: boxlite_protocol::PROTOCOL_VERSION,
        agent_version: crate::AGENT_VERSION.to_owned(),
    }
    .encode();
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        let result = tokio::time::timeout(ATTEMPT_TIMEOUT, send(addr, line.as_bytes()))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()));
        match result {
            Ok(()) => {
                tracing::info!(%addr, attempt, "readiness announced to the host");
                return Ok(());
            }
            Err(e) => {
                tracing::debug!(%addr, attempt, error = %e, "announcing readiness failed");
                last = Some(e);
            }
        }
        tokio::time::sleep(RETRY_PAUSE).await;
    }
    Err(AnnounceError {
        addr: addr.to_string(),
        last: last.expect("at least one attempt ran"),
    })
}

async fn send(addr: &ListenAddr, line: &[u8]) -> std::io::Result<()> {
    let mut conn: BoxConn = match addr {
        ListenAddr::Unix(path) => Box::pin(UnixStream::connect(path).await?),
        ListenAddr::Vsock { cid, port } => {
            Box::pin(VsockStream::connect(VsockAddr::new(*cid, *port)).await?)
        }
    };
    conn.write_all(line).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn writes_the_line_and_closes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ready.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let reader = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        announce(&ListenAddr::Unix(path)).await.unwrap();
        let got = reader.await.unwrap();
        let a = Announcement::parse(&got).unwrap();
        assert_eq!(a.protocol_version, boxlite_protocol::PROTOCOL_VERSION);
        assert_eq!(a.agent_version, crate::AGENT_VERSION);
    }

    #[tokio::test]
    async fn no_listener_is_an_error_naming_the_address() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nobody.sock");
        let err = announce(&ListenAddr::Unix(path.clone())).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "Failed to announce readiness to unix://{} after 5 attempts",
                path.display()
            )
        );
    }
}
