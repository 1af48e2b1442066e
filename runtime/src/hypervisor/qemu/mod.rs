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
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use async_trait::async_trait;

use super::launcher::{Launch, Launcher, VmSetup};
use super::process::Role;
use super::process_vm::ProcessVm;
use super::{HypervisorError, NetDevice, Share, VmSpec, VSOCK_SOCKET};
use crate::config::{ResolvedAccel, ResolvedHypervisor};
use crate::network::TapDevice;

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
fn qemu_balloon(free_page_reporting: bool) -> String {
    let b = super::builtin::balloon(free_page_reporting);
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
}

impl ProcessVm<QemuLauncher> {
    pub fn new(spec: VmSpec, bins: ResolvedHypervisor) -> Result<Self, HypervisorError> {
        let virtiofsd = bins.virtiofsd_binary.clone();
        ProcessVm::with_launcher(spec, &virtiofsd, QemuLauncher { bins })
    }

    /// The QEMU command line (without the binary); see [`QemuLauncher::qemu_args`].
    pub fn qemu_args(
        &self,
        shares: &[Share],
        nets: &[(Option<RawFd>, &NetDevice)],
        console: RawFd,
    ) -> Vec<OsString> {
        self.launcher.qemu_args(&self.setup, shares, nets, console)
    }

    /// [`BASE_CMDLINE`] plus the extras.
    pub fn cmdline(&self) -> String {
        cmdline(&self.setup)
    }
}

impl QemuLauncher {
    /// The QEMU command line (without the binary). `nets` pairs each device
    /// with the raw fd QEMU inherits for it (ignored for named taps);
    /// `console` is the inherited fd of the console pipe.
    pub fn qemu_args(
        &self,
        vm: &VmSetup,
        shares: &[Share],
        nets: &[(Option<RawFd>, &NetDevice)],
        console: RawFd,
    ) -> Vec<OsString> {
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
        // capped console.log. QEMU opens it by its /dev/fd path at start,
        // before anything could drop its privileges (QEMU 7.2's fd sets
        // refuse the O_CREAT its file chardev opens with).
        push(&[
            "-chardev",
            &format!("file,id=console,path=/dev/fd/{console}"),
        ]);
        args.push("-serial".into());
        args.push("chardev:console".into());
        args.push("-kernel".into());
        args.push(vm.spec.kernel.clone().into_os_string());
        args.push("-initrd".into());
        args.push(vm.spec.initramfs.clone().into_os_string());
        args.push("-append".into());
        args.push(cmdline(vm).into());
        args.push("-device".into());
        args.push("virtio-rng-device".into());
        push_chardev(&mut args, "socket,id=vsock", &vm.path(VHOST_VSOCK_SOCKET));
        args.push("-device".into());
        args.push("vhost-user-vsock-device,chardev=vsock".into());
        for (i, share) in shares.iter().enumerate() {
            push_chardev(
                &mut args,
                &format!("socket,id=fs{i}"),
                &vm.path(&fs_socket_name(&share.tag)),
            );
            args.push("-device".into());
            args.push(format!("vhost-user-fs-device,chardev=fs{i},tag={}", share.tag).into());
        }
        for (i, (fd, net)) in nets.iter().enumerate() {
            let netdev = match (&net.tap, fd) {
                (TapDevice::Fd(_), Some(fd)) => format!("tap,id=net{i},fd={fd}"),
                (TapDevice::Name(name), _) => {
                    format!("tap,id=net{i},ifname={name},script=no,downscript=no")
                }
                (TapDevice::Fd(f), None) => format!("tap,id=net{i},fd={}", f.as_raw_fd()),
            };
            args.push("-netdev".into());
            args.push(netdev.into());
            args.push("-device".into());
            args.push(format!("virtio-net-device,netdev=net{i},mac={}", net.mac).into());
        }
        // The balloon the builtin backend gives every sandbox too
        // (builtin::balloon): freed guest memory goes back to the host,
        // the balloon deflates before the guest would OOM. Last, so the
        // other devices keep their slots.
        args.push("-device".into());
        args.push(qemu_balloon(vm.spec.free_page_reporting).into());
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

    /// Spawns the helpers, waits for their sockets, then spawns QEMU.
    async fn spawn(&self, vm: &VmSetup, launch: &mut Launch<'_>) -> Result<(), HypervisorError> {
        let vhost = vm.path(VHOST_VSOCK_SOCKET);
        let args = vec![
            "--guest-cid".into(),
            GUEST_CID.to_string().into(),
            "--socket".into(),
            vhost.clone().into_os_string(),
            "--uds-path".into(),
            vm.path(VSOCK_SOCKET).into_os_string(),
        ];
        let bin = &self.bins.vhost_vsock_binary;
        launch.spawn(vm, Role::Vsock, bin, args, Some(vhost), Vec::new())?;

        launch.spawn_virtiofsd(vm)?;
        launch.wait_for_helper_sockets(vm).await?;

        let fds = launch.tap_fds();
        let nets: Vec<(Option<RawFd>, &NetDevice)> =
            fds.iter().copied().zip(launch.nets.iter()).collect();
        let args = self.qemu_args(vm, launch.shares, &nets, launch.console);
        tracing::info!(
            sandbox_id = %vm.spec.id,
            cmdline = %render_cmdline(&self.bins.qemu_binary, &args),
            "starting qemu"
        );
        let inherit = launch.vmm_fds();
        launch.spawn(vm, Role::Qemu, &self.bins.qemu_binary, args, None, inherit)
    }
}

/// Adds `-chardev <backend_and_id>,path=<path>`, the path escaped by
/// [`opt_with_path`]: the console log and every vhost-user socket reach
/// QEMU this way.
fn push_chardev(args: &mut Vec<OsString>, backend_and_id: &str, path: &Path) {
    args.push("-chardev".into());
    args.push(opt_with_path(&format!("{backend_and_id},path="), path, ""));
}

/// `prefix` + `path` with QEMU's option escaping (`,` → `,,`) + `suffix`.
fn opt_with_path(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut bytes = prefix.as_bytes().to_vec();
    for &b in path.as_os_str().as_bytes() {
        bytes.push(b);
        if b == b',' {
            bytes.push(b',');
        }
    }
    bytes.extend_from_slice(suffix.as_bytes());
    OsString::from_vec(bytes)
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

#[cfg(test)]
mod tests;
