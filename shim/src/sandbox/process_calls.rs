//! The calls on one process: Start, Exec, Kill, Delete, Wait, and the
//! single waiter that records a process's exit and publishes TaskExit.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use boxlite_protocol::error_chain::chain;

use super::container::Process;
use super::create::stdio_config;
use super::state::{ExitInfo, TaskState};
use super::{
    check_id, Deleted, ExecRequest, Sandbox, Vm, OUTPUT_DRAIN_TIMEOUT, STDIO_CONNECT_TIMEOUT,
    UNKNOWN_EXIT_DRAIN_TIMEOUT, UNKNOWN_EXIT_STATUS,
};
use crate::agent_client::GuestAgent;
use crate::error::{Result, ShimError};
use crate::events::{EventSink, TaskEvent};
use crate::hooks::HookKind;
use crate::rootfs;
use crate::stdio::Relay;

impl Sandbox {
    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id, container_id = %id, exec_id = %exec_id))]
    pub async fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> Result<u32> {
        let container = self.container(id)?;
        let process = container.process(exec_id)?;
        process.check(|s, what| match s {
            TaskState::Created => Ok(()),
            other => Err(ShimError::FailedPrecondition(format!(
                "cannot start {what}: it is {other}"
            ))),
        })?;
        if !exec_id.is_empty() {
            container
                .init
                .check(|s, what| s.check_running(what, "exec in"))?;
        }
        let vm = self.running_vm().await?;
        let pid = if exec_id.is_empty() {
            vm.agent.start_container(id).await?
        } else {
            self.start_exec(&vm, &process).await?
        };
        process.set_started(pid)?;
        if exec_id.is_empty() {
            let state = container.hooks.state(
                id,
                "running",
                vm.hv.pid().unwrap_or(0),
                Path::new(&container.bundle),
            );
            container
                .hooks
                .run_logged(HookKind::Poststart, &state)
                .await;
        }
        if process.claim_waiter() {
            tokio::spawn(wait_exit(
                vm.agent.clone(),
                process.clone(),
                self.events.clone(),
            ));
        }
        self.events.send(if exec_id.is_empty() {
            TaskEvent::Start {
                container_id: id.to_owned(),
                pid,
            }
        } else {
            TaskEvent::ExecStarted {
                container_id: id.to_owned(),
                exec_id: exec_id.to_owned(),
                pid,
            }
        });
        Ok(pid)
    }

    /// ExecProcess while the stdio streams connect (the agent holds a
    /// stream for an exec it has not registered yet for a while).
    async fn start_exec(&self, vm: &Vm, process: &Arc<Process>) -> Result<u32> {
        let vsock = vm.hv.hybrid_vsock();
        let (cid, eid, ns, stdio) = (
            process.container_id.clone(),
            process.exec_id.clone(),
            self.namespace.clone(),
            process.stdio.clone(),
        );
        let relay = tokio::spawn(async move {
            Relay::start(&vsock, &cid, &eid, &ns, &stdio, STDIO_CONNECT_TIMEOUT).await
        });
        let started = vm
            .agent
            .exec_process(
                &process.container_id,
                &process.exec_id,
                process.process_json.clone(),
                stdio_config(&process.stdio),
            )
            .await;
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                relay.abort();
                return Err(e);
            }
        };
        match relay.await {
            Ok(Ok(relay)) => process.set_relay(relay).await,
            Ok(Err(e)) => {
                tracing::error!(error = %chain(&e), "exec stdio failed; killing the exec");
                let _ = signal_in_guest(&vm.agent, process, libc::SIGKILL as u32, false).await;
                return Err(e);
            }
            Err(e) => return Err(ShimError::failed("stdio task failed", e)),
        }
        Ok(pid)
    }

    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id, container_id = %id, exec_id = %exec_id, signal))]
    pub async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> Result<()> {
        let process = self.process(id, exec_id)?;
        if all {
            // kill --all reaches every process even after init exited.
            if process.state() == TaskState::Deleted {
                return Err(ShimError::FailedPrecondition(format!(
                    "cannot signal {}: it is deleted",
                    process.what()
                )));
            }
        } else {
            process.check(|s, what| s.check_kill(what))?;
        }
        let agent = self.agent().await?;
        signal_in_guest(&agent, &process, signal, all).await?;
        if process.state() == TaskState::Created {
            if exec_id.is_empty() {
                // A created container has its process in the guest: the
                // agent reports its exit like any other.
                if process.claim_waiter() {
                    tokio::spawn(wait_exit(agent, process.clone(), self.events.clone()));
                }
            } else {
                // An exec that never started has no guest process.
                process.set_exited(ExitInfo {
                    status: 128 + signal,
                    at: SystemTime::now(),
                });
            }
        }
        Ok(())
    }

    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id, container_id = %id, exec_id = %exec_id))]
    pub async fn delete(&self, id: &str, exec_id: &str) -> Result<Deleted> {
        let container = self.container(id)?;
        if !exec_id.is_empty() {
            let process = container.process(exec_id)?;
            process.check(|s, what| {
                let mut probe = *s;
                probe.delete(what)
            })?;
            let exit = process.set_exited(process.state_exit_or_now());
            process.transition(|s, what| s.delete(what))?;
            process.stop_relay().await;
            container.remove_exec(exec_id);
            // Only a started exec exists in the guest. Its record there goes
            // too, so the id can be used again (runc allows it); an agent
            // that cannot forget it must not keep containerd from deleting.
            if process.pid() != 0 {
                if let Ok(agent) = self.agent().await {
                    if let Err(e) = agent.remove_process(id, exec_id).await {
                        tracing::warn!(error = %chain(&e), "RemoveProcess failed; deleting anyway");
                    }
                }
            }
            return Ok(Deleted {
                pid: process.pid(),
                exit,
            });
        }
        let _table = self.table_lock.lock().await;
        let init = container.init.clone();
        init.check(|s, what| match s {
            TaskState::Created | TaskState::Exited(_) => Ok(()),
            other => Err(ShimError::FailedPrecondition(format!(
                "cannot delete {what}: it is {other}"
            ))),
        })?;
        if let Ok(agent) = self.agent().await {
            // A container the agent does not know, or an agent that cannot
            // remove one (dead VM, no container service), must not keep
            // containerd from deleting it.
            if let Err(e) = agent.remove_container(id).await {
                tracing::warn!(error = %chain(&e), "RemoveContainer failed; deleting anyway");
            }
        }
        let exit = init.set_exited(init.state_exit_or_now());
        init.transition(|s, what| s.delete(what))?;
        init.stop_relay().await;
        for exec in container.execs() {
            exec.stop_relay().await;
        }
        let dir = container.mount_dir();
        tokio::task::spawn_blocking(move || rootfs::teardown(&dir))
            .await
            .map_err(|e| ShimError::failed("unmount task failed", e))??;
        self.containers
            .write()
            .expect("container table lock")
            .remove(id);
        let vm_pid = self.vm.lock().await.as_ref().and_then(|v| v.hv.pid());
        self.save_state(vm_pid);
        let state = container.hooks.state(
            id,
            "stopped",
            vm_pid.unwrap_or(0),
            Path::new(&container.bundle),
        );
        container.hooks.run_logged(HookKind::Poststop, &state).await;
        self.events.send(TaskEvent::Delete {
            container_id: id.to_owned(),
            pid: init.pid(),
            exit_status: exit.status,
            exited_at: exit.at,
        });
        Ok(Deleted {
            pid: init.pid(),
            exit,
        })
    }

    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id, container_id = %req.container_id, exec_id = %req.exec_id))]
    pub async fn exec(&self, req: ExecRequest) -> Result<()> {
        check_id("add the exec", "exec", &req.exec_id)?;
        let container = self.container(&req.container_id)?;
        container
            .init
            .check(|s, what| s.check_running(what, "exec in"))?;
        serde_json::from_slice::<oci_spec::runtime::Process>(&req.process_json).map_err(|e| {
            ShimError::invalid(
                format!(
                    "exec {:?}: the process spec is not a valid OCI process",
                    req.exec_id
                ),
                e,
            )
        })?;
        container.add_exec(Process::new(
            &req.container_id,
            &req.exec_id,
            req.stdio.clone(),
            req.process_json,
        ))?;
        self.events.send(TaskEvent::ExecAdded {
            container_id: req.container_id,
            exec_id: req.exec_id,
        });
        Ok(())
    }

    pub async fn wait(&self, id: &str, exec_id: &str) -> Result<ExitInfo> {
        // containerd waits on a created task before Start: this answers once
        // the process has started and exited (or was deleted unstarted).
        let process = self.process(id, exec_id)?;
        Ok(process.wait().await)
    }
}

