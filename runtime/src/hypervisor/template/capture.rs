//! Capturing a template from a sandbox's own first boot: when no template
//! exists for a VM's inputs, the VM boots with a `snapshot_dir` (the
//! template's `<key>.partial`, held under the build lock); once its agent
//! answers — before the shim's CreateSandbox, so nothing of the pod is in
//! the guest yet: no share mounted, no NIC configured or up — it is
//! paused, saved, resumed, and the directory is published.
//!
//! Saving the first sandbox rather than a throw-away VM of its shape costs
//! that sandbox the save (about a second for 256 MiB nested) instead of a
//! second boot, and a guest that never comes up fails once, not twice.

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::time::Duration;

use boxlite_vmm_api::config::JailUser;
use boxlite_vmm_api::control::{Reply, Request, VmState};

use super::store::BuildLock;
use super::{Template, TemplateError, TemplateInputs, TemplateRecord, TemplateStore};
use super::{MEMORY_FILE, STATE_FILE};
use crate::network::MacAddr;

/// How long the `snapshot` op may take: it writes the pages the guest
/// touched to disk (256 MiB take ~1 s on a nested host).
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// The `pause` and `resume` ops: every vCPU acknowledges within a second.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A template being captured from a booting VM: its build lock and
/// `<key>.partial`, which is removed unless [`PendingTemplate::save`]
/// published it.
#[derive(Debug)]
pub struct PendingTemplate {
    store: TemplateStore,
    inputs: TemplateInputs,
    key: String,
    partial: PathBuf,
    lock: BuildLock,
    published: bool,
}

impl PendingTemplate {
    /// Takes the build lock of `inputs`' key ([`TemplateError::Busy`] when
    /// another shim captures it now) and makes `<key>.partial`, owned by
    /// `user`: the jailed VMM writes the snapshot as its own uid.
    pub fn begin(
        store: &TemplateStore,
        inputs: &TemplateInputs,
        user: JailUser,
    ) -> Result<PendingTemplate, TemplateError> {
        let key = inputs.key();
        let lock = store.try_lock(&key)?;
        let partial = store.fresh_partial(&key, &lock)?;
        let pending = PendingTemplate {
            store: store.clone(),
            inputs: inputs.clone(),
            key,
            partial,
            lock,
            published: false,
        };
        pending.give(Some(user.uid), Some(user.gid), &[&pending.partial])?;
        Ok(pending)
    }

    pub fn key(&self) -> &str {
        &self.key
    }

    /// The directory the VMM's `snapshot` op writes into.
    pub fn snapshot_dir(&self) -> &Path {
        &self.partial
    }

    /// Pauses the VM, saves it, resumes it, and publishes the template.
    /// `control` sends one request to the VM's control socket with a reply
    /// timeout; `nic_macs` are the VM's NIC MACs (what a restored guest
    /// has until the shim changes them). The VM runs again whatever
    /// happens after the pause; an error says whether it does
    /// ([`CaptureError::vm_paused`]).
    pub async fn save<C, F>(
        mut self,
        control: C,
        nic_macs: &[MacAddr],
    ) -> Result<Template, CaptureError>
    where
        C: Fn(Request, Duration) -> F,
        F: std::future::Future<Output = std::io::Result<Reply>>,
    {
        let failed = |reason: String, vm_paused| CaptureError {
            error: TemplateError::Failed {
                key: self.key.clone(),
                reason,
            },
            vm_paused,
        };
        match control(Request::Pause, PAUSE_TIMEOUT).await {
            Ok(Reply::State {
                state: VmState::Paused,
            }) => {}
            other => return Err(failed(format!("the pause answered {other:?}"), false)),
        }
        let request = Request::Snapshot {
            state_file: STATE_FILE.into(),
            memory_file: MEMORY_FILE.into(),
        };
        let saved = control(request, SNAPSHOT_TIMEOUT).await;
        // Root's before the guest runs again: from the resume on, the
        // VMM's jail uid (which a guest that broke out of it would have)
        // must not be able to open the files other sandboxes restore.
        let owned = match &saved {
            Ok(Reply::Snapshot { .. }) => self.give_to_root(),
            _ => Ok(()),
        };
        let resumed = control(Request::Resume, PAUSE_TIMEOUT).await;
        let resumed = matches!(
            resumed,
            Ok(Reply::State {
                state: VmState::Running
            })
        );
        let snapshot = match saved {
            Ok(Reply::Snapshot { snapshot, .. }) => snapshot,
            other => return Err(failed(format!("the snapshot answered {other:?}"), !resumed)),
        };
        if !resumed {
            return Err(failed(
                "the VM did not resume after the snapshot".into(),
                true,
            ));
        }
        let record = TemplateRecord {
            inputs: self.inputs.clone(),
            snapshot_id: snapshot.id,
            nic_macs: nic_macs.iter().map(MacAddr::to_string).collect(),
            snapshot_ms: snapshot.took_ms,
        };
        owned?;
        let template = self.store.publish(&self.key, &record, &self.lock)?;
        self.published = true;
        Ok(template)
    }

    /// The directory and the snapshot files become root's again: only
    /// root reads a template.
    fn give_to_root(&self) -> Result<(), TemplateError> {
        let files = [
            self.partial.clone(),
            self.partial.join(STATE_FILE),
            self.partial.join(MEMORY_FILE),
        ];
        let files: Vec<&Path> = files.iter().map(PathBuf::as_path).collect();
        self.give(Some(0), Some(0), &files)
    }

    fn give(
        &self,
        uid: Option<u32>,
        gid: Option<u32>,
        paths: &[&Path],
    ) -> Result<(), TemplateError> {
        for path in paths {
            chown(path, uid, gid).map_err(|error| TemplateError::Io {
                key: self.key.clone(),
                op: "cannot change the owner of",
                path: path.to_path_buf(),
                error,
            })?;
        }
        Ok(())
    }
}

impl Drop for PendingTemplate {
    /// Not published (the VM failed, or the save did): `<key>.partial`
    /// goes; the lock is released after it.
    fn drop(&mut self) {
        if self.published {
            return;
        }
        if let Err(e) = std::fs::remove_dir_all(&self.partial) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(path = %self.partial.display(), error = %e, "cannot remove an unfinished template");
            }
        }
    }
}

/// A failed capture: the template's error, and whether the VM was left
/// paused (it could not be resumed), in which case the sandbox cannot
/// use it.
#[derive(Debug)]
pub struct CaptureError {
    pub error: TemplateError,
    pub vm_paused: bool,
}

/// A failure once the VM runs again.
impl From<TemplateError> for CaptureError {
    fn from(error: TemplateError) -> Self {
        CaptureError {
            error,
            vm_paused: false,
        }
    }
}
