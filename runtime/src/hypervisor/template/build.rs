//! Building a template: a throw-away VM of the pod's shape — the same
//! kernel, initramfs, command line, size and devices, each share served
//! from an empty directory, each NIC on a tap in a network namespace of
//! its own — booted until its agent answers, paused and saved into
//! `<key>.partial`, which is then published as `<key>`.
//!
//! Nothing pod-specific is in it: the agent has not been asked to create
//! a sandbox, no share is mounted, no NIC configured, no host connection
//! is open (the Health connection is closed before the pause, and the
//! restored guest gets a vsock transport reset anyway).

use std::os::fd::OwnedFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;
use std::time::{Duration, Instant};

use boxlite_protocol::error_chain::chain;
use boxlite_vmm_api::control::{Reply, Request, VmState};

use super::store::BuildLock;
use super::{template_nic_mac, Template, TemplateError, TemplateInputs, TemplateRecord};
use super::{TemplateStore, MEMORY_FILE, STATE_FILE};
use crate::config::ResolvedHypervisor;
use crate::hypervisor::builtin::BuiltinHypervisor;
use crate::hypervisor::{Hypervisor, NetDevice, Share, VmSpec};
use crate::network::{create_tap, tap_name, TapDevice};

/// How long the `snapshot` op may take: it writes the VM's memory (the
/// pages the guest touched) to disk; 256 MiB take ~1 s on a nested host.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// The `pause` op: every vCPU acknowledges within milliseconds.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);
/// The template VM is killed once saved; a stop has nothing to wait for.
const TEMPLATE_VM_SHUTDOWN: Duration = Duration::from_secs(1);
/// The run directory of the template VM, beside the sandboxes' in
/// `runtime.state_dir`: `template-<key>` (sandbox ids from containerd are
/// 64 hex digits or names; none starts like this and has 16 hex digits).
const RUN_DIR_PREFIX: &str = "template-";

/// What a build needs.
pub struct TemplateBuild<'a> {
    pub store: &'a TemplateStore,
    pub inputs: &'a TemplateInputs,
    /// The spec of the sandbox VM that wants the template: the template
    /// VM copies its shape (and its timeouts, jail uids, log caps).
    pub pod: &'a VmSpec,
    pub bins: &'a ResolvedHypervisor,
}

/// Builds the template `b.inputs` describe, or returns the one another
/// shim published meanwhile. [`TemplateError::Busy`] when another shim is
/// building it now. A failed build leaves no `<key>` and no `<key>.partial`.
pub async fn build_template(b: TemplateBuild<'_>) -> Result<Template, TemplateError> {
    let key = b.inputs.key();
    let lock = b.store.try_lock(&key)?;
    if let Some(t) = b.store.find(b.inputs) {
        return Ok(t);
    }
    let partial = b.store.fresh_partial(&key, &lock)?;
    let state_dir = b.pod.dir.parent().unwrap_or(Path::new("/"));
    let run_dir = state_dir.join(format!("{RUN_DIR_PREFIX}{key}"));
    clear_run_dir(&run_dir);
    tracing::info!(template = %key, dir = %b.store.dir().display(), "building a VM template");
    let built = boot_and_save(&b, &key, &run_dir, &partial).await;
    clear_run_dir(&run_dir);
    let published = built.and_then(|record| publish(b.store, &key, &record, &lock, &partial));
    match published {
        Ok(t) => {
            tracing::info!(template = %key, boot_ms = t.record.boot_ms, snapshot_ms = t.record.snapshot_ms, "VM template built");
            Ok(t)
        }
        Err(e) => {
            if let Err(rm) = std::fs::remove_dir_all(&partial) {
                if rm.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %partial.display(), error = %rm, "cannot remove an unfinished template");
                }
            }
            Err(e)
        }
    }
}

/// The snapshot files become root's again (the jailed VMM wrote them as
/// its uid), then the directory is published.
fn publish(
    store: &TemplateStore,
    key: &str,
    record: &TemplateRecord,
    lock: &BuildLock,
    partial: &Path,
) -> Result<Template, TemplateError> {
    for path in [
        partial.to_owned(),
        partial.join(STATE_FILE),
        partial.join(MEMORY_FILE),
    ] {
        std::os::unix::fs::chown(&path, Some(0), Some(0)).map_err(|error| TemplateError::Io {
            key: key.to_owned(),
            op: "cannot give root",
            path: path.clone(),
            error,
        })?;
    }
    store.publish(key, record, lock)
}

/// What a template VM run of an earlier, crashed build left: its
/// processes, its jail uid lease, its directory.
fn clear_run_dir(dir: &Path) {
    if !dir.exists() {
        return;
    }
    let killed = crate::hypervisor::cleanup_stale_processes(dir);
    if !killed.is_empty() {
        tracing::warn!(dir = %dir.display(), ?killed, "killed the processes of an earlier template build");
    }
    if let Err(e) = crate::hypervisor::jail_ids::release_sandbox(dir) {
        tracing::warn!(dir = %dir.display(), error = %chain(&e), "cannot release the template VM's jail uid");
    }
    if let Err(e) = std::fs::remove_dir_all(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the template VM's directory");
    }
}

