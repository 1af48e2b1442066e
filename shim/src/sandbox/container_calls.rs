//! The small calls on a container: pty resize, CloseIO, pause, resume,
//! pids, update, stats, State and Connect. Each checks the task state,
//! then asks the agent once — update may first have it bring vCPUs online
//! ([`grow_for`]).

use std::sync::atomic::Ordering;

use boxlite_protocol::agent::StatsContainerResponse;
use boxlite_runtime::sizing::PodResources;

use super::container::ProcessStatus;
use super::state::TaskState;
use super::{GuestProcess, Sandbox, Vm};
use crate::error::{Result, ShimError};
use crate::events::TaskEvent;

impl Sandbox {
    pub async fn resize_pty(&self, id: &str, exec_id: &str, width: u32, height: u32) -> Result<()> {
        let process = self.process(id, exec_id)?;
        if !process.stdio.terminal {
            return Err(ShimError::FailedPrecondition(format!(
                "{} has no terminal",
                process.what()
            )));
        }
        process.check(|s, what| s.check_kill(what))?;
        self.agent()
            .await?
            .resize_pty(id, exec_id, height, width)
            .await
    }

    pub async fn close_io(&self, id: &str, exec_id: &str, stdin: bool) -> Result<()> {
        let process = self.process(id, exec_id)?;
        if !stdin || process.stdio.stdin.is_empty() {
            return Ok(());
        }
        // Only through the stream: its EOF reaches the process after every
        // byte before it. (Asking the agent to close stdin as well raced
        // with Start: a CloseIO during an exec's Start closed stdin before
        // its stream connected, and the agent then refused the stream.)
        process.close_stdin().await;
        Ok(())
    }

    pub async fn pause(&self, id: &str) -> Result<()> {
        let container = self.container(id)?;
        container.init.check(|s, what| {
            let mut probe = *s;
            probe.pause(what)
        })?;
        self.agent().await?.pause_container(id).await?;
        container.init.transition(|s, what| s.pause(what))?;
        self.events.send(TaskEvent::Paused {
            container_id: id.to_owned(),
        });
        Ok(())
    }

    pub async fn resume(&self, id: &str) -> Result<()> {
        let container = self.container(id)?;
        container.init.check(|s, what| {
            let mut probe = *s;
            probe.resume(what)
        })?;
        self.agent().await?.resume_container(id).await?;
        container.init.transition(|s, what| s.resume(what))?;
        self.events.send(TaskEvent::Resumed {
            container_id: id.to_owned(),
        });
        Ok(())
    }

    pub async fn pids(&self, id: &str) -> Result<Vec<GuestProcess>> {
        self.container(id)?;
        let processes = self.agent().await?.list_processes(id).await?;
        Ok(processes
            .into_iter()
            .map(|p| GuestProcess {
                pid: p.pid,
                exec_id: p.exec_id,
            })
            .collect())
    }

    pub async fn update(&self, id: &str, resources_json: Vec<u8>) -> Result<()> {
        let container = self.container(id)?;
        container.init.check(|s, what| match s {
            TaskState::Created | TaskState::Running | TaskState::Paused => Ok(()),
            other => Err(ShimError::FailedPrecondition(format!(
                "cannot update {what}: it is {other}"
            ))),
        })?;
        let resources =
            serde_json::from_slice::<oci_spec::runtime::LinuxResources>(&resources_json)
                .map_err(|e| ShimError::invalid("resources are not OCI LinuxResources", e))?;
        let vm = self.running_vm().await?;
        grow_for(&vm, id, &resources).await?;
        vm.agent.update_container(id, resources_json).await
    }

    pub async fn stats(&self, id: &str) -> Result<StatsContainerResponse> {
        self.container(id)?;
        self.agent().await?.stats_container(id).await
    }

    pub fn state(&self, id: &str, exec_id: &str) -> Result<ProcessStatus> {
        let container = self.container(id)?;
        Ok(container.process(exec_id)?.status(&container.bundle))
    }

    /// (shim pid, init pid) for Connect.
    pub fn connect(&self, id: &str) -> Result<(u32, u32)> {
        let pid = self.container(id).map(|c| c.init.pid()).unwrap_or(0);
        Ok((std::process::id(), pid))
    }
}

/// Makes room in the VM for what an update asks: more vCPUs online when
/// its CPU quota needs more than are, and more guest memory when its
/// memory limit (plus the guest's own reserve) needs more than the guest
/// has — both up to what the VM was built with. An update asking for more
/// than that is refused, not applied as a limit nothing can reach. Neither
/// shrinks: a lower limit is applied in the guest only.
async fn grow_for(vm: &Vm, id: &str, resources: &oci_spec::runtime::LinuxResources) -> Result<()> {
    let cpu = resources.cpu().as_ref();
    let asked = PodResources {
        cpu_quota: cpu.and_then(|c| c.quota()),
        cpu_period: cpu.and_then(|c| c.period()),
        memory_limit: resources.memory().as_ref().and_then(|m| m.limit()),
        source: "the update",
    };
    if let Some(mib) = asked.memory_mib() {
        grow_memory_for(vm, id, mib).await?;
    }
    let Some(cpus) = asked.vcpus() else {
        return Ok(());
    };
    if cpus <= u64::from(vm.online_vcpus.load(Ordering::SeqCst)) {
        return Ok(());
    }
    let present = vm.size.present_vcpus;
    let cpus = match u32::try_from(cpus) {
        Ok(n) if n <= present => n,
        _ => {
            return Err(ShimError::FailedPrecondition(format!(
                "container {id:?}: the update asks for {cpus} CPUs, more than the {present} vCPUs \
                 its sandbox VM was built with (guest.max_vcpus and the host's CPUs bound them)"
            )))
        }
    };
    let online = vm.agent.online_cpus(cpus).await?;
    vm.online_vcpus.fetch_max(online, Ordering::SeqCst);
    tracing::info!(container_id = %id, online, present, "vCPUs brought online for the update");
    Ok(())
}

/// Gives the guest memory enough for a container limit of `limit_mib`
/// (the limit plus what the guest itself takes: the reserve and its page
/// records) out of the VM's headroom.
async fn grow_memory_for(vm: &Vm, id: &str, limit_mib: u64) -> Result<()> {
    let needed = limit_mib.saturating_add(vm.size.reserved_mib.into());
    let mut guest = vm.guest_memory_mib.lock().await;
    if needed <= u64::from(*guest) {
        return Ok(());
    }
    let present = vm.size.present_memory_mib;
    let needed = match u32::try_from(needed) {
        Ok(n) if n <= present => n,
        _ => {
            return Err(ShimError::FailedPrecondition(format!(
                "container {id:?}: the update asks for a {limit_mib} MiB memory limit, which \
                 needs {needed} MiB of guest memory (with the {} MiB the guest itself takes), \
                 more than the {present} MiB its sandbox VM was built with (its boot size plus \
                 guest.memory_headroom_mib, within guest.max_memory_mib)",
                vm.size.reserved_mib
            )))
        }
    };
    vm.hv.set_guest_memory(needed).await?;
    tracing::info!(container_id = %id, from_mib = *guest, to_mib = needed, present_mib = present, "guest memory grown for the update");
    *guest = needed;
    Ok(())
}
