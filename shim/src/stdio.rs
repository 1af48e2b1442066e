//! The IO relay: containerd's side of a process's stdio (fifos, `file://`
//! and `binary://` URIs) to the agent's stdio streams.
//!
//! Each stream the process has is one hybrid-vsock connection to guest port
//! [`STDIO_VSOCK_PORT`], opened with a `boxlite_protocol::stdio` header and
//! acknowledged by the agent. stdout/stderr are copied guest → host until the
//! agent closes them (after the process exited and its output was drained);
//! stdin host → guest until containerd calls CloseIO.

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use boxlite_protocol::stdio::{parse_ack_fixed, StreamHeader, StreamKind, ACK_FIXED_LEN};
use boxlite_protocol::STDIO_VSOCK_PORT;
use boxlite_runtime::HybridVsock;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::net::UnixStream;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::{Cause, Result, ShimError};

/// How long the binary logger gets to say it is ready.
pub const LOGGER_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// containerd's stdio for one process, as it sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StdioPaths {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

impl StdioPaths {
    /// The streams the agent should expect (with a terminal, stderr is
    /// merged into stdout).
    pub fn wants(&self) -> (bool, bool, bool) {
        (
            !self.stdin.is_empty(),
            !self.stdout.is_empty(),
            !self.stderr.is_empty() && !self.terminal,
        )
    }
}

/// Where an output stream goes on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    /// A fifo (or any file) path containerd created.
    Fifo(PathBuf),
    /// `file:///path`: appended to.
    File(PathBuf),
    /// `binary:///path?arg=value`: a logging binary that reads fd 3 and 4.
    Binary { path: PathBuf, args: Vec<String> },
}

impl OutputTarget {
    /// Parses containerd's stdout/stderr value.
    pub fn parse(uri: &str) -> Result<Self> {
        let bad = |reason: &str| ShimError::InvalidArgument(format!("stdio URI {uri:?}: {reason}"));
        if let Some(rest) = uri.strip_prefix("file://") {
            if !rest.starts_with('/') {
                return Err(bad("file:// needs an absolute path"));
            }
            return Ok(OutputTarget::File(decoded_path(rest)));
        }
        if let Some(rest) = uri.strip_prefix("binary://") {
            let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
            if !path.starts_with('/') {
                return Err(bad("binary:// needs an absolute path"));
            }
            let mut args = Vec::new();
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                args.push(decoded_arg(k));
                if !v.is_empty() {
                    args.push(decoded_arg(v));
                }
            }
            return Ok(OutputTarget::Binary {
                path: decoded_path(path),
                args,
            });
        }
        if let Some(rest) = uri.strip_prefix("fifo://") {
            return Ok(OutputTarget::Fifo(PathBuf::from(rest)));
        }
        if uri.contains("://") {
            return Err(bad(
                "unsupported scheme (expected a path, file:// or binary://)",
            ));
        }
        Ok(OutputTarget::Fifo(PathBuf::from(uri)))
    }
}

