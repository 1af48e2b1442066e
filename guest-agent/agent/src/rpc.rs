//! The ttrpc face of the agent: one fn per RPC, nothing else. Each one
//! opens a span (through [`serve`]), validates the request into a checked
//! type, calls the `do_*` on [`Agent`], and converts the result. Errors
//! become ttrpc statuses in one place, [`status_code`]. A panic in a handler
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
use ttrpc::Code;

use crate::agent::Agent;
use crate::error::{chain, AgentError};
use crate::etc::{Dns, EtcError, Hosts};
use crate::files::{FileError, ReadFileRequest};
use crate::sandbox::{stop_timeout, CreateSandbox, SandboxError};
use crate::share::{ShareError, ShareRequest};

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

    async fn not_yet<T>(&self, rpc: &'static str, message: String) -> ttrpc::Result<T> {
        self.serve(rpc, async { Err(AgentError::Unimplemented(message)) })
            .await
    }

    async fn container_rpc<T>(&self, rpc: &'static str) -> ttrpc::Result<T> {
        self.not_yet(rpc, format!("container service not implemented yet: {rpc}"))
            .await
    }
}

/// The status code for each error: the one place where this is decided.
pub fn status_code(err: &AgentError) -> Code {
    match err {
        AgentError::Sandbox(e) => match e {
            SandboxError::InvalidId { .. }
            | SandboxError::TooManyShares { .. }
            | SandboxError::Timeout { .. } => Code::INVALID_ARGUMENT,
            SandboxError::AlreadyCreated(_) => Code::ALREADY_EXISTS,
            SandboxError::Destroying => Code::FAILED_PRECONDITION,
            SandboxError::Hostname(e) => etc_code(e),
            SandboxError::Share(e) => share_code(e),
        },
        AgentError::Etc(e) => etc_code(e),
        AgentError::Share(e) => share_code(e),
        AgentError::File(e) => match e {
            FileError::Path(_) | FileError::NotRegular { .. } => Code::INVALID_ARGUMENT,
            FileError::Open { .. } | FileError::Read { .. } => match e.io_kind() {
                Some(std::io::ErrorKind::NotFound) => Code::NOT_FOUND,
                Some(std::io::ErrorKind::PermissionDenied) => Code::FAILED_PRECONDITION,
                _ => Code::INTERNAL,
            },
        },
        AgentError::GuestInfo(_) => Code::INTERNAL,
        AgentError::Unimplemented(_) => Code::UNIMPLEMENTED,
        AgentError::Panicked(_) | AgentError::Worker(_) => Code::INTERNAL,
    }
}

fn etc_code(e: &EtcError) -> Code {
    match e {
        EtcError::InvalidHostname { .. }
        | EtcError::NotAnIp { .. }
        | EtcError::InvalidToken { .. }
        | EtcError::TooMany { .. }
        | EtcError::NoNames { .. } => Code::INVALID_ARGUMENT,
        EtcError::SetHostname { .. } | EtcError::Write { .. } => Code::INTERNAL,
    }
}

fn share_code(e: &ShareError) -> Code {
    match e {
        ShareError::InvalidTag { .. } | ShareError::MountPoint(_) => Code::INVALID_ARGUMENT,
        ShareError::Busy { .. } => Code::ALREADY_EXISTS,
        ShareError::ReadOnlyMismatch { .. } => Code::FAILED_PRECONDITION,
        ShareError::HostShareMissing { .. } | ShareError::NoSuchTag { .. } => Code::NOT_FOUND,
        ShareError::Mount { .. }
        | ShareError::CreateMountPoint { .. }
        | ShareError::Unmount { .. }
        | ShareError::ReadMountinfo(_)
        | ShareError::HostLink { .. } => Code::INTERNAL,
    }
}

