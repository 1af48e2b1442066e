//! The control socket: a unix socket (`control_socket` in the VM config)
//! served on the VMM event loop.
//!
//! Protocol: newline-delimited JSON, one request per line, one reply line
//! per request, any number of requests per connection:
//!
//! | request | reply (besides `"ok": true`) |
//! |---|---|
//! | `{"op":"status"}` | `"state": "running"\|"paused"\|"stopping"`, `"uptime_ms"`, `"vcpus"` |
//! | `{"op":"pause"}` | `"state": "paused"` once every vCPU acknowledged (≤ 1 s each) |
//! | `{"op":"resume"}` | `"state": "running"` |
//! | `{"op":"metrics"}` | `"metrics": {"vcpus": […], "devices": {…}}` (see [`crate::metrics`]) |
//! | `{"op":"shutdown"}` | `"state": "stopping"`, `"exit_code": 0`; then the vCPUs are stopped and the process exits with 0 |
//!
//! A bad request gets `{"ok": false, "error": "<what was wrong>"}` and the
//! connection stays open; a line longer than [`MAX_REQUEST_LEN`] gets an
//! error and the connection is closed. At most [`MAX_CONNECTIONS`] clients
//! at once. There is no ACPI: `shutdown` does not ask the guest, it stops
//! the vCPUs (graceful guest shutdown goes through the agent).

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use serde_json::{json, Value};

use crate::metrics::VmMetrics;
use crate::vstate::vcpu::{ExitReason, ExitSignal, VcpuHandle};

/// Longest request line, newline included.
pub const MAX_REQUEST_LEN: usize = 4096;
/// Most control connections at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 16;
/// The ops, in the order error messages list them.
pub const OPS: &[&str] = &["shutdown", "pause", "resume", "status", "metrics"];

/// Errors of setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("Control socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("Failed to bind the control socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
}

/// What the VM is doing, as `status` reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmState {
    Running,
    Paused,
    Stopping,
}

impl VmState {
    fn as_str(self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
        }
    }
}

/// The VM as the control socket sees it; shared with `run_vm`, which takes
/// the vCPU handles back at the end.
pub struct VmControl {
    vcpus: Mutex<Vec<VcpuHandle>>,
    nvcpus: usize,
    state: Mutex<VmState>,
    started: Instant,
    exit: Arc<ExitSignal>,
    metrics: VmMetrics,
}

impl VmControl {
    /// Wraps the running VM's vCPUs (already resumed).
    pub fn new(vcpus: Vec<VcpuHandle>, exit: Arc<ExitSignal>, metrics: VmMetrics) -> Self {
        VmControl {
            nvcpus: vcpus.len(),
            vcpus: Mutex::new(vcpus),
            state: Mutex::new(VmState::Running),
            started: Instant::now(),
            exit,
            metrics,
        }
    }

    /// Takes the vCPU handles out (to finish them); later pause/resume fail.
    pub fn take_vcpus(&self) -> Vec<VcpuHandle> {
        *self.state.lock().expect("control state lock") = VmState::Stopping;
        std::mem::take(&mut *self.vcpus.lock().expect("vcpus lock"))
    }

    /// Current state.
    pub fn state(&self) -> VmState {
        if self.exit.get().is_some() {
            return VmState::Stopping;
        }
        *self.state.lock().expect("control state lock")
    }

    fn set_paused(&self, pause: bool) -> Result<VmState, String> {
        let op = if pause { "pause" } else { "resume" };
        if self.state() == VmState::Stopping {
            return Err(format!("cannot {op}: the VM is stopping"));
        }
        let vcpus = self.vcpus.lock().expect("vcpus lock");
        for h in vcpus.iter() {
            let acked = if pause { h.pause() } else { h.resume() };
            if !acked {
                return Err(format!(
                    "vCPU {} did not acknowledge {op} within 1 s",
                    h.id()
                ));
            }
        }
        let new = if pause {
            VmState::Paused
        } else {
            VmState::Running
        };
        *self.state.lock().expect("control state lock") = new;
        tracing::info!(state = new.as_str(), "VM {op}d over the control socket");
        Ok(new)
    }

