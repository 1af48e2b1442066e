//! The shim's error type and its one mapping onto ttrpc status codes.
//!
//! Messages follow the project style: sentence-like, naming the object; the
//! cause goes in `#[source]` and is appended by
//! [`boxlite_protocol::error_chain::chain`], never repeated in the message
//! itself.

use std::path::PathBuf;
use std::time::Duration;

use boxlite_protocol::error_chain::chain;
use boxlite_protocol::ids::InvalidId;
use boxlite_runtime::config::ConfigError;
use boxlite_runtime::network::NetworkError;
use boxlite_runtime::HypervisorError;
use ttrpc::Code;

use crate::hooks::HookFailure;

/// Any error kept as a cause.
pub type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    /// A request containerd sent that cannot be carried out, with why.
    #[error("{what}")]
    Invalid {
        what: String,
        #[source]
        cause: Cause,
    },
    /// An id containerd's rule refuses; `op` says what was asked.
    #[error("cannot {op}")]
    InvalidId {
        op: &'static str,
        #[source]
        error: InvalidId,
    },
    #[error("{0}")]
    FailedPrecondition(String),
    /// The node is not ready for the request, with why.
    #[error("{what}")]
    Unready {
        what: String,
        #[source]
        cause: Cause,
    },
    /// An OCI hook failed (see [`crate::hooks`]).
    #[error("{kind} hook #{n} ({}) failed", path.display())]
    Hook {
        kind: &'static str,
        n: usize,
        path: PathBuf,
        #[source]
        cause: HookFailure,
    },
    #[error("{0}")]
    Unimplemented(String),
    /// The agent answered with a status: its code is passed on to containerd.
    #[error("agent {rpc} for {object}")]
    AgentRefused {
        rpc: &'static str,
        object: String,
        #[source]
        status: AgentStatus,
    },
    /// The agent did not answer within the call's budget (the host's own
    /// timer, see [`crate::agent_client`]).
    #[error("agent {rpc} for {object} did not answer within {}s", timeout.as_secs())]
    AgentTimeout {
        rpc: &'static str,
        object: String,
        timeout: Duration,
    },
    /// The agent could not be reached (closed connection, broken transport).
    #[error("agent {rpc} for {object} failed")]
    Agent {
        rpc: &'static str,
        object: String,
        #[source]
        error: ttrpc::Error,
    },
    /// Wiring the pod network failed: the node (its CNI set-up) is not
    /// ready, and the runtime's error says why.
    #[error(transparent)]
    PodNetwork(NetworkError),
    #[error("sandbox VM")]
    Hypervisor(#[source] HypervisorError),
    #[error("config")]
    Config(#[source] ConfigError),
    #[error("{op} {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{op} {} on {}", source_desc, target.display())]
    Mount {
        op: &'static str,
        source_desc: String,
        target: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("stdio {stream} of {object}: {reason}")]
    Stdio {
        stream: &'static str,
        object: String,
        reason: String,
    },
    /// The same, with the error that ended the stream set-up.
    #[error("stdio {stream} of {object}")]
    StdioFailed {
        stream: &'static str,
        object: String,
        #[source]
        cause: Cause,
    },
    #[error("OCI spec in {}: {reason}", path.display())]
    Spec { path: PathBuf, reason: String },
    /// A spec (or state file) that does not parse.
    #[error("OCI spec in {}", path.display())]
    SpecUnreadable {
        path: PathBuf,
        #[source]
        cause: Cause,
    },
    #[error("{0}")]
    Internal(String),
    /// A shim-side failure with its cause (encoding, a task that panicked).
    #[error("{what}")]
    Failed {
        what: String,
        #[source]
        cause: Cause,
    },
}

/// What the agent said when it refused a call.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AgentStatus {
    pub code: Code,
    pub message: String,
}

pub type Result<T, E = ShimError> = std::result::Result<T, E>;

