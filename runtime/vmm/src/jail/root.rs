//! A root of the VMM's own: new mount, ipc, uts and network namespaces, and
//! `pivot_root` into an empty read-only tmpfs.
//!
//! Nothing is needed there: every file, device, tap and socket the VMM
//! uses was opened, bound or connected before this step (the virtiofsd
//! sessions and the listeners of the host ports the guest may connect to
//! included), and its seccomp profiles allow no `open`, `socket` or
//! `connect` after it. With the host's tree unmounted, no host path
//! resolves any more (`/run/containerd/containerd.sock` is not there to
//! find), and in its own network namespace the VMM can reach no abstract
//! unix socket of the host.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::unistd::{chroot, pivot_root};

use super::JailError;

fn err(what: &str, path: &Path, e: nix::Error) -> JailError {
    JailError::Root(format!("{what} {}", path.display()), e.into())
}

const LOCKED: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Enters the new namespaces and pivots into an empty tmpfs mounted over
/// `mount_point` (in the new mount namespace only).
pub fn pivot(mount_point: &Path) -> Result<(), JailError> {
    let flags = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS
        | CloneFlags::CLONE_NEWNET;
    unshare(flags).map_err(|e| err("unshare(mount, ipc, uts, net) for", mount_point, e))?;
    // Nothing we mount propagates back to the host, and nothing the host
    // mounts later shows up here.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| err("making / private before", mount_point, e))?;
    mount(
        Some("tmpfs"),
        mount_point,
        Some("tmpfs"),
        LOCKED,
        Some("mode=0755,size=64k"),
    )
    .map_err(|e| err("mounting the jail's tmpfs on", mount_point, e))?;
    mount(
        None::<&str>,
        mount_point,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | LOCKED,
        None::<&str>,
    )
    .map_err(|e| err("making read-only the jail's tmpfs on", mount_point, e))?;
    std::env::set_current_dir(mount_point)
        .map_err(|e| JailError::Root(format!("chdir {}", mount_point.display()), e))?;
    // pivot_root(".", "."): the tmpfs becomes / and the old root sits on top
    // of it, where the detaching unmount removes it.
    match pivot_root(".", ".") {
        Ok(()) => umount2(".", MntFlags::MNT_DETACH)
            .map_err(|e| err("unmounting the host root from", mount_point, e))?,
        // The host's root is the initramfs (rootfs), which pivot_root
        // refuses: a host that runs from its initramfs, like the nested
        // test host. Move the jail's root over / and chroot into it, as
        // switch_root does; the host's tree stays mounted beneath, out of
        // reach of a process with no CAP_SYS_CHROOT and no chroot, mount
        // or open in its seccomp profiles.
        Err(nix::errno::Errno::EINVAL) => {
            tracing::warn!(
                root = %mount_point.display(),
                "pivot_root refused (the host runs from its initramfs); moving the jail's root over / and chrooting"
            );
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(|e| err("moving over / the jail's root", mount_point, e))?;
            chroot(".").map_err(|e| err("chroot into", mount_point, e))?;
        }
        Err(e) => return Err(err("pivot_root into", mount_point, e)),
    }
    std::env::set_current_dir("/").map_err(|e| JailError::Root("chdir /".into(), e))?;
    Ok(())
}