/// Logs the failure (caller mistakes at warn, agent failures at error) and
/// builds the status with the whole error chain as its message.
fn to_status(err: &AgentError) -> ttrpc::Error {
    let code = status_code(err);
    let message = chain(err);
    match code {
        Code::INTERNAL => tracing::error!(?code, "{message}"),
        Code::UNIMPLEMENTED => tracing::info!(?code, "{message}"),
        _ => tracing::warn!(?code, "{message}"),
    }
    ttrpc::Error::RpcStatus(ttrpc::get_status(code, message))
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
            let req = CreateSandbox::validate(&req.sandbox_id, &req.hostname, shares)?;
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
        _req: agent::UpdateInterfaceRequest,
    ) -> ttrpc::Result<agent::Interface> {
        self.not_yet(
            "UpdateInterface",
            "UpdateInterface is not implemented yet: networking arrives with the pod networking work"
                .into(),
        )
        .await
    }

    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::UpdateRoutesRequest,
    ) -> ttrpc::Result<agent::Routes> {
        self.not_yet(
            "UpdateRoutes",
            "UpdateRoutes is not implemented yet: networking arrives with the pod networking work"
                .into(),
        )
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
    // Answered UNIMPLEMENTED until the container service lands.

    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.container_rpc("CreateContainer").await
    }

    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::StartContainerRequest,
    ) -> ttrpc::Result<agent::ProcessStarted> {
        self.container_rpc("StartContainer").await
    }

    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ExecProcessRequest,
    ) -> ttrpc::Result<agent::ProcessStarted> {
        self.container_rpc("ExecProcess").await
    }

    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        self.container_rpc("SignalProcess").await
    }

    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::WaitProcessRequest,
    ) -> ttrpc::Result<agent::WaitProcessResponse> {
        self.container_rpc("WaitProcess").await
    }

    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.container_rpc("RemoveContainer").await
    }

    async fn list_processes(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ListProcessesRequest,
    ) -> ttrpc::Result<agent::ListProcessesResponse> {
        self.container_rpc("ListProcesses").await
    }

    async fn resize_pty(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        self.container_rpc("ResizePty").await
    }

    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        self.container_rpc("CloseStdin").await
    }

    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::StatsContainerRequest,
    ) -> ttrpc::Result<agent::StatsContainerResponse> {
        self.container_rpc("StatsContainer").await
    }

    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::PauseContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.container_rpc("PauseContainer").await
    }

    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::ResumeContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.container_rpc("ResumeContainer").await
    }

    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        self.container_rpc("UpdateContainer").await
    }

    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        _req: agent::GetOOMEventRequest,
    ) -> ttrpc::Result<agent::OOMEvent> {
        self.container_rpc("GetOOMEvent").await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_for_caller_mistakes_and_agent_failures() {
        let cases: Vec<(AgentError, Code)> = vec![
            (
                SandboxError::AlreadyCreated("s".into()).into(),
                Code::ALREADY_EXISTS,
            ),
            (SandboxError::Destroying.into(), Code::FAILED_PRECONDITION),
            (
                crate::etc::validate_hostname("a_b").unwrap_err().into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                SandboxError::from(crate::etc::validate_hostname("").unwrap_err()).into(),
                Code::INVALID_ARGUMENT,
            ),
            (
                ShareError::NoSuchTag {
                    tag: "t".into(),
                    mount_point: "/m".into(),
                    source: std::io::Error::from_raw_os_error(libc::EINVAL),
                }
                .into(),
                Code::NOT_FOUND,
            ),
            (
                ShareError::Mount {
                    tag: "t".into(),
                    mount_point: "/m".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENODEV),
                }
                .into(),
                Code::INTERNAL,
            ),
            (
                FileError::Open {
                    path: "/x".into(),
                    source: std::io::Error::from_raw_os_error(libc::ENOENT),
                }
                .into(),
                Code::NOT_FOUND,
            ),
            (
                ReadFileRequest::validate("x", 0).unwrap_err().into(),
                Code::INVALID_ARGUMENT,
            ),
            (AgentError::Unimplemented("x".into()), Code::UNIMPLEMENTED),
            (AgentError::Panicked("X"), Code::INTERNAL),
        ];
        for (err, code) in cases {
            assert_eq!(status_code(&err), code, "{err}");
        }
    }
}
