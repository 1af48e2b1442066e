//! The shim's one way to call the guest agent: a typed method per RPC, each
//! with its host-side time budget and the one agent-error → [`ShimError`]
//! mapping.
//!
//! Every bounded call runs under `tokio::time::timeout`, so a guest that
//! does not answer becomes [`ShimError::AgentTimeout`]
//! (DEADLINE_EXCEEDED) rather than whatever text ttrpc puts in its own
//! timeout error. The ttrpc context still carries a deadline, so the agent
//! abandons the call too; it is [`AGENT_DEADLINE_GRACE`] later than the
//! host's, so the host's timer always fires first and decides the error.
//! The long-polls (WaitProcess, GetOOMEvent) have no deadline.

use std::future::Future;
use std::time::Duration;

use boxlite_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, ExecProcessRequest, GetOOMEventRequest,
    Interface, ListProcessesRequest, MountShareRequest, OnlineCpusRequest, PauseContainerRequest,
    ProcessInfo, RemoveContainerRequest, RemoveProcessRequest, ResizePtyRequest,
    ResumeContainerRequest, Route, Routes, SignalProcessRequest, StartContainerRequest,
    StatsContainerRequest, StatsContainerResponse, StdioConfig, UpdateContainerRequest,
    UpdateInterfaceRequest, UpdateRoutesRequest, WaitProcessRequest, WaitProcessResponse,
};
use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_runtime::AgentConnection;

use crate::error::{Result, ShimError};
use crate::stdio::describe;

/// How much later than the host the agent gives up on a call (see the
/// module doc).
pub const AGENT_DEADLINE_GRACE: Duration = Duration::from_secs(1);
/// Seconds the agent gives a container to stop on RemoveContainer.
pub const REMOVE_TIMEOUT_SECS: u32 = 10;

/// The agent of one sandbox VM. Cheap to clone (a ttrpc client handle).
#[derive(Clone, Debug)]
pub struct GuestAgent {
    conn: AgentConnection,
    /// The budget of an ordinary call (`timeouts.agent_call_secs`).
    call: Duration,
}

/// Runs one bounded call: `rpc` on `object` (both for the error) within
/// `budget`.
async fn bounded<T>(
    rpc: &'static str,
    object: String,
    budget: Duration,
    call: impl Future<Output = ttrpc::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(budget, call).await {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(e)) => Err(ShimError::agent(rpc, object, e)),
        Err(_) => Err(ShimError::AgentTimeout {
            rpc,
            object,
            timeout: budget,
        }),
    }
}

/// The ttrpc context of a bounded call (see the module doc).
fn deadline(budget: Duration) -> ttrpc::context::Context {
    ttrpc::context::with_duration(budget + AGENT_DEADLINE_GRACE)
}

/// A context without deadline, for the long-polls.
fn no_deadline() -> ttrpc::context::Context {
    ttrpc::context::Context::default()
}

fn sandbox_object(sandbox_id: &str) -> String {
    format!("sandbox {sandbox_id:?}")
}

impl GuestAgent {
    /// `call_budget` bounds every call but the long-polls.
    pub fn new(conn: AgentConnection, call_budget: Duration) -> Self {
        Self {
            conn,
            call: call_budget,
        }
    }

    /// CreateContainer's budget: it mounts and sets up a whole container,
    /// so twice an ordinary call's.
    fn create_budget(&self) -> Duration {
        self.call * 2
    }

    fn client(&self) -> &AgentClient {
        self.conn.agent()
    }

    /// CreateSandbox: the guest mounts `shares` and gets ready for containers.
    pub async fn create_sandbox(
        &self,
        sandbox_id: &str,
        shares: Vec<MountShareRequest>,
    ) -> Result<()> {
        let req = CreateSandboxRequest {
            sandbox_id: sandbox_id.to_owned(),
            shares,
            // A VM restored from a template shares the template's random
            // pool and resumes its clock: the agent mixes this in and
            // steps the clock first (docs/agent.md, CreateSandbox).
            entropy_seed: sandbox_entropy_seed(sandbox_id)?,
            wall_clock_unix_ns: unix_now_ns(),
            ..Default::default()
        };
        let call = self.client().create_sandbox(deadline(self.call), &req);
        bounded("CreateSandbox", sandbox_object(sandbox_id), self.call, call)
            .await
            .map(drop)
    }