    /// Handles one request line; returns the reply.
    pub fn handle(&self, line: &[u8]) -> Value {
        match self.dispatch(line) {
            Ok(mut v) => {
                v["ok"] = Value::Bool(true);
                v
            }
            Err(e) => json!({ "ok": false, "error": e }),
        }
    }

    fn dispatch(&self, line: &[u8]) -> Result<Value, String> {
        let req: Value =
            serde_json::from_slice(line).map_err(|e| format!("request is not valid JSON: {e}"))?;
        let obj = req.as_object().ok_or_else(|| {
            format!("request must be a JSON object like {{\"op\":\"status\"}}, got {req}")
        })?;
        if let Some(k) = obj.keys().find(|k| k.as_str() != "op") {
            return Err(format!("unknown field {k:?}: requests have only \"op\""));
        }
        let op = match obj.get("op") {
            Some(Value::String(s)) => s.as_str(),
            Some(other) => return Err(format!("\"op\" must be a string, got {other}")),
            None => {
                return Err(format!(
                    "missing \"op\": expected one of {}",
                    OPS.join(", ")
                ))
            }
        };
        match op {
            "status" => Ok(json!({
                "state": self.state().as_str(),
                "uptime_ms": self.started.elapsed().as_millis() as u64,
                "vcpus": self.nvcpus,
            })),
            "metrics" => Ok(json!({ "metrics": self.metrics.to_json() })),
            "pause" => self
                .set_paused(true)
                .map(|s| json!({ "state": s.as_str() })),
            "resume" => self
                .set_paused(false)
                .map(|s| json!({ "state": s.as_str() })),
            "shutdown" => {
                tracing::info!("shutdown requested over the control socket");
                self.exit.set(ExitReason::Stopped);
                Ok(json!({
                    "state": VmState::Stopping.as_str(),
                    "exit_code": ExitReason::Stopped.exit_code(),
                }))
            }
            other => Err(format!(
                "unknown op {other:?}: expected one of {}",
                OPS.join(", ")
            )),
        }
    }
}

struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

/// The control socket's event-loop subscriber.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    conns: HashMap<RawFd, Conn>,
    vm: Option<Arc<VmControl>>,
}

