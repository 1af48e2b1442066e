//! [`HypervisorError`], the error of every backend, and [`ExitReport`], the
//! account of a process that exited when it should not have.
//!
//! Messages name the sandbox and the object (path, process, port); an
//! underlying error is the `#[source]`, not part of the message: print with
//! `boxlite_protocol::error_chain::chain`.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use boxlite_protocol::ids::InvalidId;

use super::MAX_SOCKET_PATH_LEN;
use crate::config::ConfigError;
use crate::fmt_duration;
use crate::hybrid_vsock::{ConsoleLogHint, HybridVsockError};

/// Errors of the hypervisor layer.
#[derive(Debug, thiserror::Error)]
pub enum HypervisorError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The sandbox's jail uid could not be leased (or released).
    #[error(transparent)]
    JailId(#[from] super::jail_ids::JailIdError),
    /// The id breaks containerd's rule (`boxlite_protocol::ids`), which the
    /// source names.
    #[error("cannot set up a VM for this sandbox")]
    InvalidSandboxId(#[source] InvalidId),
    #[error("sandbox {id}: share {tag:?} is invalid: {reason}")]
    InvalidShare {
        id: String,
        tag: String,
        reason: String,
    },
    #[error("tap device {name:?} is invalid: {reason}")]
    InvalidTap { name: String, reason: &'static str },
    #[error("MAC address {value:?} is invalid: {reason}")]
    InvalidMac { value: String, reason: &'static str },
    /// A VM size the VMM's config cannot hold (its field is narrower than
    /// the runtime's).
    #[error("sandbox {id}: {key} = {value} does not fit boxlite-vmm's config (at most {max})")]
    VmmConfigRange {
        id: String,
        key: &'static str,
        value: u64,
        max: u64,
    },
    #[error("sandbox {id}: cannot {op} while the VM is {state}")]
    InvalidState {
        id: String,
        op: &'static str,
        state: &'static str,
    },
    #[error(
        "sandbox {id}: {what} {} (config key {key}) is missing or not a file; \
         build it with `cargo xtask guest` or set {key}",
        path.display()
    )]
    MissingAsset {
        id: String,
        what: &'static str,
        key: &'static str,
        path: PathBuf,
    },
    #[error("sandbox {id}: {what} {} does not exist or is not executable", path.display())]
    MissingBinary {
        id: String,
        what: String,
        path: PathBuf,
    },
    #[error(
        "sandbox {id}: socket path {} is {len} bytes, more than the unix socket limit of {MAX_SOCKET_PATH_LEN}; \
         use a shorter runtime.state_dir, sandbox id or share tag",
        path.display()
    )]
    SocketPathTooLong {
        id: String,
        path: PathBuf,
        len: usize,
    },
    #[error("sandbox {id}: {}: {op}", path.display())]
    Io {
        id: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// The pod's cgroup could not be made, joined or removed.
    #[error("sandbox {id}: the VM's cgroup")]
    Cgroup {
        id: String,
        #[source]
        error: crate::cgroup::CgroupError,
    },
    #[error("sandbox {id}: cannot start {what} ({})", binary.display())]
    Spawn {
        id: String,
        what: String,
        binary: PathBuf,
        #[source]
        error: std::io::Error,
    },
    /// A helper died before it created its socket.
    #[error("{0}")]
    HelperExited(Box<ExitReport>),
    /// A timeout: a helper did not create its socket in time.
    #[error(
        "sandbox {id}: {what} did not create its socket {} within {}; log: {}",
        socket.display(), fmt_duration(*waited), log.display()
    )]
    HelperTimeout {
        id: String,
        what: String,
        socket: PathBuf,
        waited: Duration,
        log: PathBuf,
    },
    /// The VM or a helper exited on its own.
    #[error("{0}")]
    ProcessExited(Box<ExitReport>),
    /// A timeout: the agent did not answer `Health.Check` in time. `last`
    /// says what the last attempt got (context, not a cause).
    #[error(
        "sandbox {id}: VM did not answer on vsock port {port} within {} (last attempt: {last}){console_log}",
        fmt_duration(*timeout)
    )]
    AgentTimeout {
        id: String,
        port: u32,
        timeout: Duration,
        last: String,
        console_log: ConsoleLogHint,
    },
    /// A timeout: the agent did not announce itself in time.
    #[error(
        "sandbox {id}: the agent did not announce itself on vsock port {port} ({}) within {} \
         (last: {last}){console_log}",
        socket.display(),
        fmt_duration(*timeout)
    )]
    NotAnnounced {
        id: String,
        port: u32,
        socket: PathBuf,
        timeout: Duration,
        last: String,
        console_log: ConsoleLogHint,
    },
    #[error(
        "sandbox {id}: the guest agent {agent_version} speaks protocol {guest}, this host \
         speaks {host}; install a guest image built from the same release (cargo xtask guest)"
    )]
    ProtocolMismatch {
        id: String,
        agent_version: String,
        guest: u32,
        host: u32,
    },
    #[error("sandbox {id}")]
    Vsock {
        id: String,
        #[source]
        error: Box<HybridVsockError>,
    },
    /// The balloon could not be read or set, or the guest did not follow
    /// its target in time.
    #[error("sandbox {id}: the VM's balloon: {reason}")]
    Balloon { id: String, reason: String },
    /// A VM restored from a template did not come up; the backend boots
    /// it instead, so this reaches the log, not the user.
    #[error("sandbox {id}: the VM restored from template {template} {reason}")]
    Restore {
        id: String,
        template: String,
        reason: String,
    },
    /// The VM was paused to be saved as a template and could not be
    /// resumed: it cannot serve the sandbox.
    #[error("sandbox {id}: the VM was paused to be saved as template {template} and did not resume: {reason}")]
    CaptureLeftPaused {
        id: String,
        template: String,
        reason: String,
    },
    #[error("sandbox {id}: cannot signal {what} (pid {pid})")]
    Signal {
        id: String,
        what: String,
        pid: u32,
        #[source]
        error: nix::Error,
    },
}