/// Boots the template VM, waits for its agent, pauses it and saves it into
/// `partial`; the VM is gone when this returns.
async fn boot_and_save(
    b: &TemplateBuild<'_>,
    key: &str,
    run_dir: &Path,
    partial: &Path,
) -> Result<TemplateRecord, TemplateError> {
    let failed = |reason: String| TemplateError::Failed {
        key: key.to_owned(),
        reason,
    };
    let vm_failed = |error| TemplateError::Vm {
        key: key.to_owned(),
        error: Box::new(error),
    };
    let empty = run_dir.join("empty-share");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&empty)
        .map_err(|error| TemplateError::Io {
            key: key.to_owned(),
            op: "cannot create",
            path: empty.clone(),
            error,
        })?;
    let taps = template_taps(b.inputs.nics).map_err(|error| TemplateError::Io {
        key: key.to_owned(),
        op: "cannot create the template VM's taps (in a network namespace of their own)",
        path: "/dev/net/tun".into(),
        error,
    })?;
    let spec = template_vm_spec(b, key, run_dir, &empty, taps);
    let hv = BuiltinHypervisor::for_template(spec, b.bins.clone(), partial.to_owned())
        .map_err(vm_failed)?;
    let started = Instant::now();
    let saved = async {
        hv.start().await.map_err(vm_failed)?;
        // Health answered: the agent serves. Its connection closes here,
        // before the pause.
        drop(hv.wait_ready().await.map_err(vm_failed)?);
        let boot_ms = started.elapsed().as_millis() as u64;
        match hv.control_within(Request::Pause, PAUSE_TIMEOUT).await {
            Ok(Reply::State {
                state: VmState::Paused,
            }) => {}
            other => return Err(failed(format!("the pause answered {other:?}"))),
        }
        let request = Request::Snapshot {
            state_file: STATE_FILE.into(),
            memory_file: MEMORY_FILE.into(),
        };
        let snapshot = match hv.control_within(request, SNAPSHOT_TIMEOUT).await {
            Ok(Reply::Snapshot { snapshot, .. }) => snapshot,
            other => return Err(failed(format!("the snapshot answered {other:?}"))),
        };
        Ok(TemplateRecord {
            inputs: b.inputs.clone(),
            snapshot_id: snapshot.id,
            boot_ms,
            snapshot_ms: snapshot.took_ms,
        })
    }
    .await;
    if let Err(e) = &saved {
        let console = hv.console_log_path();
        let tail = boxlite_protocol::log_tail::log_tail(&console, 40);
        tracing::warn!(template = %key, error = %chain(e), console_tail = tail.as_deref().unwrap_or("(empty)"), "template VM failed");
    }
    let _ = hv.kill().await;
    saved
}

/// The template VM: the pod's shape under its own id and directory.
fn template_vm_spec(
    b: &TemplateBuild<'_>,
    key: &str,
    run_dir: &Path,
    empty: &Path,
    taps: Vec<OwnedFd>,
) -> VmSpec {
    let pod = b.pod;
    VmSpec {
        id: format!("{RUN_DIR_PREFIX}{key}"),
        dir: run_dir.to_owned(),
        kernel: pod.kernel.clone(),
        initramfs: pod.initramfs.clone(),
        vcpus: pod.vcpus,
        memory_mib: pod.memory_mib,
        balloon_mib: pod.balloon_mib,
        free_page_reporting: pod.free_page_reporting,
        cmdline_extra: pod.cmdline_extra.clone(),
        shares: b
            .inputs
            .share_tags
            .iter()
            .map(|tag| Share {
                tag: tag.clone(),
                host_dir: empty.to_owned(),
                read_only: true,
            })
            .collect(),
        nets: taps
            .into_iter()
            .enumerate()
            .map(|(i, fd)| NetDevice {
                tap: TapDevice::Fd(fd),
                mac: template_nic_mac(i),
            })
            .collect(),
        agent_ready_timeout: pod.agent_ready_timeout,
        shutdown_timeout: TEMPLATE_VM_SHUTDOWN,
        log_max_bytes: pod.log_max_bytes,
        jail_ids: pod.jail_ids.clone(),
        // The template VM is the host's, not a pod's: it stays in the
        // shim's cgroup.
        cgroup: None,
    }
}

/// `n` taps in a network namespace made for them: a thread unshares its
/// netns, opens them and ends; the namespace lives on while a tap fd does
/// and goes with the last (when the template VM is gone).
fn template_taps(n: usize) -> std::io::Result<Vec<OwnedFd>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    std::thread::spawn(move || {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        (0..n).map(|i| create_tap(&tap_name(i))).collect()
    })
    .join()
    .unwrap_or_else(|_| Err(std::io::Error::other("the tap thread panicked")))
}