impl ControlServer {
    /// Binds `path` (replacing a stale socket; any other file there is an
    /// error). Requests get an error reply until [`Self::attach`].
    pub fn bind(path: &Path) -> Result<Self, ControlError> {
        if let Ok(m) = std::fs::symlink_metadata(path) {
            if !m.file_type().is_socket() {
                return Err(ControlError::NotASocket(path.to_path_buf()));
            }
            let _ = std::fs::remove_file(path);
        }
        let listener =
            UnixListener::bind(path).map_err(|e| ControlError::Bind(path.to_path_buf(), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| ControlError::Bind(path.to_path_buf(), e))?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            conns: HashMap::new(),
            vm: None,
        })
    }

    /// Connects the server to the running VM.
    pub fn attach(&mut self, vm: Arc<VmControl>) {
        self.vm = Some(vm);
    }

    fn reply(&self, line: &[u8]) -> Value {
        match &self.vm {
            Some(vm) => vm.handle(line),
            None => json!({"ok": false, "error": "the VM is not running yet"}),
        }
    }

    fn accept(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if self.conns.len() >= MAX_CONNECTIONS {
                        tracing::warn!(
                            max = MAX_CONNECTIONS,
                            "too many control connections; closing a new one"
                        );
                        continue;
                    }
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) = ops.add(Events::new(&stream, EventSet::IN)) {
                        tracing::warn!(error = ?e, "cannot watch a control connection");
                        continue;
                    }
                    self.conns.insert(
                        fd,
                        Conn {
                            stream,
                            buf: Vec::new(),
                        },
                    );
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    return;
                }
            }
        }
    }

    /// Reads what `fd` has; answers every complete line. False: close it.
    fn serve(&mut self, fd: RawFd) -> bool {
        let Some(mut conn) = self.conns.remove(&fd) else {
            return false;
        };
        let mut chunk = [0u8; 1024];
        let keep = loop {
            match conn.stream.read(&mut chunk) {
                Ok(0) => break false,
                Ok(n) => conn.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break true,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break false,
            }
            if conn.buf.len() > MAX_REQUEST_LEN * 4 {
                break true;
            }
        };
        let mut ok = keep;
        while let Some(pos) = conn.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = conn.buf.drain(..=pos).collect();
            let line = &line[..line.len() - 1];
            let reply = if line.len() >= MAX_REQUEST_LEN {
                ok = false;
                json!({"ok": false, "error": format!("request is {} bytes long, the limit is {}", line.len() + 1, MAX_REQUEST_LEN)})
            } else if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            } else {
                self.reply(line)
            };
            let mut out = reply.to_string().into_bytes();
            out.push(b'\n');
            if !write_reply(&mut conn.stream, &out) {
                return false;
            }
            if !ok {
                break;
            }
        }
        if ok && conn.buf.len() >= MAX_REQUEST_LEN {
            let msg = json!({"ok": false, "error": format!("request is longer than {MAX_REQUEST_LEN} bytes without a newline")});
            let _ = write_reply(&mut conn.stream, format!("{msg}\n").as_bytes());
            ok = false;
        }
        if ok {
            self.conns.insert(fd, conn);
        }
        ok
    }
}

