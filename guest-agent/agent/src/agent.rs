//! The agent's state and the work behind each RPC (`do_*`). `rpc.rs`
//! validates requests and calls these; the mechanics live in the modules
//! named after what they touch.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::config::{Config, Mode};
use crate::container::{spec, Containers};
use crate::error::AgentError;
use crate::etc::{Dns, Hosts};
use crate::files::ReadFileRequest;
use crate::guest_info::{GuestInfo, StartTime};
use crate::network::{InterfaceConfig, LinkState, Network, RouteConfig};
use crate::reaper::Reaper;
use crate::sandbox::{CreateSandbox, Sandbox, SandboxError};
use crate::share::{Mounted, ShareRequest};

/// Why the agent is about to stop serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Running,
    /// DestroySandbox finished; reboot (guest) or exit (host) once the
    /// reply is out.
    Destroyed,
}

pub struct Agent {
    pub config: Config,
    pub reaper: Reaper,
    pub start: StartTime,
    pub sandbox: Sandbox,
    pub containers: Containers,
    pub network: Network,
    shutdown: watch::Sender<Shutdown>,
}

impl Agent {
    pub fn new(config: Config, reaper: Reaper, start: StartTime) -> Arc<Self> {
        let (shutdown, _) = watch::channel(Shutdown::Running);
        Arc::new(Agent {
            config,
            reaper,
            start,
            sandbox: Sandbox::default(),
            containers: Containers::default(),
            network: Network::default(),
            shutdown,
        })
    }

    /// Resolves once DestroySandbox has done its work.
    pub fn shutdown_requested(&self) -> watch::Receiver<Shutdown> {
        self.shutdown.subscribe()
    }

    /// Health.Check: serving until DestroySandbox starts.
    pub fn do_check(&self) -> bool {
        !self.sandbox.is_destroying()
    }

    /// Holds the create lock throughout, so concurrent creates cannot
    /// interleave. Blocking (mounts): run it off the async thread.
    pub fn do_create_sandbox(&self, req: &CreateSandbox) -> Result<(), AgentError> {
        let _creating = self.sandbox.lock_for_create();
        if self.sandbox.is_destroying() {
            return Err(SandboxError::Destroying.into());
        }
        if let Some(existing) = self.sandbox.created() {
            return Err(SandboxError::AlreadyCreated(existing).into());
        }
        // First, so that everything after draws fresh randomness and
        // stamps the right time, in a VM restored from a template too.
        let applied =
            crate::identity::apply(&self.config, &req.identity).map_err(SandboxError::from)?;
        if applied.reseeded || applied.clock_step_ms.is_some() {
            tracing::info!(
                reseeded = applied.reseeded,
                clock_step_ms = applied.clock_step_ms,
                "host entropy and wall clock applied"
            );
        }
        if let Some(hostname) = &req.hostname {
            crate::etc::set_hostname(&self.config, hostname).map_err(SandboxError::from)?;
        }
        for share in &req.shares {
            let mounted =
                crate::share::mount_share(&self.config, share).map_err(SandboxError::from)?;
            tracing::info!(
                tag = %share.tag,
                mount_point = %mounted.mount_point.display(),
                already = mounted.already,
                "share mounted"
            );
        }
        self.sandbox.set_id(&req.id);
        tracing::info!(sandbox_id = %req.id, shares = req.shares.len(), "sandbox created");
        Ok(())
    }

    /// Stops every process, unmounts the shares and asks the main loop to
    /// end the VM (guest) or the process (host) after the reply is sent.
    pub async fn do_destroy_sandbox(&self, timeout: Duration) -> Result<(), AgentError> {
        if !self.sandbox.begin_destroy() {
            return Err(SandboxError::Destroying.into());
        }
        if self.config.mode == Mode::Guest {
            // Failures are logged, not returned: the VM ends either way.
            if let Err(e) = crate::power::stop_all_processes(timeout).await {
                tracing::error!(error = %e, "processes left at shutdown");
            }
            nix::unistd::sync();
            for e in crate::share::unmount_all_shares() {
                tracing::warn!(error = %boxlite_protocol::error_chain::chain(&e), "unmount at shutdown");
            }
            nix::unistd::sync();
        }
        tracing::info!(mode = ?self.config.mode, "sandbox destroyed; ending after the reply");
        self.shutdown.send_replace(Shutdown::Destroyed);
        Ok(())
    }

    /// Configures one link of the agent's network namespace.
    pub async fn do_update_interface(
        &self,
        cfg: &InterfaceConfig,
    ) -> Result<LinkState, AgentError> {
        let state = self.network.update_interface(cfg).await?;
        tracing::info!(
            link = %state.name,
            addresses = state.addresses.len(),
            mtu = state.mtu,
            "interface configured"
        );
        Ok(state)
    }

    /// Replaces the main routing table's routes.
    pub async fn do_update_routes(&self, routes: &[RouteConfig]) -> Result<(), AgentError> {
        self.network.update_routes(routes).await?;
        tracing::info!(routes = routes.len(), "routes replaced");
        Ok(())
    }

