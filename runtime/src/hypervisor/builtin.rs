//! The `builtin` backend: our own VMM, `boxlite-vmm` (crate `runtime/vmm`),
//! one process per sandbox, plus one `virtiofsd` per share.
//!
//! Files in the sandbox directory:
//!
//! | file | what |
//! |---|---|
//! | `vm.json` | the VM config the VMM is started with (`boxlite-vmm --config vm.json`) |
//! | `console.log` | guest serial console (ttyS0), copied from a pipe and capped ([`super::capped_log`]) |
//! | `vsock.sock` | hybrid vsock socket, served by the VMM itself |
//! | `control.sock` | the VMM's control socket (shutdown, pause, resume, status, metrics) |
//! | `fs-<tag>.sock` (+ `.pid` lock) | vhost-user socket between the VMM and that share's virtiofsd |
//! | `boxlite-vmm.log`, `virtiofsd-<tag>.log` | each process's stdout and stderr |
//! | `boxlite-vmm.pid`, `virtiofsd-<tag>.pid` | pids, for [`super::cleanup_stale_processes`] |
//!
//! The VMM jails itself before the guest runs (its own pid, mount, net,
//! ipc and uts namespaces, an empty root, a uid of the sandbox's own leased
//! from `hypervisor.jail_id_*` ([`super::jail_ids`]) with no capabilities,
//! landlock, seccomp; docs/security.md); it connects to the agent's
//! readiness listener and to each virtiofsd before its jail, as root, and
//! to nothing after. The lease is taken first in `spawn` and released at
//! teardown, once the VMM is reaped. Start order and
//! cleanup guarantees are `hypervisor/process_vm.rs`'s, shared with the qemu
//! backend: everything is checked first, virtiofsd daemons are spawned and
//! their sockets awaited, then the VMM (which inherits the tap fds, and
//! only it); any failure kills and reaps what was spawned and removes the
//! sockets. `stop` asks the agent (DestroySandbox: the guest reboots, the
//! VMM exits 0), then — this backend's fallback — the VMM's control socket
//! (`Request::Shutdown`), then kills.
//!
//! `vm.json` and the control messages are the types of `boxlite-vmm-api`,
//! the crate the VMM parses them with: the two cannot drift apart.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use boxlite_protocol::error_chain::chain;
use boxlite_protocol::READY_VSOCK_PORT;
use boxlite_vmm_api::config::{
    BalloonConfig, DeviceConfig, FsConfig, JailUser, MemoryMode, NetConfig, RestoreConfig,
    RngConfig, VmConfig, VsockConfig,
};
use boxlite_vmm_api::control::{BalloonState, Reply, Request, VmState};

use super::launcher::{Launch, Launcher, VmSetup};
use super::process::{fs_socket_name, Role};
use super::process_vm::ProcessVm;
use super::template::{
    FileId, PendingTemplate, Template, TemplateError, TemplateInputs, TemplateStore,
    TEMPLATE_FORMAT,
};
use super::{HypervisorError, NetDevice, Share, VmSpec, VSOCK_SOCKET};
use crate::config::ResolvedHypervisor;
use crate::network::{MacAddr, TapDevice};

/// The VM config file in the sandbox directory.
pub const VM_CONFIG: &str = "vm.json";
/// The VMM's control socket in the sandbox directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Guest CID (each VM has its own VMM, so they never clash).
pub const GUEST_CID: u32 = 3;
/// Every sandbox gets a balloon: the guest reports the memory it frees and
/// the VMM hands it back to the host (unless `guest.free_page_reporting` is
/// off), so a pod that once touched a lot of memory does not keep it.
///
/// `held_mib` is the VM's room to grow (`guest.memory_headroom_mib`): the
/// balloon holds it from boot, and an update that needs it lowers the
/// target ([`super::Hypervisor::set_guest_memory`]). That memory is the
/// pod's to be given, not the guest's to take, so a balloon holding some
/// does not deflate on OOM (and the guest's total shrinks by what it
/// holds); an empty one does, which only matters if it is ever inflated.
pub const fn balloon(free_page_reporting: bool, held_mib: u32) -> BalloonConfig {
    BalloonConfig {
        deflate_on_oom: held_mib == 0,
        free_page_reporting,
        target_mib: held_mib,
    }
}
/// After the agent's shutdown deadline, how long the VMM gets to exit after
/// a control-socket `shutdown` before it is killed.
const CONTROL_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The `builtin` backend. Build it with [`super::new_hypervisor`].
pub type BuiltinHypervisor = ProcessVm<BuiltinLauncher>;

/// How the `builtin` backend launches a VM: virtiofsd daemons, then
/// boxlite-vmm with a JSON config.
#[derive(Debug)]
pub struct BuiltinLauncher {
    bins: ResolvedHypervisor,
    /// Where the VM's template is found or captured (None: templates are
    /// off, or a restore failed and the VM boots from then on).
    templates: Mutex<Option<TemplateStore>>,
    /// The template the VM running now was restored from (None: booted).
    restored: Mutex<Option<Template>>,
    /// A template to capture from this boot once the agent answers, with
    /// the VM's NIC MACs ([`super::template::PendingTemplate`]).
    capturing: Mutex<Option<(PendingTemplate, Vec<MacAddr>)>>,
}

impl ProcessVm<BuiltinLauncher> {
    /// A sandbox VM that always boots.
    pub fn new(spec: VmSpec, bins: ResolvedHypervisor) -> Result<Self, HypervisorError> {
        Self::with_templates(spec, bins, None)
    }

    /// A sandbox VM restored from its template in `templates` when there
    /// is one, booted otherwise — and then saved as the template, unless
    /// another shim is saving it.
    pub fn with_templates(
        spec: VmSpec,
        bins: ResolvedHypervisor,
        templates: Option<TemplateStore>,
    ) -> Result<Self, HypervisorError> {
        let virtiofsd = bins.virtiofsd_binary.clone();
        let launcher = BuiltinLauncher {
            bins,
            templates: Mutex::new(templates),
            restored: Mutex::new(None),
            capturing: Mutex::new(None),
        };
        ProcessVm::with_launcher(spec, &virtiofsd, launcher)
    }

