//! The `qemu` backend: QEMU's `microvm` machine (KVM or TCG) with vhost-user
//! helper daemons: one vsock backend (`boxlite-vsock`, the built-in VMM's
//! vsock device as a vhost-user backend) for the hybrid vsock socket and one
//! `virtiofsd` per share.
//!
//! Files in the sandbox directory:
//!
//! | file | what |
//! |---|---|
//! | `console.log` | guest serial console (ttyS0), copied from a pipe and capped ([`super::capped_log`]) |
//! | `vsock.sock` | hybrid vsock socket (listened on by the vsock backend) |
//! | `vhost-vsock.sock` | vhost-user socket between QEMU and the vsock backend |
//! | `fs-<tag>.sock` | vhost-user socket between QEMU and that share's virtiofsd |
//! | `fs-<tag>.sock.pid` | virtiofsd's own lock file |
//! | `qemu.log`, `vsock-backend.log`, `virtiofsd-<tag>.log` | each process's stdout and stderr |
//! | `qemu.pid`, `vsock-backend.pid`, `virtiofsd-<tag>.pid` | pids, for [`super::cleanup_stale_processes`] |
//!
//! Start order (`hypervisor/process_vm.rs`, shared with the builtin backend):
//! every file and binary is checked first, then the helpers are spawned and
//! their sockets awaited, then QEMU. Any failure on the way kills and reaps
//! what was spawned and removes the sockets. Sockets and pid files go at
//! stop/kill (and on drop, as a last resort); logs stay for debugging.

use std::ffi::{OsStr, OsString};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use boxlite_vmm_api::control::BalloonState;

use super::launcher::{Launch, Launcher, VmSetup};
use super::process::Role;
use super::process_vm::ProcessVm;
use super::{HypervisorError, NetDevice, Share, VmSpec, VSOCK_SOCKET};
use crate::config::{ResolvedAccel, ResolvedHypervisor};
use crate::network::TapDevice;
use boxlite_protocol::READY_VSOCK_PORT;
use qmp::{QemuBalloon, Qmp};

/// vhost-user socket between QEMU and the vsock backend.
pub const VHOST_VSOCK_SOCKET: &str = "vhost-vsock.sock";
/// Guest CID given to the vsock backend (any value ≥ 3; each VM has its own
/// backend, so they never clash).
pub const GUEST_CID: u32 = 3;
/// The kernel command line the backend always uses; config extras follow.
/// `reboot=t`: microvm has no i8042, a triple fault ends the VM, and
/// `-no-reboot` turns that into a QEMU exit. `panic=-1`: reboot (so exit) at
/// once on a panic. `no_timer_check`: the kernel's early check that the
/// timer interrupt arrives within a few ticks fails on a loaded host (a
/// panic, "IO-APIC + timer doesn't work!", seen under TCG with the CI's
/// builds beside it), and a VM's timer needs no such check.
pub const BASE_CMDLINE: &str = "console=ttyS0 reboot=t panic=-1 no_timer_check";
/// QEMU's seccomp filter, on from its start: no obsolete syscalls, no
/// setuid/setgid or capability changes, no fork or exec, no scheduler,
/// affinity or memory-policy changes. A guest that takes over QEMU gets a
/// process that cannot run a program on the host.
pub const QEMU_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// QEMU's virtio-balloon on the microvm machine (virtio-mmio), offering
/// what the builtin backend's balloon offers: both come from
/// [`super::builtin::balloon`].
fn qemu_balloon(free_page_reporting: bool, held_mib: u32) -> String {
    let b = super::builtin::balloon(free_page_reporting, held_mib);
    let on = |yes: bool| if yes { "on" } else { "off" };
    format!(
        "virtio-balloon-device,deflate-on-oom={},free-page-reporting={}",
        on(b.deflate_on_oom),
        on(b.free_page_reporting)
    )
}
pub use super::process::HELPER_READY_TIMEOUT;

pub use super::process::fs_socket_name;

/// The `qemu` backend. Build it with [`super::new_hypervisor`] (or
/// [`QemuHypervisor::new`] with an already resolved config).
pub type QemuHypervisor = ProcessVm<QemuLauncher>;