impl ShimError {
    pub fn io(op: &'static str, path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        ShimError::Io {
            op,
            path: path.into(),
            error,
        }
    }

    /// INVALID_ARGUMENT: `what` was refused because of `cause`.
    pub fn invalid(what: impl Into<String>, cause: impl Into<Cause>) -> Self {
        ShimError::Invalid {
            what: what.into(),
            cause: cause.into(),
        }
    }

    /// FAILED_PRECONDITION: `what` cannot be done (yet) because of `cause`.
    pub fn unready(what: impl Into<String>, cause: impl Into<Cause>) -> Self {
        ShimError::Unready {
            what: what.into(),
            cause: cause.into(),
        }
    }

    /// INTERNAL: `what` failed in the shim because of `cause`.
    pub fn failed(what: impl Into<String>, cause: impl Into<Cause>) -> Self {
        ShimError::Failed {
            what: what.into(),
            cause: cause.into(),
        }
    }

    /// Wraps a failed agent call: a status the agent sent keeps its code;
    /// transport failures (closed connection) stay `Agent`.
    pub fn agent(rpc: &'static str, object: impl Into<String>, error: ttrpc::Error) -> Self {
        match error {
            ttrpc::Error::RpcStatus(status) => ShimError::AgentRefused {
                rpc,
                object: object.into(),
                status: AgentStatus {
                    code: status.code(),
                    message: status.message().to_owned(),
                },
            },
            error => ShimError::Agent {
                rpc,
                object: object.into(),
                error,
            },
        }
    }

    /// The ttrpc code containerd sees for this error.
    pub fn code(&self) -> Code {
        match self {
            ShimError::NotFound(_) => Code::NOT_FOUND,
            ShimError::AlreadyExists(_) => Code::ALREADY_EXISTS,
            ShimError::InvalidArgument(_)
            | ShimError::Invalid { .. }
            | ShimError::InvalidId { .. }
            | ShimError::Spec { .. }
            | ShimError::SpecUnreadable { .. } => Code::INVALID_ARGUMENT,
            ShimError::FailedPrecondition(_)
            | ShimError::Unready { .. }
            | ShimError::Hook { .. }
            | ShimError::PodNetwork(_)
            | ShimError::Config(_) => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::AgentRefused { status, .. } => status.code,
            ShimError::AgentTimeout { .. } => Code::DEADLINE_EXCEEDED,
            ShimError::Agent { .. } => Code::UNAVAILABLE,
            ShimError::Hypervisor(e) if e.is_exhausted() => Code::RESOURCE_EXHAUSTED,
            ShimError::Hypervisor(_)
            | ShimError::Io { .. }
            | ShimError::Mount { .. }
            | ShimError::Stdio { .. }
            | ShimError::StdioFailed { .. }
            | ShimError::Internal(_)
            | ShimError::Failed { .. } => Code::INTERNAL,
        }
    }
}

impl From<ShimError> for ttrpc::Error {
    fn from(e: ShimError) -> Self {
        let code = e.code();
        let message = chain(&e);
        match code {
            Code::INTERNAL | Code::UNAVAILABLE | Code::DEADLINE_EXCEEDED => {
                tracing::error!(code = ?code, "{message}")
            }
            _ => tracing::warn!(code = ?code, "{message}"),
        }
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
    }
}

impl From<HypervisorError> for ShimError {
    fn from(e: HypervisorError) -> Self {
        ShimError::Hypervisor(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(e: ShimError) -> (Code, String) {
        match ttrpc::Error::from(e) {
            ttrpc::Error::RpcStatus(s) => (s.code(), s.message().to_owned()),
            other => panic!("not a status: {other:?}"),
        }
    }

    #[test]
    fn codes_containerd_understands() {
        assert_eq!(
            status(ShimError::NotFound("container \"c1\"".into())),
            (Code::NOT_FOUND, "container \"c1\" not found".into())
        );
        assert_eq!(
            status(ShimError::AlreadyExists("container \"c1\"".into())).0,
            Code::ALREADY_EXISTS
        );
        assert_eq!(
            status(ShimError::InvalidArgument("bad".into())).0,
            Code::INVALID_ARGUMENT
        );
        assert_eq!(
            status(ShimError::FailedPrecondition("no".into())).0,
            Code::FAILED_PRECONDITION
        );
    }

    #[test]
    fn agent_status_keeps_its_code_and_message() {
        let e = ShimError::agent(
            "CreateContainer",
            "container \"c1\"",
            ttrpc::Error::RpcStatus(ttrpc::get_status(
                Code::UNIMPLEMENTED,
                "container service not implemented yet: CreateContainer",
            )),
        );
        assert_eq!(
            status(e),
            (
                Code::UNIMPLEMENTED,
                "agent CreateContainer for container \"c1\": container service not implemented yet: CreateContainer".into()
            )
        );
    }

    #[test]
    fn no_free_jail_uid_is_resource_exhausted() {
        use boxlite_runtime::hypervisor::jail_ids::JailIdError;
        let e = ShimError::from(HypervisorError::JailId(JailIdError::Exhausted {
            id: "sb1".into(),
            first: 100,
            last: 100,
            count: 1,
            malformed: 0,
            lease_dir: "/run/boxlite/.jail-ids".into(),
        }));
        let (code, msg) = status(e);
        assert_eq!(code, Code::RESOURCE_EXHAUSTED);
        assert!(
            msg.starts_with("sandbox VM: sandbox sb1: no jail uid is free: all 1 of 100..=100"),
            "{msg}"
        );
    }

    #[test]
    fn io_errors_carry_their_cause() {
        let e = ShimError::io(
            "cannot create",
            "/x/y",
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        let (code, msg) = status(e);
        assert_eq!(code, Code::INTERNAL);
        assert_eq!(msg, "cannot create /x/y: Permission denied (os error 13)");
    }

    #[test]
    fn a_timeout_is_deadline_exceeded_and_a_bad_id_invalid() {
        let e = ShimError::AgentTimeout {
            rpc: "StartContainer",
            object: "container \"c1\"".into(),
            timeout: Duration::from_secs(30),
        };
        assert_eq!(
            status(e),
            (
                Code::DEADLINE_EXCEEDED,
                "agent StartContainer for container \"c1\" did not answer within 30s".into()
            )
        );
        let e = ShimError::InvalidId {
            op: "create the container",
            error: boxlite_protocol::ids::validate("container", "a/b").unwrap_err(),
        };
        let (code, msg) = status(e);
        assert_eq!(code, Code::INVALID_ARGUMENT);
        assert!(
            msg.starts_with("cannot create the container: container id \"a/b\" is invalid"),
            "{msg}"
        );
    }
}