impl Process {
    /// The exit if there was one, else "now, status 0" (a created process
    /// that is deleted without ever running).
    fn state_exit_or_now(&self) -> ExitInfo {
        self.state().exit_info().unwrap_or(ExitInfo {
            status: 0,
            at: SystemTime::now(),
        })
    }
}

async fn signal_in_guest(
    agent: &GuestAgent,
    process: &Process,
    signal: u32,
    all: bool,
) -> Result<()> {
    agent
        .signal_process(&process.container_id, &process.exec_id, signal, all)
        .await
}

fn exit_from_nanos(status: i32, nanos: i64) -> ExitInfo {
    let at = if nanos > 0 {
        UNIX_EPOCH + Duration::from_nanos(nanos.unsigned_abs())
    } else {
        SystemTime::now()
    };
    ExitInfo {
        status: u32::try_from(status).unwrap_or(UNKNOWN_EXIT_STATUS),
        at,
    }
}

/// The single waiter of a process: WaitProcess (long-poll), then drain its
/// output, then record the exit and publish TaskExit.
async fn wait_exit(agent: GuestAgent, process: Arc<Process>, events: Arc<dyn EventSink>) {
    let waited = agent
        .wait_process(&process.container_id, &process.exec_id)
        .await;
    let (info, drain) = match waited {
        Ok(r) => (
            exit_from_nanos(r.exit_status, r.exited_at_unix_nanos),
            OUTPUT_DRAIN_TIMEOUT,
        ),
        Err(e) => {
            tracing::error!(what = %process.what(), error = %chain(&e), "WaitProcess failed; reporting exit status 255");
            let info = ExitInfo {
                status: UNKNOWN_EXIT_STATUS,
                at: SystemTime::now(),
            };
            // The agent could not report the exit: its streams may never end.
            (info, UNKNOWN_EXIT_DRAIN_TIMEOUT)
        }
    };
    process.drain_output(drain).await;
    let info = process.set_exited(info);
    let id = if process.exec_id.is_empty() {
        process.container_id.clone()
    } else {
        process.exec_id.clone()
    };
    events.send(TaskEvent::Exit {
        container_id: process.container_id.clone(),
        id,
        pid: process.pid(),
        exit_status: info.status,
        exited_at: info.at,
    });
}