/// How the `qemu` backend launches a VM: the vsock backend and virtiofsd
/// daemons, then QEMU.
#[derive(Debug)]
pub struct QemuLauncher {
    bins: ResolvedHypervisor,
    /// The runtime's end of QEMU's QMP socket once QEMU is spawned, or why
    /// there is no session: not spawned yet, or an exchange failed (a
    /// reply that came too late would answer the next command, so a
    /// session that failed once is not used again).
    qmp: Arc<Mutex<Result<Qmp, String>>>,
    /// The balloon target last set (QMP does not report it).
    balloon_target_mib: Arc<AtomicU32>,
}

impl ProcessVm<QemuLauncher> {
    pub fn new(spec: VmSpec, bins: ResolvedHypervisor) -> Result<Self, HypervisorError> {
        let virtiofsd = bins.virtiofsd_binary.clone();
        let launcher = QemuLauncher {
            bins,
            qmp: Arc::new(Mutex::new(Err("QEMU has not started".to_owned()))),
            balloon_target_mib: Arc::default(),
        };
        ProcessVm::with_launcher(spec, &virtiofsd, launcher)
    }

    /// The QEMU command line (without the binary); see [`QemuLauncher::qemu_args`].
    pub fn qemu_args(
        &self,
        shares: &[Share],
        nets: &[(Option<RawFd>, &NetDevice)],
        fds: &QemuFds,
    ) -> Vec<OsString> {
        self.launcher.qemu_args(&self.setup, shares, nets, fds)
    }

    /// [`BASE_CMDLINE`] plus the extras.
    pub fn cmdline(&self) -> String {
        cmdline(&self.setup)
    }
}

/// The files QEMU inherits as fds: it starts as the sandbox's unprivileged
/// jail uid, which could not reach them by their own paths (a kernel under
/// `/root`, sockets under a `0700` state directory), see [`unprivileged`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuFds {
    /// The write end of the console pipe (handed to the jail uid; QEMU
    /// opens it again by its `/dev/fd/<n>` path).
    pub console: RawFd,
    /// The guest kernel and initramfs, opened read-only by the runtime
    /// (QEMU opens them again by their `/dev/fd/<n>` paths).
    pub kernel: RawFd,
    pub initramfs: RawFd,
    /// The vsock backend's vhost-user socket, connected by the runtime.
    pub vhost_vsock: RawFd,
    /// Each share's virtiofsd socket, connected by the runtime, in order.
    pub fs: Vec<RawFd>,
    /// QEMU's end of the QMP socket pair (the runtime keeps the other).
    pub qmp: RawFd,
}

