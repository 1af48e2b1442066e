//! The sandbox VM's life: booting it (with the pod network and the hooks
//! that must run before it), watching it for OOM kills, stopping it, and
//! Shutdown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use boxlite_protocol::agent::MountShareRequest;
use boxlite_protocol::error_chain::chain;
use boxlite_runtime::network::PodNetwork;
use boxlite_runtime::sizing::PodResources;

use super::netns_holder::{self, NetnsHolder};
use super::network::{self, NetworkRecord, PodNetns};
use super::rollback::Rollback;
use super::vm_factory::VmRequest;
use super::{cleanup, Sandbox, Vm, MOUNTS_DIR, SHARED_DIR, SHARED_TAG};
use crate::agent_client::GuestAgent;
use crate::error::{Result, ShimError};
use crate::events::{EventSink, TaskEvent};
use crate::hooks::{ContainerHooks, HookKind, HookState};
use crate::rootfs;

/// What the container that boots the VM decides about it.
pub(super) struct BootSpec<'a> {
    pub annotations: &'a HashMap<String, String>,
    /// Its `linux.cgroupsPath`: where the VM's processes go.
    pub cgroups_path: Option<&'a str>,
    /// What its pod asks for: the VM's size.
    pub resources: PodResources,
    pub netns: PodNetns,
    /// `netns` is a namespace the shim made for the hooks before the boot.
    pub owned_netns: bool,
}

/// The pod's network namespace, held open by a process for the hooks that
/// run before the boot; the holder's job ends once the VM is wired to it.
pub(super) struct BootNetns {
    _holder: NetnsHolder,
    pub path: PathBuf,
    /// The shim made the namespace (and removes it with the network).
    pub owned: bool,
}

impl Sandbox {
    /// Runs `kinds` (the booting container's prestart/createRuntime hooks)
    /// before the VM exists, in the pod's network namespace, so that what
    /// they set up there (nerdctl's CNI) is wired to the VM. `state_of`
    /// makes the hook state from the holder's pid (the only process in the
    /// namespace yet).
    pub(super) async fn run_hooks_before_boot(
        &self,
        hooks: &ContainerHooks,
        kinds: &[HookKind],
        netns: &PodNetns,
        state_of: impl FnOnce(u32) -> HookState,
    ) -> Result<BootNetns> {
        let (holder, path, owned) = self.boot_netns(netns)?;
        let state = state_of(holder.pid());
        if let Err(err) = hooks.run_each(kinds, &state).await {
            drop(holder);
            if owned {
                netns_holder::remove_owned_netns(&path);
            }
            return Err(err);
        }
        Ok(BootNetns {
            _holder: holder,
            path,
            owned,
        })
    }

