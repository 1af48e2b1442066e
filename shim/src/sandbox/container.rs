//! The container table's entries: a container (its mounts and init process)
//! and its processes (init and execs), each with its [`TaskState`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Result, ShimError};
use crate::hooks::ContainerHooks;
use crate::rootfs::ContainerMounts;
use crate::sandbox::state::{ExitInfo, TaskState};
use crate::stdio::{describe, Relay, StdioPaths};

/// A snapshot of one process for State.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessStatus {
    pub container_id: String,
    pub exec_id: String,
    pub bundle: String,
    pub pid: u32,
    pub state: TaskState,
    pub stdio: StdioPaths,
}

struct Inner {
    state: TaskState,
    pid: u32,
}

pub struct Process {
    pub container_id: String,
    /// Empty for the init process.
    pub exec_id: String,
    pub stdio: StdioPaths,
    /// For execs: the OCI Process as JSON.
    pub process_json: Vec<u8>,
    inner: Mutex<Inner>,
    exit_tx: watch::Sender<Option<ExitInfo>>,
    relay: tokio::sync::Mutex<Option<Relay>>,
    /// CloseIO came (possibly before the relay existed: `ctr exec` with a
    /// short piped stdin sends it while Start is still connecting).
    stdin_close_requested: AtomicBool,
    waiter: AtomicBool,
}

impl Process {
    pub fn new(
        container_id: &str,
        exec_id: &str,
        stdio: StdioPaths,
        process_json: Vec<u8>,
    ) -> Self {
        Self {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            stdio,
            process_json,
            inner: Mutex::new(Inner {
                state: TaskState::Created,
                pid: 0,
            }),
            exit_tx: watch::channel(None).0,
            relay: tokio::sync::Mutex::new(None),
            stdin_close_requested: AtomicBool::new(false),
            waiter: AtomicBool::new(false),
        }
    }

    /// "container \"c\"" or "exec \"e\" of container \"c\"".
    pub fn what(&self) -> String {
        describe(&self.container_id, &self.exec_id)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().expect("process state lock")
    }

    pub fn state(&self) -> TaskState {
        self.lock().state
    }

    pub fn pid(&self) -> u32 {
        self.lock().pid
    }

    /// Applies a checked transition under the lock.
    pub fn transition(&self, f: impl FnOnce(&mut TaskState, &str) -> Result<()>) -> Result<()> {
        let what = self.what();
        let mut inner = self.lock();
        f(&mut inner.state, &what)
    }

    /// Checks without changing anything.
    pub fn check(&self, f: impl FnOnce(&TaskState, &str) -> Result<()>) -> Result<()> {
        let what = self.what();
        let inner = self.lock();
        f(&inner.state, &what)
    }

    /// True for the one caller that may start this process's waiter.
    pub fn claim_waiter(&self) -> bool {
        !self.waiter.swap(true, Ordering::SeqCst)
    }

    /// Started: Created → Running with its guest pid.
    pub fn set_started(&self, pid: u32) -> Result<()> {
        let what = self.what();
        let mut inner = self.lock();
        inner.state.start(&what)?;
        inner.pid = pid;
        Ok(())
    }

    /// Records the exit (first one wins) and wakes every Wait.
    pub fn set_exited(&self, info: ExitInfo) -> ExitInfo {
        let mut inner = self.lock();
        inner.state.exit(info);
        let kept = inner.state.exit_info().unwrap_or(info);
        drop(inner);
        self.exit_tx.send_replace(Some(kept));
        kept
    }

    /// Waits for the exit.
    pub async fn wait(&self) -> ExitInfo {
        let mut rx = self.exit_tx.subscribe();
        loop {
            if let Some(info) = *rx.borrow_and_update() {
                return info;
            }
            if rx.changed().await.is_err() {
                // The sender lives as long as self; unreachable in practice.
                return ExitInfo {
                    status: 255,
                    at: std::time::SystemTime::now(),
                };
            }
        }
    }

    pub fn status(&self, bundle: &str) -> ProcessStatus {
        let inner = self.lock();
        ProcessStatus {
            container_id: self.container_id.clone(),
            exec_id: self.exec_id.clone(),
            bundle: bundle.to_owned(),
            pid: inner.pid,
            state: inner.state,
            stdio: self.stdio.clone(),
        }
    }

    /// Installs the running relay; a CloseIO that came first applies now.
    pub async fn set_relay(&self, mut relay: Relay) {
        let mut slot = self.relay.lock().await;
        if self.stdin_close_requested.load(Ordering::SeqCst) {
            relay.close_stdin();
        }
        *slot = Some(relay);
    }

    /// CloseIO: the relay passes on what the fifo holds, then ends the
    /// stream, which is the process's EOF. Remembered if the relay is not
    /// running yet.
    pub async fn close_stdin(&self) {
        let mut slot = self.relay.lock().await;
        self.stdin_close_requested.store(true, Ordering::SeqCst);
        if let Some(relay) = slot.as_mut() {
            relay.close_stdin();
        }
    }

    /// Waits for stdout/stderr to be drained, at most `timeout`.
    pub async fn drain_output(&self, timeout: Duration) {
        if let Some(relay) = self.relay.lock().await.as_mut() {
            relay.drain(timeout).await;
        }
    }

    pub async fn stop_relay(&self) {
        if let Some(mut relay) = self.relay.lock().await.take() {
            relay.abort();
        }
    }
}

pub struct Container {
    pub id: String,
    pub bundle: String,
    pub init: Arc<Process>,
    pub mounts: Mutex<ContainerMounts>,
    /// OCI hooks, run on the host (the guest's spec has none).
    pub hooks: ContainerHooks,
    execs: Mutex<HashMap<String, Arc<Process>>>,
}

impl Container {
    pub fn new(
        id: &str,
        bundle: &str,
        init: Process,
        mounts: ContainerMounts,
        hooks: ContainerHooks,
    ) -> Self {
        Self {
            id: id.to_owned(),
            bundle: bundle.to_owned(),
            init: Arc::new(init),
            mounts: Mutex::new(mounts),
            hooks,
            execs: Mutex::new(HashMap::new()),
        }
    }

    pub fn mount_dir(&self) -> PathBuf {
        self.mounts.lock().expect("mounts lock").dir.clone()
    }

    /// The init process for an empty exec id, else that exec.
    pub fn process(&self, exec_id: &str) -> Result<Arc<Process>> {
        if exec_id.is_empty() {
            return Ok(self.init.clone());
        }
        self.execs
            .lock()
            .expect("exec table lock")
            .get(exec_id)
            .cloned()
            .ok_or_else(|| {
                ShimError::NotFound(format!("exec {exec_id:?} of container {:?}", self.id))
            })
    }

    pub fn add_exec(&self, process: Process) -> Result<Arc<Process>> {
        let mut execs = self.execs.lock().expect("exec table lock");
        if execs.contains_key(&process.exec_id) {
            return Err(ShimError::AlreadyExists(format!(
                "exec {:?} of container {:?}",
                process.exec_id, self.id
            )));
        }
        let process = Arc::new(process);
        execs.insert(process.exec_id.clone(), process.clone());
        Ok(process)
    }

    pub fn remove_exec(&self, exec_id: &str) {
        self.execs.lock().expect("exec table lock").remove(exec_id);
    }

    pub fn execs(&self) -> Vec<Arc<Process>> {
        self.execs
            .lock()
            .expect("exec table lock")
            .values()
            .cloned()
            .collect()
    }
}
