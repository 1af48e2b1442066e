//! The container table: every container of the sandbox with its
//! processes and state, and the operations on them (create, start, exec,
//! signal, pause, update, remove, …).
//!
//! State machine of a container: `Created` → (StartContainer) `Running` ⇄
//! `Paused` → `Stopped` (the init process exited). Illegal transitions are
//! FAILED_PRECONDITION.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use nix::unistd::Pid;
use oci_spec::runtime::LinuxCapabilities;

use super::capabilities::runc_capabilities;
use super::error::ContainerError;
use super::helper::{self, HelperOp, HelperRequest};
use super::home::runc_default_home;
use super::process::{Exit, Process, STREAM_CONNECT_TIMEOUT};
use super::spec::{self, CreateRequest, ExecRequest, Stdio};
use super::stdio_fds::pipes;
use super::{cgroup, oom, BUNDLE_ROOT, STATE_ROOT};
use crate::config::Config;
use crate::reaper::{ExitWatch, Reaper};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Created,
    Running,
    Paused,
    Stopped,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Created => "created, not started",
            State::Running => "running",
            State::Paused => "paused",
            State::Stopped => "stopped",
        }
    }
}

pub struct Container {
    pub id: String,
    pub cgroup_path: PathBuf,
    bundle: PathBuf,
    state_dir: PathBuf,
    state: Mutex<State>,
    pub init: Arc<Process>,
    execs: Mutex<HashMap<String, Arc<Process>>>,
    exec_added: tokio::sync::Notify,
    /// The init's capabilities (after [`runc_capabilities`]): what an exec
    /// without `capabilities` gets.
    capabilities: LinuxCapabilities,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Container {
    pub fn state(&self) -> State {
        *lock(&self.state)
    }

    fn check_state(&self, op: &'static str, allowed: &[State]) -> Result<(), ContainerError> {
        let state = self.state();
        if allowed.contains(&state) {
            Ok(())
        } else {
            Err(ContainerError::State {
                op,
                id: self.id.clone(),
                state: state.name(),
            })
        }
    }

    /// The process named by `exec_id` (empty: init).
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>, ContainerError> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        lock(&self.execs)
            .get(exec_id)
            .cloned()
            .ok_or_else(|| ContainerError::ExecNotFound {
                container_id: self.id.clone(),
                exec_id: exec_id.to_string(),
            })
    }

    /// Like [`Self::process`], but waits up to `timeout` for an exec that
    /// ExecProcess has not registered yet (its streams may come first).
    pub async fn process_eventually(
        &self,
        exec_id: &str,
        timeout: Duration,
    ) -> Result<Arc<Process>, ContainerError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.exec_added.notified();
            match self.process(exec_id) {
                Ok(p) => return Ok(p),
                Err(e) => {
                    if tokio::time::timeout_at(deadline, notified).await.is_err() {
                        return Err(e);
                    }
                }
            }
        }
    }

    fn cgroup(&self) -> Result<cgroup::Cgroup, ContainerError> {
        cgroup::Cgroup::open(&self.id, &self.cgroup_path)
    }
}

/// All containers of the sandbox.
#[derive(Default)]
pub struct Containers {
    map: Mutex<HashMap<String, Arc<Container>>>,
    /// Serialises creates so a duplicate id is refused cleanly.
    creating: tokio::sync::Mutex<()>,
    pub oom: oom::OomEvents,
}

impl Containers {
    pub fn get(&self, id: &str) -> Result<Arc<Container>, ContainerError> {
        lock(&self.map)
            .get(id)
            .cloned()
            .ok_or_else(|| ContainerError::NotFound(id.to_string()))
    }