/// Writes a whole reply to a non-blocking stream; gives up (false) if the
/// client does not read for 1 s.
fn write_reply(stream: &mut UnixStream, mut out: &[u8]) -> bool {
    let deadline = Instant::now() + std::time::Duration::from_secs(1);
    while !out.is_empty() {
        match stream.write(out) {
            Ok(0) => return false,
            Ok(n) => out = &out[n..],
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                if Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
    true
}

impl MutEventSubscriber for ControlServer {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.listener, EventSet::IN)) {
            tracing::error!(error = ?e, "failed to watch the control socket");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.listener.as_raw_fd() {
            self.accept(ops);
            return;
        }
        let closed = events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP);
        let readable = events.event_set().contains(EventSet::IN);
        if (readable && self.serve(fd)) || (!readable && !closed) {
            return;
        }
        // Closed (or served and told to close): forget it.
        let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
        self.conns.remove(&fd);
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use event_manager::SubscriberOps;
    use std::io::{BufRead, BufReader};

    fn vm() -> Arc<VmControl> {
        let exit = Arc::new(ExitSignal::new().expect("exit"));
        Arc::new(VmControl::new(Vec::new(), exit, VmMetrics::default()))
    }

    #[test]
    fn requests_and_error_replies() {
        let vm = vm();
        let r = vm.handle(br#"{"op":"status"}"#);
        assert_eq!(r["ok"], true);
        assert_eq!(r["state"], "running");
        assert_eq!(r["vcpus"], 0);
        assert!(r["uptime_ms"].is_u64());
        let r = vm.handle(br#"{"op":"metrics"}"#);
        assert!(r["metrics"]["devices"].is_object(), "{r}");
        // With no vCPUs, pause/resume just change the state.
        assert_eq!(vm.handle(br#"{"op":"pause"}"#)["state"], "paused");
        assert_eq!(vm.handle(br#"{"op":"status"}"#)["state"], "paused");
        assert_eq!(vm.handle(br#"{"op":"resume"}"#)["state"], "running");

        for (req, want) in [
            (&b"nope"[..], "request is not valid JSON"),
            (b"[1]", "request must be a JSON object"),
            (
                b"{}",
                "missing \"op\": expected one of shutdown, pause, resume, status, metrics",
            ),
            (br#"{"op":1}"#, "\"op\" must be a string, got 1"),
            (
                br#"{"op":"reboot"}"#,
                "unknown op \"reboot\": expected one of shutdown",
            ),
            (br#"{"op":"status","x":1}"#, "unknown field \"x\""),
        ] {
            let r = vm.handle(req);
            assert_eq!(r["ok"], false, "{r}");
            let e = r["error"].as_str().expect("error string");
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }

        let r = vm.handle(br#"{"op":"shutdown"}"#);
        assert_eq!(r["ok"], true);
        assert_eq!(r["exit_code"], 0);
        assert_eq!(vm.exit.get(), Some(ExitReason::Stopped));
        assert_eq!(vm.handle(br#"{"op":"status"}"#)["state"], "stopping");
        let r = vm.handle(br#"{"op":"pause"}"#);
        assert!(
            r["error"].as_str().expect("err").contains("stopping"),
            "{r}"
        );
    }

    #[test]
    fn served_on_an_event_loop() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        std::fs::write(&path, "").expect("file");
        assert!(matches!(
            ControlServer::bind(&path),
            Err(ControlError::NotASocket(_))
        ));
        std::fs::remove_file(&path).expect("rm");
        let _stale = UnixListener::bind(&path).expect("stale socket");
        let mut server = ControlServer::bind(&path).expect("bind over a stale socket");
        let vm = vm();
        server.attach(vm.clone());
        let server = Arc::new(Mutex::new(server));
        let mut em =
            event_manager::EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
                .expect("em");
        em.add_subscriber(server.clone());

        type Em = event_manager::EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>>;
        struct Client {
            w: UnixStream,
            r: BufReader<UnixStream>,
        }
        impl Client {
            fn new(path: &Path) -> Self {
                let w = UnixStream::connect(path).expect("connect");
                w.set_nonblocking(true).expect("nb");
                let r = BufReader::new(w.try_clone().expect("clone"));
                Client { w, r }
            }
            /// One reply line, or None at EOF.
            fn read(&mut self, em: &mut Em) -> Option<Value> {
                let mut line = String::new();
                for _ in 0..100 {
                    em.run_with_timeout(20).expect("loop");
                    match self.r.read_line(&mut line) {
                        Ok(0) => return None,
                        Ok(_) if line.ends_with('\n') => {
                            return Some(serde_json::from_str(&line).expect("reply is JSON"))
                        }
                        _ => {}
                    }
                }
                panic!("no reply");
            }
            fn ask(&mut self, em: &mut Em, req: &[u8]) -> Value {
                self.w.write_all(req).expect("write");
                self.read(em).expect("reply")
            }
        }
        let mut c = Client::new(&path);
        assert_eq!(c.ask(&mut em, b"{\"op\":\"status\"}\n")["state"], "running");
        assert_eq!(c.ask(&mut em, b"garbage\n")["ok"], false);
        // Two requests in one write, two replies, in order.
        let v = c.ask(&mut em, b"{\"op\":\"pause\"}\n{\"op\":\"resume\"}\n");
        assert_eq!(v["state"], "paused");
        assert_eq!(c.read(&mut em).expect("second reply")["state"], "running");
        // Oversized line: error, then the connection is closed.
        let mut big = vec![b' '; MAX_REQUEST_LEN + 10];
        big.push(b'\n');
        let v = c.ask(&mut em, &big);
        assert!(
            v["error"].as_str().expect("err").contains("limit is 4096"),
            "{v}"
        );
        assert_eq!(c.read(&mut em), None);
        // A new client can still shut the VM down.
        let mut c = Client::new(&path);
        assert_eq!(c.ask(&mut em, b"{\"op\":\"shutdown\"}\n")["exit_code"], 0);
        assert_eq!(vm.exit.get(), Some(ExitReason::Stopped));
        drop(em);
        drop(server);
        assert!(!path.exists(), "socket removed on drop");
    }
}
