//! The control socket's messages (`control_socket` in the VM config).
//!
//! Newline-delimited JSON, one request per line, one reply line per
//! request, any number of requests per connection:
//!
//! | [`Request`] | line | [`Reply`] on success |
//! |---|---|---|
//! | `Status` | `{"op":"status"}` | [`Reply::Status`]: `"state"`, `"uptime_ms"`, `"vcpus"` |
//! | `Pause` | `{"op":"pause"}` | [`Reply::State`]: `"state": "paused"` once every vCPU acknowledged |
//! | `Resume` | `{"op":"resume"}` | [`Reply::State`]: `"state": "running"` |
//! | `Metrics` | `{"op":"metrics"}` | [`Reply::Metrics`]: `"metrics": {"vcpus": […], "devices": {…}}` |
//! | `Shutdown` | `{"op":"shutdown"}` | [`Reply::Shutdown`]: `"state": "stopping"`, `"exit_code": 0` |
//! | `Balloon` | `{"op":"balloon"}`, `{"op":"balloon","target_mib":N}` | [`Reply::Balloon`]: `"balloon": {"target_mib", "actual_mib"}` |
//! | `Snapshot` | `{"op":"snapshot","state_file":"vm.state","memory_file":"vm.mem"}` | [`Reply::Snapshot`]: `"state": "paused"`, `"snapshot": {"id", "state_bytes", "memory_bytes", "memory_data_bytes", "took_ms"}` |
//! | `Restore` | `{"op":"restore"}`, `{"op":"restore","snapshot_id":"5f0c…"}` | [`Reply::Restored`]: `"state": "running"`, `"restore": {"id", "memory_mode", "setup_us", "took_us"}` |
//!
//! Every reply carries `"ok"`: `true` with the fields above, or `false`
//! with `"error"` ([`Reply::Error`]). The server's limits (line length,
//! connections) are the VMM's (`boxlite_vmm::control`).

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// One control request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", try_from = "serde_json::Value")]
pub enum Request {
    /// Stop the vCPUs and exit with code 0 (no ACPI: the guest is not asked;
    /// a graceful guest shutdown goes through the agent).
    Shutdown,
    /// Pause every vCPU.
    Pause,
    /// Resume paused vCPUs.
    Resume,
    /// State, uptime and vCPU count.
    Status,
    /// Every counter of the VM.
    Metrics,
    /// The balloon: with `target_mib`, sets how much of the guest's memory
    /// the host wants it to hold (the guest inflates or deflates to it);
    /// either way, replies with the target and what the guest holds now.
    Balloon {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        target_mib: Option<u32>,
    },
    /// Save the paused VM into two new files in the VMM's `snapshot_dir`
    /// (plain file names); the VM stays paused.
    Snapshot {
        state_file: String,
        memory_file: String,
    },
    /// Run a VM started from a snapshot (state `restored`) for the first
    /// time. With `snapshot_id`, only if that is the snapshot it was
    /// restored from.
    Restore {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        snapshot_id: Option<String>,
    },
}

/// Every op name, in the order error messages list them.
pub const OPS: [&str; 8] = [
    "shutdown", "pause", "resume", "status", "metrics", "balloon", "snapshot", "restore",
];

impl Request {
    /// The `op` name.
    pub fn as_str(&self) -> &'static str {
        match self {
            Request::Shutdown => "shutdown",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Status => "status",
            Request::Metrics => "metrics",
            Request::Balloon { .. } => "balloon",
            Request::Snapshot { .. } => "snapshot",
            Request::Restore { .. } => "restore",
        }
    }

    /// The fields an op takes besides `op`.
    fn fields(op: &str) -> &'static [&'static str] {
        match op {
            "balloon" => &["target_mib"],
            "snapshot" => &["state_file", "memory_file"],
            "restore" => &["snapshot_id"],
            _ => &[],
        }
    }

    /// The request line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("requests have string keys only");
        s.push('\n');
        s
    }

    /// Parses one request line (without its newline). The errors say what
    /// was wrong in words a person typing at the socket understands.
    pub fn from_line(line: &[u8]) -> Result<Request, RequestError> {
        let v: Value =
            serde_json::from_slice(line).map_err(|e| RequestError::NotJson(e.to_string()))?;
        Request::try_from(v)
    }
}

