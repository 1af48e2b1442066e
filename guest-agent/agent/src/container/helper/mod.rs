//! The container helper protocol. The helper is a short-lived,
//! single-threaded child of the agent that runs youki's `libcontainer` to
//! create a container or exec a process in one, then exits.
//!
//! Why a separate process: libcontainer forks (`clone3`) from its caller and
//! runs Rust code in the child before `execve`. The agent is multi-threaded
//! (tokio plus its blocking pool), and a raw `clone3` runs no atfork
//! handlers, so a lock held by another thread (malloc, the log ring) would
//! stay locked forever in the child. The helper is a fresh `execve` of the
//! agent binary with one thread. libcontainer also `waitpid`s its
//! intermediate process, which would race the agent's reaper; in the helper
//! that child is the helper's own.
//!
//! Process tree: helper → intermediate → container process (cloned with
//! `CLONE_PARENT`, so it is the helper's child). When the helper exits, the
//! container process is re-parented to the agent (PID 1 in the guest; the
//! agent is a child subreaper in host mode), whose reaper collects it.
//!
//! Interface: `boxlite-agent __container-helper <request JSON>`. fds 0, 1
//! and 2 are the process's stdio (pipes or `/dev/null`); fd
//! [`RESULT_FD`] is a unix socket to the agent. The helper writes a
//! [`HelperResult`] as one JSON line there and, when a process was
//! started, waits for the agent's one-byte ack before it exits 0: the agent
//! registers the pid for its exit status while the process is still the
//! helper's child, so the agent's reaper cannot collect it before anyone
//! waits for it (however many other orphans exit meanwhile).
//!
//! This module holds the contract; [`child`] is the helper's side (the
//! libcontainer work) and [`parent`] the agent's (spawn, read, ack).

mod child;
mod parent;

pub use child::helper_main;
pub use parent::{run, HELPER_TIMEOUT};

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// argv\[1\] that selects helper mode.
pub const HELPER_ARG: &str = "__container-helper";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum HelperOp {
    /// Create the container from `bundle/config.json`; the process waits
    /// for StartContainer.
    Create { bundle: PathBuf },
    /// Start the process described by `process_json` (an OCI Process) in
    /// the running container.
    Exec { process_json: PathBuf },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct HelperRequest {
    pub op: HelperOp,
    pub container_id: String,
    /// libcontainer's state root (`<state>/<id>/state.json` …).
    pub state_root: PathBuf,
    /// Unix socket on which the agent listens for the pty master, when the
    /// process has a terminal.
    pub console_socket: Option<PathBuf>,
    /// Where the helper logs: its stderr is the container process's, so
    /// libcontainer's own log lines (which name the failing step and
    /// errno, where its returned error often says only "failed syscall")
    /// go here; the agent adds the last of them to a failure.
    pub log_path: PathBuf,
}

/// The helper's end of its socket to the agent.
pub const RESULT_FD: i32 = 3;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum HelperResult {
    Started { pid: i32 },
    Failed { error: String },
}