    /// A holder process in the pod's network namespace: inside the one the
    /// spec names, or a new one the shim makes (and owns) when the spec
    /// asks for a new namespace without a path.
    fn boot_netns(&self, netns: &PodNetns) -> Result<(NetnsHolder, PathBuf, bool)> {
        match netns {
            PodNetns::Path(path) => Ok((NetnsHolder::enter(path)?, path.clone(), false)),
            PodNetns::NewEmpty => {
                let dir = self.dir()?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| ShimError::io("cannot create the sandbox directory", &dir, e))?;
                let file = dir.join(netns_holder::OWNED_NETNS_FILE);
                let (holder, path) = NetnsHolder::create_bound(&file)?;
                Ok((holder, path, true))
            }
            PodNetns::Host => Err(network::host_network_refused(&self.id)),
        }
    }

    /// The VM, booted on first use as `boot` says (the `io.boxlite.*`
    /// overrides and the network of the container that boots it); true when
    /// this call booted it. A container joining a running VM cannot change
    /// it, so its annotations and network are not looked at (CRI copies pod
    /// annotations onto every container).
    pub(super) async fn ensure_vm(self: &Arc<Self>, boot: BootSpec<'_>) -> Result<(Arc<Vm>, bool)> {
        let mut slot = self.vm.lock().await;
        if let Some(vm) = slot.as_ref() {
            return Ok((vm.clone(), false));
        }
        let vm = Arc::new(self.boot(boot).await?);
        *slot = Some(vm.clone());
        Ok((vm, true))
    }

    /// Wires the pod network (if any), then boots; on failure the network
    /// is torn down again.
    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id))]
    async fn boot(self: &Arc<Self>, boot: BootSpec<'_>) -> Result<Vm> {
        let dir = self.dir()?;
        let (mounts, shared) = (dir.join(MOUNTS_DIR), dir.join(SHARED_DIR));
        let view = shared.clone();
        tokio::task::spawn_blocking(move || rootfs::prepare_share(&mounts, &view))
            .await
            .map_err(|e| ShimError::failed("share set-up task failed", e))??;
        let mut net = match &boot.netns {
            PodNetns::Host => return Err(network::host_network_refused(&self.id)),
            PodNetns::NewEmpty => None,
            PodNetns::Path(netns) => {
                let net = match PodNetwork::wire(&self.id, netns).await {
                    Ok(net) => net,
                    Err(e) => {
                        if boot.owned_netns {
                            netns_holder::remove_owned_netns(netns);
                        }
                        return Err(ShimError::PodNetwork(e));
                    }
                };
                *self.network.lock().expect("network lock") =
                    Some(NetworkRecord::of(netns, &net, boot.owned_netns));
                tracing::info!(netns = %netns.display(), interfaces = net.interfaces.len(), "pod network wired");
                Some(net)
            }
        };
        self.save_state(None);
        let mut undo = Rollback::new("sandbox boot");
        // Last: the sandbox record without the network and the VM.
        undo.push("the sandbox record", async { self.save_state(None) });
        undo.push("pod network", async {
            let record = self.network.lock().expect("network lock").take();
            if let Some(record) = record {
                record.teardown(&self.id).await;
            }
        });
        let req = VmRequest {
            annotations: boot.annotations,
            cgroups_path: boot.cgroups_path,
            resources: boot.resources,
        };
        let vm = self.boot_vm(&shared, req, net.as_mut()).await;
        let vm = undo.check(vm).await?;
        undo.commit();
        Ok(vm)
    }

    /// Starts the VM with the share and the pod's taps, waits for the
    /// agent, creates the sandbox in the guest and gives it the pod's
    /// interfaces and routes; a VM that started is killed on failure.
    async fn boot_vm(
        self: &Arc<Self>,
        shared: &Path,
        req: VmRequest<'_>,
        mut net: Option<&mut PodNetwork>,
    ) -> Result<Vm> {
        let (hv, size) = self.factory.new_vm(&self.id, req)?;
        hv.add_share(SHARED_TAG, shared, false).await?;
        if let Some(net) = net.as_deref_mut() {
            for iface in &mut net.interfaces {
                let tap = iface.take_tap().ok_or_else(|| {
                    ShimError::Internal(format!("tap {} has no fd", iface.tap_name))
                })?;
                hv.add_net(tap, iface.mac).await?;
            }
        }
        hv.start().await?;
        self.save_state(hv.pid());
        let mut undo = Rollback::new("sandbox VM start");
        undo.push("kill the VM", async {
            let _ = hv.kill().await;
        });
        let ready = hv.wait_ready().await;
        if ready.is_err() {
            // The sandbox directory (and the console log the error names)
            // goes with the failed create: keep the guest's last words in
            // the shim log, which containerd keeps.
            let console = hv.console_log_path();
            let tail = boxlite_protocol::log_tail::log_tail(&console, 40);
            tracing::error!(
                console_log = %console.display(),
                console_tail = tail.as_deref().unwrap_or("(empty)"),
                "sandbox VM did not become ready"
            );
        }
        let conn = undo.check(ready.map_err(ShimError::from)).await?;
        let agent = GuestAgent::new(conn, self.factory.agent_call_timeout());
        let share = MountShareRequest {
            tag: SHARED_TAG.into(),
            mount_point: Self::guest_shared_dir(),
            read_only: false,
            ..Default::default()
        };
        let created = agent.create_sandbox(&self.id, vec![share]).await;
        undo.check(created).await?;
        if let Some(net) = net.as_deref() {
            let guest_macs = hv.restored_nic_macs();
            let configured =
                network::configure_guest(&self.id, &agent, net, guest_macs.as_deref()).await;
            undo.check(configured).await?;
        }
        undo.commit();
        tracing::info!(pid = ?hv.pid(), "sandbox VM ready");
        let oom_watcher = tokio::spawn(watch_oom(
            Arc::downgrade(self),
            agent.clone(),
            self.events.clone(),
        ));
        Ok(Vm {
            hv,
            agent,
            oom_watcher,
            size,
            online_vcpus: size.vcpus.into(),
            guest_memory_mib: tokio::sync::Mutex::new(size.memory_mib),
        })
    }

    /// Shutdown: only when no container is left (or `now`). Answers at
    /// once; stopping the VM, removing the sandbox directory and letting the
    /// shim exit happen in the background, so containerd's deadline for
    /// Shutdown never races a slow guest.
    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id))]
    pub async fn shutdown(self: &Arc<Self>, now: bool) -> Result<()> {
        let table = self.table_lock.lock().await;
        if !self
            .containers
            .read()
            .expect("container table lock")
            .is_empty()
            && !now
        {
            tracing::debug!("shutdown ignored: containers remain");
            return Ok(());
        }
        drop(table);
        let sandbox = self.clone();
        tokio::spawn(async move {
            sandbox.teardown().await;
        });
        Ok(())
    }

    /// Stops the VM, removes the sandbox directory, signals the shim's exit.
    pub async fn teardown(&self) {
        let _table = self.table_lock.lock().await;
        self.stop_vm().await;
        if let Ok(dir) = self.dir() {
            cleanup::archive_console(&self.id, &dir);
            cleanup::cleanup_sandbox_dir(&dir).await;
        }
        tracing::info!("sandbox stopped; shim exiting");
        self.exit.signal();
    }

    async fn stop_vm(&self) {
        let vm = self.vm.lock().await.take();
        if let Some(vm) = vm {
            vm.oom_watcher.abort();
            if let Err(e) = vm.hv.stop().await {
                tracing::warn!(error = %chain(&e), "VM stop failed; killing it");
                let _ = vm.hv.kill().await;
            }
        }
        // After the VM: its taps go with its last fd, the filters do not.
        let record = self.network.lock().expect("network lock").take();
        if let Some(record) = record {
            record.teardown(&self.id).await;
        }
    }
}

/// Long-polls GetOOMEvent for the life of the VM.
async fn watch_oom(sandbox: Weak<Sandbox>, agent: GuestAgent, events: Arc<dyn EventSink>) {
    loop {
        match agent.get_oom_event().await {
            Ok(container_id) => {
                let Some(sb) = sandbox.upgrade() else { return };
                if sb.container(&container_id).is_ok() {
                    events.send(TaskEvent::Oom { container_id });
                }
            }
            Err(e) if e.code() == ttrpc::Code::UNIMPLEMENTED => {
                tracing::info!("agent has no OOM events yet: {}", chain(&e));
                return;
            }
            Err(e) => {
                if sandbox.upgrade().is_none() {
                    return;
                }
                tracing::debug!(error = %chain(&e), "GetOOMEvent failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}