impl fmt::Display for Request {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The op names, comma-separated, for error messages.
fn op_list() -> String {
    OPS.join(", ")
}

/// Why a request line was refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// Not JSON at all (the parser's message).
    NotJson(String),
    /// JSON, but not an object (the value).
    NotAnObject(String),
    /// A field the op does not take: (op, field).
    UnknownField(String, String),
    /// A field of the right name with a value it cannot have: (field,
    /// what it must be, the value).
    BadField(&'static str, &'static str, String),
    /// A field the op needs is missing: (op, field).
    MissingField(&'static str, &'static str),
    /// `op` is missing.
    MissingOp,
    /// `op` is not a string (the value).
    OpNotAString(String),
    /// `op` names no request.
    UnknownOp(String),
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::NotJson(e) => write!(f, "request is not valid JSON: {e}"),
            RequestError::NotAnObject(v) => write!(
                f,
                "request must be a JSON object like {{\"op\":\"status\"}}, got {v}"
            ),
            RequestError::UnknownField(op, k) => match Request::fields(op) {
                [] => write!(f, "unknown field {k:?}: {op:?} takes only \"op\""),
                more => write!(
                    f,
                    "unknown field {k:?}: {op:?} takes \"op\" and {}",
                    more.iter()
                        .map(|m| format!("{m:?}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            },
            RequestError::BadField(k, must, v) => write!(f, "{k:?} must be {must}, got {v}"),
            RequestError::MissingField(op, k) => write!(f, "{op:?} needs {k:?}"),
            RequestError::MissingOp => write!(f, "missing \"op\": expected one of {}", op_list()),
            RequestError::OpNotAString(v) => write!(f, "\"op\" must be a string, got {v}"),
            RequestError::UnknownOp(op) => {
                write!(f, "unknown op {op:?}: expected one of {}", op_list())
            }
        }
    }
}

impl std::error::Error for RequestError {}

impl TryFrom<Value> for Request {
    type Error = RequestError;

    /// The one request parser: serde's `Deserialize` goes through it too.
    fn try_from(v: Value) -> Result<Request, RequestError> {
        let Value::Object(obj) = v else {
            return Err(RequestError::NotAnObject(v.to_string()));
        };
        let op = match obj.get("op") {
            Some(Value::String(s)) if OPS.contains(&s.as_str()) => s.as_str(),
            Some(Value::String(s)) => return Err(RequestError::UnknownOp(s.clone())),
            Some(other) => return Err(RequestError::OpNotAString(other.to_string())),
            None => return Err(RequestError::MissingOp),
        };
        let takes = Request::fields(op);
        if let Some(k) = obj
            .keys()
            .find(|k| k.as_str() != "op" && !takes.contains(&k.as_str()))
        {
            return Err(RequestError::UnknownField(op.to_owned(), k.clone()));
        }
        Ok(match op {
            "shutdown" => Request::Shutdown,
            "pause" => Request::Pause,
            "resume" => Request::Resume,
            "status" => Request::Status,
            "metrics" => Request::Metrics,
            "balloon" => Request::Balloon {
                target_mib: match obj.get("target_mib") {
                    None | Some(Value::Null) => None,
                    Some(v) => Some(v.as_u64().and_then(|n| u32::try_from(n).ok()).ok_or_else(
                        || {
                            RequestError::BadField(
                                "target_mib",
                                "a whole number of MiB below 2^32",
                                v.to_string(),
                            )
                        },
                    )?),
                },
            },
            "snapshot" => {
                let name = |field: &'static str| match obj.get(field) {
                    Some(Value::String(s)) => Ok(s.clone()),
                    Some(v) => Err(RequestError::BadField(
                        field,
                        "a file name (a string)",
                        v.to_string(),
                    )),
                    None => Err(RequestError::MissingField("snapshot", field)),
                };
                Request::Snapshot {
                    state_file: name("state_file")?,
                    memory_file: name("memory_file")?,
                }
            }
            "restore" => Request::Restore {
                snapshot_id: match obj.get("snapshot_id") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(s)) => Some(s.clone()),
                    Some(v) => {
                        return Err(RequestError::BadField(
                            "snapshot_id",
                            "a snapshot id (a string of hex digits)",
                            v.to_string(),
                        ))
                    }
                },
            },
            _ => unreachable!("every name in OPS is matched"),
        })
    }
}

