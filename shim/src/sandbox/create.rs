//! Create: boots the VM if this container is the first, puts the rootfs
//! on the share, runs the create-time hooks, creates the container in the
//! guest, connects its stdio, and enters it in the table; a failure undoes
//! what was done (see [`super::rollback`]).

use std::collections::HashMap;
use std::sync::Arc;

use boxlite_protocol::agent::StdioConfig;
use boxlite_protocol::error_chain::chain;
use oci_spec::runtime::Spec;

use super::container::{Container, Process};
use super::lifecycle::BootSpec;
use super::network::{self, PodNetns};
use super::rollback::Rollback;
use super::vm_factory::pod_resources;
use super::{check_id, CreateRequest, Sandbox, STDIO_CONNECT_TIMEOUT};
use crate::agent_client::GuestAgent;
use crate::error::{Result, ShimError};
use crate::events::TaskEvent;
use crate::hooks::ContainerHooks;
use crate::rootfs::{self, ContainerMounts};
use crate::stdio::{Relay, StdioPaths};

impl Sandbox {
    #[tracing::instrument(skip_all, fields(sandbox_id = %self.id, container_id = %req.id))]
    pub async fn create(self: &Arc<Self>, req: CreateRequest) -> Result<u32> {
        check_id("create the container", "container", &req.id)?;
        let _table = self.table_lock.lock().await;
        if self.container(&req.id).is_ok() {
            return Err(ShimError::AlreadyExists(format!("container {:?}", req.id)));
        }
        let spec_path = req.bundle.join("config.json");
        let mut spec = Spec::load(&spec_path).map_err(|e| ShimError::SpecUnreadable {
            path: spec_path.clone(),
            cause: e.into(),
        })?;
        let hooks = ContainerHooks::take_from(&mut spec);
        let cgroups_path = guest_cgroups_path(&req.id, &mut spec)?;
        let mut netns = network::pod_netns(&spec);
        let booting = self.vm.lock().await.is_none();
        let plan = hooks.plan_create(booting && netns != PodNetns::Host);
        let boot_netns = if plan.before_boot.is_empty() {
            None
        } else {
            let state_of = |pid| hooks.state(&req.id, "creating", pid, &req.bundle);
            let held = self
                .run_hooks_before_boot(&hooks, plan.before_boot, &netns, state_of)
                .await?;
            netns = PodNetns::Path(held.path.clone());
            Some(held)
        };
        let no_annotations = HashMap::new();
        let boot = BootSpec {
            annotations: spec.annotations().as_ref().unwrap_or(&no_annotations),
            cgroups_path: cgroups_path.as_deref(),
            resources: pod_resources(&spec),
            netns: netns.clone(),
            owned_netns: boot_netns.as_ref().is_some_and(|held| held.owned),
        };
        let booted = self.ensure_vm(boot).await;
        // The namespace is wired (or the boot failed): the holder's job is done.
        drop(boot_netns);
        let (vm, booted) = booted?;
        if booted && matches!(netns, PodNetns::Path(_)) {
            network::drop_network_namespace(&mut spec);
        }
        let (mounts, spec) = self.prepare_rootfs(&req, spec).await?;

        let mut undo = Rollback::new("create");
        let mount_dir = mounts.dir.clone();
        undo.push("unmount the rootfs", async move {
            if let Err(e) = rootfs::teardown(&mount_dir) {
                tracing::error!(error = %chain(&e), "unmount after failed create");
            }
        });
        let state = hooks.state(&req.id, "creating", vm.hv.pid().unwrap_or(0), &req.bundle);
        undo.check(hooks.run_each(plan.after_mounts, &state).await)
            .await?;
        let spec_json =
            serde_json::to_vec(&spec).map_err(|e| ShimError::failed("cannot encode the spec", e));
        let spec_json = undo.check(spec_json).await?;
        let created = vm
            .agent
            .create_container(&req.id, spec_json, stdio_config(&req.stdio))
            .await;
        undo.check(created).await?;
        undo.push(
            "remove the container from the guest",
            remove_in_guest(&vm.agent, &req.id),
        );
        let relay = Relay::start(
            &vm.hv.hybrid_vsock(),
            &req.id,
            "",
            &self.namespace,
            &req.stdio,
            STDIO_CONNECT_TIMEOUT,
        )
        .await;
        let relay = undo.check(relay).await?;
        undo.commit();

        let init = Process::new(&req.id, "", req.stdio.clone(), Vec::new());
        init.set_relay(relay).await;
        let bundle = req.bundle.display().to_string();
        let container = Arc::new(Container::new(&req.id, &bundle, init, mounts, hooks));
        self.containers
            .write()
            .expect("container table lock")
            .insert(req.id.clone(), container);
        self.save_state(vm.hv.pid());
        self.events.send(TaskEvent::Create {
            container_id: req.id.clone(),
            bundle,
            stdin: req.stdio.stdin.clone(),
            stdout: req.stdio.stdout.clone(),
            stderr: req.stdio.stderr.clone(),
            terminal: req.stdio.terminal,
            pid: 0,
        });
        Ok(0)
    }

