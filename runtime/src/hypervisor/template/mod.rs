//! Pod VM templates: a snapshot of a VM booted until its agent announced
//! itself, from which the builtin backend restores a sandbox's VM instead
//! of booting it (docs/templates.md).
//!
//! Under `templates.dir`, per template key:
//!
//! | path | what |
//! |---|---|
//! | `<key>/` | a finished template: `vm.state`, `vm.mem` (boxlite-vmm's snapshot files) and `template.json` ([`TemplateRecord`]) |
//! | `<key>.partial/` | a template being built; renamed to `<key>/` once whole, so a reader never sees half of one |
//! | `<key>.lock` | `flock`ed (exclusive) by the one shim that builds `<key>` |
//!
//! The key is a digest of [`TemplateInputs`]: every input the snapshot
//! depends on (the VMM, kernel and initramfs files, the command line, the
//! VM's size, its device set). A new VMM, kernel or agent (the initramfs)
//! is a new key, so an upgrade never restores an old snapshot; the VMM
//! also refuses a snapshot whose format, CPU or devices do not match.
//!
//! Everything here is the host's own: the template directory is root's
//! (0700) and the snapshot files root's (0600); boxlite-vmm opens them
//! before it jails itself.

mod capture;
mod store;

use std::path::{Path, PathBuf};

use boxlite_vmm_api::config::BalloonConfig;
use serde::{Deserialize, Serialize};

use crate::network::MacAddr;

pub use capture::{CaptureError, PendingTemplate};
pub use store::{Template, TemplateStore};

/// The snapshot's two files in a template directory.
pub const STATE_FILE: &str = "vm.state";
pub const MEMORY_FILE: &str = "vm.mem";
/// The record of what a template was built from.
pub const RECORD_FILE: &str = "template.json";
/// Bumped when the layout of a template or what its VM looks like changes
/// in a way [`TemplateInputs`] does not capture: every old key goes stale.
pub const TEMPLATE_FORMAT: u32 = 1;

/// Identifies the exact file a template was built with: a replaced file
/// (an upgrade, a rebuild) has another inode or mtime.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileId {
    pub path: PathBuf,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
}

impl FileId {
    pub fn of(path: &Path) -> std::io::Result<FileId> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(FileId {
            path: path.to_owned(),
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        })
    }
}

/// Everything a template's snapshot depends on. Two VMs with equal inputs
/// can be restored from one template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateInputs {
    pub format: u32,
    pub vmm: FileId,
    pub kernel: FileId,
    pub initramfs: FileId,
    pub cmdline: String,
    pub vcpus: u8,
    pub memory_mib: u32,
    pub balloon: BalloonConfig,
    /// The virtio-fs tags, in device order.
    pub share_tags: Vec<String>,
    /// How many virtio-net devices follow the shares.
    pub nics: usize,
}

impl TemplateInputs {
    /// The template's name: the first 16 hex digits of the SHA-256 of the
    /// inputs' JSON.
    pub fn key(&self) -> String {
        use sha2::{Digest, Sha256};
        let json = serde_json::to_vec(self).expect("template inputs serialize");
        let digest = Sha256::digest(json);
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// `template.json`: the inputs a template was built from (compared with
/// the wanted ones on every use) and the snapshot's id, which the
/// `restore` op checks against the state file it loaded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TemplateRecord {
    pub inputs: TemplateInputs,
    pub snapshot_id: String,
    /// The MAC of each NIC of the VM it was captured from, in device
    /// order: a restored guest's NICs have them (the driver read them at
    /// probe) until the shim gives each the pod's.
    pub nic_macs: Vec<String>,
    /// How long the save took, in ms.
    pub snapshot_ms: u64,
}

impl TemplateRecord {
    /// [`TemplateRecord::nic_macs`] parsed; a record with one that does
    /// not parse is not used ([`TemplateStore::find`]).
    pub fn macs(&self) -> Result<Vec<MacAddr>, String> {
        self.nic_macs
            .iter()
            .map(|m| {
                m.parse()
                    .map_err(|e| format!("NIC MAC {m:?} of the record: {e}"))
            })
            .collect()
    }
}

/// Why a template could not be built or used. The sandbox still starts
/// (cold boot); this goes to the log.
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("template {key}: {op} {}", path.display())]
    Io {
        key: String,
        op: &'static str,
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("template {key}: another shim is building it (lock {} held)", lock.display())]
    Busy { key: String, lock: PathBuf },
    #[error("template {key}: {reason}")]
    Failed { key: String, reason: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(dir: &Path) -> TemplateInputs {
        let file = |name: &str| {
            let p = dir.join(name);
            std::fs::write(&p, name).unwrap();
            FileId::of(&p).unwrap()
        };
        TemplateInputs {
            format: TEMPLATE_FORMAT,
            vmm: file("vmm"),
            kernel: file("kernel"),
            initramfs: file("initramfs"),
            cmdline: "loglevel=5".into(),
            vcpus: 1,
            memory_mib: 256,
            balloon: BalloonConfig::default(),
            share_tags: vec!["shared".into()],
            nics: 1,
        }
    }

    #[test]
    fn the_key_changes_with_every_input() {
        let dir = tempfile::tempdir().unwrap();
        let base = inputs(dir.path());
        let key = base.key();
        assert_eq!(key.len(), 16);
        assert!(key.bytes().all(|b| b.is_ascii_hexdigit()));
        assert_eq!(key, base.clone().key(), "stable");
        let mut changed = Vec::new();
        let mut vary = |f: &dyn Fn(&mut TemplateInputs)| {
            let mut i = base.clone();
            f(&mut i);
            changed.push(i.key());
        };
        vary(&|i| i.format += 1);
        vary(&|i| i.cmdline.push_str(" maxcpus=1"));
        vary(&|i| i.vcpus = 2);
        vary(&|i| i.memory_mib = 512);
        vary(&|i| i.balloon.target_mib = 64);
        vary(&|i| i.share_tags.push("more".into()));
        vary(&|i| i.nics = 0);
        vary(&|i| i.kernel.mtime_ns += 1);
        vary(&|i| i.initramfs.ino += 1);
        vary(&|i| i.vmm.size += 1);
        for k in &changed {
            assert_ne!(*k, key);
        }
    }

    #[test]
    fn a_replaced_file_has_another_id() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("kernel");
        std::fs::write(&p, "v1").unwrap();
        let before = FileId::of(&p).unwrap();
        // An upgrade writes a new file and renames it over the old one.
        let new = dir.path().join("kernel.new");
        std::fs::write(&new, "v2").unwrap();
        std::fs::rename(&new, &p).unwrap();
        assert_ne!(FileId::of(&p).unwrap(), before);
    }
}
