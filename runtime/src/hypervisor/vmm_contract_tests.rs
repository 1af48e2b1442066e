//! The runtime <-> boxlite-vmm contract, checked from both ends.
//!
//! The builtin backend writes `vm.json` with `boxlite-vmm-api`'s types and
//! the VMM parses it with the same types, so field names cannot drift. What
//! can still drift is what the two sides *allow*: the runtime's limits
//! (guest size, cmdline, share tags, tap names, socket paths) against the
//! VMM's validation. Here every VM the runtime agrees to start (its
//! preflight passes) has its config written exactly as a start writes it,
//! then loaded by the VMM's own loader (`boxlite_vmm::config::load`:
//! unknown fields refused, then validated); it must be accepted and read
//! back equal to what was generated.

use std::fs::File;
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use boxlite_protocol::error_chain::chain;
use boxlite_vmm_api::config::{BalloonConfig, DeviceConfig, JailUser, MemoryMode, VmConfig};
use serde_json::Value;

use super::builtin::{vm_config, write_vm_config, BuiltinHypervisor, VmmStart};
use super::spec::GUEST_CONSOLE_LOGLEVEL;
use super::template::{
    FileId, Template, TemplateInputs, TemplateRecord, MEMORY_FILE, STATE_FILE, TEMPLATE_FORMAT,
};
use super::test_rig::{Bins, Rig};
use super::{Hypervisor, HypervisorError, NetDevice};
use crate::config::{
    Config, ResolvedAccel, ResolvedBackend, MAX_KERNEL_CMDLINE_EXTRA_LEN, MAX_MEMORY_MIB,
    MAX_VCPUS, MIN_MEMORY_MIB, MIN_VCPUS,
};
use crate::network::TapDevice;

/// The guest devices of one case, besides the rng and vsock every VM has.
#[derive(Clone, Copy, Debug)]
struct Mix {
    /// virtio-fs share tags.
    shares: &'static [&'static str],
    /// Taps inherited as fds.
    tap_fds: usize,
    /// Taps the VMM opens by name.
    tap_names: &'static [&'static str],
}

/// The longest share tag the runtime allows (36 bytes).
const LONG_TAG: &str = "abcdefghijklmnopqrstuvwxyz0123456789";

const MIXES: &[Mix] = &[
    Mix {
        shares: &[],
        tap_fds: 0,
        tap_names: &[],
    },
    Mix {
        shares: &["rootfs"],
        tap_fds: 0,
        tap_names: &[],
    },
    Mix {
        shares: &["rootfs", "vol-1.data", LONG_TAG],
        tap_fds: 0,
        tap_names: &[],
    },
    Mix {
        shares: &[],
        tap_fds: 1,
        tap_names: &[],
    },
    Mix {
        shares: &[],
        tap_fds: 0,
        tap_names: &["tap0_bx"],
    },
    Mix {
        shares: &["rootfs"],
        tap_fds: 1,
        tap_names: &["eth1-pod.0123"],
    },
    Mix {
        shares: &["rootfs", LONG_TAG],
        tap_fds: 2,
        tap_names: &["tap0_bx", "tap1_bx"],
    },
];

/// (vcpus, memory MiB): the runtime's bounds and sizes in between.
const SIZES: &[(u32, u32)] = &[
    (MIN_VCPUS, MIN_MEMORY_MIB),
    (2, 512),
    (4, 4096),
    (MAX_VCPUS, MAX_MEMORY_MIB),
];

/// How the VMM is to start the VM (see [`VmmStart`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Start {
    Boot,
    /// A template's VM, which may be saved.
    BootToSave,
    /// A sandbox VM restored from a template.
    Restore,
}

/// One VM the runtime is asked to start.
struct Case {
    state_dir: PathBuf,
    vcpus: u32,
    memory_mib: u32,
    cmdline: String,
    mix: Mix,
    start: Start,
}

impl Case {
    fn name(&self) -> String {
        format!(
            "{:?}: {} vcpus, {} MiB, {:?}, state_dir {} bytes",
            self.start,
            self.vcpus,
            self.memory_mib,
            self.mix,
            self.state_dir.as_os_str().len()
        )
    }
}

