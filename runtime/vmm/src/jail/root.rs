//! A root of the VMM's own: new mount, ipc, uts and network namespaces, and
//! `pivot_root` into an empty read-only tmpfs that holds only the socket
//! directories the VMM still connects into once the guest runs.
//!
//! Those are the directories of the vhost-user sockets of virtiofsd (the
//! frontend connects when the guest driver activates the device, and again
//! after a backend restart) and of the hybrid vsock socket (a guest-initiated
//! connection to host port P is a `connect` to `<uds_path>_P`). Each is
//! bind-mounted at its own path, read-only, nosuid, nodev, noexec, without
//! the mounts beneath it (a share's container rootfs mounts stay out).
//! Connecting to a socket needs write permission on the socket, not on its
//! mount, so the runtime hands those sockets to the jail's uid.
//!
//! With the host's tree unmounted, no host path resolves any more (a
//! `connect` to `/run/containerd/containerd.sock` finds nothing), and in its
//! own network namespace the VMM can reach no abstract unix socket of the
//! host. Taps and every other file were opened before this step.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::fcntl::{open, OFlag};
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::stat::Mode;
use nix::unistd::{chroot, pivot_root};

use super::JailError;

fn err(what: &str, path: &Path, e: nix::Error) -> JailError {
    JailError::Root(format!("{what} {}", path.display()), e.into())
}

const LOCKED: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// Enters the new namespaces and pivots into a tmpfs mounted over
/// `mount_point` (in the new mount namespace only) that holds `expose`.
pub fn pivot(mount_point: &Path, expose: &[PathBuf]) -> Result<(), JailError> {
    // Re-created at the same path inside the jail, where the VMM's working
    // directory is "/": only an absolute path names the same socket on
    // both sides.
    if let Some(dir) = expose.iter().find(|d| !d.is_absolute()) {
        return Err(JailError::Root(
            format!("socket directory {} is not absolute", dir.display()),
            std::io::Error::from(std::io::ErrorKind::InvalidInput),
        ));
    }
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
    // Held open across the tmpfs mount, which may hide them.
    let mut held: Vec<(PathBuf, OwnedFd)> = Vec::with_capacity(expose.len());
    for dir in expose {
        let fd = open(
            dir,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| err("opening", dir, e))?;
        held.push((dir.clone(), fd));
    }
    mount(
        Some("tmpfs"),
        mount_point,
        Some("tmpfs"),
        LOCKED,
        Some("mode=0755,size=64k"),
    )
    .map_err(|e| err("mounting the jail's tmpfs on", mount_point, e))?;
    for (dir, fd) in &held {
        let inside = mount_point.join(dir.strip_prefix("/").expect("checked absolute"));
        std::fs::create_dir_all(&inside)
            .map_err(|e| JailError::Root(format!("creating {}", inside.display()), e))?;
        let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
        mount(
            Some(&source),
            &inside,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| err("bind-mounting", dir, e))?;
        mount(
            None::<&str>,
            &inside,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | LOCKED,
            None::<&str>,
        )
        .map_err(|e| err("making read-only", dir, e))?;
    }
    drop(held);
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