impl QemuLauncher {
    /// The QEMU command line (without the binary). `nets` pairs each device
    /// with the raw fd QEMU inherits for it (None: a tap QEMU opens by
    /// name); `fds` are the other files it inherits.
    pub fn qemu_args(
        &self,
        vm: &VmSetup,
        shares: &[Share],
        nets: &[(Option<RawFd>, &NetDevice)],
        fds: &QemuFds,
    ) -> Vec<OsString> {
        let console = fds.console;
        let mut args: Vec<OsString> = Vec::new();
        let mut push = |a: &[&str]| args.extend(a.iter().map(OsString::from));
        let (accel, cpu) = match self.bins.accel {
            ResolvedAccel::Kvm => ("kvm", "host"),
            ResolvedAccel::Tcg => ("tcg", "max"),
        };
        let mem = format!("{}M", vm.spec.memory_mib);
        push(&["-name", &format!("boxlite-{}", vm.spec.id)]);
        push(&["-M", "microvm,acpi=off,memory-backend=mem"]);
        push(&["-accel", accel, "-cpu", cpu]);
        push(&["-smp", &vm.spec.vcpus.to_string(), "-m", &mem]);
        push(&[
            "-object",
            &format!("memory-backend-memfd,id=mem,size={mem},share=on"),
        ]);
        push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
        // QEMU's own seccomp filter (what Kata offers as `seccompsandbox`).
        push(&["-sandbox", QEMU_SANDBOX]);
        // The console goes into the inherited pipe the shim copies into a
        // capped console.log; QEMU opens it by its /dev/fd path (QEMU
        // 7.2's fd sets refuse the O_CREAT its file chardev opens with),
        // which its uid may since the pipe was handed to it.
        push(&[
            "-chardev",
            &format!("file,id=console,path=/dev/fd/{console}"),
        ]);
        push(&["-serial", "chardev:console"]);
        push(&["-kernel", &format!("/dev/fd/{}", fds.kernel)]);
        push(&["-initrd", &format!("/dev/fd/{}", fds.initramfs)]);
        push(&["-append", &cmdline(vm)]);
        push(&["-device", "virtio-rng-device"]);
        // vhost-user sockets as connected fds: QEMU needs no path to them.
        push(&[
            "-chardev",
            &format!("socket,id=vsock,fd={}", fds.vhost_vsock),
        ]);
        push(&["-device", "vhost-user-vsock-device,chardev=vsock"]);
        for (i, (share, fd)) in shares.iter().zip(&fds.fs).enumerate() {
            push(&["-chardev", &format!("socket,id=fs{i},fd={fd}")]);
            push(&[
                "-device",
                &format!("vhost-user-fs-device,chardev=fs{i},tag={}", share.tag),
            ]);
        }
        for (i, (fd, net)) in nets.iter().enumerate() {
            let netdev = match (&net.tap, fd) {
                (_, Some(fd)) => format!("tap,id=net{i},fd={fd}"),
                (TapDevice::Name(name), None) => {
                    format!("tap,id=net{i},ifname={name},script=no,downscript=no")
                }
                (TapDevice::Fd(f), None) => format!("tap,id=net{i},fd={}", f.as_raw_fd()),
            };
            push(&["-netdev", &netdev]);
            push(&[
                "-device",
                &format!("virtio-net-device,netdev=net{i},mac={}", net.mac),
            ]);
        }
        // The balloon the builtin backend gives every sandbox too
        // (builtin::balloon): freed guest memory goes back to the host.
        // Its target from boot (the VM's room to grow) is set over QMP
        // once QEMU runs. Last, so the other devices keep their slots.
        push(&[
            "-device",
            &qemu_balloon(vm.spec.free_page_reporting, vm.spec.balloon_mib),
        ]);
        // QMP on the inherited socket pair: the balloon's target.
        push(&["-chardev", &format!("socket,id=qmp,fd={}", fds.qmp)]);
        push(&["-mon", "chardev=qmp,mode=control"]);
        args
    }
}

/// [`BASE_CMDLINE`] plus the extras.
fn cmdline(vm: &VmSetup) -> String {
    let mut cmdline = BASE_CMDLINE.to_owned();
    for extra in &vm.spec.cmdline_extra {
        cmdline.push(' ');
        cmdline.push_str(extra);
    }
    cmdline
}

#[async_trait]
impl Launcher for QemuLauncher {
    const VMM: Role = Role::Qemu;

    fn binaries(&self) -> Vec<(&'static str, &Path)> {
        vec![
            (
                "QEMU (hypervisor.qemu_binary)",
                self.bins.qemu_binary.as_path(),
            ),
            (
                "the vsock backend (hypervisor.vhost_vsock_binary)",
                self.bins.vhost_vsock_binary.as_path(),
            ),
        ]
    }

    fn own_sockets(&self, vm: &VmSetup) -> Vec<PathBuf> {
        vec![vm.path(VHOST_VSOCK_SOCKET)]
    }

