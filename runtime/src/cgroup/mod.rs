//! The pod's cgroup: every host process of a sandbox's VM (the VMM, the
//! vsock backend, each virtiofsd) runs in the cgroup the sandbox's
//! `cgroupsPath` names, so the kubelet's pod limits (and the RuntimeClass
//! overhead it adds to them) bound the VM, and its memory counts for
//! eviction and `kubectl top`. This is Kata's `sandbox_cgroup_only = true`.
//!
//! - [`path::resolve`] turns the `cgroupsPath` (cgroupfs or systemd form)
//!   into a path below each hierarchy's root;
//! - [`PodCgroup::create`] makes it in every mounted hierarchy (v1, v2 or
//!   both) where missing. The sandbox's own directory (the last component)
//!   is the sandbox's, as a container's is runc's: it is removed with the
//!   sandbox even if it was there before (a crashed run's leftover). Its
//!   parents — the kubelet's pod cgroup, shared ones such as `/boxlite` or
//!   ctr's `/default` — are left alone;
//! - [`PodCgroup::joiner`] gives what a child writes between fork and exec
//!   to join it, so that no process of the VM (nor a child it forks before
//!   anyone could move it) ever runs outside it;
//! - [`PodCgroup::remove`] removes the sandbox's directory, once the
//!   processes are gone;
//!   [`remove_recorded`] does it after a crashed shim, from the record
//!   [`PodCgroup::create`] leaves in the sandbox directory.
//!
//! Limits are not written here: a pod's live in the kubelet's pod cgroup
//! (the parent), a container's inside the guest. The directories are made
//! directly, for both forms of `cgroupsPath`; with systemd no transient
//! unit is registered for the scope (docs/resources.md says what that
//! means).

mod mounts;
pub mod path;

use std::ffi::CString;
use std::io::ErrorKind;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use mounts::{parse_mountinfo, Hierarchy};
pub use path::{resolve, InvalidCgroupsPath};

/// In the sandbox directory: the sandbox's own cgroup directory in each
/// hierarchy, one absolute path a line.
pub const RECORD_FILE: &str = "cgroup.created";

/// How long removal waits for the cgroup to empty: a killed process leaves
/// it only when its exit is complete, which can lag the SIGKILL a little.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(2);

/// What went wrong with a sandbox's cgroup. Messages name the path.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error(transparent)]
    InvalidPath(#[from] InvalidCgroupsPath),
    #[error("no cgroup hierarchy is mounted (none in /proc/self/mountinfo)")]
    NoHierarchy,
    #[error("cannot read /proc/self/mountinfo")]
    Mountinfo(#[source] std::io::Error),
    #[error("cannot {op} cgroup {}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("cgroup {} still has processes {waited:?} after the VM's were killed", path.display())]
    Busy { path: PathBuf, waited: Duration },
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> CgroupError + 'a {
    move |error| CgroupError::Io {
        op,
        path: path.to_owned(),
        error,
    }
}

/// The hierarchies mounted on this host.
pub fn host_hierarchies() -> Result<Vec<Hierarchy>, CgroupError> {
    let info = std::fs::read("/proc/self/mountinfo").map_err(CgroupError::Mountinfo)?;
    let h = parse_mountinfo(&info);
    if h.is_empty() {
        return Err(CgroupError::NoHierarchy);
    }
    Ok(h)
}

/// A sandbox's cgroup, made (where missing) in every hierarchy.
#[derive(Debug)]
pub struct PodCgroup {
    /// The sandbox's directory in each hierarchy.
    leaves: Vec<PathBuf>,
    /// The sandbox's directories to remove with it: its own in each
    /// hierarchy (never a parent).
    created: Vec<PathBuf>,
    /// Where [`RECORD_FILE`] is, once written.
    record: Option<PathBuf>,
}

impl PodCgroup {
    /// Makes `relative` in each hierarchy of `hierarchies` (what exists is
    /// used as it is), then writes the record into `record_dir`. On error
    /// what was made is removed again.
    pub fn create(
        hierarchies: &[Hierarchy],
        relative: &Path,
        record_dir: &Path,
    ) -> Result<Self, CgroupError> {
        let mut cg = PodCgroup {
            leaves: Vec::new(),
            created: Vec::new(),
            record: None,
        };
        if let Err(e) = cg.make(hierarchies, relative, record_dir) {
            let _ = cg.remove();
            return Err(e);
        }
        Ok(cg)
    }

    fn make(
        &mut self,
        hierarchies: &[Hierarchy],
        relative: &Path,
        record_dir: &Path,
    ) -> Result<(), CgroupError> {
        for h in hierarchies {
            let mut dir = h.mount.clone();
            let levels = relative.iter().count();
            for (level, name) in relative.iter().enumerate() {
                let parent = dir.clone();
                dir.push(name);
                match std::fs::create_dir(&dir) {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io("create", &dir)(e)),
                }
                // Only the sandbox's own directory is ours to remove: a
                // parent (`/boxlite`, ctr's `/default`, the kubelet's pod
                // cgroup) is shared by every sandbox under it and stays,
                // as runc leaves it.
                if level + 1 == levels {
                    self.created.push(dir.clone());
                }
                // Also where the directory existed: a sandbox starting at
                // the same moment may have made it and not filled it yet.
                if h.v1_cpuset {
                    inherit_cpuset(&parent, &dir)?;
                }
            }
            self.leaves.push(dir);
        }
        let record = record_dir.join(RECORD_FILE);
        let mut text = Vec::new();
        for dir in &self.created {
            text.extend_from_slice(dir.as_os_str().as_bytes());
            text.push(b'\n');
        }
        std::fs::write(&record, text).map_err(io("write the record of the sandbox's", &record))?;
        self.record = Some(record);
        Ok(())
    }

    /// The sandbox's directory in each hierarchy.
    pub fn leaves(&self) -> &[PathBuf] {
        &self.leaves
    }

    /// What a child runs between fork and exec to join the cgroup.
    pub fn joiner(&self) -> CgroupJoiner {
        CgroupJoiner {
            procs_files: self
                .leaves
                .iter()
                .map(|l| {
                    CString::new(l.join("cgroup.procs").as_os_str().as_bytes())
                        .expect("cgroup paths come from mountinfo and checked names: no NUL")
                })
                .collect(),
        }
    }

    /// The pids in the sandbox's cgroup (its first hierarchy's view).
    pub fn pids(&self) -> Vec<u32> {
        self.leaves
            .first()
            .map(|l| read_pids(l))
            .unwrap_or_default()
    }

    /// Removes the directories this sandbox made, children first, then the
    /// record. Waits (bounded) for killed processes to leave. Idempotent.
    pub fn remove(&mut self) -> Result<(), CgroupError> {
        remove_dirs(&self.created)?;
        self.created.clear();
        if let Some(record) = self.record.take() {
            let _ = std::fs::remove_file(record);
        }
        Ok(())
    }
}

