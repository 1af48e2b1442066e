//! The stdio stream port. Process stdio arrives here as one connection per
//! stream (see `boxlite_protocol::stdio`). The header names the container,
//! the exec (empty: init) and the stream; the connection is handed to that
//! process ([`crate::container::process::Process::attach`]) and acked, or
//! refused with an ack that says why. A stream for an exec that
//! ExecProcess has not registered yet waits for it up to
//! [`EXEC_WAIT`]: the host may connect the streams and call ExecProcess
//! at the same time.

use std::sync::Arc;
use std::time::Duration;

use boxlite_protocol::error_chain::chain;
use boxlite_protocol::stdio::{encode_ack, StreamHeader, FIXED_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::agent::Agent;
use crate::listener::{BoxConn, Listener};

/// How long a peer may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a stream waits for its exec to be registered.
pub const EXEC_WAIT: Duration = Duration::from_secs(10);

/// Accepts stdio connections forever.
pub async fn serve(listener: Listener, agent: Arc<Agent>) {
    loop {
        match listener.accept().await {
            Ok(conn) => {
                tokio::spawn(handle(conn, agent.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %chain(&e), "stdio accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(mut conn: BoxConn, agent: Arc<Agent>) {
    let header = match tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut conn)).await {
        Ok(Ok(h)) => h,
        Ok(Err(e)) => return refuse(conn, e).await,
        Err(_) => return refuse(conn, "stdio header did not arrive within 5 s".into()).await,
    };
    let process = match agent.containers.get(&header.container_id) {
        Ok(c) => c.process_eventually(&header.exec_id, EXEC_WAIT).await,
        Err(e) => Err(e),
    };
    let process = match process {
        Ok(p) => p,
        Err(e) => return refuse(conn, e.to_string()).await,
    };
    if let Err(reason) = process.check_attach(header.stream) {
        return refuse(conn, reason).await;
    }
    // The ack goes out before the stream is attached: once attached, the
    // output pump owns the connection.
    if let Err(e) = conn.write_all(&encode_ack(Ok(()))).await {
        tracing::warn!(error = %e, "stdio ack failed");
        return;
    }
    match process.attach(header.stream, conn) {
        Ok(()) => tracing::debug!(
            container_id = %header.container_id,
            exec_id = %header.exec_id,
            stream = ?header.stream,
            "stdio stream attached"
        ),
        Err(reason) => tracing::warn!(
            container_id = %header.container_id,
            exec_id = %header.exec_id,
            %reason,
            "stdio stream dropped after its ack"
        ),
    }
}

async fn refuse(mut conn: BoxConn, reason: String) {
    tracing::info!(%reason, "stdio stream refused");
    let _ = conn.write_all(&encode_ack(Err(&reason))).await;
    let _ = conn.shutdown().await;
}

async fn read_header(conn: &mut BoxConn) -> Result<StreamHeader, String> {
    let mut fixed = [0u8; FIXED_LEN];
    conn.read_exact(&mut fixed)
        .await
        .map_err(|e| format!("stdio header read failed: {e}"))?;
    let fixed = StreamHeader::parse_fixed(&fixed).map_err(|e| chain(&e))?;
    // ids_len() is bounded by 2 * MAX_ID_LEN after parse_fixed.
    let mut ids = vec![0u8; fixed.ids_len()];
    conn.read_exact(&mut ids)
        .await
        .map_err(|e| format!("stdio header read failed: {e}"))?;
    StreamHeader::from_parts(fixed, &ids).map_err(|e| chain(&e))
}
