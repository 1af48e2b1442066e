//! The control socket: a unix socket (`control_socket` in the VM config)
//! served on the VMM event loop.
//!
//! The messages — requests, replies, the metrics — are the contract
//! crate's, `boxlite_vmm_api::control` (the runtime's client uses the same
//! types). Newline-delimited JSON, one request per line, one reply line per
//! request, any number of requests per connection:
//!
//! | request | reply (besides `"ok": true`) |
//! |---|---|
//! | `{"op":"status"}` | `"state": "running"\|"paused"\|"restored"\|"stopping"`, `"uptime_ms"`, `"vcpus"` |
//! | `{"op":"pause"}` | `"state": "paused"` once every vCPU acknowledged (≤ 1 s each) |
//! | `{"op":"resume"}` | `"state": "running"` |
//! | `{"op":"metrics"}` | `"metrics": {"vcpus": […], "devices": {…}}` (see [`crate::metrics`]) |
//! | `{"op":"shutdown"}` | `"state": "stopping"`, `"exit_code": 0`; then the vCPUs are stopped and the process exits with 0 |
//! | `{"op":"balloon"}`, `{"op":"balloon","target_mib":N}` | `"balloon": {"target_mib", "actual_mib"}`; with `target_mib`, the target is set first and the guest told (configuration-change interrupt) |
//! | `{"op":"snapshot","state_file":F,"memory_file":M}` | `"state": "paused"`, `"snapshot": {"id", "state_bytes", "memory_bytes", "memory_data_bytes", "took_ms"}`: the paused VM saved into two new files in `snapshot_dir` ([`crate::snapshot::save`]) |
//! | `{"op":"restore"}`, `{"op":"restore","snapshot_id":ID}` | `"state": "running"`, `"restore": {"id", "memory_mode", "setup_us", "took_us"}`: a VM started from a snapshot (`restore` in its config; state `restored` until then) runs for the first time |
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
use std::time::{Duration, Instant};

pub use boxlite_vmm_api::control::{
    BalloonState, Reply, Request, RestoreInfo, SnapshotInfo, VmState,
};
use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use crate::config::MemoryMode;
use crate::device_manager::DeviceManager;
use crate::devices::virtio::balloon::{Balloon, PAGES_PER_MIB};
use crate::metrics::VmMetrics;
use crate::snapshot::save::{save_vm, SaveParts, SaveTarget};
use crate::snapshot::SnapshotId;
use crate::vstate::memory::GuestRam;
use crate::vstate::vcpu::{ExitReason, ExitSignal, VcpuHandle};
use crate::vstate::vm::Vm;

/// Longest request line, newline included.
pub const MAX_REQUEST_LEN: usize = 4096;
/// Most control connections at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 16;

/// Errors of setting up the control socket.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("Control socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    #[error("Failed to bind the control socket {0}")]
    Bind(PathBuf, #[source] std::io::Error),
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
    /// The balloon, if the VM has one, and the guest memory it is part of.
    balloon: Option<Arc<Mutex<Balloon>>>,
    memory_mib: u32,
    /// What the `snapshot` op reads, if the config has a `snapshot_dir`.
    snapshots: Option<SnapshotCtx>,
    /// For a VM started from a snapshot: what the `restore` op needs.
    restored: Option<RestoreCtx>,
}

/// A VM rebuilt from a snapshot, waiting for the `restore` op.
pub struct RestoreCtx {
    /// The snapshot it was rebuilt from.
    pub id: SnapshotId,
    /// How its RAM was made (`Private` or `Copy`).
    pub memory_mode: MemoryMode,
    /// Its devices, to wake before the first run.
    pub devices: Arc<DeviceManager>,
    /// From the VMM's start to the VM ready to run.
    pub setup_us: u64,
}