    pub fn do_set_hostname(&self, hostname: &str) -> Result<(), AgentError> {
        crate::etc::set_hostname(&self.config, hostname)?;
        tracing::info!(hostname, "hostname set");
        Ok(())
    }

    pub fn do_set_dns(&self, dns: &Dns) -> Result<(), AgentError> {
        crate::etc::set_dns(&self.config, dns)?;
        tracing::info!(nameservers = dns.nameservers.len(), "resolv.conf written");
        Ok(())
    }

    pub fn do_set_hosts(&self, hosts: &Hosts) -> Result<(), AgentError> {
        crate::etc::set_hosts(&self.config, hosts)?;
        tracing::info!(entries = hosts.entries.len(), "hosts written");
        Ok(())
    }

    /// Blocking (mount): run it off the async thread.
    pub fn do_mount_share(&self, req: &ShareRequest) -> Result<Mounted, AgentError> {
        let mounted = crate::share::mount_share(&self.config, req)?;
        tracing::info!(
            tag = %req.tag,
            mount_point = %mounted.mount_point.display(),
            read_only = req.read_only,
            already = mounted.already,
            "share mounted"
        );
        Ok(mounted)
    }

    pub fn do_guest_info(&self) -> Result<GuestInfo, AgentError> {
        Ok(crate::guest_info::collect(&self.start)?)
    }

    /// Blocking (file I/O): run it off the async thread.
    pub fn do_read_file(&self, req: &ReadFileRequest) -> Result<(Vec<u8>, bool), AgentError> {
        Ok(crate::files::read_file(&self.config, req)?)
    }

    // ------------------------------------------------------ containers --

    pub async fn do_create_container(&self, req: spec::CreateRequest) -> Result<(), AgentError> {
        Ok(self
            .containers
            .create(&self.config, &self.reaper, req)
            .await?)
    }

    pub async fn do_start_container(&self, id: &str) -> Result<i32, AgentError> {
        Ok(self.containers.start(id).await?)
    }

    pub async fn do_exec_process(&self, req: spec::ExecRequest) -> Result<i32, AgentError> {
        Ok(self
            .containers
            .exec(&self.config, &self.reaper, req)
            .await?)
    }

    pub async fn do_wait_process(
        &self,
        id: &str,
        exec_id: &str,
    ) -> Result<crate::container::process::Exit, AgentError> {
        Ok(self.containers.wait(id, exec_id).await?)
    }

    pub fn do_signal_process(
        &self,
        id: &str,
        exec_id: &str,
        signal: u32,
        all: bool,
    ) -> Result<(), AgentError> {
        Ok(self.containers.signal(id, exec_id, signal, all)?)
    }

    pub async fn do_remove_container(&self, id: &str, timeout: Duration) -> Result<(), AgentError> {
        Ok(self.containers.remove(id, timeout).await?)
    }

    pub fn do_remove_process(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        Ok(self.containers.remove_exec(id, exec_id)?)
    }

    pub fn do_list_processes(&self, id: &str) -> Result<Vec<(i32, String)>, AgentError> {
        Ok(self.containers.list(id)?)
    }

    pub fn do_close_stdin(&self, id: &str, exec_id: &str) -> Result<(), AgentError> {
        Ok(self.containers.close_stdin(id, exec_id)?)
    }

    pub fn do_resize_pty(
        &self,
        id: &str,
        exec_id: &str,
        rows: u32,
        cols: u32,
    ) -> Result<(), AgentError> {
        Ok(self.containers.resize(id, exec_id, rows, cols)?)
    }

    /// Blocking (cgroup files): run it off the async thread.
    pub fn do_pause_container(&self, id: &str) -> Result<(), AgentError> {
        Ok(self.containers.pause(id)?)
    }

    /// Blocking (cgroup files): run it off the async thread.
    pub fn do_resume_container(&self, id: &str) -> Result<(), AgentError> {
        Ok(self.containers.resume(id)?)
    }

    /// Blocking (cgroup files): run it off the async thread.
    pub fn do_update_container(&self, id: &str, resources_json: &[u8]) -> Result<(), AgentError> {
        Ok(self.containers.update(id, resources_json)?)
    }

    /// Blocking (sysfs writes): (online, present) vCPUs after bringing
    /// them online up to `count`.
    pub fn do_online_cpus(&self, count: u32) -> Result<(u32, u32), AgentError> {
        let sys = self
            .config
            .resolve(std::path::Path::new(crate::cpus::SYS_CPU));
        Ok(crate::cpus::online_cpus(&sys, count)?)
    }

    /// Blocking (cgroup files): run it off the async thread.
    pub fn do_stats_container(
        &self,
        id: &str,
    ) -> Result<crate::container::cgroup::Stats, AgentError> {
        Ok(self.containers.stats(id)?)
    }

    pub async fn do_get_oom_event(&self) -> Result<String, AgentError> {
        self.containers
            .oom
            .next()
            .await
            .ok_or_else(|| AgentError::Unimplemented("the OOM watcher stopped".into()))
    }
}