/// What the VM is doing, as replies report it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmState {
    Running,
    Paused,
    Stopping,
    /// Rebuilt from a snapshot, not yet run: waits for `restore`.
    Restored,
}

impl VmState {
    /// The name on the wire.
    pub fn as_str(&self) -> &'static str {
        match self {
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Restored => "restored",
        }
    }
}

impl fmt::Display for VmState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One reply line. On the wire every reply is a flat object with `"ok"`;
/// which variant it is follows from the set of fields present.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "WireReply", into = "WireReply")]
pub enum Reply {
    /// `status`: `{"ok": true, "state", "uptime_ms", "vcpus"}`.
    Status {
        state: VmState,
        uptime_ms: u64,
        vcpus: u32,
    },
    /// `pause` and `resume`: `{"ok": true, "state"}`, the state reached.
    State { state: VmState },
    /// `shutdown`: `{"ok": true, "state": "stopping", "exit_code"}`, the
    /// code the VMM is about to exit with.
    Shutdown { state: VmState, exit_code: i32 },
    /// `metrics`: `{"ok": true, "metrics": {…}}`.
    Metrics { metrics: Metrics },
    /// `balloon`: `{"ok": true, "balloon": {"target_mib", "actual_mib"}}`.
    Balloon { balloon: BalloonState },
    /// `snapshot`: `{"ok": true, "state": "paused", "snapshot": {…}}`.
    Snapshot {
        state: VmState,
        snapshot: SnapshotInfo,
    },
    /// `restore`: `{"ok": true, "state": "running", "restore": {…}}`.
    Restored {
        state: VmState,
        restore: RestoreInfo,
    },
    /// Any refused request: `{"ok": false, "error": "<what was wrong>"}`.
    Error { error: String },
}

impl Reply {
    /// The reply line, newline included.
    pub fn to_line(&self) -> String {
        let mut s = serde_json::to_string(self).expect("replies have string keys only");
        s.push('\n');
        s
    }

    /// Parses one reply line (a trailing newline is allowed).
    pub fn from_line(line: &str) -> serde_json::Result<Reply> {
        serde_json::from_str(line)
    }
}

/// The balloon as the host set it and as the guest filled it, in MiB of
/// the guest's memory (the device counts 4 KiB pages; a partial MiB is
/// rounded down).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    /// How much the host wants the balloon to hold.
    pub target_mib: u32,
    /// How much the guest says it holds (its `actual`: guest input).
    pub actual_mib: u32,
}

/// What a `snapshot` wrote.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotInfo {
    /// The snapshot's id (32 hex digits), in both files' headers.
    pub id: String,
    /// The state file's length.
    pub state_bytes: u64,
    /// The memory file's length (a 4 KiB header page plus guest RAM)...
    pub memory_bytes: u64,
    /// ...of which this much is data; the rest are holes.
    pub memory_data_bytes: u64,
    /// How long the save took, the VM paused all along.
    pub took_ms: u64,
}

/// How a VM came back from its snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestoreInfo {
    /// The snapshot's id (32 hex digits).
    pub id: String,
    /// How its RAM was made from the memory file: `private` or `copy`.
    pub memory_mode: String,
    /// From the VMM's start to the VM ready to run (files read, memory
    /// mapped or copied, KVM state set, devices restored).
    pub setup_us: u64,
    /// The `restore` op itself: devices woken, vCPUs resumed.
    pub took_us: u64,
}

/// The flat wire form of a [`Reply`].
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireReply {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    state: Option<VmState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    uptime_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    vcpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    metrics: Option<Metrics>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    balloon: Option<BalloonState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    snapshot: Option<SnapshotInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    restore: Option<RestoreInfo>,
}

impl WireReply {
    fn ok() -> Self {
        WireReply {
            ok: true,
            error: None,
            state: None,
            uptime_ms: None,
            vcpus: None,
            exit_code: None,
            metrics: None,
            balloon: None,
            snapshot: None,
            restore: None,
        }
    }