impl HypervisorError {
    /// True for the variants that mean "not within the time allowed" — for
    /// callers that map them (e.g. to DEADLINE_EXCEEDED), so that no one
    /// has to look at message text.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            HypervisorError::HelperTimeout { .. }
                | HypervisorError::AgentTimeout { .. }
                | HypervisorError::NotAnnounced { .. }
        ) || matches!(self, HypervisorError::Vsock { error, .. }
            if matches!(**error, HybridVsockError::Timeout { .. }))
    }

    /// True when a node-wide resource this sandbox needs is used up (every
    /// jail uid leased): for callers that map it to RESOURCE_EXHAUSTED,
    /// which tells the kubelet to retry later rather than that the pod is
    /// broken.
    pub fn is_exhausted(&self) -> bool {
        matches!(
            self,
            HypervisorError::JailId(super::jail_ids::JailIdError::Exhausted { .. })
        )
    }
}

/// A process that exited when it should not have.
#[derive(Debug)]
pub struct ExitReport {
    pub id: String,
    /// "qemu", "the vsock backend", "virtiofsd for share \"rootfs\"".
    pub what: String,
    pub pid: u32,
    pub status: ExitStatus,
    /// Its stdout/stderr.
    pub log: PathBuf,
    /// The last line of `log`, if any.
    pub last_line: Option<String>,
    /// For helpers that died before they were ready: the socket they did
    /// not create.
    pub socket: Option<PathBuf>,
    pub console_log: Option<PathBuf>,
}

impl fmt::Display for ExitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (id, what, status) = (&self.id, &self.what, &self.status);
        match &self.socket {
            Some(socket) => write!(
                f,
                "sandbox {id}: {what} exited with {status} before its socket {} appeared",
                socket.display()
            )?,
            None => write!(
                f,
                "sandbox {id}: {what} (pid {}) exited unexpectedly with {status}",
                self.pid
            )?,
        }
        write!(
            f,
            "; log: {}{}",
            self.log.display(),
            LastLine(&self.last_line)
        )?;
        write!(f, "{}", ConsoleLogHint(self.console_log.clone()))
    }
}

/// Renders ` (last line: "…")` for a log excerpt.
struct LastLine<'a>(&'a Option<String>);

impl fmt::Display for LastLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(line) => write!(f, " (last line: {line:?})"),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_protocol::error_chain::chain;

    #[test]
    fn timeouts_are_told_by_variant() {
        let timeout = HypervisorError::AgentTimeout {
            id: "s".into(),
            port: 1024,
            timeout: Duration::from_secs(1),
            last: "none made".into(),
            console_log: ConsoleLogHint(None),
        };
        assert!(timeout.is_timeout());
        let state = HypervisorError::InvalidState {
            id: "s".into(),
            op: "start",
            state: "stopped",
        };
        assert!(!state.is_timeout());
    }

    #[test]
    fn causes_are_sources_not_message_text() {
        let err = HypervisorError::Io {
            id: "s".into(),
            op: "cannot create the console log",
            path: "/run/boxlite/s/console.log".into(),
            error: std::io::Error::other("disk full"),
        };
        assert_eq!(
            err.to_string(),
            "sandbox s: /run/boxlite/s/console.log: cannot create the console log"
        );
        assert_eq!(
            chain(&err),
            "sandbox s: /run/boxlite/s/console.log: cannot create the console log: disk full"
        );
    }
}