    pub async fn create(
        &self,
        config: &Config,
        reaper: &Reaper,
        mut req: CreateRequest,
    ) -> Result<(), ContainerError> {
        let _creating = self.creating.lock().await;
        if lock(&self.map).contains_key(&req.id) {
            return Err(ContainerError::AlreadyExists(req.id));
        }
        let state_root = config.resolve(Path::new(STATE_ROOT));
        let bundle = config.resolve(Path::new(BUNDLE_ROOT)).join(&req.id);
        let state_dir = state_root.join(&req.id);
        let io_err = |what| move |source| ContainerError::Io { what, source };
        // Leftovers of an earlier container with this id (removed or failed).
        let _ = std::fs::remove_dir_all(&state_dir);
        let _ = std::fs::remove_dir_all(&bundle);
        std::fs::create_dir_all(&bundle).map_err(io_err("create the bundle directory"))?;
        std::fs::create_dir_all(&state_root).map_err(io_err("create the state directory"))?;
        // validate_create checked that the spec has a process.
        let capabilities = match req.spec.process().clone() {
            Some(mut process) => {
                if let Some(root) = req.spec.root() {
                    runc_default_home(&mut process, root.path());
                }
                let caps = runc_capabilities(process.capabilities().as_ref(), None);
                process.set_capabilities(Some(caps.clone()));
                req.spec.set_process(Some(process));
                caps
            }
            None => runc_capabilities(None, None),
        };
        write_runc_json(&bundle.join("config.json"), &req.spec, "write config.json")?;

        let process = Process::new("", req.stdio);
        let helper_req = HelperRequest {
            op: HelperOp::Create {
                bundle: bundle.clone(),
            },
            container_id: req.id.clone(),
            state_root: state_root.clone(),
            console_socket: req.stdio.terminal.then(|| bundle.join("console.sock")),
            log_path: bundle.join("create.log"),
        };
        let op = "create the container";
        let result = run_helper(reaper, &process, req.stdio, helper_req, op).await;
        let watch = match result {
            Ok(w) => w,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&state_dir);
                let _ = std::fs::remove_dir_all(&bundle);
                if let Ok(cg) = cgroup::Cgroup::open(&req.id, &req.cgroup_path) {
                    cg.remove();
                }
                return Err(e);
            }
        };
        let container = Arc::new(Container {
            id: req.id.clone(),
            cgroup_path: req.cgroup_path.clone(),
            bundle,
            state_dir,
            state: Mutex::new(State::Created),
            init: process.clone(),
            execs: Mutex::new(HashMap::new()),
            exec_added: tokio::sync::Notify::new(),
            capabilities,
        });
        let weak = Arc::downgrade(&container);
        // Watched before the process can be seen to exit, so that the exit
        // path below finds it.
        self.oom.watch(&container.id, &container.cgroup_path);
        let oom = self.oom.reporter();
        let id = req.id.clone();
        process.started(watch, move |_exit: Exit| {
            // Before the exit is published: the host gets an OOM kill's
            // event first, while the container still exists for it.
            oom.report_new_kill(&id);
            if let Some(c) = weak.upgrade() {
                *lock(&c.state) = State::Stopped;
            }
        });
        lock(&self.map).insert(req.id.clone(), container);
        tracing::info!(container_id = %req.id, pid = ?process.pid(), "container created");
        Ok(())
    }

    pub async fn start(&self, id: &str) -> Result<i32, ContainerError> {
        let c = self.get(id)?;
        c.check_state("start", &[State::Created])?;
        c.init.wait_streams(id, STREAM_CONNECT_TIMEOUT).await?;
        // Another StartContainer may have won while we waited.
        {
            let mut state = lock(&c.state);
            if *state != State::Created {
                return Err(ContainerError::State {
                    op: "start",
                    id: id.to_string(),
                    state: state.name(),
                });
            }
            *state = State::Running;
        }
        c.init.start_pumps();
        let state_dir = c.state_dir.clone();
        let started = tokio::task::spawn_blocking(move || {
            libcontainer::container::Container::load(state_dir)
                .and_then(|mut lc| lc.start())
                .map_err(|e| boxlite_protocol::error_chain::chain(&e))
        })
        .await
        .map_err(|e| e.to_string())
        .and_then(|r| r);
        if let Err(message) = started {
            *lock(&c.state) = State::Created;
            return Err(ContainerError::Helper {
                op: "start the container",
                message,
            });
        }
        let pid = c.init.pid().unwrap_or(0);
        tracing::info!(container_id = %id, pid, "container started");
        Ok(pid)
    }

    pub async fn exec(
        &self,
        config: &Config,
        reaper: &Reaper,
        mut req: ExecRequest,
    ) -> Result<i32, ContainerError> {
        let c = self.get(&req.container_id)?;
        c.check_state("exec in", &[State::Running])?;
        let process = {
            let mut execs = lock(&c.execs);
            if execs.contains_key(&req.exec_id) {
                return Err(ContainerError::ExecExists {
                    container_id: req.container_id.clone(),
                    exec_id: req.exec_id.clone(),
                });
            }
            let p = Process::new(&req.exec_id, req.stdio);
            execs.insert(req.exec_id.clone(), p.clone());
            p
        };
        c.exec_added.notify_waiters();
        let result = async {
            process
                .wait_streams(&req.container_id, STREAM_CONNECT_TIMEOUT)
                .await?;
            c.check_state("exec in", &[State::Running])?;
            let process_json = c.bundle.join(format!("exec-{}.json", req.exec_id));
            // The init's root (its pivot_root) is the container's: what
            // the exec's /etc/passwd will be.
            if let Some(pid) = c.init.pid() {
                runc_default_home(&mut req.process, Path::new(&format!("/proc/{pid}/root")));
            }
            let caps =
                runc_capabilities(req.process.capabilities().as_ref(), Some(&c.capabilities));
            req.process.set_capabilities(Some(caps));
            write_runc_json(&process_json, &req.process, "write the exec process file")?;
            let helper_req = HelperRequest {
                op: HelperOp::Exec {
                    process_json: process_json.clone(),
                },
                container_id: req.container_id.clone(),
                state_root: config.resolve(Path::new(STATE_ROOT)),
                console_socket: req
                    .stdio
                    .terminal
                    .then(|| c.bundle.join(format!("exec-{}.console.sock", req.exec_id))),
                log_path: c.bundle.join(format!("exec-{}.log", req.exec_id)),
            };
            let op = "exec the process";
            let outcome = run_helper(reaper, &process, req.stdio, helper_req, op).await;
            let _ = std::fs::remove_file(&process_json);
            outcome
        }
        .await;
        let watch = match result {
            Ok(w) => w,
            Err(e) => {
                lock(&c.execs).remove(&req.exec_id);
                return Err(e);
            }
        };
        process.start_pumps();
        // An OOM-killed exec's event goes out before its exit too (see
        // the init's exit path in `create`).
        let oom = self.oom.reporter();
        let id = req.container_id.clone();
        process.started(watch, move |_| oom.report_new_kill(&id));
        let pid = process.pid().unwrap_or(0);
        tracing::info!(container_id = %req.container_id, exec_id = %req.exec_id, pid, "exec started");
        Ok(pid)
    }

    /// Forgets exec `exec_id` of container `id` once it has exited (or
    /// never started a process), so the id can be used again; its record,
    /// stdio and exit status go with it. An exec that still runs stays.
    pub fn remove_exec(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        if exec_id.is_empty() {
            return Err(ContainerError::InvalidSpec(
                "exec_id is empty: the init goes with RemoveContainer".into(),
            ));
        }
        let c = self.get(id)?;
        let mut execs = lock(&c.execs);
        let process = execs
            .get(exec_id)
            .ok_or_else(|| ContainerError::ExecNotFound {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            })?;
        if process.pid().is_some() && process.exit().is_none() {
            return Err(ContainerError::Precondition(format!(
                "cannot remove exec {exec_id:?} of container {id:?}: it is running"
            )));
        }
        execs.remove(exec_id);
        tracing::info!(container_id = %id, exec_id, "exec removed");
        Ok(())
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<Exit, ContainerError> {
        let p = self.get(id)?.process(exec_id)?;
        Ok(p.wait().await)
    }

    pub fn signal(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), ContainerError> {
        let sig = i32::try_from(signal)
            .ok()
            .and_then(|s| Signal::try_from(s).ok())
            .ok_or(ContainerError::InvalidSignal(signal))?;
        let c = self.get(id)?;
        let p = c.process(exec_id)?;
        if all {
            for pid in c.cgroup()?.pids()? {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), sig);
            }
            return Ok(());
        }
        let exited = || ContainerError::Exited {
            container_id: id.to_string(),
            process: p.name(),
        };
        if p.exit().is_some() {
            return Err(exited());
        }
        // An exec still being set up (ExecProcess has not returned) has no
        // process to signal yet; "already exited" would be a lie.
        let pid = p.pid().ok_or_else(|| {
            ContainerError::Precondition(format!(
                "the {} of container {id:?} has not started yet",
                p.name()
            ))
        })?;
        match nix::sys::signal::kill(Pid::from_raw(pid), sig) {
            Ok(()) => Ok(()),
            Err(nix::errno::Errno::ESRCH) => Err(exited()),
            Err(e) => Err(ContainerError::Io {
                what: "send the signal",
                source: e.into(),
            }),
        }
    }

    pub fn list(&self, id: &str) -> Result<Vec<(i32, String)>, ContainerError> {
        let c = self.get(id)?;
        let execs: HashMap<i32, String> = lock(&c.execs)
            .values()
            .filter_map(|p| p.pid().map(|pid| (pid, p.exec_id.clone())))
            .collect();
        let mut pids = c.cgroup()?.pids()?;
        pids.sort_unstable();
        Ok(pids
            .into_iter()
            .map(|pid| (pid, execs.get(&pid).cloned().unwrap_or_default()))
            .collect())
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> Result<(), ContainerError> {
        let p = self.get(id)?.process(exec_id)?;
        if !p.stdio.stdin {
            return Err(ContainerError::Precondition(format!(
                "the {} of container {id:?} has no stdin",
                p.name()
            )));
        }
        p.close_stdin();
        Ok(())
    }

    pub fn resize(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), ContainerError> {
        let p = self.get(id)?.process(exec_id)?;
        let (rows, cols) = match (u16::try_from(rows), u16::try_from(cols)) {
            (Ok(r), Ok(c)) => (r, c),
            _ => {
                return Err(ContainerError::InvalidSpec(format!(
                    "pty size {rows}x{cols} exceeds 65535"
                )))
            }
        };
        p.resize(rows, cols).map_err(ContainerError::Precondition)
    }

    pub fn pause(&self, id: &str) -> Result<(), ContainerError> {
        self.set_frozen(id, true)
    }

    pub fn resume(&self, id: &str) -> Result<(), ContainerError> {
        self.set_frozen(id, false)
    }

    /// Pause (freeze the cgroup of a running container) or resume (thaw
    /// a paused one): the same steps from opposite states.
    fn set_frozen(&self, id: &str, frozen: bool) -> Result<(), ContainerError> {
        let (op, from, to, done) = if frozen {
            ("pause", State::Running, State::Paused, "container paused")
        } else {
            ("resume", State::Paused, State::Running, "container resumed")
        };
        let c = self.get(id)?;
        c.check_state(op, &[from])?;
        c.cgroup()?.freeze(frozen)?;
        *lock(&c.state) = to;
        tracing::info!(container_id = %id, "{done}");
        Ok(())
    }

    pub fn update(&self, id: &str, resources_json: &[u8]) -> Result<(), ContainerError> {
        let resources = spec::parse_resources(resources_json)?;
        let c = self.get(id)?;
        c.check_state("update", &[State::Created, State::Running, State::Paused])?;
        c.cgroup()?.update(&resources)
    }

    pub fn stats(&self, id: &str) -> Result<cgroup::Stats, ContainerError> {
        self.get(id)?.cgroup()?.stats()
    }

    /// Kills what is left of the container (SIGKILL to its cgroup, thawed
    /// first), waits up to `timeout` for the init's exit, and removes the
    /// cgroup, the state and the bundle.
    pub async fn remove(&self, id: &str, timeout: Duration) -> Result<(), ContainerError> {
        let c = self.get(id)?;
        if c.init.exit().is_none() {
            if let Ok(cg) = c.cgroup() {
                if c.state() == State::Paused {
                    let _ = cg.freeze(false);
                }
                for pid in cg.pids().unwrap_or_default() {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            if let Some(pid) = c.init.pid() {
                let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
            if tokio::time::timeout(timeout, c.init.wait()).await.is_err() {
                return Err(ContainerError::Precondition(format!(
                    "container {id:?} did not exit within {timeout:?} of SIGKILL"
                )));
            }
        }
        lock(&self.map).remove(id);
        self.oom.unwatch(id);
        if let Ok(cg) = c.cgroup() {
            cg.remove();
        }
        let _ = std::fs::remove_dir_all(&c.state_dir);
        let _ = std::fs::remove_dir_all(&c.bundle);
        tracing::info!(container_id = %id, "container removed");
        Ok(())
    }
}

/// Writes `value` as a JSON file runc reads (a bundle's config.json, an
/// exec's process file) at `path`; `what` names the write in an I/O error.
fn write_runc_json(
    path: &Path,
    value: &impl serde::Serialize,
    what: &'static str,
) -> Result<(), ContainerError> {
    let json = serde_json::to_vec(value).map_err(|e| ContainerError::InvalidSpec(e.to_string()))?;
    std::fs::write(path, json).map_err(|source| ContainerError::Io { what, source })
}

/// Runs the helper for `req` (a create or an exec) with new stdio pipes
/// for `process`: the container's process gets one end of each, `process`
/// keeps the agent's ends and the pty master. Returns the watch on the
/// process's exit.
async fn run_helper(
    reaper: &Reaper,
    process: &Process,
    stdio: Stdio,
    req: HelperRequest,
    op: &'static str,
) -> Result<ExitWatch, ContainerError> {
    let mut pipes = pipes(stdio)?;
    pipes.spawn_discards();
    let (watch, master) = helper::run(reaper, req, pipes.process, op).await?;
    process.set_stdio(pipes.agent, master)?;
    Ok(watch)
}