/// The runtime's side: the hypervisor for `case` with its shares and taps
/// added, the preflight a start runs, then the config written the way a
/// start writes it. `Ok(None)`: the runtime itself refuses the case (its
/// socket paths are too long), which the caller expects or not.
async fn runtime_writes(
    rig: &Rig,
    case: &Case,
) -> Result<Option<(VmConfig, PathBuf)>, HypervisorError> {
    let mut config = Config::default();
    config.runtime.state_dir = case.state_dir.clone();
    config.guest.kernel = rig.file("vmlinux");
    config.guest.initramfs = rig.file("initramfs");
    config.guest.vcpus = case.vcpus;
    config.guest.memory_mib = case.memory_mib;
    config.guest.kernel_cmdline_extra = case.cmdline.clone();
    config
        .validate()
        .unwrap_or_else(|e| panic!("{}: not a runtime config: {}", case.name(), chain(&e)));
    let spec = super::VmSpec::from_config(&config, "sb1")?;
    let sandbox = spec.dir.clone();
    let bins = Bins {
        qemu: "qemu-system-x86_64".into(),
        virtiofsd: rig.script("virtiofsd", "exit 0"),
        vhost_vsock: "boxlite-vsock".into(),
        vmm: rig.script("boxlite-vmm", "exit 0"),
    }
    .resolve(ResolvedBackend::Builtin, ResolvedAccel::Kvm);
    let hv = BuiltinHypervisor::new(spec, bins)?;
    let share_dir = rig.path("share");
    std::fs::create_dir_all(&share_dir).expect("share dir");
    for tag in case.mix.shares {
        hv.add_share(tag, &share_dir, true).await?;
    }
    for i in 0..case.mix.tap_fds {
        // Any fd stands in for a tap: the backend only passes it on.
        let fd: OwnedFd = File::open("/dev/null").expect("/dev/null").into();
        let mac = format!("02:00:00:00:01:{i:02x}").parse().expect("mac");
        hv.add_net(TapDevice::Fd(fd), mac).await?;
    }
    for (i, name) in case.mix.tap_names.iter().enumerate() {
        let mac = format!("02:00:00:00:02:{i:02x}").parse().expect("mac");
        hv.add_net(TapDevice::Name((*name).to_owned()), mac).await?;
    }
    let (snapshot_dir, template) = template_files(rig);
    // A start creates the sandbox directory after the preflight; the VMM
    // finds it there.
    let written = hv
        .with_preflighted(|vm, launch| {
            std::fs::create_dir_all(&sandbox).expect("sandbox dir");
            let nets: Vec<(Option<RawFd>, &NetDevice)> = launch
                .tap_fds()
                .into_iter()
                .zip(launch.nets.iter())
                .collect();
            // A start leases one; the first of the range stands in.
            let base = vm.spec.jail_ids.range.base;
            let user = JailUser {
                uid: base,
                gid: base,
            };
            let start = match case.start {
                Start::Boot => VmmStart::Boot,
                Start::BootToSave => VmmStart::BootToSave {
                    snapshot_dir: &snapshot_dir,
                },
                Start::Restore => VmmStart::Restore(&template),
            };
            let (shares, console) = (launch.shares, launch.console);
            let generated = vm_config(vm, start, user, shares, &nets, console)?;
            let path = write_vm_config(vm, start, user, shares, &nets, console)?;
            Ok::<_, HypervisorError>((generated, path))
        })
        .await;
    match written {
        Ok(r) => r.map(Some),
        Err(HypervisorError::SocketPathTooLong { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}

/// A template's directory with its two (dummy) snapshot files, and an
/// empty directory to save one into: the VMM's loader checks that they
/// exist.
fn template_files(rig: &Rig) -> (PathBuf, Template) {
    let snapshot_dir = rig.path("template.partial");
    std::fs::create_dir_all(&snapshot_dir).expect("snapshot dir");
    let dir = rig.path("template");
    std::fs::create_dir_all(&dir).expect("template dir");
    for f in [STATE_FILE, MEMORY_FILE] {
        std::fs::write(dir.join(f), "x").expect("snapshot file");
    }
    let file = FileId::of(&dir.join(STATE_FILE)).expect("file id");
    let inputs = TemplateInputs {
        format: TEMPLATE_FORMAT,
        vmm: file.clone(),
        kernel: file.clone(),
        initramfs: file,
        cmdline: String::new(),
        vcpus: 1,
        memory_mib: MIN_MEMORY_MIB,
        balloon: BalloonConfig::default(),
        share_tags: Vec::new(),
        nics: 0,
    };
    let template = Template {
        key: inputs.key(),
        dir,
        record: TemplateRecord {
            inputs,
            snapshot_id: "0123".into(),
            // One per NIC of the largest mix.
            nic_macs: (0..8).map(|i| format!("02:00:00:00:0e:{i:02x}")).collect(),
            snapshot_ms: 0,
        },
    };
    (snapshot_dir, template)
}

/// The VMM's side: its loader accepts the file and reads back what the
/// runtime generated; and it is strict (an unknown field anywhere in this
/// very file is refused), so a field the runtime wrote and the VMM did not
/// know would have failed the first step.
fn vmm_accepts(case: &Case, generated: &VmConfig, path: &Path) {
    let name = case.name();
    let loaded = boxlite_vmm::config::load(path).unwrap_or_else(|e| {
        panic!(
            "{name}: boxlite-vmm refuses the runtime's config: {}\n{}",
            chain(&e),
            std::fs::read_to_string(path).unwrap_or_default()
        )
    });
    assert_eq!(&loaded, generated, "{name}: read back differently");

    let text = std::fs::read_to_string(path).expect("vm.json");
    let file: Value = serde_json::from_str(&text).expect("vm.json is JSON");
    let ndevices = file["devices"].as_array().expect("devices").len();
    assert_eq!(ndevices, generated.devices.len(), "{name}");
    // Every sandbox has the balloon section; it is probed like a device.
    assert!(file["balloon"].is_object(), "{name}: no balloon section");
    let mut targets = vec![String::new(), "/balloon".to_string()];
    targets.extend((0..ndevices).map(|i| format!("/devices/{i}")));
    for target in targets {
        let mut bad = file.clone();
        let obj = bad.pointer_mut(&target).expect("probed object");
        obj.as_object_mut()
            .expect("object")
            .insert("not_in_the_contract".into(), Value::from(1));
        let bad_path = path.with_file_name("vm-bad.json");
        std::fs::write(&bad_path, bad.to_string()).expect("write");
        let err = boxlite_vmm::config::load(&bad_path)
            .map(|_| ())
            .expect_err("an unknown field is refused");
        assert!(
            chain(&err).contains("unknown field `not_in_the_contract`"),
            "{name}, {target:?}: {}",
            chain(&err)
        );
    }
}

#[tokio::test]
async fn every_device_mix_and_size_the_runtime_starts_is_accepted_by_the_vmm() {
    let rig = Rig::new();
    let mut checked = 0;
    for &(vcpus, memory_mib) in SIZES {
        for &mix in MIXES {
            let case = Case {
                state_dir: rig.path("state"),
                vcpus,
                memory_mib,
                cmdline: "quiet console=ttyS0".into(),
                mix,
                start: Start::Boot,
            };
            let (generated, path) = runtime_writes(&rig, &case)
                .await
                .unwrap_or_else(|e| panic!("{}: {}", case.name(), chain(&e)))
                .unwrap_or_else(|| panic!("{}: runtime refused a short path", case.name()));
            // What the devices are, in bus order: rng, vsock, fs…, net….
            let kinds: Vec<&str> = generated
                .devices
                .iter()
                .map(|d| match d {
                    DeviceConfig::Rng(_) => "rng",
                    DeviceConfig::Vsock(_) => "vsock",
                    DeviceConfig::Fs(_) => "fs",
                    DeviceConfig::Block(_) => "block",
                    DeviceConfig::Net(n) if n.tap_fd.is_some() => "net-fd",
                    DeviceConfig::Net(_) => "net-name",
                })
                .collect();
            let mut want = vec!["rng", "vsock"];
            want.extend(mix.shares.iter().map(|_| "fs"));
            want.extend((0..mix.tap_fds).map(|_| "net-fd"));
            want.extend(mix.tap_names.iter().map(|_| "net-name"));
            assert_eq!(kinds, want, "{}", case.name());
            assert_eq!(u32::from(generated.vcpus), vcpus);
            assert_eq!(generated.memory_mib, memory_mib);
            vmm_accepts(&case, &generated, &path);
            checked += 1;
        }
    }
    assert_eq!(checked, SIZES.len() * MIXES.len());
}

#[tokio::test]
async fn the_longest_cmdline_the_runtime_allows_is_accepted_by_the_vmm() {
    let rig = Rig::new();
    // Words of 9 bytes and a space: exactly the runtime's limit.
    let words = MAX_KERNEL_CMDLINE_EXTRA_LEN / 10;
    let mut cmdline = "opt=value ".repeat(words);
    cmdline.push_str(&"x".repeat(MAX_KERNEL_CMDLINE_EXTRA_LEN - cmdline.len()));
    assert_eq!(cmdline.len(), MAX_KERNEL_CMDLINE_EXTRA_LEN);
    let case = Case {
        state_dir: rig.path("state"),
        vcpus: 1,
        memory_mib: MIN_MEMORY_MIB,
        cmdline,
        mix: MIXES[1],
        start: Start::Boot,
    };
    let (generated, path) = runtime_writes(&rig, &case)
        .await
        .expect("runtime")
        .expect("short path");
    // The runtime puts its console log level first (spec::GUEST_CONSOLE_LOGLEVEL).
    let prefix = format!("{GUEST_CONSOLE_LOGLEVEL} ");
    assert_eq!(
        generated.cmdline.len(),
        prefix.len() + MAX_KERNEL_CMDLINE_EXTRA_LEN
    );
    vmm_accepts(&case, &generated, &path);
}

/// Socket paths: the runtime refuses a state directory whose sockets would
/// not fit `sun_path`; every longer-and-longer directory it still accepts
/// must fit the VMM's limits too (the vsock socket has the VMM append
/// `_<port>` to it, the fs sockets are used as they are).
#[tokio::test]
async fn every_state_dir_length_the_runtime_accepts_is_accepted_by_the_vmm() {
    let rig = Rig::new();
    let base = rig.path("");
    for mix in [MIXES[0], MIXES[2]] {
        let mut accepted = 0;
        let mut refused = false;
        for pad in 1..=110usize {
            let case = Case {
                state_dir: base.join("d".repeat(pad)),
                vcpus: 1,
                memory_mib: MIN_MEMORY_MIB,
                cmdline: String::new(),
                mix,
                start: Start::Boot,
            };
            match runtime_writes(&rig, &case)
                .await
                .unwrap_or_else(|e| panic!("{}: {}", case.name(), chain(&e)))
            {
                Some((generated, path)) => {
                    assert!(
                        !refused,
                        "{}: accepted after a shorter one was refused",
                        case.name()
                    );
                    vmm_accepts(&case, &generated, &path);
                    accepted += 1;
                }
                None => refused = true,
            }
        }
        assert!(accepted > 0, "{mix:?}: no length accepted");
        assert!(refused, "{mix:?}: the runtime never refused a long path");
    }
}

/// A template's VM (booted, with a `snapshot_dir`) and a sandbox VM
/// restored from a template (no kernel, initramfs or command line; the
/// template's NIC MACs; memory copied): every device mix, accepted.
#[tokio::test]
async fn template_and_restored_vm_configs_are_accepted_by_the_vmm() {
    let rig = Rig::new();
    for start in [Start::BootToSave, Start::Restore] {
        for &mix in MIXES {
            let case = Case {
                state_dir: rig.path("state"),
                vcpus: 2,
                memory_mib: 512,
                cmdline: "quiet".into(),
                mix,
                start,
            };
            let (generated, path) = runtime_writes(&rig, &case)
                .await
                .unwrap_or_else(|e| panic!("{}: {}", case.name(), chain(&e)))
                .unwrap_or_else(|| panic!("{}: runtime refused a short path", case.name()));
            match start {
                Start::BootToSave => {
                    assert_eq!(generated.snapshot_dir, Some(rig.path("template.partial")));
                    assert!(generated.restore.is_none() && generated.kernel.is_some());
                }
                _ => {
                    let restore = generated.restore.as_ref().expect("restore");
                    assert_eq!(restore.memory_mode, MemoryMode::Copy, "virtio-fs needs it");
                    assert_eq!(restore.state, rig.path("template").join(STATE_FILE));
                    assert_eq!(generated.kernel, None);
                    assert_eq!(generated.cmdline, "");
                    let macs: Vec<_> = generated
                        .devices
                        .iter()
                        .filter_map(|d| match d {
                            DeviceConfig::Net(n) => n.mac.clone(),
                            _ => None,
                        })
                        .collect();
                    let want: Vec<_> = (0..macs.len())
                        .map(|i| format!("02:00:00:00:0e:{i:02x}"))
                        .collect();
                    assert_eq!(macs, want, "the template's: {}", case.name());
                }
            }
            vmm_accepts(&case, &generated, &path);
        }
    }
}
