//! The container helper: a short-lived, single-threaded child of the agent
//! that runs youki's `libcontainer` to create a container or exec a process
//! in one, then exits.
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
//! and 2 are the process's stdio (pipes or `/dev/null`). The helper writes
//! a [`HelperResult`] as JSON to `request.result_path` and exits 0 when the
//! result says ok.

use std::path::PathBuf;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
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
    pub result_path: PathBuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub enum HelperResult {
    Started { pid: i32 },
    Failed { error: String },
}

/// Helper entry point (from `main`): returns the exit code.
pub fn helper_main(args: &[String]) -> i32 {
    let Some(json) = args.first() else {
        eprintln!("boxlite-agent {HELPER_ARG}: missing request");
        return 2;
    };
    let req: HelperRequest = match serde_json::from_str(json) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("boxlite-agent {HELPER_ARG}: bad request: {e}");
            return 2;
        }
    };
    let result = match run(&req) {
        Ok(pid) => HelperResult::Started { pid },
        Err(error) => HelperResult::Failed { error },
    };
    let ok = matches!(result, HelperResult::Started { .. });
    let written = serde_json::to_vec(&result)
        .map_err(|e| e.to_string())
        .and_then(|bytes| std::fs::write(&req.result_path, bytes).map_err(|e| e.to_string()));
    if let Err(e) = written {
        eprintln!(
            "boxlite-agent {HELPER_ARG}: cannot write {}: {e}",
            req.result_path.display()
        );
        return 1;
    }
    if ok {
        0
    } else {
        1
    }
}

fn run(req: &HelperRequest) -> Result<i32, String> {
    let builder = ContainerBuilder::new(req.container_id.clone(), SyscallType::default())
        .with_root_path(req.state_root.clone())
        .map_err(|e| crate::error::chain(&e))?
        .with_console_socket(req.console_socket.clone());
    match &req.op {
        HelperOp::Create { bundle } => {
            let container = builder
                .as_init(bundle.clone())
                .with_systemd(false)
                .with_detach(true)
                .build()
                .map_err(|e| crate::error::chain(&e))?;
            container
                .pid()
                .map(|p| p.as_raw())
                .ok_or_else(|| "libcontainer created the container but reported no pid".into())
        }
        HelperOp::Exec { process_json } => builder
            .as_tenant()
            .with_process(Some(process_json.clone()))
            .with_detach(true)
            .build()
            .map(|p| p.as_raw())
            .map_err(|e| crate::error::chain(&e)),
    }
}