    /// Mounts the rootfs and volumes under the share (blocking work, off
    /// the runtime) and points `spec` at their guest paths.
    async fn prepare_rootfs(
        &self,
        req: &CreateRequest,
        mut spec: Spec,
    ) -> Result<(ContainerMounts, Spec)> {
        let (private, guest) = (self.mounts_dir()?, self.shared_dir()?);
        let (id, bundle, rootfs) = (req.id.clone(), req.bundle.clone(), req.rootfs.clone());
        tokio::task::spawn_blocking(move || {
            let share = rootfs::ShareViews {
                private: &private,
                guest: &guest,
            };
            rootfs::prepare(
                share,
                &Self::guest_shared_dir(),
                &id,
                &bundle,
                &rootfs,
                &mut spec,
            )
            .map(|m| (m, spec))
        })
        .await
        .map_err(|e| ShimError::failed("rootfs task failed", e))?
    }
}

/// The container's `cgroupsPath` as the kubelet or ctr gave it (for the
/// VM's own cgroup on the host), and in `spec` its cgroupfs form for the
/// guest: the guest has no systemd, so a systemd path
/// (`kubepods-pod1.slice:cri-containerd:<id>`) becomes the directory runc's
/// systemd driver would make (`/kubepods.slice/kubepods-pod1.slice/cri-containerd-<id>.scope`).
fn guest_cgroups_path(id: &str, spec: &mut Spec) -> Result<Option<String>> {
    let Some(linux) = spec.linux_mut() else {
        return Ok(None);
    };
    let Some(given) = linux.cgroups_path().as_ref() else {
        return Ok(None);
    };
    let given = given.to_str().map(str::to_owned).ok_or_else(|| {
        ShimError::InvalidArgument(format!("container {id:?}: linux.cgroupsPath is not UTF-8"))
    })?;
    if given.is_empty() {
        return Ok(None);
    }
    let relative = boxlite_runtime::cgroup::resolve(Some(&given), "/", id)
        .map_err(|e| ShimError::InvalidArgument(format!("container {id:?}: {e}")))?;
    linux.set_cgroups_path(Some(std::path::Path::new("/").join(relative)));
    Ok(Some(given))
}

/// Undo of a created container: RemoveContainer, logged if it fails.
async fn remove_in_guest(agent: &GuestAgent, id: &str) {
    if let Err(e) = agent.remove_container(id).await {
        tracing::warn!(container_id = %id, error = %chain(&e), "RemoveContainer failed");
    }
}

/// Which stdio streams the guest connects for a process.
pub(super) fn stdio_config(stdio: &StdioPaths) -> StdioConfig {
    let (stdin, stdout, stderr) = stdio.wants();
    StdioConfig {
        stdin,
        stdout,
        stderr,
        terminal: stdio.terminal,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec_with(cgroups_path: Option<&str>) -> Spec {
        let mut spec = Spec::default();
        let mut linux = spec.linux().clone().unwrap_or_default();
        linux.set_cgroups_path(cgroups_path.map(Into::into));
        spec.set_linux(Some(linux));
        spec
    }

    fn guest_path(spec: &Spec) -> Option<String> {
        let linux = spec.linux().as_ref().unwrap();
        linux
            .cgroups_path()
            .as_ref()
            .map(|p| p.display().to_string())
    }

    #[test]
    fn the_guest_gets_a_systemd_cgroups_path_in_cgroupfs_form() {
        let mut spec = spec_with(Some("kubepods-besteffort-pod1.slice:cri-containerd:c1"));
        let given = guest_cgroups_path("c1", &mut spec).unwrap();
        assert_eq!(
            given.as_deref(),
            Some("kubepods-besteffort-pod1.slice:cri-containerd:c1")
        );
        assert_eq!(
            guest_path(&spec).as_deref(),
            Some("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1.slice/cri-containerd-c1.scope")
        );
        let mut spec = spec_with(Some("/kubepods/besteffort/pod1/c1"));
        guest_cgroups_path("c1", &mut spec).unwrap();
        assert_eq!(
            guest_path(&spec).as_deref(),
            Some("/kubepods/besteffort/pod1/c1")
        );
        let mut spec = spec_with(None);
        assert_eq!(guest_cgroups_path("c1", &mut spec).unwrap(), None);
        assert_eq!(guest_path(&spec), None);
    }

    #[test]
    fn a_cgroups_path_that_leaves_the_tree_is_refused() {
        let mut spec = spec_with(Some("/kubepods/../../x"));
        let err = guest_cgroups_path("c1", &mut spec).unwrap_err();
        assert!(matches!(err, ShimError::InvalidArgument(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "container \"c1\": cgroupsPath \"/kubepods/../../x\" is invalid: it has a '..' component"
        );
    }
}
