//! The log stream: every connection to the log port gets the ring content,
//! then live lines, until it closes. A reader that falls behind loses lines
//! (counted, and announced in its stream) instead of slowing the agent.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncWriteExt, BufWriter};

use super::ring::LogHub;
use crate::listener::{BoxConn, Listener};

/// Accepts log stream connections forever.
pub async fn serve(listener: Listener, hub: Arc<LogHub>) {
    loop {
        match listener.accept().await {
            Ok(conn) => {
                tokio::spawn(stream_to(conn, hub.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %boxlite_protocol::error_chain::chain(&e), "log stream accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn stream_to(conn: BoxConn, hub: Arc<LogHub>) {
    let mut out = BufWriter::new(conn);
    let mut sub = match hub.subscribe() {
        Ok(sub) => sub,
        Err(e) => {
            let _ = out
                .write_all(format!("[boxlite-agent: {e}]\n").as_bytes())
                .await;
            let _ = out.flush().await;
            return;
        }
    };
    if write_backlog(&mut out, &hub, &sub.backlog, sub.evicted)
        .await
        .is_err()
    {
        return;
    }
    sub.backlog = Vec::new();
    while let Some(line) = sub.rx.recv().await {
        if out.write_all(line.as_bytes()).await.is_err() {
            return;
        }
        if !sub.rx.is_empty() {
            continue;
        }
        // Caught up. Lines are only dropped while the queue is full, so
        // the gap is here, after what was queued.
        let dropped = sub.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let note =
                format!("[boxlite-agent: {dropped} log lines dropped: this reader is too slow]\n");
            if out.write_all(note.as_bytes()).await.is_err() {
                return;
            }
        }
        if out.flush().await.is_err() {
            return;
        }
    }
}

async fn write_backlog(
    out: &mut BufWriter<BoxConn>,
    hub: &LogHub,
    backlog: &[Arc<str>],
    evicted: u64,
) -> std::io::Result<()> {
    if evicted > 0 {
        let note = format!(
            "[boxlite-agent: {evicted} earlier log lines no longer fit the {} KiB ring]\n",
            hub.capacity() / 1024
        );
        out.write_all(note.as_bytes()).await?;
    }
    for line in backlog {
        out.write_all(line.as_bytes()).await?;
    }
    out.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logging::ring::SUBSCRIBER_QUEUE;
    use tokio::io::AsyncReadExt;

    async fn read_until(r: &mut (impl AsyncReadExt + Unpin), needle: &str) -> String {
        let mut seen = String::new();
        let mut buf = [0u8; 8192];
        while !seen.contains(needle) {
            let n = tokio::time::timeout(Duration::from_secs(5), r.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {needle:?} in:\n{seen}"))
                .unwrap();
            assert_ne!(n, 0, "stream ended before {needle:?}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        seen
    }

    #[tokio::test]
    async fn backlog_then_live_lines() {
        let hub = Arc::new(LogHub::new(16));
        hub.publish("evicted line\n");
        hub.publish("kept\n");
        let (ours, mut theirs) = tokio::io::duplex(1 << 16);
        tokio::spawn(stream_to(Box::pin(ours), hub.clone()));
        let seen = read_until(&mut theirs, "kept\n").await;
        assert!(
            seen.starts_with("[boxlite-agent: 1 earlier log lines"),
            "{seen}"
        );
        hub.publish("live\n");
        read_until(&mut theirs, "live\n").await;
    }

    #[tokio::test]
    async fn a_reader_that_stalls_is_told_how_many_lines_it_lost() {
        let hub = Arc::new(LogHub::new(1 << 20));
        // A tiny pipe: the writer task blocks at once, as with a reader
        // that stopped reading.
        let (ours, mut theirs) = tokio::io::duplex(64);
        tokio::spawn(stream_to(Box::pin(ours), hub.clone()));
        tokio::task::yield_now().await;
        let total = SUBSCRIBER_QUEUE + 500;
        for i in 0..total {
            // Never blocks, whatever the reader does.
            hub.publish(&format!("line {i}\n"));
        }
        let seen = read_until(&mut theirs, "too slow]\n").await;
        let want = format!(
            "line {}\n[boxlite-agent: 500 log lines dropped: this reader is too slow]\n",
            SUBSCRIBER_QUEUE - 1
        );
        assert!(seen.ends_with(&want), "{seen}");
        hub.publish("after catching up\n");
        read_until(&mut theirs, "after catching up\n").await;
    }
}