    /// The jail uid lease (first: a full range fails before anything is
    /// spawned); the vsock backend, jailed as that uid, and virtiofsd
    /// (sockets awaited); then QEMU, started as that uid with only the
    /// group of `/dev/kvm` besides, and every file it needs open already.
    async fn spawn(&self, vm: &VmSetup, launch: &mut Launch<'_>) -> Result<(), HypervisorError> {
        let user = launch.lease_jail_user(vm)?;
        let vhost = vm.path(VHOST_VSOCK_SOCKET);
        let bin = &self.bins.vhost_vsock_binary;
        let mut args = vec![
            "--guest-cid".into(),
            GUEST_CID.to_string().into(),
            "--socket".into(),
            vhost.clone().into_os_string(),
            "--uds-path".into(),
            vm.path(VSOCK_SOCKET).into_os_string(),
        ];
        if jails_itself(bin) {
            // The one host port the guest connects to (the readiness
            // announcement), connected before the backend's jail.
            args.push("--host-port".into());
            args.push(READY_VSOCK_PORT.to_string().into());
            args.push("--jail-user".into());
            args.push(format!("{}:{}", user.uid, user.gid).into());
        } else {
            tracing::warn!(
                sandbox_id = %vm.spec.id,
                binary = %bin.display(),
                "hypervisor.vhost_vsock_binary is not boxlite-vsock: the vsock backend runs as root with no jail"
            );
        }
        launch.spawn(vm, Role::Vsock, bin, args, Some(vhost), Vec::new())?;

        launch.spawn_virtiofsd(vm)?;
        launch.wait_for_helper_sockets(vm).await?;
        let owned =
            unprivileged::QemuFiles::open(vm, user, launch.console, launch.shares, launch.nets)
                .await?;

        let fds: Vec<Option<RawFd>> = launch
            .tap_fds()
            .into_iter()
            .zip(owned.named_taps())
            .map(|(given, opened)| given.or(opened))
            .collect();
        let nets: Vec<(Option<RawFd>, &NetDevice)> =
            fds.iter().copied().zip(launch.nets.iter()).collect();
        let args = self.qemu_args(vm, launch.shares, &nets, &owned.fds(launch.console));
        let run_as = unprivileged::run_as(user, self.bins.accel);
        tracing::info!(
            sandbox_id = %vm.spec.id,
            uid = run_as.uid,
            groups = ?run_as.groups,
            cmdline = %render_cmdline(&self.bins.qemu_binary, &args),
            "starting qemu"
        );
        let mut inherit = launch.vmm_fds();
        inherit.extend(owned.inherited());
        launch.spawn_as(
            vm,
            Some(&run_as),
            Role::Qemu,
            &self.bins.qemu_binary,
            args,
            None,
            inherit,
        )?;
        *self.qmp.lock().expect("qmp lock") = Ok(Qmp::new(owned.into_qmp()));
        if vm.spec.balloon_mib > 0 {
            // The VM's room to grow, held from boot: the driver reads the
            // target when it probes the balloon, or is told if it already
            // has.
            self.balloon(vm, Some(vm.spec.balloon_mib)).await?;
        }
        Ok(())
    }

    /// Over QMP: `balloon` sets the guest's memory to the VM's less the
    /// target, `query-balloon` says what the guest has.
    async fn balloon(
        &self,
        vm: &VmSetup,
        target_mib: Option<u32>,
    ) -> Result<BalloonState, HypervisorError> {
        let failed = |reason: String| HypervisorError::Balloon {
            id: vm.spec.id.clone(),
            reason,
        };
        let (qmp, target) = (self.qmp.clone(), self.balloon_target_mib.clone());
        let memory_mib = vm.spec.memory_mib;
        tokio::task::spawn_blocking(move || {
            let mut guard = qmp.lock().expect("qmp lock");
            let session = guard.as_mut().map_err(|why| why.clone())?;
            let mut balloon = QemuBalloon {
                qmp: session,
                memory_mib,
            };
            let result = (|| {
                if let Some(t) = target_mib {
                    balloon.set_target(t)?;
                    target.store(t, Ordering::SeqCst);
                }
                balloon.held_mib()
            })();
            match result {
                Ok(actual_mib) => Ok(BalloonState {
                    target_mib: target.load(Ordering::SeqCst),
                    actual_mib,
                }),
                Err(e) => {
                    *guard = Err(format!("an earlier QMP exchange failed ({e})"));
                    Err(e.to_string())
                }
            }
        })
        .await
        .map_err(|e| failed(format!("the QMP request did not finish: {e}")))?
        .map_err(failed)
    }
}

/// Whether `binary` is our `boxlite-vsock`, which takes `--jail-user`
/// (`vhost-device-vsock`, the other backend that fits, does not).
fn jails_itself(binary: &Path) -> bool {
    binary.file_name() == Some(OsStr::new("boxlite-vsock"))
}

/// The command line as a shell would need it, for logs and reports.
pub fn render_cmdline(binary: &Path, args: &[OsString]) -> String {
    let quote = |s: &OsStr| {
        let s = s.to_string_lossy();
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.,/=:+@%".contains(c))
        {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once(binary.as_os_str())
        .chain(args.iter().map(OsString::as_os_str))
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

mod qmp;
mod unprivileged;

#[cfg(test)]
mod tests;
