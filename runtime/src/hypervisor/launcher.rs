//! [`Launcher`]: what makes the `qemu` and `builtin` backends differ — the
//! binaries they need, the sockets they make, how they spawn their
//! processes and their last way to end a VM. Everything else (checks,
//! phases, readiness, stop, kill, cleanup) is [`super::process_vm::ProcessVm`]'s,
//! the same for both.

use std::ffi::OsString;
use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use boxlite_vmm_api::config::JailUser;
use boxlite_vmm_api::control::BalloonState;

use super::jail_ids::JailLease;
use super::process::{
    fs_socket_name, spawn_process, virtiofsd_args, wait_for_sockets, Proc, ProcessPlace, Role,
    RunAs,
};
use super::{HypervisorError, NetDevice, Share, VmSpec};
use crate::cgroup::CgroupJoiner;
use crate::network::{MacAddr, TapDevice};

/// What is fixed for a VM once it is created: the [`VmSpec`] it was made
/// from (where it lives, what it boots and how big it is) and the
/// virtiofsd both backends spawn. Launchers read it to build their command
/// lines.
#[derive(Debug)]
pub struct VmSetup {
    /// The spec less its shares and nets (left empty): those change while
    /// the VM lives, so [`super::process_vm::ProcessVm`] keeps them in its
    /// state and hands them to [`Launcher::spawn`] in a [`Launch`].
    pub spec: VmSpec,
    /// Spawned once per share, by both backends.
    pub virtiofsd_binary: PathBuf,
}

impl VmSetup {
    /// A file of the sandbox directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.spec.dir.join(name)
    }
}

/// The console fd the launch of [`super::process_vm::ProcessVm::with_preflighted`]
/// names (tests read command lines; nothing is spawned).
#[cfg(test)]
pub(crate) const TEST_CONSOLE_FD: RawFd = 9;

/// What a launcher's [`Launcher::spawn`] works with: the shares and taps
/// to give the VM, the console pipe, and the list of processes, which it
/// fills (helpers first, the VMM last) so that a failure half-way kills
/// what was spawned; likewise the jail uid lease, which teardown releases.
pub struct Launch<'a> {
    pub shares: &'a [Share],
    pub nets: &'a [NetDevice],
    /// The write end of the pipe the shim copies into `console.log`
    /// ([`super::capped_log`]): the VMM inherits it and writes the guest's
    /// serial console there.
    pub console: RawFd,
    /// Every process joins the pod's cgroup (empty: stays in ours).
    pub cgroup: CgroupJoiner,
    pub procs: &'a mut Vec<Proc>,
    /// The VM's jail uid lease, once [`Launch::lease_jail_user`] took one.
    pub jail: &'a mut Option<JailLease>,
}

impl Launch<'_> {
    /// Spawns one process (see [`spawn_process`]) and records it.
    pub fn spawn(
        &mut self,
        vm: &VmSetup,
        role: Role,
        binary: &Path,
        args: Vec<OsString>,
        socket: Option<PathBuf>,
        inherit_fds: Vec<RawFd>,
    ) -> Result<(), HypervisorError> {
        self.spawn_as(vm, None, role, binary, args, socket, inherit_fds)
    }

    /// [`Launch::spawn`], the process starting with `user`'s credentials
    /// (None: ours).
    #[allow(clippy::too_many_arguments)]
    pub fn spawn_as(
        &mut self,
        vm: &VmSetup,
        user: Option<&RunAs>,
        role: Role,
        binary: &Path,
        args: Vec<OsString>,
        socket: Option<PathBuf>,
        inherit_fds: Vec<RawFd>,
    ) -> Result<(), HypervisorError> {
        let place = ProcessPlace {
            dir: &vm.spec.dir,
            cap: vm.spec.log_max_bytes,
            cgroup: &self.cgroup,
            user,
        };
        let p = spawn_process(&vm.spec.id, place, role, binary, args, socket, inherit_fds)?;
        self.procs.push(p);
        Ok(())
    }

    /// Leases the uid (= gid) a jailed VMM runs as, one no other live
    /// sandbox holds ([`super::jail_ids`]). The lease stays in the VM's
    /// state until teardown, which releases it after the VMM is reaped;
    /// so does a failed start.
    pub fn lease_jail_user(&mut self, vm: &VmSetup) -> Result<JailUser, HypervisorError> {
        // Asked twice, the first stays: a second lease names the same
        // file, and replacing the first would drop it, removing that file.
        if let Some(lease) = self.jail.as_ref() {
            return Ok(lease.user());
        }
        let lease = vm.spec.jail_ids.lease(&vm.spec.id)?;
        let user = lease.user();
        *self.jail = Some(lease);
        Ok(user)
    }

    /// Spawns one virtiofsd per share (sockets not awaited yet).
    pub fn spawn_virtiofsd(&mut self, vm: &VmSetup) -> Result<(), HypervisorError> {
        for share in self.shares {
            let socket = vm.path(&fs_socket_name(&share.tag));
            let args = virtiofsd_args(&socket, share);
            self.spawn(
                vm,
                Role::Fs(share.tag.clone()),
                &vm.virtiofsd_binary,
                args,
                Some(socket),
                Vec::new(),
            )?;
        }
        Ok(())
    }

    /// Waits until every helper spawned so far has created its socket.
    pub async fn wait_for_helper_sockets(&mut self, vm: &VmSetup) -> Result<(), HypervisorError> {
        wait_for_sockets(&vm.spec.id, self.procs).await
    }

    /// The fds the VMM inherits: the taps passed by fd, and the console.
    pub fn vmm_fds(&self) -> Vec<RawFd> {
        let mut fds: Vec<RawFd> = self.tap_fds().into_iter().flatten().collect();
        fds.push(self.console);
        fds
    }

    /// The raw fd of each tap the VMM inherits, in order (None: a tap the
    /// VMM opens by name).
    pub fn tap_fds(&self) -> Vec<Option<RawFd>> {
        self.nets
            .iter()
            .map(|n| match &n.tap {
                TapDevice::Fd(fd) => Some(fd.as_raw_fd()),
                TapDevice::Name(_) => None,
            })
            .collect()
    }
}

