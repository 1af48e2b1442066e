//! The container service's error: every way a container RPC can fail.
//! Its own module so the container code depends on nothing above it;
//! `crate::error::AgentError` wraps it and `rpc.rs` maps each variant to
//! a status code.

use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ContainerError {
    /// `field` names the request field; the id and why it is refused are
    /// in the source.
    #[error("{field} is refused")]
    InvalidId {
        field: &'static str,
        #[source]
        source: boxlite_protocol::ids::InvalidId,
    },
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("rootfs {0} does not exist or is not a directory")]
    RootfsMissing(PathBuf),
    #[error("signal {0} is not a valid signal number")]
    InvalidSignal(u32),
    #[error("container {0:?} not found")]
    NotFound(String),
    #[error("exec {exec_id:?} not found in container {container_id:?}")]
    ExecNotFound {
        container_id: String,
        exec_id: String,
    },
    #[error("container {0:?} already exists")]
    AlreadyExists(String),
    #[error("exec {exec_id:?} already exists in container {container_id:?}")]
    ExecExists {
        container_id: String,
        exec_id: String,
    },
    #[error("cannot {op} container {id:?}: it is {state}")]
    State {
        op: &'static str,
        id: String,
        state: &'static str,
    },
    #[error("the {process} of container {container_id:?} has already exited")]
    Exited {
        container_id: String,
        process: String,
    },
    #[error("{0}")]
    Precondition(String),
    #[error(
        "the {process} of container {container_id:?}: stdio stream(s) {missing} did not \
         connect within {timeout:?}"
    )]
    StreamsMissing {
        container_id: String,
        process: String,
        missing: String,
        timeout: Duration,
    },
    #[error("container helper failed to {op}: {message}")]
    Helper { op: &'static str, message: String },
    #[error("Failed to {what}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {what} failed: {message}")]
    Cgroup { what: &'static str, message: String },
}
