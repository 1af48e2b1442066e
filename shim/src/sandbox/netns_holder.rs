//! A process that sits in the pod's network namespace while the booting
//! container's createRuntime (and prestart) hooks run.
//!
//! Why: such hooks find the pod's network namespace through the state's
//! `pid` (`/proc/<pid>/ns/net`) — nerdctl's CNI hook does exactly that —
//! and they run before the VM exists (its NICs are wired from what they
//! set up). Under runc that pid is the container's init, already in its
//! namespaces; here it is this holder. For a spec that asks for a new
//! network namespace without naming one, the shim makes that namespace
//! and bind-mounts it into the sandbox directory so it outlives the holder
//! (it is removed with the sandbox's network, see
//! [`super::network::NetworkRecord`]).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{setns, unshare, CloneFlags};

use crate::error::{Result, ShimError};

/// Where a namespace the shim made lives: `<sandbox dir>/netns`.
pub const OWNED_NETNS_FILE: &str = "netns";

/// The holder process; killed when dropped.
pub struct NetnsHolder {
    child: Child,
}

impl NetnsHolder {
    /// A holder in a new, empty network namespace, bind-mounted at `file`.
    pub fn create_bound(file: &Path) -> Result<(Self, PathBuf)> {
        let holder = Self::spawn(|| unshare(CloneFlags::CLONE_NEWNET).map_err(Into::into))?;
        std::fs::File::create(file)
            .map_err(|e| ShimError::io("cannot create the network namespace file", file, e))?;
        let source = PathBuf::from(format!("/proc/{}/ns/net", holder.pid()));
        mount(
            Some(&source),
            file,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| {
            let _ = std::fs::remove_file(file);
            ShimError::Mount {
                op: "cannot bind-mount the new network namespace",
                source_desc: source.display().to_string(),
                target: file.to_owned(),
                error: e.into(),
            }
        })?;
        Ok((holder, file.to_owned()))
    }

    /// A holder inside the existing network namespace at `path`.
    pub fn enter(path: &Path) -> Result<Self> {
        let ns = std::fs::File::open(path)
            .map_err(|e| ShimError::io("cannot open the network namespace", path, e))?;
        Self::spawn(move || setns(&ns, CloneFlags::CLONE_NEWNET).map_err(Into::into))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `sleep infinity` with `join` run between fork and exec.
    fn spawn(join: impl Fn() -> std::io::Result<()> + Send + Sync + 'static) -> Result<Self> {
        let mut cmd = Command::new("sleep");
        cmd.arg("infinity")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        // SAFETY: only async-signal-safe calls run between fork and exec:
        // unshare(2)/setns(2) on an fd opened before the fork, and prctl(2).
        unsafe {
            cmd.pre_exec(move || {
                // Dies with the shim instead of lingering.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                join()
            });
        }
        let child = cmd.spawn().map_err(|e| {
            ShimError::unready(
                "cannot start the network namespace holder (sleep infinity)",
                e,
            )
        })?;
        Ok(Self { child })
    }
}

impl Drop for NetnsHolder {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Unmounts and removes a namespace file the shim made; what is not there
/// is fine. The namespace goes when nothing else holds it.
pub fn remove_owned_netns(file: &Path) {
    let _ = umount2(file, MntFlags::MNT_DETACH);
    match std::fs::remove_file(file) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(file = %file.display(), error = %e, "cannot remove the network namespace file")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn netns_of(pid: u32) -> PathBuf {
        std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap()
    }

    #[test]
    #[ignore = "needs root (network namespaces, mounts)"]
    fn holders_sit_in_a_new_or_the_given_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(OWNED_NETNS_FILE);
        let own = netns_of(std::process::id());
        let (made, path) = NetnsHolder::create_bound(&file).unwrap();
        let new_ns = netns_of(made.pid());
        assert_ne!(new_ns, own, "the holder has a namespace of its own");
        // The bind mount keeps it: a second holder entering the file joins
        // the same namespace even after the first one is gone.
        drop(made);
        let joined = NetnsHolder::enter(&path).unwrap();
        assert_eq!(netns_of(joined.pid()), new_ns);
        drop(joined);
        remove_owned_netns(&path);
        assert!(!path.exists());
        remove_owned_netns(&path); // twice is fine
        assert!(NetnsHolder::enter(&path).is_err());
    }
}