/// One process-based backend's own part.
#[async_trait]
pub trait Launcher: fmt::Debug + Send + Sync + 'static {
    /// The role of the VMM process (the last one [`Launcher::spawn`] adds).
    const VMM: Role;

    /// The VMM and the helpers a start needs besides virtiofsd, as
    /// (description naming its config key, path); checked before anything
    /// is spawned.
    fn binaries(&self) -> Vec<(&'static str, &Path)>;

    /// The sockets this backend makes besides the hybrid vsock socket, its
    /// readiness listener and one vhost-user socket per share.
    fn own_sockets(&self, vm: &VmSetup) -> Vec<PathBuf>;

    /// Spawns the helpers (virtiofsd with [`Launch::spawn_virtiofsd`]),
    /// waits for their sockets, then spawns the VMM last, handing it the
    /// fds of [`Launch::tap_fds`] (and only it).
    async fn spawn(&self, vm: &VmSetup, launch: &mut Launch<'_>) -> Result<(), HypervisorError>;

    /// The VM's balloon, in MiB of guest memory: sets its target when
    /// `target_mib` is given, and reports the target and what the guest
    /// holds now ([`Hypervisor::set_guest_memory`]). Only while the VMM
    /// runs.
    ///
    /// [`Hypervisor::set_guest_memory`]: super::Hypervisor::set_guest_memory
    async fn balloon(
        &self,
        vm: &VmSetup,
        target_mib: Option<u32>,
    ) -> Result<BalloonState, HypervisorError>;

    /// The VMM has not exited by the agent shutdown's deadline: the
    /// backend's own way to end it, if it has one. Returns how long to
    /// wait for the VMM to exit after it (None: no such way, kill now).
    async fn last_resort_shutdown(&self, _vm: &VmSetup) -> Option<Duration> {
        None
    }

    /// The booted VM's agent answered (before anything is asked of it):
    /// the launcher's chance to act on the fresh guest. An error fails the
    /// VM's start.
    async fn agent_ready(&self, _vm: &VmSetup) -> Result<(), HypervisorError> {
        Ok(())
    }

    /// Every process of the VM was killed and reaped (teardown): whatever
    /// the launcher kept for the VM's start goes.
    fn torn_down(&self) {}

    /// The name of the snapshot (template) the VM [`Launcher::spawn`]
    /// started last was restored from — it waits, paused, for
    /// [`Launcher::run_restored`] — or None: it was booted.
    fn restored(&self) -> Option<String> {
        None
    }

    /// Runs the restored VM: `Ok(false)` while the VMM is not ready to be
    /// asked yet, `Ok(true)` once the guest runs. Only when
    /// [`Launcher::restored`].
    async fn run_restored(&self, vm: &VmSetup) -> Result<bool, HypervisorError> {
        Err(HypervisorError::InvalidState {
            id: vm.spec.id.clone(),
            op: "run a restored VM",
            state: "booted, not restored",
        })
    }

    /// The restored VM did not come up (`error`); from now on
    /// [`Launcher::spawn`] boots.
    fn restore_failed(&self, _vm: &VmSetup, _error: &HypervisorError) {}

    /// For a restored VM, the MAC each of its NICs has in the guest (the
    /// template's), in device order; None for a booted one.
    fn restored_nic_macs(&self) -> Option<Vec<MacAddr>> {
        None
    }
}