    /// Sends one control request and returns the reply (blocking, with a
    /// short timeout: the VMM answers from its event loop).
    pub fn control_request(&self, request: Request) -> std::io::Result<Reply> {
        control_request(&self.setup.path(CONTROL_SOCKET), request)
    }
}

/// How boxlite-vmm starts the VM.
#[derive(Debug, Clone, Copy)]
pub enum VmmStart<'a> {
    /// Boots the kernel.
    Boot,
    /// Boots the kernel; the `snapshot` op may save the VM into this
    /// directory (the VM a template is captured from).
    BootToSave { snapshot_dir: &'a Path },
    /// Rebuilds the VM from a template's snapshot, paused until the
    /// `restore` op.
    Restore(&'a Template),
}

/// The VMM's config (see `docs/vmm.md`). `user` is the sandbox's jail
/// uid ([`Launch::lease_jail_user`]); `nets` pairs each device with the
/// raw fd the VMM inherits for it (None for named taps); `console` is the
/// inherited fd of the console pipe.
///
/// A restored VM's devices are the same kinds in the same order as its
/// template's (the template's key holds the share tags and NIC count); its
/// NICs keep the template's MACs, the ones its guest driver read at probe,
/// until the shim gives each the pod's.
pub fn vm_config(
    vm: &VmSetup,
    start: VmmStart<'_>,
    user: JailUser,
    shares: &[Share],
    nets: &[(Option<RawFd>, &NetDevice)],
    console: RawFd,
) -> Result<VmConfig, HypervisorError> {
    let mut devices = vec![
        DeviceConfig::Rng(RngConfig::default()),
        DeviceConfig::Vsock(VsockConfig {
            guest_cid: GUEST_CID.into(),
            uds_path: vm.path(VSOCK_SOCKET),
            // The agent's readiness announcement: the one host port the
            // guest connects to, connected by the VMM before its jail.
            host_ports: vec![READY_VSOCK_PORT],
        }),
    ];
    for share in shares {
        devices.push(DeviceConfig::Fs(FsConfig {
            tag: share.tag.clone(),
            socket_path: vm.path(&fs_socket_name(&share.tag)),
        }));
    }
    for (i, (fd, net)) in nets.iter().enumerate() {
        let mac = match start {
            VmmStart::Restore(t) => t.record.nic_macs.get(i).cloned(),
            _ => Some(net.mac.to_string()),
        };
        devices.push(DeviceConfig::Net(match (&net.tap, fd) {
            (TapDevice::Name(name), _) => NetConfig::with_tap_name(name.clone(), mac),
            (TapDevice::Fd(_), Some(fd)) => NetConfig::with_tap_fd(*fd, mac),
            (TapDevice::Fd(f), None) => NetConfig::with_tap_fd(f.as_raw_fd(), mac),
        }));
    }
    let mut cfg = VmConfig {
        vcpus: vm_vcpus(vm)?,
        memory_mib: vm.spec.memory_mib,
        kernel: Some(vm.spec.kernel.clone()),
        initramfs: Some(vm.spec.initramfs.clone()),
        cmdline: vm.spec.cmdline_extra.join(" "),
        console_fd: Some(console),
        control_socket: Some(vm.path(CONTROL_SOCKET)),
        sandbox_dir: Some(vm.spec.dir.clone()),
        jail_user: Some(user),
        devices,
        balloon: Some(balloon(vm.spec.free_page_reporting, vm.spec.balloon_mib)),
        ..VmConfig::default()
    };
    match start {
        VmmStart::Boot => {}
        VmmStart::BootToSave { snapshot_dir } => cfg.snapshot_dir = Some(snapshot_dir.to_owned()),
        VmmStart::Restore(template) => {
            // The kernel ran already: what it was booted with is in the
            // snapshot (and in the template's key).
            (cfg.kernel, cfg.initramfs, cfg.cmdline) = (None, None, String::new());
            cfg.restore = Some(RestoreConfig {
                state: template.state_file(),
                memory: template.memory_file(),
                // The VM has virtio-fs: virtiofsd maps guest memory by fd,
                // so RAM must be the VM's own memfd, not a private mapping
                // of the template's file (docs/templates.md).
                memory_mode: MemoryMode::Copy,
            });
        }
    }
    Ok(cfg)
}

/// The VM's vCPU count as the VMM's config holds it.
fn vm_vcpus(vm: &VmSetup) -> Result<u8, HypervisorError> {
    u8::try_from(vm.spec.vcpus).map_err(|_| HypervisorError::VmmConfigRange {
        id: vm.spec.id.clone(),
        key: "guest.vcpus",
        value: vm.spec.vcpus.into(),
        max: u8::MAX.into(),
    })
}

/// Writes [`vm_config`] as `vm.json` in the sandbox directory; returns its
/// path (what `boxlite-vmm --config` is given).
pub fn write_vm_config(
    vm: &VmSetup,
    start: VmmStart<'_>,
    user: JailUser,
    shares: &[Share],
    nets: &[(Option<RawFd>, &NetDevice)],
    console: RawFd,
) -> Result<PathBuf, HypervisorError> {
    let cfg = vm_config(vm, start, user, shares, nets, console)?;
    let path = vm.path(VM_CONFIG);
    std::fs::write(&path, cfg.to_json_pretty()).map_err(|error| HypervisorError::Io {
        id: vm.spec.id.clone(),
        op: "cannot write the VM config",
        path: path.clone(),
        error,
    })?;
    Ok(path)
}

/// One request on a VMM control socket: writes it, reads the reply line
/// (2 s timeout each way). A reply that is not a [`Reply`] is an error
/// naming the socket.
pub fn control_request(socket: &Path, request: Request) -> std::io::Result<Reply> {
    control_request_within(socket, request, CONTROL_TIMEOUT)
}

/// [`control_request`] with a reply timeout of `timeout` (the `snapshot`
/// op writes the VM's memory before it answers).
pub fn control_request_within(
    socket: &Path,
    request: Request,
    timeout: Duration,
) -> std::io::Result<Reply> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(request.to_line().as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Reply::from_line(&line).map_err(|e| {
        std::io::Error::other(format!(
            "control socket {}: the reply to {request} is not a control reply: {e} (got {:?})",
            socket.display(),
            line.trim_end()
        ))
    })
}

/// [`control_request_within`] off the async runtime's threads (it blocks
/// on the socket); a request whose task did not finish is an error too.
pub async fn ask_vmm(
    socket: PathBuf,
    request: Request,
    timeout: Duration,
) -> std::io::Result<Reply> {
    tokio::task::spawn_blocking(move || control_request_within(&socket, request, timeout))
        .await
        .map_err(|e| std::io::Error::other(format!("the control request did not finish: {e}")))?
}

/// The reply timeout of the control ops that answer at once.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(2);

#[async_trait]
impl Launcher for BuiltinLauncher {
    const VMM: Role = Role::Vmm;

    fn binaries(&self) -> Vec<(&'static str, &Path)> {
        vec![(
            "boxlite-vmm (hypervisor.vmm_binary)",
            self.bins.vmm_binary.as_path(),
        )]
    }

    fn own_sockets(&self, vm: &VmSetup) -> Vec<PathBuf> {
        vec![vm.path(CONTROL_SOCKET)]
    }

    /// The jail uid lease (first: a full range fails before anything is
    /// spawned), virtiofsd daemons (sockets awaited), then the VMM with the
    /// taps.
    async fn spawn(&self, vm: &VmSetup, launch: &mut Launch<'_>) -> Result<(), HypervisorError> {
        let user = launch.lease_jail_user(vm)?;
        let devices = TemplateDevices {
            share_tags: launch.shares.iter().map(|s| s.tag.clone()).collect(),
            nics: launch.nets.len(),
        };
        let plan = self.template_plan(vm, devices, user);
        launch.spawn_virtiofsd(vm)?;
        launch.wait_for_helper_sockets(vm).await?;

        let start = match &plan {
            TemplatePlan::Restore(t) => VmmStart::Restore(t),
            TemplatePlan::Capture(p) => VmmStart::BootToSave {
                snapshot_dir: p.snapshot_dir(),
            },
            TemplatePlan::None => VmmStart::Boot,
        };
        let fds = launch.tap_fds();
        let nets: Vec<(Option<RawFd>, &NetDevice)> =
            fds.iter().copied().zip(launch.nets.iter()).collect();
        let cfg_path = write_vm_config(vm, start, user, launch.shares, &nets, launch.console)?;
        let args: Vec<OsString> = vec!["--config".into(), cfg_path.into_os_string()];
        tracing::info!(
            sandbox_id = %vm.spec.id,
            uid = user.uid,
            binary = %self.bins.vmm_binary.display(),
            template = %plan,
            "starting boxlite-vmm"
        );
        let inherit = launch.vmm_fds();
        let macs: Vec<MacAddr> = launch.nets.iter().map(|n| n.mac).collect();
        let (restored, capturing) = match plan {
            TemplatePlan::Restore(t) => (Some(t), None),
            TemplatePlan::Capture(p) => (None, Some((p, macs))),
            TemplatePlan::None => (None, None),
        };
        *self.restored.lock().expect("restored lock") = restored;
        *self.capturing.lock().expect("capturing lock") = capturing;
        launch.spawn(vm, Role::Vmm, &self.bins.vmm_binary, args, None, inherit)
    }

    /// A booted VM whose agent answered: if this boot is to become the
    /// template, pause, save, resume, publish. A failed capture is logged
    /// (the next sandbox tries again); only a VM left paused is an error.
    async fn agent_ready(&self, vm: &VmSetup) -> Result<(), HypervisorError> {
        let Some((pending, macs)) = self.capturing.lock().expect("capturing lock").take() else {
            return Ok(());
        };
        let key = pending.key().to_owned();
        let socket = vm.path(CONTROL_SOCKET);
        let control = |request, timeout| ask_vmm(socket.clone(), request, timeout);
        match pending.save(control, &macs).await {
            Ok(t) => {
                tracing::info!(sandbox_id = %vm.spec.id, template = %t.key, snapshot_ms = t.record.snapshot_ms, dir = %t.dir.display(), "VM template saved from this sandbox's boot");
                Ok(())
            }
            Err(e) if e.vm_paused => Err(HypervisorError::CaptureLeftPaused {
                id: vm.spec.id.clone(),
                template: key,
                reason: chain(&e.error),
            }),
            Err(e) => {
                tracing::warn!(sandbox_id = %vm.spec.id, error = %chain(&e.error), "cannot save this boot as the VM template; the next sandbox tries again");
                Ok(())
            }
        }
    }

    /// A template this boot was to become is not: its `.partial` goes and
    /// its lock is released.
    fn torn_down(&self) {
        self.capturing.lock().expect("capturing lock").take();
    }

    fn restored(&self) -> Option<String> {
        let restored = self.restored.lock().expect("restored lock");
        restored.as_ref().map(|t| t.key.clone())
    }

    /// `Ok(false)` until the VMM serves its control socket (it does once
    /// the VM is rebuilt, its memory copied); then the `restore` op, which
    /// names the template's snapshot id: the VMM refuses any other.
    async fn run_restored(&self, vm: &VmSetup) -> Result<bool, HypervisorError> {
        let Some(template) = self.restored.lock().expect("restored lock").clone() else {
            return Err(HypervisorError::InvalidState {
                id: vm.spec.id.clone(),
                op: "run a restored VM",
                state: "booted, not restored",
            });
        };
        let failed = |reason: String| HypervisorError::Restore {
            id: vm.spec.id.clone(),
            template: template.key.clone(),
            reason,
        };
        let request = Request::Restore {
            snapshot_id: Some(template.record.snapshot_id.clone()),
        };
        match ask_vmm(vm.path(CONTROL_SOCKET), request, CONTROL_TIMEOUT).await {
            Ok(Reply::Restored {
                state: VmState::Running,
                restore,
            }) => {
                tracing::info!(sandbox_id = %vm.spec.id, template = %template.key, setup_us = restore.setup_us, took_us = restore.took_us, "VM restored from its template");
                Ok(true)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(false)
            }
            Ok(Reply::Error { error }) => {
                Err(failed(format!("was refused by boxlite-vmm: {error}")))
            }
            Ok(other) => Err(failed(format!(
                "was not run: the restore op answered {other:?}"
            ))),
            Err(e) => Err(failed(format!("was not run: control socket: {e}"))),
        }
    }

    /// Forgets the template (and discards it: a template that restores a
    /// VM that does not come up would fail the next sandbox too; the next
    /// one rebuilds it) and restores no more: the next spawn boots.
    fn restore_failed(&self, vm: &VmSetup, error: &HypervisorError) {
        let template = self.restored.lock().expect("restored lock").take();
        let store = self.templates.lock().expect("templates lock").take();
        if let (Some(t), Some(store)) = (template, store) {
            let why = format!(
                "sandbox {}: {}",
                vm.spec.id,
                boxlite_protocol::error_chain::chain(error)
            );
            store.discard(&t.key, &why);
        }
    }

    fn restored_nic_macs(&self) -> Option<Vec<MacAddr>> {
        let restored = self.restored.lock().expect("restored lock");
        // Parsed when the template was found: it is not used otherwise.
        restored.as_ref()?.record.macs().ok()
    }

    /// The VMM's control socket: it stops its vCPUs and exits (code 0).
    /// Over the VMM's control socket (`{"op":"balloon"}`).
    async fn balloon(
        &self,
        vm: &VmSetup,
        target_mib: Option<u32>,
    ) -> Result<BalloonState, HypervisorError> {
        let failed = |reason: String| HypervisorError::Balloon {
            id: vm.spec.id.clone(),
            reason,
        };
        let request = Request::Balloon { target_mib };
        let reply = ask_vmm(vm.path(CONTROL_SOCKET), request, CONTROL_TIMEOUT)
            .await
            .map_err(|e| failed(e.to_string()))?;
        match reply {
            Reply::Balloon { balloon } => Ok(balloon),
            Reply::Error { error } => Err(failed(format!("boxlite-vmm refused: {error}"))),
            other => Err(failed(format!(
                "boxlite-vmm answered a balloon request with {other:?}"
            ))),
        }
    }

    async fn last_resort_shutdown(&self, vm: &VmSetup) -> Option<Duration> {
        let id = &vm.spec.id;
        tracing::warn!(sandbox_id = %id, "VM did not exit after the agent shutdown; asking the VMM over its control socket");
        match ask_vmm(vm.path(CONTROL_SOCKET), Request::Shutdown, CONTROL_TIMEOUT).await {
            Ok(reply) => tracing::debug!(sandbox_id = %id, ?reply, "control shutdown"),
            Err(e) => tracing::warn!(sandbox_id = %id, error = %e, "control shutdown failed"),
        }
        Some(CONTROL_SHUTDOWN_GRACE)
    }
}

impl BuiltinLauncher {
    /// Whether this VM is restored from its template, boots to become it,
    /// or just boots: templates off, after a failed restore, when another
    /// shim is capturing the template, or when it cannot be (logged).
    fn template_plan(
        &self,
        vm: &VmSetup,
        devices: TemplateDevices,
        user: JailUser,
    ) -> TemplatePlan {
        let Some(store) = self.templates.lock().expect("templates lock").clone() else {
            return TemplatePlan::None;
        };
        let inputs = match self.template_inputs(vm, devices) {
            Ok(inputs) => inputs,
            Err(e) => {
                tracing::warn!(sandbox_id = %vm.spec.id, error = %chain(&e), "no VM template: booting");
                return TemplatePlan::None;
            }
        };
        if let Some(t) = store.find(&inputs) {
            return TemplatePlan::Restore(t);
        }
        match PendingTemplate::begin(&store, &inputs, user) {
            Ok(p) => TemplatePlan::Capture(p),
            Err(e @ TemplateError::Busy { .. }) => {
                tracing::info!(sandbox_id = %vm.spec.id, "{e}; booting without it");
                TemplatePlan::None
            }
            Err(e) => {
                tracing::warn!(sandbox_id = %vm.spec.id, error = %chain(&e), "cannot capture the VM template; booting without it");
                TemplatePlan::None
            }
        }
    }

    /// What a template for this VM depends on.
    fn template_inputs(
        &self,
        vm: &VmSetup,
        devices: TemplateDevices,
    ) -> Result<TemplateInputs, HypervisorError> {
        let file = |path: &Path| {
            FileId::of(path).map_err(|error| HypervisorError::Io {
                id: vm.spec.id.clone(),
                op: "cannot read the metadata of",
                path: path.to_owned(),
                error,
            })
        };
        Ok(TemplateInputs {
            format: TEMPLATE_FORMAT,
            vmm: file(&self.bins.vmm_binary)?,
            kernel: file(&vm.spec.kernel)?,
            initramfs: file(&vm.spec.initramfs)?,
            cmdline: vm.spec.cmdline_extra.join(" "),
            vcpus: vm_vcpus(vm)?,
            memory_mib: vm.spec.memory_mib,
            balloon: balloon(vm.spec.free_page_reporting, vm.spec.balloon_mib),
            share_tags: devices.share_tags,
            nics: devices.nics,
        })
    }
}

/// The devices of a VM that a template must have too (the rest of the
/// device set is the same for every sandbox VM).
struct TemplateDevices {
    share_tags: Vec<String>,
    nics: usize,
}

/// What [`BuiltinLauncher::spawn`] does about templates.
enum TemplatePlan {
    Restore(Template),
    Capture(PendingTemplate),
    None,
}

impl std::fmt::Display for TemplatePlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TemplatePlan::Restore(t) => write!(f, "restore from {}", t.key),
            TemplatePlan::Capture(p) => write!(f, "boot, then save as {}", p.key()),
            TemplatePlan::None => f.write_str("none"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ResolvedAccel, ResolvedBackend};
    use crate::hypervisor::template::{TemplateRecord, MEMORY_FILE, STATE_FILE};
    use crate::hypervisor::test_rig::{assert_stops_in_time, Bins, Rig};
    use crate::hypervisor::Hypervisor;
    use boxlite_test_support::fake_bin::pid_alive;
    use std::fs::File;

    #[test]
    fn free_page_reporting_follows_the_config() {
        assert!(Rig::new().spec().free_page_reporting, "on by default");
        for reporting in [true, false] {
            assert_eq!(
                balloon(reporting, 0),
                BalloonConfig {
                    deflate_on_oom: true,
                    free_page_reporting: reporting,
                    target_mib: 0,
                }
            );
        }
        // Room to grow is held from boot and never given to an OOM.
        assert_eq!(
            balloon(true, 512),
            BalloonConfig {
                deflate_on_oom: false,
                free_page_reporting: true,
                target_mib: 512,
            }
        );
    }

    fn bins(vmm: PathBuf, virtiofsd: PathBuf) -> ResolvedHypervisor {
        let (qemu, vhost_vsock) = ("qemu-system-x86_64".into(), "boxlite-vsock".into());
        Bins {
            qemu,
            virtiofsd,
            vhost_vsock,
            vmm,
        }
        .resolve(ResolvedBackend::Builtin, ResolvedAccel::Kvm)
    }

    /// virtiofsd stand-in: creates its socket (and lock file), sleeps.
    fn fake_virtiofsd(rig: &Rig) -> PathBuf {
        rig.socket_helper("virtiofsd", "--socket-path", true)
    }

    /// VMM stand-in: records its arguments and config, lists its open fds,
    /// creates the sockets a real one would, sleeps.
    fn fake_vmm(rig: &Rig) -> PathBuf {
        rig.script(
            "boxlite-vmm",
            &format!(
                r#"echo "$@" > {args}
cp "$2" {cfg}
ls /proc/$$/fd > {fds}
c=$(grep -o '"console_fd": *[0-9]*' "$2" | grep -o '[0-9]*$')
echo "guest says hello" > /proc/$$/fd/$c
echo "vmm says hello"
d=$(dirname "$2"); : > "$d/vsock.sock"; : > "$d/control.sock"
exec sleep 30"#,
                args = rig.path("vmm.args").display(),
                cfg = rig.path("vmm.json").display(),
                fds = rig.path("vmm.fds").display(),
            ),
        )
    }

    /// Adds share `tag` (`<rig>/share`) and a tap with MAC
    /// 02:00:00:00:00:01 — any fd stands in for a tap: the backend only
    /// passes it on — and returns that fd's number.
    async fn add_share_and_tap(rig: &Rig, hv: &BuiltinHypervisor, tag: &str, ro: bool) -> RawFd {
        let share = rig.path("share");
        std::fs::create_dir_all(&share).unwrap();
        hv.add_share(tag, &share, ro).await.unwrap();
        let tap: std::os::fd::OwnedFd = File::open("/dev/null").unwrap().into();
        let tap_fd = tap.as_raw_fd();
        hv.add_net(TapDevice::Fd(tap), "02:00:00:00:00:01".parse().unwrap())
            .await
            .unwrap();
        tap_fd
    }

    #[tokio::test]
    async fn start_writes_the_vm_config_and_hands_the_tap_and_console_fds_to_the_vmm_only() {
        let rig = Rig::new();
        let hv =
            BuiltinHypervisor::new(rig.spec(), bins(fake_vmm(&rig), fake_virtiofsd(&rig))).unwrap();
        let tap_fd = add_share_and_tap(&rig, &hv, "rootfs", true).await;
        hv.start().await.unwrap();
        let pid = hv.pid().expect("running");
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !rig.path("vmm.fds").exists() {
            assert!(std::time::Instant::now() < end, "fake vmm did not run");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sb = rig.sandbox();
        let args = std::fs::read_to_string(rig.path("vmm.args")).unwrap();
        assert_eq!(
            args.trim(),
            format!("--config {}", sb.join("vm.json").display())
        );
        let cfg =
            VmConfig::from_json(&std::fs::read_to_string(rig.path("vmm.json")).unwrap()).unwrap();
        assert_eq!(cfg.vcpus, 1, "{cfg:?}");
        assert_eq!(cfg.cmdline, "loglevel=5 quiet");
        assert_eq!(cfg.sandbox_dir, Some(sb.clone()));
        assert_eq!(cfg.control_socket, Some(sb.join("control.sock")));
        assert_eq!(cfg.console_log, None);
        let console_fd = cfg
            .console_fd
            .expect("the console goes to an inherited pipe");
        assert!(cfg.jail, "the jail is on");
        // The uid leased for the sandbox, at its hash position in an
        // otherwise empty range.
        let uid = rig.spec().jail_ids.range.home("sb1");
        assert_eq!(cfg.jail_user, Some(JailUser { uid, gid: uid }));
        assert_eq!(rig.jail_leases(), [uid]);
        assert_eq!(
            cfg.devices,
            vec![
                DeviceConfig::Rng(RngConfig::default()),
                DeviceConfig::Vsock(VsockConfig {
                    guest_cid: 3,
                    uds_path: sb.join("vsock.sock"),
                    host_ports: vec![1027],
                }),
                DeviceConfig::Fs(FsConfig {
                    tag: "rootfs".into(),
                    socket_path: sb.join("fs-rootfs.sock")
                }),
                DeviceConfig::Net(NetConfig::with_tap_fd(
                    tap_fd,
                    Some("02:00:00:00:00:01".into())
                )),
            ]
        );
        assert_eq!(
            cfg.balloon,
            Some(BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: true,
                target_mib: 0,
            }),
            "every sandbox gets the balloon"
        );
        let fds = std::fs::read_to_string(rig.path("vmm.fds")).unwrap();
        for (what, fd) in [("tap", tap_fd), ("console", console_fd)] {
            assert!(
                fds.lines().any(|l| l == fd.to_string()),
                "{what} fd {fd} not inherited: {fds}"
            );
        }
        assert!(std::fs::read_to_string(sb.join("boxlite-vmm.pid"))
            .unwrap()
            .starts_with(&pid.to_string()));
        hv.check_alive().await.unwrap();

        hv.kill().await.unwrap();
        assert!(!pid_alive(pid));
        assert_eq!(rig.leftovers(), Vec::<String>::new());
        assert_eq!(rig.jail_leases(), Vec::<u32>::new(), "released");
        assert!(hv.pid().is_none());
        // What it wrote reached the capped logs by the time kill returned.
        let read = |name| std::fs::read_to_string(sb.join(name)).unwrap();
        assert_eq!(read("console.log"), "guest says hello\n");
        assert_eq!(read("boxlite-vmm.log"), "vmm says hello\n");
    }

    #[tokio::test]
    async fn missing_vmm_binary_fails_before_spawning() {
        let rig = Rig::new();
        let hv =
            BuiltinHypervisor::new(rig.spec(), bins(rig.path("nope"), rig.path("nope2"))).unwrap();
        let err = hv.start().await.unwrap_err().to_string();
        assert!(err.contains("hypervisor.vmm_binary"), "{err}");
        assert!(!rig.sandbox().exists());
    }

    #[tokio::test]
    async fn vmm_dying_early_is_reported_with_its_log() {
        let rig = Rig::new();
        let vmm = rig.script(
            "boxlite-vmm",
            "echo 'ERROR Jail setup failed: landlock' >&2; exit 5",
        );
        let hv = BuiltinHypervisor::new(rig.spec(), bins(vmm, rig.path("nope"))).unwrap();
        hv.start().await.unwrap();
        let started = std::time::Instant::now();
        let err = hv.wait_ready().await.unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(2), "fails fast");
        assert!(err.contains("boxlite-vmm"), "{err}");
        assert!(err.contains("exit status: 5"), "{err}");
        assert!(err.contains("Jail setup failed"), "{err}");
        assert_eq!(rig.jail_leases().len(), 1, "held until the VM is torn down");
        hv.stop().await.unwrap();
        rig.assert_clean();
    }

    /// A start that fails after the lease (a virtiofsd that dies at once)
    /// leaves none behind.
    #[tokio::test]
    async fn a_failed_start_releases_the_jail_uid() {
        let rig = Rig::new();
        let virtiofsd = rig.script("virtiofsd", "exit 3");
        let hv = BuiltinHypervisor::new(rig.spec(), bins(fake_vmm(&rig), virtiofsd)).unwrap();
        let share = rig.path("share");
        std::fs::create_dir(&share).unwrap();
        hv.add_share("s0", &share, false).await.unwrap();
        let err = chain(&hv.start().await.unwrap_err());
        assert!(err.contains("virtiofsd"), "{err}");
        assert_eq!(rig.jail_leases(), Vec::<u32>::new());
        assert_eq!(rig.leftovers(), Vec::<String>::new());
    }

    /// With every uid of the range held by a live sandbox, the start fails
    /// naming the range, before anything is spawned.
    #[tokio::test]
    async fn a_full_jail_uid_range_fails_the_start_before_spawning() {
        let rig = Rig::new();
        let mut spec = rig.spec();
        spec.jail_ids.range.count = 1;
        let other = spec.jail_ids.state_dir.join("other");
        std::fs::create_dir_all(&other).unwrap();
        let held = spec.jail_ids.lease("other").unwrap();
        let hv = BuiltinHypervisor::new(spec, bins(fake_vmm(&rig), fake_virtiofsd(&rig))).unwrap();
        let err = chain(&hv.start().await.unwrap_err());
        assert!(
            err.starts_with("sandbox sb1: no jail uid is free: all 1 of 1879048192..=1879048192"),
            "{err}"
        );
        assert!(!rig.path("vmm.args").exists(), "the VMM was not spawned");
        assert_eq!(rig.leftovers(), Vec::<String>::new());
        assert_eq!(rig.jail_leases(), [held.user().uid]);
    }

    #[tokio::test]
    async fn stop_is_bounded_when_the_agent_accepts_and_never_reads() {
        let rig = Rig::new();
        // A VMM whose hybrid vsock socket accepts, acknowledges the
        // CONNECT, and then reads nothing more; no control socket.
        let vmm = rig.script(
            "boxlite-vmm",
            r#"exec python3 - "$2" <<'EOF'
import json, socket, sys
cfg = json.load(open(sys.argv[1]))
uds = [d["uds_path"] for d in cfg["devices"] if d["kind"] == "vsock"][0]
s = socket.socket(socket.AF_UNIX); s.bind(uds); s.listen(8)
held = []
while True:
    c, _ = s.accept()
    c.recv(64)
    c.sendall(b"OK 1\n")
    held.append(c)
EOF"#,
        );
        let hv = BuiltinHypervisor::new(rig.spec(), bins(vmm, rig.path("nope"))).unwrap();
        hv.start().await.unwrap();
        let pid = hv.pid().unwrap();
        rig.wait_for_sandbox_file(VSOCK_SOCKET, "boxlite-vmm.log")
            .await;
        assert_stops_in_time(&hv).await;
        assert!(!pid_alive(pid));
        assert_eq!(rig.leftovers(), Vec::<String>::new());
    }

    /// A VMM stand-in's body (python3, given the config as `$2`): serves
    /// the config's control socket for one request, records the request
    /// line in `marker`, answers `reply` (made here from the contract's
    /// types, sent as is), then runs `then` (python).
    fn control_stand_in(marker: &Path, reply: &Reply, then: &str) -> String {
        let reply_hex: String = reply
            .to_line()
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!(
            r#"exec python3 - "$2" <<'EOF'
import json, os, socket, sys, time
cfg = json.load(open(sys.argv[1]))
s = socket.socket(socket.AF_UNIX); s.bind(cfg["control_socket"]); s.listen(1)
c, _ = s.accept()
open("{marker}", "w").write(c.makefile().readline())
c.sendall(bytes.fromhex("{reply_hex}"))
{then}
EOF"#,
            marker = marker.display()
        )
    }

    #[tokio::test]
    async fn stop_falls_back_to_the_control_socket() {
        let rig = Rig::new();
        // A VMM that serves the control socket (python3) but whose guest
        // agent never answers. It records the request line as it came and
        // answers with a reply line made here from the contract's types.
        let reply = Reply::Shutdown {
            state: VmState::Stopping,
            exit_code: 0,
        };
        let marker = rig.path("control.request");
        let vmm = rig.script(
            "boxlite-vmm",
            &control_stand_in(&marker, &reply, "os.unlink(cfg['control_socket'])"),
        );
        let hv = BuiltinHypervisor::new(rig.spec(), bins(vmm, rig.path("nope"))).unwrap();
        hv.start().await.unwrap();
        let pid = hv.pid().unwrap();
        rig.wait_for_sandbox_file(CONTROL_SOCKET, "boxlite-vmm.log")
            .await;
        assert_stops_in_time(&hv).await;
        let line = std::fs::read_to_string(&marker).unwrap();
        assert_eq!(
            Request::from_line(line.trim_end().as_bytes()),
            Ok(Request::Shutdown),
            "{line:?}"
        );
        assert!(!pid_alive(pid));
        assert_eq!(rig.leftovers(), Vec::<String>::new());
        // Idempotent.
        hv.stop().await.unwrap();
        hv.kill().await.unwrap();
    }

    /// A VMM stand-in for the template tests: records each start's config
    /// and open fds (`markers/vmm.<n>.json`, `.fds`, n from 0), then runs
    /// `restore` for a config that restores, `save` for a VM to be saved
    /// as a template, and otherwise acts booted (makes its sockets,
    /// sleeps).
    fn fake_template_vmm(rig: &Rig, restore: &str, save: &str) -> PathBuf {
        let markers = rig.path("markers");
        std::fs::create_dir_all(&markers).unwrap();
        rig.script(
            "boxlite-vmm",
            &format!(
                r#"n=$(ls {m} | grep -c '^vmm\.[0-9]*\.json$')
cp "$2" {m}/vmm.$n.json
ls /proc/$$/fd > {m}/vmm.$n.fds
d=$(dirname "$2")
if grep -q '"restore"' "$2"; then
{restore}
fi
if grep -q '"snapshot_dir"' "$2"; then
{save}
fi
# As the real one: a booting VMM connects to the readiness listener.
[ -S "$d/vsock.sock_1027" ] || {{ echo "no readiness listener" >&2; exit 4; }}
: > "$d/vsock.sock"; : > "$d/control.sock"
exec sleep 30"#,
                m = markers.display()
            ),
        )
    }

    /// The configs of the fake VMM's first `n` starts, once it made them
    /// (a spawned process writes its markers a moment after the start).
    async fn wait_for_starts(rig: &Rig, n: usize) -> Vec<VmConfig> {
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !rig.path(&format!("markers/vmm.{}.fds", n - 1)).exists() {
            assert!(std::time::Instant::now() < end, "no VMM start {n}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        vmm_starts(rig)
    }

    /// The configs the fake VMM was started with, in order.
    fn vmm_starts(rig: &Rig) -> Vec<VmConfig> {
        (0..)
            .map(|n| rig.path(&format!("markers/vmm.{n}.json")))
            .take_while(|p| p.exists())
            .map(|p| VmConfig::from_json(&std::fs::read_to_string(p).unwrap()).unwrap())
            .collect()
    }

    fn net_macs(cfg: &VmConfig) -> Vec<String> {
        cfg.devices
            .iter()
            .filter_map(|d| match d {
                DeviceConfig::Net(n) => n.mac.clone(),
                _ => None,
            })
            .collect()
    }

    /// A sandbox VM of [`fake_template_vmm`]`(restore, save)` with its
    /// templates in `store`, one share and one tap (any fd stands in: the
    /// backend only passes it on, `tap_fd`).
    struct TemplatedVm {
        hv: BuiltinHypervisor,
        store: TemplateStore,
        tap_fd: RawFd,
    }

    async fn templated_vm(rig: &Rig, restore: &str, save: &str) -> TemplatedVm {
        let vmm = fake_template_vmm(rig, restore, save);
        let store = TemplateStore::new(rig.path("templates"));
        let hv = BuiltinHypervisor::with_templates(
            rig.spec(),
            bins(vmm, fake_virtiofsd(rig)),
            Some(store.clone()),
        )
        .unwrap();
        let tap_fd = add_share_and_tap(rig, &hv, "shared", false).await;
        TemplatedVm { hv, store, tap_fd }
    }

    /// The template inputs of exactly the VM `hv` would start.
    async fn inputs_of(hv: &BuiltinHypervisor) -> TemplateInputs {
        hv.with_preflighted(|vm, launch| {
            let devices = TemplateDevices {
                share_tags: launch.shares.iter().map(|s| s.tag.clone()).collect(),
                nics: launch.nets.len(),
            };
            hv.launcher.template_inputs(vm, devices).unwrap()
        })
        .await
        .unwrap()
    }

    /// The names in a directory.
    fn entries(dir: &Path) -> Vec<String> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect()
    }

    /// Publishes a template (dummy snapshot files) for exactly the VM `hv`
    /// would start, as a capture would.
    async fn publish_for(hv: &BuiltinHypervisor, store: &TemplateStore) -> Template {
        let inputs = inputs_of(hv).await;
        let key = inputs.key();
        let lock = store.try_lock(&key).unwrap();
        let partial = store.fresh_partial(&key, &lock).unwrap();
        for f in [STATE_FILE, MEMORY_FILE] {
            std::fs::write(partial.join(f), "x").unwrap();
        }
        let record = TemplateRecord {
            inputs,
            snapshot_id: "5f0c".into(),
            nic_macs: vec![TEMPLATE_MAC.into()],
            snapshot_ms: 0,
        };
        store.publish(&key, &record, &lock).unwrap()
    }

    /// The MAC of the NIC of the VM a test template was captured from.
    const TEMPLATE_MAC: &str = "02:00:00:00:0e:01";

    /// A template the VMM refuses (exit 1, as for a corrupt state file):
    /// the VM boots instead with the same taps, the template is discarded,
    /// nothing is left behind.
    #[tokio::test]
    async fn a_refused_template_is_discarded_and_the_vm_boots_instead() {
        let rig = Rig::new();
        let refused = "echo 'Error: vm.state: checksum mismatch in the vcpu section' >&2; exit 1";
        let TemplatedVm { hv, store, tap_fd } = templated_vm(&rig, refused, "exit 9").await;
        let template = publish_for(&hv, &store).await;
        hv.start().await.unwrap();
        assert_eq!(
            hv.restored_nic_macs(),
            Some(vec![TEMPLATE_MAC.parse().unwrap()]),
            "restored, until it fails"
        );
        // The agent never answers the booted stand-in either: what fails
        // is the boot's wait for the announcement.
        let err = chain(&hv.wait_ready().await.unwrap_err());
        assert!(err.contains("did not announce itself"), "{err}");
        let starts = vmm_starts(&rig);
        assert_eq!(starts.len(), 2, "one restore, one boot");
        let restore = starts[0].restore.as_ref().expect("first start restores");
        assert_eq!(restore.state, template.state_file());
        assert_eq!(restore.memory_mode, MemoryMode::Copy);
        assert_eq!(starts[0].kernel, None);
        assert_eq!(
            net_macs(&starts[0]),
            [TEMPLATE_MAC],
            "the guest's NIC has it"
        );
        assert_eq!(starts[1].restore, None, "then boots");
        assert!(starts[1].kernel.is_some());
        assert_eq!(net_macs(&starts[1]), ["02:00:00:00:00:01"]);
        for n in 0..2 {
            let fds = std::fs::read_to_string(rig.path(&format!("markers/vmm.{n}.fds"))).unwrap();
            assert!(
                fds.lines().any(|l| l == tap_fd.to_string()),
                "start {n}: {fds}"
            );
        }
        assert!(!template.dir.exists(), "discarded");
        assert_eq!(store.find(&template.record.inputs), None);
        assert_eq!(hv.restored_nic_macs(), None, "booted now");
        hv.stop().await.unwrap();
        rig.assert_clean();
    }

    /// The restore op names the template's snapshot; a restored guest whose
    /// agent does not answer in time is booted instead.
    #[tokio::test]
    async fn a_restored_vm_is_run_by_the_restore_op_and_booted_if_its_agent_is_silent() {
        let rig = Rig::new();
        let reply = Reply::Restored {
            state: VmState::Running,
            restore: boxlite_vmm_api::control::RestoreInfo {
                id: "5f0c".into(),
                memory_mode: "copy".into(),
                setup_us: 1,
                took_us: 2,
            },
        };
        let restore = control_stand_in(&rig.path("restore.request"), &reply, "time.sleep(30)");
        let TemplatedVm { hv, store, .. } = templated_vm(&rig, &restore, "exit 9").await;
        let template = publish_for(&hv, &store).await;
        hv.start().await.unwrap();
        let err = chain(&hv.wait_ready().await.unwrap_err());
        assert!(err.contains("did not announce itself"), "the boot's: {err}");
        let line = std::fs::read_to_string(rig.path("restore.request")).unwrap();
        assert_eq!(
            Request::from_line(line.trim_end().as_bytes()),
            Ok(Request::Restore {
                snapshot_id: Some("5f0c".into())
            }),
            "{line:?}"
        );
        let starts = vmm_starts(&rig);
        assert_eq!(starts.len(), 2);
        assert!(starts[0].restore.is_some() && starts[1].restore.is_none());
        assert!(!template.dir.exists(), "discarded");
        hv.kill().await.unwrap();
        rig.assert_clean();
    }

    /// A sandbox killed while its VM is being restored: the wait ends
    /// with the kill's error, nothing is booted, and the template stays
    /// (the kill was not its doing).
    #[tokio::test]
    async fn a_kill_during_a_restore_keeps_the_template() {
        let rig = Rig::new();
        // Restoring for ever: no control socket yet.
        let TemplatedVm { hv, store, .. } = templated_vm(&rig, "exec sleep 30", "exit 9").await;
        let template = publish_for(&hv, &store).await;
        hv.start().await.unwrap();
        let hv = std::sync::Arc::new(hv);
        let waiting = tokio::spawn({
            let hv = hv.clone();
            async move { hv.wait_ready().await.map(|_| ()) }
        });
        wait_for_starts(&rig, 1).await;
        hv.kill().await.unwrap();
        let err = waiting.await.unwrap().unwrap_err();
        assert!(
            matches!(err, HypervisorError::InvalidState { .. }),
            "{}",
            chain(&err)
        );
        assert_eq!(vmm_starts(&rig).len(), 1, "nothing booted");
        assert_eq!(store.find(&template.record.inputs), Some(template));
        assert_eq!(rig.leftovers(), Vec::<String>::new());
    }

    /// No template yet: the VM boots to become it, the VMM able to save
    /// into `<key>.partial`, which its jail uid owns. A boot that fails
    /// leaves no template and no `.partial`, and releases the lock.
    #[tokio::test]
    async fn a_failed_boot_captures_no_template_and_leaves_nothing() {
        let rig = Rig::new();
        let failing = "echo 'KVM_RUN failed' >&2; exit 1";
        let TemplatedVm { hv, store, .. } = templated_vm(&rig, "exit 9", failing).await;
        hv.start().await.unwrap();
        let starts = wait_for_starts(&rig, 1).await;
        let partial = starts[0]
            .snapshot_dir
            .clone()
            .expect("saves into the template");
        let key = partial
            .file_name()
            .unwrap()
            .to_string_lossy()
            .replace(".partial", "");
        assert_eq!(partial, store.partial_dir(&key));
        assert_eq!(starts[0].restore, None);
        assert_eq!(net_macs(&starts[0]), ["02:00:00:00:00:01"], "the pod's own");
        use std::os::unix::fs::MetadataExt;
        let uid = rig.jail_leases()[0];
        assert_eq!(
            std::fs::metadata(&partial).unwrap().uid(),
            uid,
            "the jailed VMM writes it"
        );
        let err = chain(&hv.wait_ready().await.unwrap_err());
        assert!(err.contains("KVM_RUN failed"), "{err}");
        assert!(
            store.try_lock(&key).is_err(),
            "held until the VM is torn down"
        );
        hv.kill().await.unwrap();
        assert_eq!(
            entries(store.dir()),
            [format!("{key}.lock")],
            "no template, no .partial"
        );
        store.try_lock(&key).expect("released");
        assert_eq!(rig.jail_leases(), Vec::<u32>::new());
    }

    /// Another shim capturing the template: this one just boots.
    #[tokio::test]
    async fn a_template_being_built_elsewhere_is_not_waited_for() {
        let rig = Rig::new();
        let TemplatedVm { hv, store, .. } = templated_vm(&rig, "exit 9", "exit 9").await;
        let key = inputs_of(&hv).await.key();
        let _held = store.try_lock(&key).unwrap();
        hv.start().await.unwrap();
        let starts = wait_for_starts(&rig, 1).await;
        assert!(starts[0].restore.is_none() && starts[0].snapshot_dir.is_none());
        hv.kill().await.unwrap();
    }

    #[tokio::test]
    async fn drop_kills_everything() {
        let rig = Rig::new();
        let hv =
            BuiltinHypervisor::new(rig.spec(), bins(fake_vmm(&rig), fake_virtiofsd(&rig))).unwrap();
        let share = rig.path("share");
        std::fs::create_dir(&share).unwrap();
        hv.add_share("s0", &share, false).await.unwrap();
        hv.start().await.unwrap();
        let pid = hv.pid().unwrap();
        assert!(hv.add_share("s1", &share, false).await.is_err());
        drop(hv);
        assert!(!pid_alive(pid));
        rig.assert_clean();
    }
}
