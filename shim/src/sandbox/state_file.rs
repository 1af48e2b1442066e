//! The shim's record of a sandbox: what `containerd-shim-boxlite-v2
//! delete` needs to clean up after a crashed shim.
//!
//! It lives outside the sandbox directory, in `<state dir>/.shim/<id>.json`:
//! the sandbox directory is writable by the VMM (its sockets, pid files and
//! console log are there), and cleanup acts on what this record names — it
//! kills `shim_pid`, tears down taps in `network.netns` and removes an owned
//! namespace. A compromised VMM must not be able to steer that, so the
//! record sits where only the shim writes (sandbox ids never start with
//! `.`, so `.shim` is no sandbox's directory), and what is read back is
//! checked against what the shim itself would have written.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Component, Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::netns_holder::OWNED_NETNS_FILE;
use crate::error::{Result, ShimError};

/// The directory of the shim records, beside the sandbox directories.
pub const STATE_DIR: &str = ".shim";
/// The virtio-fs share of a sandbox, in its directory and as its tag: the
/// guest's view, read-only at its top (`crate::rootfs::prepare_share`).
pub const SHARED_DIR: &str = "shared";
pub const SHARED_TAG: &str = "shared";
/// Where the shim creates and mounts each container's rootfs and volumes
/// (`mounts/<cid>/…`): not shared with the guest, and propagated into
/// [`SHARED_DIR`].
pub const MOUNTS_DIR: &str = "mounts";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxState {
    pub sandbox_id: String,
    pub namespace: String,
    pub shim_pid: u32,
    /// Pid of the VM process once started.
    pub vm_pid: Option<u32>,
    /// Containers with mounts under `mounts/` (seen in `shared/`).
    pub containers: Vec<String>,
    /// The pod network wired to the VM (netns and taps), if any.
    #[serde(default)]
    pub network: Option<super::network::NetworkRecord>,
}

impl SandboxState {
    /// The record of the sandbox whose directory is `sandbox_dir`.
    pub fn path(sandbox_dir: &Path) -> Result<PathBuf> {
        match (sandbox_dir.parent(), sandbox_dir.file_name()) {
            (Some(root), Some(id)) => {
                let mut file = id.to_os_string();
                file.push(".json");
                Ok(root.join(STATE_DIR).join(file))
            }
            _ => Err(ShimError::InvalidArgument(format!(
                "{} is not a sandbox directory",
                sandbox_dir.display()
            ))),
        }
    }

