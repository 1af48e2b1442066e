//! The ttrpc face of the agent: one fn per RPC, nothing else. Each one
//! opens a span (through [`serve`]), validates the request into a checked
//! type, calls the `do_*` on [`Agent`], and converts the result. Errors
//! become ttrpc statuses in one place, [`status::status_code`]. A panic in a handler
//! becomes INTERNAL instead of a request that never answers.

use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use async_trait::async_trait;
use boxlite_protocol::agent::{self, Empty};
use boxlite_protocol::health::{self, health_check_response::ServingStatus};
use boxlite_protocol::{agent_ttrpc, health_ttrpc, PROTOCOL_VERSION};
use futures::FutureExt;
use tracing::Instrument;
use ttrpc::r#async::TtrpcContext;

mod status;

use self::status::to_status;
use crate::agent::Agent;
use crate::container::{spec, ContainerError};
use crate::error::AgentError;
use crate::etc::{Dns, Hosts};
use crate::files::ReadFileRequest;
use crate::identity::Identity;
use crate::network::{validate_routes, InterfaceConfig};
use crate::sandbox::{stop_timeout, CreateSandbox, SandboxError};
use crate::share::ShareRequest;

/// Serves Health and Agent for one [`Agent`].
#[derive(Clone)]
pub struct AgentService {
    agent: Arc<Agent>,
}

impl AgentService {
    pub fn new(agent: Arc<Agent>) -> Self {
        AgentService { agent }
    }

    /// Both services, ready for `ttrpc::asynchronous::Server::register_service`.
    pub fn services(self) -> HashMap<String, ttrpc::r#async::Service> {
        let this = Arc::new(self);
        let mut services = health_ttrpc::create_health(this.clone());
        services.extend(agent_ttrpc::create_agent(this));
        services
    }

    /// Runs an RPC's work inside its span, catching panics, and maps the
    /// outcome to a ttrpc result.
    async fn serve<T, F>(&self, rpc: &'static str, work: F) -> ttrpc::Result<T>
    where
        F: Future<Output = Result<T, AgentError>>,
    {
        let span = tracing::info_span!("rpc", rpc, sandbox_id = %self.agent.sandbox.id());
        let outcome = AssertUnwindSafe(work)
            .catch_unwind()
            .instrument(span.clone())
            .await
            .unwrap_or(Err(AgentError::Panicked(rpc)));
        let _entered = span.enter();
        match outcome {
            Ok(v) => {
                tracing::debug!("ok");
                Ok(v)
            }
            Err(e) => Err(to_status(&e)),
        }
    }

    /// Runs blocking work (mounts, file I/O) on tokio's blocking pool, in
    /// the caller's span.
    async fn blocking<T, F>(&self, rpc: &'static str, work: F) -> Result<T, AgentError>
    where
        T: Send + 'static,
        F: FnOnce(&Agent) -> Result<T, AgentError> + Send + 'static,
    {
        let agent = self.agent.clone();
        let span = tracing::Span::current();
        match tokio::task::spawn_blocking(move || span.in_scope(|| work(&agent))).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => Err(AgentError::Panicked(rpc)),
            Err(_) => Err(AgentError::Worker(rpc)),
        }
    }

    /// [`Self::serve`] inside a span that names the container and exec.
    async fn serve_container<T, F>(
        &self,
        rpc: &'static str,
        container_id: &str,
        exec_id: &str,
        work: F,
    ) -> ttrpc::Result<T>
    where
        F: Future<Output = Result<T, AgentError>>,
    {
        let span = tracing::info_span!(
            "container",
            container_id = %container_id.escape_debug(),
            exec_id = %exec_id.escape_debug()
        );
        self.serve(rpc, work).instrument(span).await
    }
}

fn empty() -> Empty {
    Empty::new()
}

