//! `state.json` in the sandbox directory: what `containerd-shim-boxlite-v2
//! delete` needs to clean up after a crashed shim.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Result, ShimError};

pub const STATE_FILE: &str = "state.json";
/// The virtio-fs share of a sandbox, in its directory and as its tag.
pub const SHARED_DIR: &str = "shared";
pub const SHARED_TAG: &str = "shared";

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SandboxState {
    pub sandbox_id: String,
    pub namespace: String,
    pub shim_pid: u32,
    /// Pid of the VM process once started.
    pub vm_pid: Option<u32>,
    /// Containers with mounts under `shared/`.
    pub containers: Vec<String>,
    /// The pod network wired to the VM (netns and taps), if any.
    #[serde(default)]
    pub network: Option<super::network::NetworkRecord>,
}

impl SandboxState {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join(STATE_FILE)
    }

    /// Writes atomically (temp file + rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = Self::path(dir);
        let tmp = dir.join(format!("{STATE_FILE}.tmp"));
        let data = serde_json::to_vec_pretty(self)
            .map_err(|e| ShimError::failed("cannot encode state.json", e))?;
        std::fs::write(&tmp, data).map_err(|e| ShimError::io("cannot write", &tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| ShimError::io("cannot replace", &path, e))
    }

    pub fn load(dir: &Path) -> Result<Self> {
        let path = Self::path(dir);
        let data = std::fs::read(&path).map_err(|e| ShimError::io("cannot read", &path, e))?;
        serde_json::from_slice(&data).map_err(|e| {
            ShimError::invalid(format!("{} is not a shim state file", path.display()), e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = SandboxState {
            sandbox_id: "p1".into(),
            namespace: "k8s.io".into(),
            shim_pid: 42,
            vm_pid: Some(43),
            containers: vec!["p1".into(), "c1".into()],
            network: Some(super::super::network::NetworkRecord {
                netns: "/var/run/netns/cni-1".into(),
                taps: vec!["tap0_bx".into()],
                owned: false,
            }),
        };
        s.save(dir.path()).unwrap();
        assert_eq!(SandboxState::load(dir.path()).unwrap(), s);
        std::fs::write(SandboxState::path(dir.path()), "{\"nope\":1}").unwrap();
        assert!(SandboxState::load(dir.path()).is_err());
    }
}