/// The `cgroup.procs` files a new process writes itself into, prepared
/// before fork: [`CgroupJoiner::join`] only makes system calls.
#[derive(Debug, Clone, Default)]
pub struct CgroupJoiner {
    procs_files: Vec<CString>,
}

impl CgroupJoiner {
    /// Writes "0" (the writer itself) into each `cgroup.procs`.
    ///
    /// # Safety
    /// Meant for a `pre_exec` hook: it allocates nothing and calls only
    /// open, write and close, which are async-signal-safe.
    pub unsafe fn join(&self) -> std::io::Result<()> {
        for file in &self.procs_files {
            // SAFETY: a NUL-terminated path we own; the fd is ours alone.
            let fd = unsafe { libc::open(file.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: writing one byte from a static buffer to our fd.
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            let err = std::io::Error::last_os_error();
            // SAFETY: closing the fd opened above.
            unsafe { libc::close(fd) };
            if n != 1 {
                return Err(err);
            }
        }
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.procs_files.is_empty()
    }
}

/// After a crashed shim: removes the cgroup directories `dir`'s record
/// names, children first, then the record. Only directories that are
/// cgroups of a mounted hierarchy are touched, and only with rmdir, which
/// the kernel refuses for a cgroup that still has processes or children:
/// a damaged record cannot remove anything else.
pub fn remove_recorded(dir: &Path) -> Result<(), CgroupError> {
    let record = dir.join(RECORD_FILE);
    let text = match std::fs::read(&record) {
        Ok(t) => t,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io("read the record of", &record)(e)),
    };
    let hierarchies = host_hierarchies()?;
    let dirs: Vec<PathBuf> = text
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| PathBuf::from(std::ffi::OsStr::from_bytes(l)))
        .filter(|p| {
            let inside = hierarchies
                .iter()
                .any(|h| p.starts_with(&h.mount) && p != &h.mount)
                && p.is_absolute()
                && !p
                    .components()
                    .any(|c| matches!(c, std::path::Component::ParentDir));
            if !inside {
                tracing::warn!(path = %p.display(), "cgroup record names a path outside the cgroup hierarchies; ignored");
            }
            inside
        })
        .collect();
    remove_dirs(&dirs)?;
    let _ = std::fs::remove_file(&record);
    Ok(())
}

/// rmdir each of `dirs`, last first; a cgroup still busy is waited for.
fn remove_dirs(dirs: &[PathBuf]) -> Result<(), CgroupError> {
    for dir in dirs.iter().rev() {
        let started = Instant::now();
        loop {
            match std::fs::remove_dir(dir) {
                Ok(()) => break,
                Err(e) if e.kind() == ErrorKind::NotFound => break,
                // EBUSY: a process has not finished exiting (or a child
                // cgroup someone else made is still there).
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {
                    if started.elapsed() >= REMOVE_TIMEOUT {
                        let pids = read_pids(dir);
                        tracing::warn!(cgroup = %dir.display(), ?pids, "cgroup still busy");
                        return Err(CgroupError::Busy {
                            path: dir.clone(),
                            waited: REMOVE_TIMEOUT,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => return Err(io("remove", dir)(e)),
            }
        }
    }
    Ok(())
}

fn read_pids(leaf: &Path) -> Vec<u32> {
    std::fs::read_to_string(leaf.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

/// cgroup v1's cpuset starts a child with no CPUs and no memory nodes, and
/// refuses processes until they are set: where the child's are empty, copy
/// the parent's (what is set, by us or the kubelet, stays).
fn inherit_cpuset(parent: &Path, child: &Path) -> Result<(), CgroupError> {
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let to = child.join(file);
        let current = std::fs::read_to_string(&to).map_err(io("read", &to))?;
        if !current.trim().is_empty() {
            continue;
        }
        let from = parent.join(file);
        let value = std::fs::read_to_string(&from).map_err(io("read", &from))?;
        std::fs::write(&to, value.trim()).map_err(io("write", &to))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests;
