//! The stdio stream port. Process stdio arrives here as one connection per
//! stream (see `boxlite_protocol::stdio`). Until the container service
//! exists, every stream is read up to its header and refused with an ack
//! that says why, so the host gets a clear answer instead of a reset.

use std::time::Duration;

use boxlite_protocol::stdio::{encode_ack, StreamHeader, FIXED_LEN};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::listener::{BoxConn, Listener};

/// How long a peer may take to send its header.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

/// Accepts stdio connections forever.
pub async fn serve(listener: Listener) {
    loop {
        match listener.accept().await {
            Ok(conn) => {
                tokio::spawn(refuse(conn));
            }
            Err(e) => {
                tracing::warn!(error = %crate::error::chain(&e), "stdio accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn refuse(mut conn: BoxConn) {
    let reason = match tokio::time::timeout(HEADER_TIMEOUT, read_header(&mut conn)).await {
        Ok(Ok(h)) => format!(
            "container service not implemented yet: no {:?} stream for container {:?} exec {:?}",
            h.stream, h.container_id, h.exec_id
        ),
        Ok(Err(e)) => e,
        Err(_) => "stdio header did not arrive within 5 s".to_string(),
    };
    tracing::info!(%reason, "stdio stream refused");
    let _ = conn.write_all(&encode_ack(Err(&reason))).await;
    let _ = conn.shutdown().await;
}

async fn read_header(conn: &mut BoxConn) -> Result<StreamHeader, String> {
    let mut fixed = [0u8; FIXED_LEN];
    conn.read_exact(&mut fixed)
        .await
        .map_err(|e| format!("stdio header read failed: {e}"))?;
    let fixed = StreamHeader::parse_fixed(&fixed).map_err(|e| e.to_string())?;
    // ids_len() is bounded by 2 * MAX_ID_LEN after parse_fixed.
    let mut ids = vec![0u8; fixed.ids_len()];
    conn.read_exact(&mut ids)
        .await
        .map_err(|e| format!("stdio header read failed: {e}"))?;
    StreamHeader::from_parts(fixed, &ids).map_err(|e| e.to_string())
}
