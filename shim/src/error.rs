//! The shim's error type and its one mapping onto ttrpc status codes.
//!
//! Messages follow the project style: sentence-like, naming the object; the
//! cause goes in `#[source]` and is appended by [`chain`], never repeated in
//! the message itself.

use std::error::Error as StdError;
use std::path::PathBuf;

use boxlite_runtime::config::ConfigError;
use boxlite_runtime::HypervisorError;
use ttrpc::Code;

#[derive(Debug, thiserror::Error)]
pub enum ShimError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    Unimplemented(String),
    /// The agent answered with a status: its code is passed on to containerd.
    #[error("agent {rpc} for {object}: {message}")]
    AgentStatus {
        rpc: &'static str,
        object: String,
        code: Code,
        message: String,
    },
    /// The agent could not be reached or did not answer in time.
    #[error("agent {rpc} for {object} failed")]
    Agent {
        rpc: &'static str,
        object: String,
        #[source]
        error: ttrpc::Error,
    },
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
    #[error("OCI spec in {}: {reason}", path.display())]
    Spec { path: PathBuf, reason: String },
    #[error("{0}")]
    Internal(String),
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

    /// Wraps a failed agent call: a status the agent sent keeps its code;
    /// transport failures (closed connection, deadline) stay `Agent`.
    pub fn agent(rpc: &'static str, object: impl Into<String>, error: ttrpc::Error) -> Self {
        match error {
            ttrpc::Error::RpcStatus(status) => ShimError::AgentStatus {
                rpc,
                object: object.into(),
                code: status.code(),
                message: status.message().to_owned(),
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
            ShimError::InvalidArgument(_) | ShimError::Spec { .. } => Code::INVALID_ARGUMENT,
            ShimError::FailedPrecondition(_) | ShimError::Config(_) => Code::FAILED_PRECONDITION,
            ShimError::Unimplemented(_) => Code::UNIMPLEMENTED,
            ShimError::AgentStatus { code, .. } => *code,
            ShimError::Agent { error, .. } => match error {
                ttrpc::Error::Others(m) if m.contains("timeout") => Code::DEADLINE_EXCEEDED,
                _ => Code::UNAVAILABLE,
            },
            ShimError::Hypervisor(_)
            | ShimError::Io { .. }
            | ShimError::Mount { .. }
            | ShimError::Stdio { .. }
            | ShimError::Internal(_) => Code::INTERNAL,
        }
    }
}

/// The whole error chain, joined with `": "`.
pub fn chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let next = cause.to_string();
        // Some causes (HypervisorError) already include their own cause.
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = cause.source();
    }
    text
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
}