    /// Writes atomically (temp file + rename), creating the records'
    /// directory (root only) on first use.
    pub fn save(&self, sandbox_dir: &Path) -> Result<()> {
        let path = Self::path(sandbox_dir)?;
        let records = path.parent().expect("a record path has a parent");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(records)
            .map_err(|e| ShimError::io("cannot create", records, e))?;
        let mut tmp = path.clone().into_os_string();
        tmp.push(".tmp");
        let tmp = PathBuf::from(tmp);
        let data = serde_json::to_vec_pretty(self)
            .map_err(|e| ShimError::failed("cannot encode the sandbox record", e))?;
        std::fs::write(&tmp, data).map_err(|e| ShimError::io("cannot write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ShimError::io("cannot replace", &path, e))
    }

    /// Reads the record back and refuses one the shim would not have
    /// written for this directory.
    pub fn load(sandbox_dir: &Path) -> Result<Self> {
        let path = Self::path(sandbox_dir)?;
        let data = std::fs::read(&path).map_err(|e| ShimError::io("cannot read", &path, e))?;
        let state: Self = serde_json::from_slice(&data).map_err(|e| {
            ShimError::invalid(format!("{} is not a shim state file", path.display()), e)
        })?;
        state.check(sandbox_dir).map_err(|why| {
            ShimError::InvalidArgument(format!("{}: {why}; not used", path.display()))
        })?;
        Ok(state)
    }

    /// Removes the record (once the sandbox is gone).
    pub fn remove(sandbox_dir: &Path) {
        if let Ok(path) = Self::path(sandbox_dir) {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = %e, "cannot remove the sandbox record")
                }
            }
        }
    }

    /// What the shim writes: its own sandbox id, tap names of its own
    /// scheme, an absolute namespace path, and an owned namespace only at
    /// the file the shim makes in the sandbox directory.
    fn check(&self, sandbox_dir: &Path) -> std::result::Result<(), String> {
        if sandbox_dir.file_name() != Some(self.sandbox_id.as_ref()) {
            return Err(format!("it names sandbox {:?}", self.sandbox_id));
        }
        let Some(net) = &self.network else {
            return Ok(());
        };
        if let Some(tap) = net
            .taps
            .iter()
            .find(|t| !boxlite_runtime::network::is_tap_name(t))
        {
            return Err(format!("{tap:?} is not a tap name of ours"));
        }
        let plain = net.netns.is_absolute()
            && net
                .netns
                .components()
                .all(|c| matches!(c, Component::RootDir | Component::Normal(_)));
        if !plain {
            return Err(format!(
                "network namespace {} is not a plain absolute path",
                net.netns.display()
            ));
        }
        if net.owned && net.netns != sandbox_dir.join(OWNED_NETNS_FILE) {
            return Err(format!(
                "an owned network namespace must be {}, not {}",
                sandbox_dir.join(OWNED_NETNS_FILE).display(),
                net.netns.display()
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(dir: &Path) -> SandboxState {
        SandboxState {
            sandbox_id: "p1".into(),
            namespace: "k8s.io".into(),
            shim_pid: 42,
            vm_pid: Some(43),
            containers: vec!["p1".into(), "c1".into()],
            network: Some(super::super::network::NetworkRecord {
                netns: dir.join(OWNED_NETNS_FILE),
                taps: vec!["tap0_bx".into()],
                owned: true,
            }),
        }
    }

    #[test]
    fn round_trip_outside_the_sandbox_directory() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("p1");
        std::fs::create_dir(&dir).unwrap();
        let s = record(&dir);
        s.save(&dir).unwrap();
        assert_eq!(SandboxState::load(&dir).unwrap(), s);
        let path = SandboxState::path(&dir).unwrap();
        assert_eq!(path, root.path().join(".shim/p1.json"));
        assert!(!path.starts_with(&dir));
        std::fs::write(&path, "{\"nope\":1}").unwrap();
        assert!(SandboxState::load(&dir).is_err());
        SandboxState::remove(&dir);
        assert!(!path.exists());
    }

    /// A record planted where the VMM can write — the sandbox directory,
    /// where it used to be — is not read.
    #[test]
    fn a_record_in_the_sandbox_directory_is_ignored() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("p1");
        std::fs::create_dir(&dir).unwrap();
        let planted = serde_json::to_vec(&record(&dir)).unwrap();
        std::fs::write(dir.join("state.json"), planted).unwrap();
        assert!(SandboxState::load(&dir).is_err());
    }

    /// Records the shim would not have written are refused, each naming
    /// why.
    #[test]
    fn forged_records_are_refused() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("p1");
        type Forge = fn(&mut SandboxState);
        let cases: [(&str, Forge); 5] = [
            ("names sandbox \"p2\"", |s| s.sandbox_id = "p2".into()),
            ("\"eth0\" is not a tap name of ours", |s| {
                s.network.as_mut().unwrap().taps = vec!["eth0".into()]
            }),
            ("not a plain absolute path", |s| {
                s.network.as_mut().unwrap().netns = "/var/run/netns/../../etc".into()
            }),
            ("not a plain absolute path", |s| {
                s.network.as_mut().unwrap().netns = "netns".into()
            }),
            ("an owned network namespace must be", |s| {
                s.network.as_mut().unwrap().netns = "/var/run/netns/cni-other".into()
            }),
        ];
        for (why, forge) in cases {
            let mut s = record(&dir);
            forge(&mut s);
            s.save(&dir).unwrap();
            let err = SandboxState::load(&dir).unwrap_err().to_string();
            assert!(err.contains(why), "{why}: {err}");
        }
        // Someone else's namespace is fine when not owned (CNI's).
        let mut s = record(&dir);
        let net = s.network.as_mut().unwrap();
        net.netns = "/var/run/netns/cni-1".into();
        net.owned = false;
        s.save(&dir).unwrap();
        assert_eq!(SandboxState::load(&dir).unwrap(), s);
    }
}
