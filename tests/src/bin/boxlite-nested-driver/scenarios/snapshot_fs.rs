//! `snapshot-fs`: a template with a virtio-fs device, restored on another
//! virtiofsd serving another directory.
//!
//! The source VM's virtio-fs device is started by the guest driver at
//! boot (vrings handed to its virtiofsd) but no share is mounted, as for
//! a pod template. Its clone is restored into copied memory (`auto` picks
//! `copy`: virtiofsd maps guest memory by fd), starts the saved vrings on
//! its own virtiofsd at the `restore` op, mounts the share and reads the
//! clone's file, not the template's.

use std::time::Instant;

use boxlite_protocol::agent::MountShareRequest;
use boxlite_vmm_api::config::MemoryMode;

use super::fs::{Virtiofsd, FS_FILE};
use super::snapshot::{restore, Template};
use crate::settings::Settings;
use crate::verdict::{ScenarioResult, Verdict};
use crate::vm::{vsock_support, Device, Vm, VmOptions, RPC_TIMEOUT};

const TAG: &str = "pod";
const DEVICES: [Device; 3] = [Device::Rng, Device::Vsock, Device::Fs { tag: TAG }];
const TEMPLATE_CONTENT: &str = "the template's share\n";
const CLONE_CONTENT: &str = "the clone's own share\n";

pub async fn run(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (the agent answers over vsock)"
        )));
    }
    let fsd_dir = s.work.join("snapshot-fs-virtiofsd");
    let template_socket = fsd_dir.join("template.sock");
    let _template_fsd = Virtiofsd::serving(
        s,
        &fsd_dir.join("template"),
        &template_socket,
        TEMPLATE_CONTENT,
    )?;
    let (template, cold) = Template::take(
        s,
        "snapshot-fs",
        &DEVICES,
        &VmOptions {
            fs_socket: Some(template_socket),
            ..VmOptions::default()
        },
    )
    .await?;

    let clone_socket = fsd_dir.join("clone.sock");
    let _clone_fsd = Virtiofsd::serving(s, &fsd_dir.join("clone"), &clone_socket, CLONE_CONTENT)?;
    let opts = template.restore_options(
        MemoryMode::Auto,
        &VmOptions {
            fs_socket: Some(clone_socket),
            ..VmOptions::default()
        },
    );
    let mut vm = Vm::start_with(s, "snapshot-fs-clone", 1, &DEVICES, &opts)?;
    let t = Instant::now();
    let info = restore(&mut vm, &template.saved).await?;
    if info.memory_mode != "copy" {
        return Err(vm.fail(format!(
            "memory_mode {} for a VM with virtio-fs, want copy",
            info.memory_mode
        )));
    }
    let conn = vm.connect(s.timeout).await?;
    let answering = t.elapsed();
    let mounted = conn
        .agent()
        .mount_share(
            ttrpc::context::with_duration(RPC_TIMEOUT),
            &MountShareRequest {
                tag: TAG.into(),
                read_only: true,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| vm.fail(format!("MountShare {TAG:?} on the clone failed: {e}")))?;
    let path = format!("{}/{FS_FILE}", mounted.mount_point);
    let read = vm.read_guest_file(&conn, &path).await?;
    if read != CLONE_CONTENT {
        return Err(vm.fail(format!(
            "the clone read {read:?} from {path}, want its own share's {CLONE_CONTENT:?}"
        )));
    }
    vm.kill();
    Ok(Verdict::Pass(format!(
        "cold boot to agent ready {:.2}s; clone built in {} ms (memory copied: {} MiB of {} \
         MiB), restore op {} us, agent answering {:.2}s after restore; share {TAG:?} mounted on \
         the clone's virtiofsd and its own {FS_FILE} read back",
        cold.announced.as_secs_f64(),
        info.setup_us / 1000,
        template.saved.memory_data_bytes >> 20,
        template.saved.memory_bytes >> 20,
        info.took_us,
        answering.as_secs_f64()
    )))
}
