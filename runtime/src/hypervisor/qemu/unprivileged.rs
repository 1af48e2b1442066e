//! QEMU without root: it starts as the sandbox's jail uid (the one
//! `boxlite-vmm` jails itself as, [`super::super::jail_ids`]) with no
//! capabilities and only the group of `/dev/kvm` besides its own, in empty
//! network, ipc and uts namespaces of its own, and its seccomp sandbox
//! (`elevateprivileges=deny`) holds from its first instruction. QEMU's own
//! `-runas` would drop privileges only after QEMU had run as root for a
//! while, and its seccomp filter forbids that very setuid.
//!
//! Everything QEMU could not open as that uid is opened here, as root, and
//! inherited, so QEMU needs no host path at all: the vhost-user sockets of
//! the vsock backend and of each virtiofsd, connected here (each serves
//! one frontend; `-chardev socket,fd=<n>`); the guest kernel and
//! initramfs (QEMU reopens them by their `/dev/fd/<n>` path, which checks
//! the file's own mode but none of the directories above it); taps named
//! in the config; and the console pipe, which becomes the jail uid's so
//! that reopening it is allowed.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::Path;

use boxlite_vmm_api::config::JailUser;

use super::{QemuFds, VHOST_VSOCK_SOCKET};
use crate::config::ResolvedAccel;
use crate::hypervisor::launcher::VmSetup;
use crate::hypervisor::process::{fs_socket_name, RunAs, HELPER_READY_TIMEOUT, POLL_INTERVAL};
use crate::hypervisor::{HypervisorError, NetDevice, Share};
use crate::network::{create_tap, TapDevice};

/// Where KVM lives; its group is the one extra group QEMU gets.
const KVM_DEVICE: &str = "/dev/kvm";

/// Files opened for QEMU, held until it is spawned (it inherits them).
#[derive(Debug)]
pub struct QemuFiles {
    kernel: File,
    initramfs: File,
    vhost_vsock: UnixStream,
    /// One per share, in order.
    fs: Vec<UnixStream>,
    /// One per net device, in order: the tap opened here for a named one.
    named_taps: Vec<Option<OwnedFd>>,
    /// The QMP socket pair: QEMU inherits the first, the runtime keeps
    /// the second ([`QemuFiles::into_qmp`]).
    qmp: (UnixStream, UnixStream),
}

impl QemuFiles {
    /// Connects to the helpers' sockets (the vsock backend's, and each of
    /// `shares`' virtiofsd), opens the boot files and the taps `nets` name,
    /// and hands the console pipe (`console`, its write end) to `user`.
    pub async fn open(
        vm: &VmSetup,
        user: JailUser,
        console: RawFd,
        shares: &[Share],
        nets: &[NetDevice],
    ) -> Result<Self, HypervisorError> {
        let id = &vm.spec.id;
        let io = |op, path: &Path, error| HypervisorError::Io {
            id: id.clone(),
            op,
            path: path.to_owned(),
            error,
        };
        // SAFETY: fchown on an fd the caller keeps open for this call.
        if unsafe { libc::fchown(console, user.uid, user.gid) } != 0 {
            let e = std::io::Error::last_os_error();
            return Err(io(
                "cannot hand the console pipe to QEMU's uid",
                Path::new("console pipe"),
                e,
            ));
        }
        let mut sockets = Vec::with_capacity(1 + shares.len());
        sockets.push(vm.path(VHOST_VSOCK_SOCKET));
        sockets.extend(shares.iter().map(|s| vm.path(&fs_socket_name(&s.tag))));
        let mut connected = Vec::with_capacity(sockets.len());
        for path in &sockets {
            connected.push(
                connect_listening(path).await.map_err(|e| {
                    io("cannot connect to this vhost-user socket for QEMU", path, e)
                })?,
            );
        }
        let vhost_vsock = connected.remove(0);
        let fs = connected;
        let kernel = open_boot_file(id, &vm.spec.kernel)?;
        let initramfs = open_boot_file(id, &vm.spec.initramfs)?;
        let mut named_taps = Vec::with_capacity(nets.len());
        for net in nets {
            named_taps.push(match &net.tap {
                TapDevice::Name(name) => Some(create_tap(name).map_err(|e| {
                    io(
                        "cannot open this tap for QEMU (it runs unprivileged)",
                        Path::new(name),
                        e,
                    )
                })?),
                TapDevice::Fd(_) => None,
            });
        }
        let qmp = UnixStream::pair().map_err(|e| {
            io(
                "cannot make the QMP socket pair",
                Path::new("socketpair"),
                e,
            )
        })?;
        Ok(QemuFiles {
            kernel,
            initramfs,
            vhost_vsock,
            fs,
            named_taps,
            qmp,
        })
    }