/// Decodes `%XX` escapes byte-wise. A `%` not followed by two hex digits
/// stays as it is (it is not an escape); the result may be any bytes, which
/// is what a path is on Linux.
fn percent_decode(s: &str) -> Vec<u8> {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            if let (Some(hi), Some(lo)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// A percent-encoded path from a stdio URI, byte for byte.
fn decoded_path(s: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(percent_decode(s)))
}

/// A percent-encoded argument of a logging binary's URI.
fn decoded_arg(s: &str) -> String {
    String::from_utf8_lossy(&percent_decode(s)).into_owned()
}

type Writer = Box<dyn AsyncWrite + Send + Unpin>;
type Reader = Box<dyn AsyncRead + Send + Unpin>;

/// The host ends of a process's stdio, opened before any guest stream.
struct HostEnds {
    stdin: Option<Reader>,
    stdout: Option<Writer>,
    stderr: Option<Writer>,
    logger: Option<tokio::process::Child>,
}

async fn open_output(target: &OutputTarget) -> Result<Writer> {
    match target {
        OutputTarget::Fifo(path) => {
            // Read-write, like runc's shim keeps a read end: never blocks on
            // open, and a detached client does not turn writes into EPIPE.
            let sender = pipe::OpenOptions::new()
                .read_write(true)
                .open_sender(path)
                .map_err(|e| ShimError::io("cannot open stdio fifo", path, e))?;
            Ok(Box::new(sender))
        }
        OutputTarget::File(path) => {
            if let Some(parent) = path.parent() {
                tokio::fs::create_dir_all(parent)
                    .await
                    .map_err(|e| ShimError::io("cannot create log directory", parent, e))?;
            }
            let file = tokio::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .await
                .map_err(|e| ShimError::io("cannot open log file", path, e))?;
            Ok(Box::new(file))
        }
        OutputTarget::Binary { .. } => Err(ShimError::Internal(
            "binary:// outputs are opened together".into(),
        )),
    }
}

/// Starts a containerd binary logger: fd 3 carries stdout, fd 4 stderr, and
/// the logger closes (or writes to) fd 5 once it is ready.
async fn spawn_binary_logger(
    path: &PathBuf,
    args: &[String],
    container_id: &str,
    namespace: &str,
) -> Result<(Writer, Writer, tokio::process::Child)> {
    let pipe_pair = || {
        nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
            .map_err(|e| ShimError::io("cannot create a pipe for", path, e.into()))
    };
    let (out_r, out_w) = pipe_pair()?;
    let (err_r, err_w) = pipe_pair()?;
    let (ready_r, ready_w) = pipe_pair()?;
    let child_fds = [out_r.as_raw_fd(), err_r.as_raw_fd(), ready_w.as_raw_fd()];
    let mut cmd = tokio::process::Command::new(path);
    cmd.args(args)
        .env("CONTAINER_ID", container_id)
        .env("CONTAINER_NAMESPACE", namespace)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(false);
    // SAFETY: the closure only calls async-signal-safe functions (dup2,
    // fcntl) on fds that stay open in the parent until spawn returns.
    unsafe {
        cmd.as_std_mut().pre_exec(move || {
            // Move the fds above the target range first, so dup2 onto 3..=5
            // cannot clobber a source that happens to be 3, 4 or 5.
            let mut high = [0i32; 3];
            for (i, fd) in child_fds.iter().enumerate() {
                let moved = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
                if moved < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                high[i] = moved;
            }
            for (i, fd) in high.iter().enumerate() {
                if libc::dup2(*fd, 3 + i as i32) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| ShimError::io("cannot start logging binary", path, e))?;
    drop((out_r, err_r, ready_w));
    // Wait until the logger closes or writes to its ready fd.
    let ready = pipe::Receiver::from_owned_fd(ready_r)
        .map_err(|e| ShimError::io("cannot watch logging binary", path, e))?;
    let mut ready = ready;
    let mut byte = [0u8; 1];
    match tokio::time::timeout(LOGGER_READY_TIMEOUT, ready.read(&mut byte)).await {
        Ok(_) => {}
        Err(_) => {
            return Err(ShimError::Stdio {
                stream: "stdout",
                object: format!("container {container_id:?}"),
                reason: format!(
                    "logging binary {} did not become ready within {}s",
                    path.display(),
                    LOGGER_READY_TIMEOUT.as_secs()
                ),
            })
        }
    }
    let as_writer = |fd: OwnedFd| -> Result<Writer> {
        Ok(Box::new(pipe::Sender::from_owned_fd(fd).map_err(|e| {
            ShimError::io("cannot use logging pipe for", path, e)
        })?))
    };
    Ok((as_writer(out_w)?, as_writer(err_w)?, child))
}

async fn open_host_ends(
    stdio: &StdioPaths,
    container_id: &str,
    namespace: &str,
) -> Result<HostEnds> {
    let (want_in, want_out, want_err) = stdio.wants();
    let mut ends = HostEnds {
        stdin: None,
        stdout: None,
        stderr: None,
        logger: None,
    };
    if want_in {
        let path = PathBuf::from(stdio.stdin.strip_prefix("fifo://").unwrap_or(&stdio.stdin));
        // Read-only and non-blocking (tokio opens with O_NONBLOCK): the
        // open never waits for the client, and a FIFO that never had a
        // writer is not readable, so no early EOF; once the client has
        // opened and closed its end (`echo x | ctr run … cat`), the read
        // returns EOF and so does the process's stdin, as under runc.
        // CloseIO ends stdin as well.
        let receiver = pipe::OpenOptions::new()
            .open_receiver(&path)
            .map_err(|e| ShimError::io("cannot open stdin fifo", &path, e))?;
        ends.stdin = Some(Box::new(receiver));
    }
    let out = want_out
        .then(|| OutputTarget::parse(&stdio.stdout))
        .transpose()?;
    let err = want_err
        .then(|| OutputTarget::parse(&stdio.stderr))
        .transpose()?;
    if let Some(OutputTarget::Binary { path, args }) = out
        .as_ref()
        .or(err.as_ref())
        .filter(|t| matches!(t, OutputTarget::Binary { .. }))
    {
        let (o, e, child) = spawn_binary_logger(path, args, container_id, namespace).await?;
        ends.stdout = want_out.then_some(o);
        ends.stderr = want_err.then_some(e);
        ends.logger = Some(child);
        return Ok(ends);
    }
    if let Some(t) = &out {
        ends.stdout = Some(open_output(t).await?);
    }
    if let Some(t) = &err {
        ends.stderr = Some(open_output(t).await?);
    }
    Ok(ends)
}

/// Opens one stdio stream to the agent: connect through the hybrid socket,
/// send the header, read the ack.
pub async fn connect_stream(
    vsock: &HybridVsock,
    container_id: &str,
    exec_id: &str,
    stream: StreamKind,
    timeout: Duration,
) -> Result<UnixStream> {
    let name = stream_name(stream);
    let object = describe(container_id, exec_id);
    let fail = |reason: String| ShimError::Stdio {
        stream: name,
        object: object.clone(),
        reason,
    };
    let failed = |cause: Cause| ShimError::StdioFailed {
        stream: name,
        object: object.clone(),
        cause,
    };
    let header = StreamHeader {
        stream,
        container_id: container_id.to_owned(),
        exec_id: exec_id.to_owned(),
    }
    .encode()
    .map_err(|e| failed(e.into()))?;
    let attempt = async {
        let mut conn = vsock
            .connect(STDIO_VSOCK_PORT, timeout)
            .await
            .map_err(|e| failed(e.into()))?;
        conn.write_all(&header)
            .await
            .map_err(|e| failed(StreamSetupError::Header(e).into()))?;
        let mut fixed = [0u8; ACK_FIXED_LEN];
        conn.read_exact(&mut fixed)
            .await
            .map_err(|e| failed(StreamSetupError::NoAck(e).into()))?;
        let (status, len) = parse_ack_fixed(&fixed).map_err(|e| failed(e.into()))?;
        let mut message = vec![0u8; len];
        conn.read_exact(&mut message)
            .await
            .map_err(|e| failed(StreamSetupError::TruncatedAck(e).into()))?;
        if status != 0 {
            return Err(fail(format!(
                "the agent refused the stream: {}",
                String::from_utf8_lossy(&message)
            )));
        }
        Ok(conn)
    };
    // The header/ack exchange gets its own budget on top of the connect.
    match tokio::time::timeout(timeout + Duration::from_secs(15), attempt).await {
        Ok(r) => r,
        Err(_) => Err(fail(
            "the agent did not acknowledge the stream in time".into(),
        )),
    }
}

/// Where the stream set-up with the agent broke off.
#[derive(Debug, thiserror::Error)]
enum StreamSetupError {
    #[error("sending the header failed")]
    Header(#[source] std::io::Error),
    #[error("no ack from the agent")]
    NoAck(#[source] std::io::Error),
    #[error("truncated ack from the agent")]
    TruncatedAck(#[source] std::io::Error),
}

fn stream_name(stream: StreamKind) -> &'static str {
    match stream {
        StreamKind::Stdin => "stdin",
        StreamKind::Stdout => "stdout",
        StreamKind::Stderr => "stderr",
    }
}

pub fn describe(container_id: &str, exec_id: &str) -> String {
    if exec_id.is_empty() {
        format!("container {container_id:?}")
    } else {
        format!("exec {exec_id:?} of container {container_id:?}")
    }
}

/// A running relay for one process.
pub struct Relay {
    outputs: Vec<JoinHandle<()>>,
    stdin_close: Option<oneshot::Sender<()>>,
    stdin_task: Option<JoinHandle<()>>,
    logger: Option<tokio::process::Child>,
}

impl Relay {
    /// Opens the host ends, then one agent stream per wanted stdio stream,
    /// and starts copying.
    pub async fn start(
        vsock: &HybridVsock,
        container_id: &str,
        exec_id: &str,
        namespace: &str,
        stdio: &StdioPaths,
        connect_timeout: Duration,
    ) -> Result<Relay> {
        let mut ends = open_host_ends(stdio, container_id, namespace).await?;
        let mut relay = Relay {
            outputs: Vec::new(),
            stdin_close: None,
            stdin_task: None,
            logger: ends.logger.take(),
        };
        let connect = |kind| connect_stream(vsock, container_id, exec_id, kind, connect_timeout);
        // Outputs first: a process that writes at once must find them.
        for (kind, writer) in [
            (StreamKind::Stdout, ends.stdout.take()),
            (StreamKind::Stderr, ends.stderr.take()),
        ] {
            if let Some(mut writer) = writer {
                let mut conn = match connect(kind).await {
                    Ok(c) => c,
                    Err(e) => {
                        relay.abort();
                        return Err(e);
                    }
                };
                let what = describe(container_id, exec_id);
                relay.outputs.push(tokio::spawn(async move {
                    match tokio::io::copy(&mut conn, &mut writer).await {
                        Ok(n) => tracing::debug!(%what, stream = stream_name(kind), bytes = n, "output drained"),
                        Err(e) => tracing::warn!(%what, stream = stream_name(kind), error = %e, "output relay failed"),
                    }
                    let _ = writer.flush().await;
                    let _ = writer.shutdown().await;
                }));
            }
        }
        if let Some(mut reader) = ends.stdin.take() {
            let mut conn = match connect(StreamKind::Stdin).await {
                Ok(c) => c,
                Err(e) => {
                    relay.abort();
                    return Err(e);
                }
            };
            let (tx, mut rx) = oneshot::channel::<()>();
            let what = describe(container_id, exec_id);
            relay.stdin_close = Some(tx);
            relay.stdin_task = Some(tokio::spawn(async move {
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    tokio::select! {
                        biased;
                        read = reader.read(&mut buf) => match read {
                            Ok(0) => break,
                            Ok(n) => {
                                if let Err(e) = conn.write_all(&buf[..n]).await {
                                    tracing::debug!(%what, error = %e, "stdin relay: guest side closed");
                                    return;
                                }
                            }
                            Err(e) => {
                                tracing::warn!(%what, error = %e, "stdin relay: reading the fifo failed");
                                break;
                            }
                        },
                        _ = &mut rx => {
                            // CloseIO: pass on what is already in the fifo, then EOF.
                            drain_nonblocking(&mut reader, &mut conn, &mut buf).await;
                            break;
                        }
                    }
                }
                let _ = conn.shutdown().await;
                tracing::debug!(%what, "stdin closed");
            }));
        }
        Ok(relay)
    }

    /// Ends stdin (CloseIO): the guest process reads EOF.
    pub fn close_stdin(&mut self) {
        if let Some(tx) = self.stdin_close.take() {
            let _ = tx.send(());
        }
    }

    /// Waits until stdout and stderr are drained (the agent closed them),
    /// at most `timeout`; then stops what is left.
    pub async fn drain(&mut self, timeout: Duration) {
        let outputs = std::mem::take(&mut self.outputs);
        let all = futures_join_all(outputs);
        if tokio::time::timeout(timeout, all).await.is_err() {
            tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                "stdout/stderr not drained in time; dropping the rest"
            );
        }
    }

    /// Stops every copy at once (delete, failed start).
    pub fn abort(&mut self) {
        for h in self.outputs.drain(..) {
            h.abort();
        }
        if let Some(h) = self.stdin_task.take() {
            h.abort();
        }
        self.stdin_close = None;
        if let Some(mut child) = self.logger.take() {
            // The logger ends on EOF of its pipes; reap it in the background.
            tokio::spawn(async move {
                if tokio::time::timeout(Duration::from_secs(5), child.wait())
                    .await
                    .is_err()
                {
                    let _ = child.kill().await;
                }
            });
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.abort();
    }
}

async fn futures_join_all(handles: Vec<JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

/// Copies what a fifo holds right now, without waiting for more.
async fn drain_nonblocking(reader: &mut Reader, conn: &mut UnixStream, buf: &mut [u8]) {
    loop {
        match tokio::time::timeout(Duration::from_millis(20), reader.read(buf)).await {
            Ok(Ok(n)) if n > 0 => {
                if conn.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_containerd_stdio_values() {
        assert_eq!(
            OutputTarget::parse("/run/containerd/fifo/1/c-stdout").unwrap(),
            OutputTarget::Fifo("/run/containerd/fifo/1/c-stdout".into())
        );
        assert_eq!(
            OutputTarget::parse("file:///var/log/c%201.log").unwrap(),
            OutputTarget::File("/var/log/c 1.log".into())
        );
        assert_eq!(
            OutputTarget::parse("binary:///usr/bin/logger?tag=web&debug").unwrap(),
            OutputTarget::Binary {
                path: "/usr/bin/logger".into(),
                args: vec!["tag".into(), "web".into(), "debug".into()],
            }
        );
        assert!(OutputTarget::parse("file://relative").is_err());
        assert!(OutputTarget::parse("http://x/y").is_err());
    }

    /// Escapes decode byte-wise; anything that is not `%` + two hex digits
    /// stays literal. A multibyte character right after `%` once panicked
    /// (a string slice across a char boundary), and `%+1` decoded as 0x01.
    #[test]
    fn percent_escapes_decode_byte_wise_and_never_panic() {
        use std::os::unix::ffi::OsStrExt;
        let file = |uri: &str| match OutputTarget::parse(uri).unwrap() {
            OutputTarget::File(p) => p.as_os_str().as_bytes().to_vec(),
            other => panic!("{other:?}"),
        };
        assert_eq!(file("file:///a%C3%A9"), "/aé".as_bytes());
        assert_eq!(file("file:///a%é"), "/a%é".as_bytes());
        assert_eq!(file("file:///a%aé"), "/a%aé".as_bytes());
        assert_eq!(file("file:///a%%é%"), "/a%%é%".as_bytes());
        assert_eq!(file("file:///a%+1"), b"/a%+1");
        assert_eq!(file("file:///a%4"), b"/a%4");
        assert_eq!(file("file:///a%ff"), b"/a\xff");
        assert_eq!(
            OutputTarget::parse("binary:///l?%é=%41").unwrap(),
            OutputTarget::Binary {
                path: "/l".into(),
                args: vec!["%é".into(), "A".into()],
            }
        );
    }

    #[test]
    fn terminal_merges_stderr() {
        let s = StdioPaths {
            stdin: "/i".into(),
            stdout: "/o".into(),
            stderr: "/e".into(),
            terminal: true,
        };
        assert_eq!(s.wants(), (true, true, false));
        let s = StdioPaths {
            terminal: false,
            ..s
        };
        assert_eq!(s.wants(), (true, true, true));
        assert_eq!(StdioPaths::default().wants(), (false, false, false));
    }
}