    /// UpdateInterface: configures the guest NIC with `interface`'s MAC;
    /// answers with it as configured (its guest name). `object` names it.
    pub async fn update_interface(
        &self,
        object: String,
        interface: Interface,
        current_hw_addr: Option<String>,
    ) -> Result<Interface> {
        let req = UpdateInterfaceRequest {
            interface: Some(interface).into(),
            current_hw_addr: current_hw_addr.unwrap_or_default(),
            ..Default::default()
        };
        let call = self.client().update_interface(deadline(self.call), &req);
        bounded("UpdateInterface", object, self.call, call).await
    }

    /// UpdateRoutes: the pod's routes in the guest.
    pub async fn update_routes(&self, sandbox_id: &str, routes: Vec<Route>) -> Result<()> {
        let req = UpdateRoutesRequest {
            routes: Some(Routes {
                routes,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        let call = self.client().update_routes(deadline(self.call), &req);
        bounded("UpdateRoutes", sandbox_object(sandbox_id), self.call, call)
            .await
            .map(drop)
    }

    /// CreateContainer (the longer budget: mounts and a whole set-up).
    pub async fn create_container(
        &self,
        container_id: &str,
        oci_spec_json: Vec<u8>,
        stdio: StdioConfig,
    ) -> Result<()> {
        let req = CreateContainerRequest {
            container_id: container_id.to_owned(),
            oci_spec_json,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        let call = self
            .client()
            .create_container(deadline(self.create_budget()), &req);
        bounded(
            "CreateContainer",
            describe(container_id, ""),
            self.create_budget(),
            call,
        )
        .await
        .map(drop)
    }

    /// StartContainer: the init process's guest pid.
    pub async fn start_container(&self, container_id: &str) -> Result<u32> {
        let req = StartContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let call = self.client().start_container(deadline(self.call), &req);
        bounded(
            "StartContainer",
            describe(container_id, ""),
            self.call,
            call,
        )
        .await
        .map(|started| started.pid)
    }

    /// ExecProcess: the exec's guest pid.
    pub async fn exec_process(
        &self,
        container_id: &str,
        exec_id: &str,
        process_json: Vec<u8>,
        stdio: StdioConfig,
    ) -> Result<u32> {
        let req = ExecProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            process_json,
            stdio: Some(stdio).into(),
            ..Default::default()
        };
        let call = self.client().exec_process(deadline(self.call), &req);
        bounded(
            "ExecProcess",
            describe(container_id, exec_id),
            self.call,
            call,
        )
        .await
        .map(|started| started.pid)
    }

    /// SignalProcess; `all` reaches every process of the container.
    pub async fn signal_process(
        &self,
        container_id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<()> {
        let req = SignalProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            signal,
            all,
            ..Default::default()
        };
        let call = self.client().signal_process(deadline(self.call), &req);
        bounded(
            "SignalProcess",
            describe(container_id, exec_id),
            self.call,
            call,
        )
        .await
        .map(drop)
    }

    /// WaitProcess: long-polls until the process exits.
    pub async fn wait_process(
        &self,
        container_id: &str,
        exec_id: &str,
    ) -> Result<WaitProcessResponse> {
        let req = WaitProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        self.client()
            .wait_process(no_deadline(), &req)
            .await
            .map_err(|e| ShimError::agent("WaitProcess", describe(container_id, exec_id), e))
    }

    /// GetOOMEvent: long-polls for the next OOM kill; the container's id.
    pub async fn get_oom_event(&self) -> Result<String> {
        self.client()
            .get_oom_event(no_deadline(), &GetOOMEventRequest::new())
            .await
            .map(|event| event.container_id)
            .map_err(|e| ShimError::agent("GetOOMEvent", "the sandbox", e))
    }

    /// RemoveContainer: stops it (within [`REMOVE_TIMEOUT_SECS`]) and
    /// removes it from the guest.
    pub async fn remove_container(&self, container_id: &str) -> Result<()> {
        let req = RemoveContainerRequest {
            container_id: container_id.to_owned(),
            timeout_secs: REMOVE_TIMEOUT_SECS,
            ..Default::default()
        };
        let call = self.client().remove_container(deadline(self.call), &req);
        bounded(
            "RemoveContainer",
            describe(container_id, ""),
            self.call,
            call,
        )
        .await
        .map(drop)
    }

    /// RemoveProcess: the guest forgets an exited exec, so its id can be
    /// used again.
    pub async fn remove_process(&self, container_id: &str, exec_id: &str) -> Result<()> {
        let req = RemoveProcessRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            ..Default::default()
        };
        let call = self.client().remove_process(deadline(self.call), &req);
        bounded(
            "RemoveProcess",
            describe(container_id, exec_id),
            self.call,
            call,
        )
        .await
        .map(drop)
    }

    /// ResizePty of a process with a terminal.
    pub async fn resize_pty(
        &self,
        container_id: &str,
        exec_id: &str,
        rows: u32,
        columns: u32,
    ) -> Result<()> {
        let req = ResizePtyRequest {
            container_id: container_id.to_owned(),
            exec_id: exec_id.to_owned(),
            rows,
            columns,
            ..Default::default()
        };
        let call = self.client().resize_pty(deadline(self.call), &req);
        bounded(
            "ResizePty",
            describe(container_id, exec_id),
            self.call,
            call,
        )
        .await
        .map(drop)
    }

    pub async fn pause_container(&self, container_id: &str) -> Result<()> {
        let req = PauseContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let call = self.client().pause_container(deadline(self.call), &req);
        bounded(
            "PauseContainer",
            describe(container_id, ""),
            self.call,
            call,
        )
        .await
        .map(drop)
    }

    pub async fn resume_container(&self, container_id: &str) -> Result<()> {
        let req = ResumeContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let call = self.client().resume_container(deadline(self.call), &req);
        bounded(
            "ResumeContainer",
            describe(container_id, ""),
            self.call,
            call,
        )
        .await
        .map(drop)
    }

    /// ListProcesses: the container's guest processes.
    pub async fn list_processes(&self, container_id: &str) -> Result<Vec<ProcessInfo>> {
        let req = ListProcessesRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let call = self.client().list_processes(deadline(self.call), &req);
        bounded("ListProcesses", describe(container_id, ""), self.call, call)
            .await
            .map(|listed| listed.processes)
    }

    /// UpdateContainer with OCI LinuxResources as JSON.
    pub async fn update_container(
        &self,
        container_id: &str,
        resources_json: Vec<u8>,
    ) -> Result<()> {
        let req = UpdateContainerRequest {
            container_id: container_id.to_owned(),
            resources_json,
            ..Default::default()
        };
        let call = self.client().update_container(deadline(self.call), &req);
        bounded(
            "UpdateContainer",
            describe(container_id, ""),
            self.call,
            call,
        )
        .await
        .map(drop)
    }

    /// OnlineCpus: brings the guest's vCPUs online up to `count`; the
    /// number online after it.
    pub async fn online_cpus(&self, count: u32) -> Result<u32> {
        let req = OnlineCpusRequest {
            count,
            ..Default::default()
        };
        let call = self.client().online_cpus(deadline(self.call), &req);
        bounded("OnlineCpus", "the sandbox".to_owned(), self.call, call)
            .await
            .map(|r| r.online)
    }

    pub async fn stats_container(&self, container_id: &str) -> Result<StatsContainerResponse> {
        let req = StatsContainerRequest {
            container_id: container_id.to_owned(),
            ..Default::default()
        };
        let call = self.client().stats_container(deadline(self.call), &req);
        bounded(
            "StatsContainer",
            describe(container_id, ""),
            self.call,
            call,
        )
        .await
    }
}

/// How much host entropy CreateSandbox brings the guest.
const ENTROPY_SEED_BYTES: usize = 64;

/// Fresh bytes from the host's CSPRNG for sandbox `sandbox_id`'s random
/// pool.
fn sandbox_entropy_seed(sandbox_id: &str) -> Result<Vec<u8>> {
    let mut seed = vec![0u8; ENTROPY_SEED_BYTES];
    boxlite_protocol::random::fill(&mut seed).map_err(|e| {
        ShimError::Internal(format!(
            "sandbox {sandbox_id}: no entropy for its guest: getrandom failed: {e}"
        ))
    })?;
    Ok(seed)
}

/// The host's wall clock in ns since 1970 (0 if it is before 1970, which
/// the agent takes as "leave the guest's clock alone").
fn unix_now_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_call_past_its_budget_is_a_timeout_not_a_transport_error() {
        let never = std::future::pending::<ttrpc::Result<()>>();
        let err = bounded(
            "StartContainer",
            "container \"c1\"".into(),
            Duration::from_millis(10),
            never,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, ShimError::AgentTimeout { .. }), "{err:?}");
        assert_eq!(err.code(), ttrpc::Code::DEADLINE_EXCEEDED);
    }
}