    /// The runtime's end of the QMP socket pair; QEMU's end closes here,
    /// once QEMU has inherited it.
    pub fn into_qmp(self) -> UnixStream {
        self.qmp.1
    }

    /// The raw fd of the tap opened here for each net device, in order.
    pub fn named_taps(&self) -> Vec<Option<RawFd>> {
        self.named_taps
            .iter()
            .map(|t| t.as_ref().map(|fd| fd.as_raw_fd()))
            .collect()
    }

    /// What QEMU's command line names, with the console's `console`.
    pub fn fds(&self, console: RawFd) -> QemuFds {
        QemuFds {
            console,
            kernel: self.kernel.as_raw_fd(),
            initramfs: self.initramfs.as_raw_fd(),
            vhost_vsock: self.vhost_vsock.as_raw_fd(),
            fs: self.fs.iter().map(AsRawFd::as_raw_fd).collect(),
            qmp: self.qmp.0.as_raw_fd(),
        }
    }

    /// Every fd opened here, for QEMU to inherit.
    pub fn inherited(&self) -> Vec<RawFd> {
        let mut fds = vec![
            self.kernel.as_raw_fd(),
            self.initramfs.as_raw_fd(),
            self.vhost_vsock.as_raw_fd(),
            self.qmp.0.as_raw_fd(),
        ];
        fds.extend(self.fs.iter().map(AsRawFd::as_raw_fd));
        fds.extend(self.named_taps().into_iter().flatten());
        fds
    }
}

/// Connects to a helper's socket. Its file appears when the helper binds
/// it, a moment before the helper listens (seen with 20 sandboxes starting
/// at once): a refused connection is tried again, for at most
/// [`HELPER_READY_TIMEOUT`].
async fn connect_listening(path: &Path) -> std::io::Result<UnixStream> {
    let deadline = tokio::time::Instant::now() + HELPER_READY_TIMEOUT;
    loop {
        match UnixStream::connect(path) {
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() < deadline =>
            {
                tokio::time::sleep(POLL_INTERVAL).await
            }
            result => return result,
        }
    }
}

/// Opens a boot file for QEMU; it must be readable by everyone, since QEMU
/// reopens it as the jail uid (which owns nothing on the host).
fn open_boot_file(id: &str, path: &Path) -> Result<File, HypervisorError> {
    let io = |op, error| HypervisorError::Io {
        id: id.to_owned(),
        op,
        path: path.to_owned(),
        error,
    };
    let file = File::open(path).map_err(|e| io("cannot open a guest boot file", e))?;
    let mode = file
        .metadata()
        .map_err(|e| io("cannot stat a guest boot file", e))?
        .mode();
    if mode & 0o004 == 0 {
        return Err(io(
            "QEMU runs unprivileged and reads this guest boot file as another uid: make it world-readable (chmod a+r)",
            std::io::Error::from_raw_os_error(libc::EACCES),
        ));
    }
    Ok(file)
}

/// QEMU's credentials: the jail uid and gid, plus the group of `/dev/kvm`
/// under KVM (none under TCG, which needs no device); and empty network,
/// ipc and uts namespaces of its own: its taps and sockets are inherited
/// fds, so it needs no interface, address or abstract socket of the host's.
pub fn run_as(user: JailUser, accel: ResolvedAccel) -> RunAs {
    let groups = match accel {
        ResolvedAccel::Kvm => std::fs::metadata(KVM_DEVICE)
            .map(|m| vec![m.gid()])
            .unwrap_or_default(),
        ResolvedAccel::Tcg => Vec::new(),
    };
    RunAs {
        uid: user.uid,
        gid: user.gid,
        groups,
        own_namespaces: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{
        bind, listen, socket, AddressFamily, Backlog, SockFlag, SockType, UnixAddr,
    };
    use std::os::fd::AsRawFd;

    /// A helper's socket file exists from its `bind`; until its `listen`,
    /// a connection is refused. The connect waits that moment out.
    #[tokio::test]
    async fn a_socket_bound_but_not_yet_listening_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("helper.sock");
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        assert_eq!(
            UnixStream::connect(&path).unwrap_err().kind(),
            std::io::ErrorKind::ConnectionRefused
        );
        let listening = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(100));
            listen(&fd, Backlog::new(1).unwrap()).unwrap();
            fd
        });
        connect_listening(&path)
            .await
            .expect("connected once it listens");
        drop(listening.join());
        // Nothing there at all: an error at once, not a wait.
        let started = std::time::Instant::now();
        let err = connect_listening(&dir.path().join("none.sock"))
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
        assert!(started.elapsed() < HELPER_READY_TIMEOUT);
    }
}