    /// The names of the fields present, for an error message.
    fn fields(&self) -> String {
        [
            ("error", self.error.is_some()),
            ("state", self.state.is_some()),
            ("uptime_ms", self.uptime_ms.is_some()),
            ("vcpus", self.vcpus.is_some()),
            ("exit_code", self.exit_code.is_some()),
            ("metrics", self.metrics.is_some()),
            ("balloon", self.balloon.is_some()),
            ("snapshot", self.snapshot.is_some()),
            ("restore", self.restore.is_some()),
        ]
        .iter()
        .filter(|(_, present)| *present)
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
    }
}

impl From<Reply> for WireReply {
    fn from(r: Reply) -> Self {
        match r {
            Reply::Status {
                state,
                uptime_ms,
                vcpus,
            } => WireReply {
                state: Some(state),
                uptime_ms: Some(uptime_ms),
                vcpus: Some(vcpus),
                ..WireReply::ok()
            },
            Reply::State { state } => WireReply {
                state: Some(state),
                ..WireReply::ok()
            },
            Reply::Shutdown { state, exit_code } => WireReply {
                state: Some(state),
                exit_code: Some(exit_code),
                ..WireReply::ok()
            },
            Reply::Metrics { metrics } => WireReply {
                metrics: Some(metrics),
                ..WireReply::ok()
            },
            Reply::Balloon { balloon } => WireReply {
                balloon: Some(balloon),
                ..WireReply::ok()
            },
            Reply::Snapshot { state, snapshot } => WireReply {
                state: Some(state),
                snapshot: Some(snapshot),
                ..WireReply::ok()
            },
            Reply::Restored { state, restore } => WireReply {
                state: Some(state),
                restore: Some(restore),
                ..WireReply::ok()
            },
            Reply::Error { error } => WireReply {
                ok: false,
                error: Some(error),
                ..WireReply::ok()
            },
        }
    }
}

impl TryFrom<WireReply> for Reply {
    type Error = String;

    fn try_from(w: WireReply) -> Result<Reply, String> {
        let fields = w.fields();
        let reply = match w {
            WireReply {
                ok: false,
                error: Some(error),
                state: None,
                uptime_ms: None,
                vcpus: None,
                exit_code: None,
                metrics: None,
                balloon: None,
                snapshot: None,
                restore: None,
            } => Reply::Error { error },
            WireReply {
                ok: true,
                error: None,
                state: Some(state),
                uptime_ms,
                vcpus,
                exit_code,
                metrics: None,
                balloon: None,
                snapshot: None,
                restore: None,
            } => match (uptime_ms, vcpus, exit_code) {
                (Some(uptime_ms), Some(vcpus), None) => Reply::Status {
                    state,
                    uptime_ms,
                    vcpus,
                },
                (None, None, None) => Reply::State { state },
                (None, None, Some(exit_code)) => Reply::Shutdown { state, exit_code },
                _ => {
                    return Err(format!(
                        "control reply with ok = true has no known shape (fields: {fields})"
                    ))
                }
            },
            WireReply {
                ok: true,
                error: None,
                state: None,
                uptime_ms: None,
                vcpus: None,
                exit_code: None,
                metrics: Some(metrics),
                balloon: None,
                snapshot: None,
                restore: None,
            } => Reply::Metrics { metrics },
            WireReply {
                ok: true,
                error: None,
                state: None,
                uptime_ms: None,
                vcpus: None,
                exit_code: None,
                metrics: None,
                balloon: Some(balloon),
                snapshot: None,
                restore: None,
            } => Reply::Balloon { balloon },
            WireReply {
                ok: true,
                error: None,
                state: Some(state),
                uptime_ms: None,
                vcpus: None,
                exit_code: None,
                metrics: None,
                balloon: None,
                snapshot: Some(snapshot),
                restore: None,
            } => Reply::Snapshot { state, snapshot },
            WireReply {
                ok: true,
                error: None,
                state: Some(state),
                uptime_ms: None,
                vcpus: None,
                exit_code: None,
                metrics: None,
                balloon: None,
                snapshot: None,
                restore: Some(restore),
            } => Reply::Restored { state, restore },
            WireReply { ok, .. } => {
                return Err(format!(
                    "control reply with ok = {ok} has no known shape (fields: {fields})"
                ))
            }
        };
        Ok(reply)
    }
}

