//! What is left of a sandbox on the host after a crash or at shutdown:
//! leftover VM processes, the pod network, mounts and the sandbox
//! directory; and, for debugging, the guest console log kept aside.

use std::path::Path;

use boxlite_protocol::error_chain::chain;
use boxlite_runtime::hypervisor::jail_ids;

use super::state_file::SandboxState;
use crate::rootfs;

/// Debugging aid: with `BOXLITE_CONSOLE_ARCHIVE=<dir>` in the shim's
/// environment, the guest console log (kernel and agent lines) is copied to
/// `<dir>/<sandbox>.console.log` before the sandbox directory is removed.
pub const CONSOLE_ARCHIVE_ENV: &str = "BOXLITE_CONSOLE_ARCHIVE";

pub(super) fn archive_console(id: &str, dir: &Path) {
    let Some(archive) = std::env::var_os(CONSOLE_ARCHIVE_ENV) else {
        return;
    };
    let from = dir.join(boxlite_runtime::hypervisor::CONSOLE_LOG);
    let to = Path::new(&archive).join(format!("{id}.console.log"));
    match std::fs::create_dir_all(&archive).and_then(|()| std::fs::copy(&from, &to)) {
        Ok(_) => tracing::info!(to = %to.display(), "guest console log archived"),
        Err(e) => {
            tracing::warn!(to = %to.display(), error = %e, "cannot archive the guest console log")
        }
    }
}

/// After a crash or at shutdown: kills what the pid files name, removes the
/// VM's cgroup, unmounts everything under `dir`, and removes it, then
/// releases the sandbox's jail uid and removes the shim's record of it.
pub async fn cleanup_sandbox_dir(dir: &Path) {
    let killed = boxlite_runtime::hypervisor::cleanup_stale_processes(dir);
    if !killed.is_empty() {
        tracing::info!(?killed, "killed leftover VM processes");
    }
    // The VM's cgroup, once those processes have left it.
    if let Err(e) = boxlite_runtime::cgroup::remove_recorded(dir) {
        tracing::error!(error = %chain(&e), "cannot remove the leftover VM cgroup");
    }
    // A crashed shim's pod network (taps, tc filters in the pod's netns).
    if let Ok(SandboxState {
        sandbox_id,
        network: Some(record),
        ..
    }) = SandboxState::load(dir)
    {
        record.teardown(&sandbox_id).await;
    }
    match rootfs::teardown(dir) {
        Ok(()) => {
            // A crashed shim's VM never released its uid (the VM's
            // teardown does). With the directory gone the lease is stale
            // anyway; this frees it now rather than at the next lease.
            release_jail_uid(dir);
            // The record goes last: while anything is left, a later
            // `delete` needs it.
            SandboxState::remove(dir);
        }
        Err(e) => tracing::error!(error = %chain(&e), "sandbox directory cleanup failed"),
    }
}

fn release_jail_uid(dir: &Path) {
    match jail_ids::release_sandbox(dir) {
        Ok(uids) if uids.is_empty() => {}
        Ok(uids) => tracing::info!(?uids, "released the leftover jail uid lease"),
        Err(e) => tracing::error!(error = %chain(&e), "cannot release the jail uid lease"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_runtime::hypervisor::{JailIdRange, JailIds};

    /// A crashed shim's lease goes with its sandbox directory; another
    /// sandbox's stays.
    #[tokio::test]
    async fn cleanup_releases_the_sandboxs_jail_uid() {
        let root = tempfile::tempdir().unwrap();
        let ids = JailIds {
            range: JailIdRange {
                base: 1000,
                count: 4,
            },
            state_dir: root.path().to_owned(),
        };
        let lease = |id: &str| {
            std::fs::create_dir(root.path().join(id)).unwrap();
            ids.lease(id).unwrap()
        };
        let crashed = lease("crashed");
        let crashed_path = crashed.path();
        std::mem::forget(crashed);
        let live = lease("live");

        cleanup_sandbox_dir(&root.path().join("crashed")).await;
        assert!(!root.path().join("crashed").exists());
        assert!(!crashed_path.exists(), "released");
        assert!(live.path().exists(), "another sandbox's lease stays");
    }
}