#[async_trait]
impl health_ttrpc::Health for AgentService {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        req: health::CheckRequest,
    ) -> ttrpc::Result<health::HealthCheckResponse> {
        self.serve("Check", async {
            tracing::debug!(caller = %req.service.escape_debug(), "health check");
            let status = if self.agent.do_check() {
                ServingStatus::SERVING
            } else {
                ServingStatus::NOT_SERVING
            };
            Ok(health::HealthCheckResponse {
                status: status.into(),
                ..Default::default()
            })
        })
        .await
    }

    async fn version(
        &self,
        _ctx: &TtrpcContext,
        _req: health::CheckRequest,
    ) -> ttrpc::Result<health::VersionCheckResponse> {
        self.serve("Version", async {
            Ok(health::VersionCheckResponse {
                agent_version: crate::AGENT_VERSION.to_string(),
                protocol_version: PROTOCOL_VERSION,
                ..Default::default()
            })
        })
        .await
    }
}

#[async_trait]
impl agent_ttrpc::Agent for AgentService {
    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve("CreateSandbox", async {
            let shares = req
                .shares
                .iter()
                .map(|s| ShareRequest::validate(&s.tag, &s.mount_point, s.read_only));
            let identity = Identity::validate(&req.entropy_seed, req.wall_clock_unix_ns)
                .map_err(SandboxError::from)?;
            let req = CreateSandbox::validate(&req.sandbox_id, &req.hostname, shares, identity)?;
            self.blocking("CreateSandbox", move |a| a.do_create_sandbox(&req))
                .await?;
            Ok(empty())
        })
        .await
    }

    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: agent::DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve("DestroySandbox", async {
            let timeout = stop_timeout(req.timeout_secs)?;
            self.agent.do_destroy_sandbox(timeout).await?;
            Ok(empty())
        })
        .await
    }

    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateInterfaceRequest,
    ) -> ttrpc::Result<agent::Interface> {
        self.serve("UpdateInterface", async {
            let cfg = InterfaceConfig::validate(&req)?;
            let state = self.agent.do_update_interface(&cfg).await?;
            Ok(state.to_proto())
        })
        .await
    }

    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateRoutesRequest,
    ) -> ttrpc::Result<agent::Routes> {
        self.serve("UpdateRoutes", async {
            let routes = validate_routes(&req)?;
            self.agent.do_update_routes(&routes).await?;
            // The routes as asked: all of them are in the table now.
            Ok(req.routes.clone().unwrap_or_default())
        })
        .await
    }

    async fn set_dns(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SetDnsRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve("SetDns", async {
            let dns = Dns::validate(&req.nameservers, &req.searches, &req.options)?;
            self.agent.do_set_dns(&dns)?;
            Ok(empty())
        })
        .await
    }

    async fn set_hosts(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SetHostsRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve("SetHosts", async {
            let entries = req
                .entries
                .iter()
                .map(|e| (e.ip.as_str(), e.names.as_slice()));
            let hosts = Hosts::validate(entries)?;
            self.agent.do_set_hosts(&hosts)?;
            Ok(empty())
        })
        .await
    }

    async fn set_hostname(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SetHostnameRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve("SetHostname", async {
            crate::etc::validate_hostname(&req.hostname)?;
            self.agent.do_set_hostname(&req.hostname)?;
            Ok(empty())
        })
        .await
    }

    async fn mount_share(
        &self,
        _ctx: &TtrpcContext,
        req: agent::MountShareRequest,
    ) -> ttrpc::Result<agent::MountShareResponse> {
        self.serve("MountShare", async {
            let req = ShareRequest::validate(&req.tag, &req.mount_point, req.read_only)?;
            let mounted = self
                .blocking("MountShare", move |a| a.do_mount_share(&req))
                .await?;
            Ok(agent::MountShareResponse {
                mount_point: mounted.mount_point.to_string_lossy().into_owned(),
                ..Default::default()
            })
        })
        .await
    }

    async fn guest_info(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GuestInfoRequest,
    ) -> ttrpc::Result<agent::GuestInfoResponse> {
        self.serve("GuestInfo", async {
            let info = self.agent.do_guest_info()?;
            Ok(agent::GuestInfoResponse {
                kernel_release: info.kernel_release,
                boot_id: info.boot_id,
                online_cpus: info.online_cpus,
                mem_total_kib: info.mem_total_kib,
                virtio_devices: info
                    .virtio_devices
                    .into_iter()
                    .map(|(name, device_id)| agent::VirtioDevice {
                        name,
                        device_id,
                        ..Default::default()
                    })
                    .collect(),
                agent_uptime_ms: info.agent_uptime_ms,
                agent_started_at_ms: info.agent_started_at_ms,
                ..Default::default()
            })
        })
        .await
    }

    async fn read_file(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ReadFileRequest,
    ) -> ttrpc::Result<agent::ReadFileResponse> {
        self.serve("ReadFile", async {
            let req = ReadFileRequest::validate(&req.path, req.max_len)?;
            let (data, truncated) = self
                .blocking("ReadFile", move |a| a.do_read_file(&req))
                .await?;
            Ok(agent::ReadFileResponse {
                data,
                truncated,
                ..Default::default()
            })
        })
        .await
    }

    // ---------------------------------------------------------- containers --

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve_container("CreateContainer", &req.container_id, "", async {
            let req = spec::validate_create(
                &self.agent.config,
                &req.container_id,
                &req.oci_spec_json,
                stdio(req.stdio.as_ref()),
            )?;
            self.agent.do_create_container(req).await?;
            Ok(empty())
        })
        .await
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::StartContainerRequest,
    ) -> ttrpc::Result<agent::ProcessStarted> {
        self.serve_container("StartContainer", &req.container_id, "", async {
            let pid = self.agent.do_start_container(&req.container_id).await?;
            Ok(started(pid))
        })
        .await
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ExecProcessRequest,
    ) -> ttrpc::Result<agent::ProcessStarted> {
        self.serve_container("ExecProcess", &req.container_id, &req.exec_id, async {
            let req = spec::validate_exec(
                &req.container_id,
                &req.exec_id,
                &req.process_json,
                stdio(req.stdio.as_ref()),
            )?;
            let pid = self.agent.do_exec_process(req).await?;
            Ok(started(pid))
        })
        .await
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve_container("SignalProcess", &req.container_id, &req.exec_id, async {
            self.agent
                .do_signal_process(&req.container_id, &req.exec_id, req.signal, req.all)?;
            Ok(empty())
        })
        .await
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::WaitProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        self.serve_container("WaitProcess", &req.container_id, &req.exec_id, async {
            let exit = self
                .agent
                .do_wait_process(&req.container_id, &req.exec_id)
                .await?;
            let nanos = exit
                .at
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX))
                .unwrap_or(0);
            Ok(agent::WaitProcessResponse {
                exit_status: exit.status,
                exited_at_unix_nanos: nanos,
                ..Default::default()
            })
        })
        .await
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve_container("RemoveContainer", &req.container_id, "", async {
            let timeout = remove_timeout(req.timeout_secs)?;
            self.agent
                .do_remove_container(&req.container_id, timeout)
                .await?;
            Ok(empty())
        })
        .await
    }

    async fn remove_process(
        &self,
        _ctx: &TtrpcContext,
        req: agent::RemoveProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve_container("RemoveProcess", &req.container_id, &req.exec_id, async {
            self.agent
                .do_remove_process(&req.container_id, &req.exec_id)?;
            Ok(empty())
        })
        .await
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ListProcessesRequest,
    ) -> ttrpc::Result<agent::ListProcessesResponse> {
        self.serve_container("ListProcesses", &req.container_id, "", async {
            let id = req.container_id.clone();
            let procs = self
                .blocking("ListProcesses", move |a| a.do_list_processes(&id))
                .await?;
            Ok(agent::ListProcessesResponse {
                processes: procs
                    .into_iter()
                    .map(|(pid, exec_id)| agent::ProcessInfo {
                        pid: u32::try_from(pid).unwrap_or(0),
                        exec_id,
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            })
        })
        .await
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve_container("ResizePty", &req.container_id, &req.exec_id, async {
            self.agent
                .do_resize_pty(&req.container_id, &req.exec_id, req.rows, req.columns)?;
            Ok(empty())
        })
        .await
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: agent::CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve_container("CloseStdin", &req.container_id, &req.exec_id, async {
            self.agent.do_close_stdin(&req.container_id, &req.exec_id)?;
            Ok(empty())
        })
        .await
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::StatsContainerRequest,
    ) -> ttrpc::Result<agent::StatsContainerResponse> {
        self.serve_container("StatsContainer", &req.container_id, "", async {
            let id = req.container_id.clone();
            let s = self
                .blocking("StatsContainer", move |a| a.do_stats_container(&id))
                .await?;
            Ok(stats_response(s))
        })
        .await
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::PauseContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve_container("PauseContainer", &req.container_id, "", async {
            let id = req.container_id.clone();
            self.blocking("PauseContainer", move |a| a.do_pause_container(&id))
                .await?;
            Ok(empty())
        })
        .await
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::ResumeContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve_container("ResumeContainer", &req.container_id, "", async {
            let id = req.container_id.clone();
            self.blocking("ResumeContainer", move |a| a.do_resume_container(&id))
                .await?;
            Ok(empty())
        })
        .await
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: agent::UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.serve_container("UpdateContainer", &req.container_id, "", async {
            let container_id = req.container_id.clone();
            let resources_json = req.resources_json.clone();
            self.blocking("UpdateContainer", move |a| {
                a.do_update_container(&container_id, &resources_json)
            })
            .await?;
            Ok(empty())
        })
        .await
    }

    async fn online_cpus(
        &self,
        _ctx: &TtrpcContext,
        req: agent::OnlineCpusRequest,
    ) -> ttrpc::Result<agent::OnlineCpusResponse> {
        self.serve("OnlineCpus", async {
            let count = req.count;
            let (online, present) = self
                .blocking("OnlineCpus", move |a| a.do_online_cpus(count))
                .await?;
            Ok(agent::OnlineCpusResponse {
                online,
                present,
                ..Default::default()
            })
        })
        .await
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GetOOMEventRequest,
    ) -> ttrpc::Result<agent::OOMEvent> {
        self.serve("GetOOMEvent", async {
            let container_id = self.agent.do_get_oom_event().await?;
            Ok(agent::OOMEvent {
                container_id,
                ..Default::default()
            })
        })
        .await
    }
}

fn stdio(s: Option<&agent::StdioConfig>) -> spec::Stdio {
    s.map(|s| spec::Stdio {
        stdin: s.stdin,
        stdout: s.stdout,
        stderr: s.stderr,
        terminal: s.terminal,
    })
    .unwrap_or_default()
}

fn started(pid: i32) -> agent::ProcessStarted {
    agent::ProcessStarted {
        pid: u32::try_from(pid).unwrap_or(0),
        ..Default::default()
    }
}

/// RemoveContainer's timeout: 0 means the default, at most 300 s.
fn remove_timeout(secs: u32) -> Result<std::time::Duration, ContainerError> {
    match secs {
        0 => Ok(crate::container::DEFAULT_REMOVE_TIMEOUT),
        1..=300 => Ok(std::time::Duration::from_secs(u64::from(secs))),
        _ => Err(ContainerError::InvalidSpec(format!(
            "timeout_secs = {secs} is out of range 0..=300"
        ))),
    }
}

fn stats_response(s: crate::container::cgroup::Stats) -> agent::StatsContainerResponse {
    let ev = |k: &str| s.memory_events.get(k).copied().unwrap_or(0);
    agent::StatsContainerResponse {
        cpu: Some(agent::CpuStats {
            usage_usec: s.cpu_usage_usec,
            user_usec: s.cpu_user_usec,
            system_usec: s.cpu_system_usec,
            nr_periods: s.cpu_nr_periods,
            nr_throttled: s.cpu_nr_throttled,
            throttled_usec: s.cpu_throttled_usec,
            ..Default::default()
        })
        .into(),
        memory: Some(agent::MemoryStats {
            usage: s.memory_usage,
            usage_limit: s.memory_limit,
            swap_usage: s.swap_usage,
            swap_limit: s.swap_limit,
            low_events: ev("low"),
            high_events: ev("high"),
            max_events: ev("max"),
            oom_events: ev("oom"),
            oom_kill_events: ev("oom_kill"),
            stat: s.memory_stat.clone(),
            ..Default::default()
        })
        .into(),
        pids: Some(agent::PidsStats {
            current: s.pids_current,
            limit: s.pids_limit,
            ..Default::default()
        })
        .into(),
        io: s
            .io
            .iter()
            .map(
                |&(major, minor, rbytes, wbytes, rios, wios)| agent::IoEntry {
                    major,
                    minor,
                    rbytes,
                    wbytes,
                    rios,
                    wios,
                    ..Default::default()
                },
            )
            .collect(),
        ..Default::default()
    }
}