/// Every counter of one VM (the `metrics` reply). Counter names follow
/// `boxlite_<device>_<event>_total` when exported.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Per-vCPU exit counters, by vCPU index.
    pub vcpus: Vec<VcpuCounters>,
    /// Per virtio device, by name (`vsock0`, `block1`: kind and MMIO slot).
    pub devices: BTreeMap<String, DeviceCounters>,
}

/// One vCPU's exit counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuCounters {
    pub id: u32,
    pub exits: u64,
    pub pio_exits: u64,
    pub mmio_exits: u64,
    pub kicks: u64,
}

/// One device's counters, tagged with its kind as in the config.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeviceCounters {
    Rng(RngCounters),
    Vsock(VsockCounters),
    Fs(FsCounters),
    Block(BlockCounters),
    Net(NetCounters),
    Balloon(BalloonCounters),
}

/// virtio-rng counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngCounters {
    pub bytes: u64,
    pub requests: u64,
    pub bad_chains: u64,
}

/// virtio-vsock counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockCounters {
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    pub conns_opened: u64,
    pub conns_closed: u64,
    pub conns_refused: u64,
    pub rst_sent: u64,
    pub bad_chains: u64,
    pub dropped_packets: u64,
    pub protocol_errors: u64,
}

/// virtio-fs (vhost-user frontend) counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsCounters {
    pub activations: u64,
    pub activation_failures: u64,
    pub backend_lost: u64,
}

/// virtio-blk counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockCounters {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub get_ids: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub io_errors: u64,
    pub unsupported: u64,
    pub bad_chains: u64,
}

/// virtio-net counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_drops: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_drops: u64,
    pub bad_chains: u64,
    pub backend_errors: u64,
}