/// What the `snapshot` op needs of the VM besides its vCPUs: the KVM VM,
/// its RAM and devices, and the directory the files go to, opened before
/// the jail.
pub struct SnapshotCtx {
    pub vm: Arc<Vm>,
    pub ram: Arc<GuestRam>,
    pub devices: Arc<DeviceManager>,
    pub dir: std::os::fd::OwnedFd,
    /// `dir`'s path, for messages (in the jail it no longer resolves).
    pub dir_path: PathBuf,
    /// The MSRs each vCPU's state includes (`vcpu_state::saveable_msrs`).
    pub msr_indices: Arc<[u32]>,
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
            balloon: None,
            memory_mib: 0,
            snapshots: None,
            restored: None,
        }
    }

    /// Marks the VM as rebuilt from a snapshot (`ctx`): it starts in state
    /// `restored`, its vCPUs paused, and runs on the `restore` op.
    pub fn restored_from(mut self, ctx: Option<RestoreCtx>) -> Self {
        if ctx.is_some() {
            *self.state.get_mut().expect("control state lock") = VmState::Restored;
        }
        self.restored = ctx;
        self
    }

    /// Runs the restored VM for the first time: wakes its devices, then
    /// resumes every vCPU. Only once, and only in state `restored`; with
    /// `expected`, only if that is the snapshot it came from.
    fn restore(&self, expected: Option<&str>) -> Result<RestoreInfo, String> {
        let begun = Instant::now();
        let Some(ctx) = &self.restored else {
            return Err(format!(
                "restore: this VM was not started from a snapshot (it is {})",
                self.state()
            ));
        };
        match self.state() {
            VmState::Restored => {}
            VmState::Stopping => return Err("restore: the VM is stopping".into()),
            _ => return Err("restore: already done; the VM has run since".into()),
        }
        let id = ctx.id.to_string();
        if let Some(want) = expected.filter(|want| !want.eq_ignore_ascii_case(&id)) {
            return Err(format!(
                "restore: expected snapshot {want}, this VM was restored from {id}"
            ));
        }
        ctx.devices.wake_after_restore().map_err(|e| {
            format!(
                "restore: cannot wake the devices: {}",
                boxlite_protocol::error_chain::chain(&e)
            )
        })?;
        self.switch_vcpus(false)?;
        let info = RestoreInfo {
            id,
            memory_mode: ctx.memory_mode.as_str().to_owned(),
            setup_us: ctx.setup_us,
            took_us: u64::try_from(begun.elapsed().as_micros()).unwrap_or(u64::MAX),
        };
        tracing::info!(
            snapshot = %info.id,
            memory_mode = %info.memory_mode,
            setup_us = info.setup_us,
            took_us = info.took_us,
            "restored VM running"
        );
        Ok(info)
    }

    /// Lets the `snapshot` op save this VM as `ctx` describes.
    pub fn with_snapshots(mut self, ctx: Option<SnapshotCtx>) -> Self {
        self.snapshots = ctx;
        self
    }

    /// Saves the paused VM into `state_file` and `memory_file` in the
    /// snapshot directory; it stays paused.
    fn snapshot(&self, state_file: &str, memory_file: &str) -> Result<SnapshotInfo, String> {
        let Some(ctx) = &self.snapshots else {
            return Err("this VM takes no snapshots (no \"snapshot_dir\" in its config)".into());
        };
        match self.state() {
            VmState::Paused => {}
            state => {
                return Err(format!(
                    "snapshot needs a paused VM (send {{\"op\":\"pause\"}} first); it is {state}"
                ))
            }
        }
        let vcpus = self.vcpus.lock().expect("vcpus lock");
        let parts = SaveParts {
            vm: ctx.vm.fd(),
            irqchip: ctx.vm.has_irqchip(),
            vcpus: &vcpus,
            msr_indices: ctx.msr_indices.clone(),
            devices: &ctx.devices,
            ram: &ctx.ram,
            memory_mib: u64::from(self.memory_mib),
        };
        let target = SaveTarget {
            dir: std::os::fd::AsFd::as_fd(&ctx.dir),
            dir_path: &ctx.dir_path,
            state_file,
            memory_file,
        };
        let saved = save_vm(&parts, &target).map_err(|e| {
            let msg = format!(
                "snapshot failed: {}",
                boxlite_protocol::error_chain::chain(&e)
            );
            tracing::warn!(error = %msg, "snapshot refused or failed");
            msg
        })?;
        Ok(SnapshotInfo {
            id: saved.id.to_string(),
            state_bytes: saved.state_bytes,
            memory_bytes: saved.memory_bytes,
            memory_data_bytes: saved.memory_data_bytes,
            took_ms: saved.took_ms,
        })
    }

    /// Gives the `balloon` op the VM's balloon, in a guest of `memory_mib`.
    pub fn with_balloon(mut self, balloon: Option<Arc<Mutex<Balloon>>>, memory_mib: u32) -> Self {
        self.balloon = balloon;
        self.memory_mib = memory_mib;
        self
    }

    /// Sets the balloon's target if asked, then reports it with what the
    /// guest holds. The target must leave the guest some memory; `actual`
    /// is the guest's word, reported as it is (at most the guest's memory).
    fn balloon(&self, target_mib: Option<u32>) -> Result<BalloonState, String> {
        let Some(balloon) = &self.balloon else {
            return Err("this VM has no balloon (no \"balloon\" in its config)".into());
        };
        let mut b = balloon.lock().expect("balloon lock");
        if let Some(target) = target_mib {
            if target >= self.memory_mib {
                return Err(format!(
                    "balloon target {target} MiB would leave the guest nothing of its \
                     {} MiB",
                    self.memory_mib
                ));
            }
            b.set_target_pages(target * PAGES_PER_MIB)
                .map_err(|e| format!("cannot tell the guest the new balloon target: {e}"))?;
            tracing::info!(
                target_mib = target,
                "balloon target set over the control socket"
            );
        }
        Ok(BalloonState {
            target_mib: b.target_pages() / PAGES_PER_MIB,
            actual_mib: (b.actual_pages() / PAGES_PER_MIB).min(self.memory_mib),
        })
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
        match self.state() {
            VmState::Stopping => return Err(format!("cannot {op}: the VM is stopping")),
            // Only `restore` runs it first: it wakes the devices too.
            VmState::Restored => {
                return Err(format!(
                    "cannot {op}: the VM was restored from a snapshot and has not run yet; send \
                     {{\"op\":\"restore\"}}"
                ))
            }
            _ => {}
        }
        self.switch_vcpus(pause)
    }

    /// Pauses or resumes every vCPU and records the new state.
    fn switch_vcpus(&self, pause: bool) -> Result<VmState, String> {
        let op = if pause { "pause" } else { "resume" };
        let vcpus = self.vcpus.lock().expect("vcpus lock");
        if pause {
            // Every vCPU is asked before any is waited for: the guest stops
            // as a whole, not one vCPU per kick round trip.
            for h in vcpus.iter() {
                h.request_pause();
            }
        }
        for h in vcpus.iter() {
            let acked = if pause {
                h.wait_paused(Duration::from_secs(1))
            } else {
                h.resume()
            };
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
    pub fn handle(&self, line: &[u8]) -> Reply {
        let request = match Request::from_line(line) {
            Ok(r) => r,
            Err(e) => {
                return Reply::Error {
                    error: e.to_string(),
                }
            }
        };
        let state = |r: Result<VmState, String>| match r {
            Ok(state) => Reply::State { state },
            Err(error) => Reply::Error { error },
        };
        match request {
            Request::Status => Reply::Status {
                state: self.state(),
                uptime_ms: u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
                vcpus: u32::try_from(self.nvcpus).unwrap_or(u32::MAX),
            },
            Request::Metrics => Reply::Metrics {
                metrics: self.metrics.snapshot(),
            },
            Request::Balloon { target_mib } => match self.balloon(target_mib) {
                Ok(balloon) => Reply::Balloon { balloon },
                Err(error) => Reply::Error { error },
            },
            Request::Snapshot {
                state_file,
                memory_file,
            } => match self.snapshot(&state_file, &memory_file) {
                Ok(snapshot) => Reply::Snapshot {
                    state: VmState::Paused,
                    snapshot,
                },
                Err(error) => Reply::Error { error },
            },
            Request::Restore { snapshot_id } => match self.restore(snapshot_id.as_deref()) {
                Ok(restore) => Reply::Restored {
                    state: VmState::Running,
                    restore,
                },
                Err(error) => Reply::Error { error },
            },
            Request::Pause => state(self.set_paused(true)),
            Request::Resume => state(self.set_paused(false)),
            Request::Shutdown => {
                tracing::info!("shutdown requested over the control socket");
                self.exit.set(ExitReason::Stopped);
                Reply::Shutdown {
                    state: VmState::Stopping,
                    exit_code: ExitReason::Stopped.exit_code(),
                }
            }
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

    fn reply(&self, line: &[u8]) -> Reply {
        match &self.vm {
            Some(vm) => vm.handle(line),
            None => Reply::Error {
                error: "the VM is not running yet".into(),
            },
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
    /// The connection stays in the table either way: its stream (and so
    /// its fd) must outlive its removal from the event loop, or the
    /// removal fails on a closed fd and the loop keeps the fd number
    /// registered, refusing the next connection that gets it.
    fn serve(&mut self, fd: RawFd) -> bool {
        let Some(mut conn) = self.conns.remove(&fd) else {
            return false;
        };
        let keep = self.serve_conn(&mut conn);
        self.conns.insert(fd, conn);
        keep
    }

    fn serve_conn(&self, conn: &mut Conn) -> bool {
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
                Reply::Error {
                    error: format!(
                        "request is {} bytes long, the limit is {}",
                        line.len() + 1,
                        MAX_REQUEST_LEN
                    ),
                }
            } else if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            } else {
                self.reply(line)
            };
            if !write_reply(&mut conn.stream, reply.to_line().as_bytes()) {
                return false;
            }
            if !ok {
                break;
            }
        }
        if ok && conn.buf.len() >= MAX_REQUEST_LEN {
            let msg = Reply::Error {
                error: format!("request is longer than {MAX_REQUEST_LEN} bytes without a newline"),
            };
            let _ = write_reply(&mut conn.stream, msg.to_line().as_bytes());
            ok = false;
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
        // Closed (or served and told to close): out of the event loop
        // while its fd is still open, then closed.
        if let Err(e) = ops.remove(Events::new_raw(fd, EventSet::IN)) {
            tracing::warn!(error = ?e, "cannot stop watching a control connection");
        }
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

    fn balloon_state(r: Reply) -> BalloonState {
        match r {
            Reply::Balloon { balloon } => balloon,
            other => panic!("not a balloon reply: {other:?}"),
        }
    }

    #[test]
    fn the_balloon_op_sets_the_target_and_reports_the_guests_actual() {
        use crate::devices::virtio::VirtioDevice;
        let balloon = Arc::new(Mutex::new(Balloon::new(false, true)));
        let exit = Arc::new(ExitSignal::new().expect("exit"));
        let vm = VmControl::new(Vec::new(), exit, VmMetrics::default())
            .with_balloon(Some(balloon.clone()), 1024);
        let query = || Request::Balloon { target_mib: None };
        assert_eq!(
            balloon_state(ask(&vm, query())),
            BalloonState {
                target_mib: 0,
                actual_mib: 0
            }
        );
        let set = |mib| Request::Balloon {
            target_mib: Some(mib),
        };
        assert_eq!(balloon_state(ask(&vm, set(512))).target_mib, 512);
        assert_eq!(balloon.lock().unwrap().target_pages(), 512 * 256);
        // The driver writes `actual` (bytes 4..8 of the config space).
        let pages: u32 = 300 * 256 + 17;
        balloon
            .lock()
            .unwrap()
            .write_config(4, &pages.to_le_bytes())
            .unwrap();
        assert_eq!(
            balloon_state(ask(&vm, query())),
            BalloonState {
                target_mib: 512,
                actual_mib: 300
            }
        );
        // A guest claiming more than it has is reported as holding it all.
        balloon
            .lock()
            .unwrap()
            .write_config(4, &u32::MAX.to_le_bytes())
            .unwrap();
        assert_eq!(balloon_state(ask(&vm, query())).actual_mib, 1024);
        assert_eq!(
            error(ask(&vm, set(1024))),
            "balloon target 1024 MiB would leave the guest nothing of its 1024 MiB"
        );
        assert_eq!(balloon.lock().unwrap().target_pages(), 512 * 256);
        assert_eq!(
            error(ask(&self::vm(), query())),
            "this VM has no balloon (no \"balloon\" in its config)"
        );
    }

    fn ask(vm: &VmControl, r: Request) -> Reply {
        vm.handle(r.to_line().trim_end().as_bytes())
    }

    fn state(r: Reply) -> VmState {
        match r {
            Reply::State { state } => state,
            other => panic!("not a state reply: {other:?}"),
        }
    }

    fn error(r: Reply) -> String {
        match r {
            Reply::Error { error } => error,
            other => panic!("not an error reply: {other:?}"),
        }
    }

    #[test]
    fn requests_and_error_replies() {
        let vm = vm();
        let Reply::Status {
            state: VmState::Running,
            vcpus: 0,
            ..
        } = ask(&vm, Request::Status)
        else {
            panic!("status");
        };
        let Reply::Metrics { metrics } = ask(&vm, Request::Metrics) else {
            panic!("metrics");
        };
        assert!(metrics.devices.is_empty() && metrics.vcpus.is_empty());
        // With no vCPUs, pause/resume just change the state.
        assert_eq!(state(ask(&vm, Request::Pause)), VmState::Paused);
        assert_eq!(vm.state(), VmState::Paused);
        assert_eq!(state(ask(&vm, Request::Resume)), VmState::Running);

        // Malformed lines: the contract crate's parser says what is wrong
        // (its own tests check every message); the VMM passes it on.
        for (req, want) in [
            (&b"nope"[..], "request is not valid JSON"),
            (
                br#"{"op":"reboot"}"#,
                "unknown op \"reboot\": expected one of shutdown",
            ),
        ] {
            let e = error(vm.handle(req));
            assert!(e.contains(want), "{e:?} lacks {want:?}");
        }

        assert_eq!(
            ask(&vm, Request::Shutdown),
            Reply::Shutdown {
                state: VmState::Stopping,
                exit_code: 0
            }
        );
        assert_eq!(vm.exit.get(), Some(ExitReason::Stopped));
        let Reply::Status {
            state: VmState::Stopping,
            ..
        } = ask(&vm, Request::Status)
        else {
            panic!("stopping");
        };
        let e = error(ask(&vm, Request::Pause));
        assert!(e.contains("cannot pause: the VM is stopping"), "{e}");
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
            fn read(&mut self, em: &mut Em) -> Option<Reply> {
                let mut line = String::new();
                for _ in 0..100 {
                    em.run_with_timeout(20).expect("loop");
                    match self.r.read_line(&mut line) {
                        Ok(0) => return None,
                        Ok(_) if line.ends_with('\n') => {
                            return Some(Reply::from_line(&line).expect("reply is a Reply"))
                        }
                        _ => {}
                    }
                }
                panic!("no reply");
            }
            fn send(&mut self, em: &mut Em, bytes: &[u8]) -> Reply {
                self.w.write_all(bytes).expect("write");
                self.read(em).expect("reply")
            }
            fn ask(&mut self, em: &mut Em, r: Request) -> Reply {
                self.send(em, r.to_line().as_bytes())
            }
        }
        let mut c = Client::new(&path);
        assert!(matches!(
            c.ask(&mut em, Request::Status),
            Reply::Status {
                state: VmState::Running,
                ..
            }
        ));
        assert!(matches!(c.send(&mut em, b"garbage\n"), Reply::Error { .. }));
        // Two requests in one write, two replies, in order.
        let two = Request::Pause.to_line() + &Request::Resume.to_line();
        assert_eq!(state(c.send(&mut em, two.as_bytes())), VmState::Paused);
        assert_eq!(
            state(c.read(&mut em).expect("second reply")),
            VmState::Running
        );
        // Oversized line: error, then the connection is closed.
        let mut big = vec![b' '; MAX_REQUEST_LEN + 10];
        big.push(b'\n');
        let e = error(c.send(&mut em, &big));
        assert!(e.contains("limit is 4096"), "{e}");
        assert_eq!(c.read(&mut em), None);
        // One connection per request, one after the other, as the runtime
        // asks: each closed connection leaves the event loop before its fd
        // is closed, so the next one, which gets the same fd number, is
        // watched and answered (it was refused: FdAlreadyRegistered).
        for _ in 0..5 {
            let mut c = Client::new(&path);
            assert!(matches!(
                c.ask(&mut em, Request::Status),
                Reply::Status { .. }
            ));
            drop(c);
            em.run_with_timeout(20).expect("loop");
        }
        // A new client can still shut the VM down.
        let mut c = Client::new(&path);
        assert!(matches!(
            c.ask(&mut em, Request::Shutdown),
            Reply::Shutdown { exit_code: 0, .. }
        ));
        assert_eq!(vm.exit.get(), Some(ExitReason::Stopped));
        drop(em);
        drop(server);
        assert!(!path.exists(), "socket removed on drop");
    }
}