/// virtio-balloon counters. Pages are the balloon's 4 KiB units.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonCounters {
    /// Pages the guest put in the balloon whose host memory was discarded.
    pub inflated_pages: u64,
    /// Pages the guest took back out of the balloon.
    pub deflated_pages: u64,
    /// Free-page reports served (one descriptor chain each).
    pub reports: u64,
    /// Bytes of reported free memory whose host memory was discarded.
    pub reported_bytes: u64,
    /// Chains refused whole (wrong direction, bad length, unreadable, too
    /// long) and returned without discarding anything.
    pub bad_chains: u64,
    /// PFNs or reported ranges skipped: outside guest RAM, across a region
    /// end, unaligned, empty or overflowing.
    pub bad_ranges: u64,
    /// Discards the host kernel refused (madvise / fallocate errors).
    pub discard_errors: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_op_lines() {
        for (r, wire) in [
            (Request::Shutdown, r#"{"op":"shutdown"}"#),
            (Request::Pause, r#"{"op":"pause"}"#),
            (Request::Resume, r#"{"op":"resume"}"#),
            (Request::Status, r#"{"op":"status"}"#),
            (Request::Metrics, r#"{"op":"metrics"}"#),
            (Request::Balloon { target_mib: None }, r#"{"op":"balloon"}"#),
            (
                Request::Balloon {
                    target_mib: Some(768),
                },
                r#"{"op":"balloon","target_mib":768}"#,
            ),
            (
                Request::Snapshot {
                    state_file: "vm.state".into(),
                    memory_file: "vm.mem".into(),
                },
                r#"{"op":"snapshot","state_file":"vm.state","memory_file":"vm.mem"}"#,
            ),
            (
                Request::Restore { snapshot_id: None },
                r#"{"op":"restore"}"#,
            ),
            (
                Request::Restore {
                    snapshot_id: Some("5f0c".into()),
                },
                r#"{"op":"restore","snapshot_id":"5f0c"}"#,
            ),
        ] {
            let line = r.to_line();
            assert_eq!(line, format!("{wire}\n"));
            assert!(OPS.contains(&r.as_str()));
            assert_eq!(
                Request::from_line(line.trim_end().as_bytes()),
                Ok(r.clone())
            );
            assert_eq!(serde_json::from_str::<Request>(&line).expect("serde"), r);
        }
        assert_eq!(
            Request::from_line(br#"{"op":"balloon","target_mib":null}"#),
            Ok(Request::Balloon { target_mib: None })
        );
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        for (line, want) in [
            (&b"nope"[..], "request is not valid JSON"),
            (
                b"[1]",
                "request must be a JSON object like {\"op\":\"status\"}, got [1]",
            ),
            (
                b"{}",
                "missing \"op\": expected one of shutdown, pause, resume, status, metrics, balloon, \
                 snapshot, restore",
            ),
            (br#"{"op":1}"#, "\"op\" must be a string, got 1"),
            (
                br#"{"op":"reboot"}"#,
                "unknown op \"reboot\": expected one of shutdown, pause, resume, status, metrics, \
                 balloon, snapshot, restore",
            ),
            (
                br#"{"op":"status","x":1}"#,
                "unknown field \"x\": \"status\" takes only \"op\"",
            ),
            (
                br#"{"op":"status","target_mib":1}"#,
                "unknown field \"target_mib\": \"status\" takes only \"op\"",
            ),
            (
                br#"{"op":"balloon","target":1}"#,
                "unknown field \"target\": \"balloon\" takes \"op\" and \"target_mib\"",
            ),
            (
                br#"{"op":"balloon","target_mib":-1}"#,
                "\"target_mib\" must be a whole number of MiB below 2^32, got -1",
            ),
            (
                br#"{"op":"balloon","target_mib":4294967296}"#,
                "\"target_mib\" must be a whole number of MiB below 2^32, got 4294967296",
            ),
            (
                br#"{"op":"balloon","target_mib":"1"}"#,
                "\"target_mib\" must be a whole number of MiB below 2^32, got \"1\"",
            ),
            (
                br#"{"op":"snapshot","state_file":"s"}"#,
                "\"snapshot\" needs \"memory_file\"",
            ),
            (
                br#"{"op":"snapshot","state_file":1,"memory_file":"m"}"#,
                "\"state_file\" must be a file name (a string), got 1",
            ),
            (
                br#"{"op":"snapshot","state_file":"s","memory_file":"m","dir":"/"}"#,
                "unknown field \"dir\": \"snapshot\" takes \"op\" and \"state_file\", \"memory_file\"",
            ),
            (
                br#"{"op":"restore","snapshot_id":7}"#,
                "\"snapshot_id\" must be a snapshot id (a string of hex digits), got 7",
            ),
            (
                br#"{"op":"restore","id":"5f0c"}"#,
                "unknown field \"id\": \"restore\" takes \"op\" and \"snapshot_id\"",
            ),
        ] {
            let e = Request::from_line(line).expect_err("refused").to_string();
            assert!(e.starts_with(want), "{e:?} does not start with {want:?}");
            // serde's Deserialize is the same parser.
            let text = std::str::from_utf8(line).expect("utf-8");
            if let Ok(v) = serde_json::from_str::<Value>(text) {
                let e = serde_json::from_value::<Request>(v).expect_err("serde refuses too");
                assert!(e.to_string().starts_with(want), "{e}");
            }
        }
    }

    fn metrics() -> Metrics {
        Metrics {
            vcpus: vec![VcpuCounters {
                id: 0,
                exits: 7,
                ..VcpuCounters::default()
            }],
            devices: BTreeMap::from([
                (
                    "vsock0".to_string(),
                    DeviceCounters::Vsock(VsockCounters {
                        tx_bytes: 42,
                        ..VsockCounters::default()
                    }),
                ),
                (
                    "block1".to_string(),
                    DeviceCounters::Block(BlockCounters::default()),
                ),
                (
                    "rng2".to_string(),
                    DeviceCounters::Rng(RngCounters::default()),
                ),
                ("fs3".to_string(), DeviceCounters::Fs(FsCounters::default())),
                (
                    "net4".to_string(),
                    DeviceCounters::Net(NetCounters::default()),
                ),
                (
                    "balloon5".to_string(),
                    DeviceCounters::Balloon(BalloonCounters {
                        reported_bytes: 2 << 20,
                        ..BalloonCounters::default()
                    }),
                ),
            ]),
        }
    }

    #[test]
    fn replies_round_trip_and_keep_the_flat_wire_shape() {
        let cases = [
            (
                Reply::Status {
                    state: VmState::Running,
                    uptime_ms: 12,
                    vcpus: 2,
                },
                r#"{"ok":true,"state":"running","uptime_ms":12,"vcpus":2}"#,
            ),
            (
                Reply::State {
                    state: VmState::Paused,
                },
                r#"{"ok":true,"state":"paused"}"#,
            ),
            (
                Reply::Shutdown {
                    state: VmState::Stopping,
                    exit_code: 0,
                },
                r#"{"ok":true,"state":"stopping","exit_code":0}"#,
            ),
            (
                Reply::Error {
                    error: "unknown op".into(),
                },
                r#"{"ok":false,"error":"unknown op"}"#,
            ),
            (
                Reply::Balloon {
                    balloon: BalloonState {
                        target_mib: 512,
                        actual_mib: 300,
                    },
                },
                r#"{"ok":true,"balloon":{"target_mib":512,"actual_mib":300}}"#,
            ),
            (
                Reply::Snapshot {
                    state: VmState::Paused,
                    snapshot: SnapshotInfo {
                        id: "5f0c".into(),
                        state_bytes: 91234,
                        memory_bytes: 268439552,
                        memory_data_bytes: 61865984,
                        took_ms: 143,
                    },
                },
                r#"{"ok":true,"state":"paused","snapshot":{"id":"5f0c","state_bytes":91234,"memory_bytes":268439552,"memory_data_bytes":61865984,"took_ms":143}}"#,
            ),
            (
                Reply::Status {
                    state: VmState::Restored,
                    uptime_ms: 3,
                    vcpus: 1,
                },
                r#"{"ok":true,"state":"restored","uptime_ms":3,"vcpus":1}"#,
            ),
            (
                Reply::Restored {
                    state: VmState::Running,
                    restore: RestoreInfo {
                        id: "5f0c".into(),
                        memory_mode: "private".into(),
                        setup_us: 9100,
                        took_us: 40,
                    },
                },
                r#"{"ok":true,"state":"running","restore":{"id":"5f0c","memory_mode":"private","setup_us":9100,"took_us":40}}"#,
            ),
        ];
        for (reply, wire) in cases {
            assert_eq!(reply.to_line(), format!("{wire}\n"));
            assert_eq!(Reply::from_line(wire).expect(wire), reply);
        }
        let m = Reply::Metrics { metrics: metrics() };
        let v: Value = serde_json::from_str(&m.to_line()).expect("json");
        assert_eq!(v["ok"], true);
        assert_eq!(v["metrics"]["vcpus"][0]["exits"], 7);
        assert_eq!(v["metrics"]["devices"]["vsock0"]["kind"], "vsock");
        assert_eq!(v["metrics"]["devices"]["vsock0"]["tx_bytes"], 42);
        assert_eq!(v["metrics"]["devices"]["block1"]["kind"], "block");
        assert_eq!(v["metrics"]["devices"]["balloon5"]["kind"], "balloon");
        assert_eq!(
            v["metrics"]["devices"]["balloon5"]["reported_bytes"],
            2 << 20
        );
        assert_eq!(v["metrics"]["devices"]["balloon5"]["bad_ranges"], 0);
        assert_eq!(Reply::from_line(&m.to_line()).expect("metrics"), m);
    }

    #[test]
    fn replies_of_no_known_shape_are_refused() {
        for (wire, want) in [
            (r#"{"ok":true}"#, "ok = true has no known shape (fields: )"),
            (
                r#"{"ok":false,"state":"running"}"#,
                "ok = false has no known shape (fields: state)",
            ),
            (
                r#"{"ok":true,"error":"x"}"#,
                "ok = true has no known shape (fields: error)",
            ),
            (
                r#"{"ok":true,"state":"running","uptime_ms":1}"#,
                "(fields: state, uptime_ms)",
            ),
            (r#"{"ok":true,"state":"gone"}"#, "unknown variant `gone`"),
            (
                r#"{"ok":true,"state":"running","extra":1}"#,
                "unknown field `extra`",
            ),
            (
                r#"{"ok":true,"state":"running","balloon":{"target_mib":1,"actual_mib":0}}"#,
                "(fields: state, balloon)",
            ),
            (
                r#"{"ok":true,"balloon":{"target_mib":1}}"#,
                "missing field `actual_mib`",
            ),
            (
                r#"{"ok":true,"metrics":{"vcpus":[],"devices":{"x0":{"kind":"gpu"}}}}"#,
                "unknown variant `gpu`",
            ),
        ] {
            let e = Reply::from_line(wire).expect_err(wire).to_string();
            assert!(e.contains(want), "{wire}: {e}");
        }
    }
}
