//! The `snapshot` control op on the jailed `boxlite-vmm` binary (root +
//! /dev/kvm): a paused real-mode guest with an irqchip and an rng is saved
//! into two new files in `snapshot_dir`, created under the jail's landlock
//! rule and its event loop's snapshot seccomp profile, owned by the jail's
//! user; the state file reads back; and each refusal (running VM, no
//! snapshot_dir, an existing file, a path for a name, a device that cannot
//! be saved yet) is a clear error that leaves nothing behind.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use boxlite_vmm::config::{DeviceConfig, JailUser, RngConfig, VmConfig, VsockConfig};
use boxlite_vmm::snapshot::{body, state_file};
use boxlite_vmm_api::control::{Reply, Request, SnapshotInfo, VmState};

/// Real-mode guest: `out 0x80, al` in a loop.
const PIO_LOOP: [u8; 4] = [0xe6, 0x80, 0xeb, 0xfc];

struct Vmm {
    child: Child,
    w: UnixStream,
    r: BufReader<UnixStream>,
    dir: PathBuf,
}

impl Vmm {
    /// Starts the jailed VMM on the PIO loop with an irqchip, `devices`
    /// and, if given, `snapshot_dir`.
    fn start(dir: &Path, devices: Vec<DeviceConfig>, snapshot_dir: Option<&Path>) -> Self {
        let ctl = dir.join("control.sock");
        let cfg = VmConfig {
            irqchip: true,
            control_socket: Some(ctl.clone()),
            console_log: Some(dir.join("console.log")),
            snapshot_dir: snapshot_dir.map(Path::to_path_buf),
            ..common::raw_config(dir, &PIO_LOOP, devices)
        };
        let child = common::spawn_with_control(dir, &cfg);
        let w = UnixStream::connect(&ctl).expect("connect");
        w.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let r = BufReader::new(w.try_clone().expect("clone"));
        Vmm {
            child,
            w,
            r,
            dir: dir.to_path_buf(),
        }
    }

    fn ask(&mut self, r: &Request) -> Reply {
        self.w.write_all(r.to_line().as_bytes()).expect("write");
        let mut line = String::new();
        self.r.read_line(&mut line).expect("reply");
        Reply::from_line(&line).unwrap_or_else(|e| panic!("{line:?}: {e}; {}", log(&self.dir)))
    }

    fn snapshot(&mut self, state_file: &str, memory_file: &str) -> Result<SnapshotInfo, String> {
        match self.ask(&Request::Snapshot {
            state_file: state_file.into(),
            memory_file: memory_file.into(),
        }) {
            Reply::Snapshot {
                state: VmState::Paused,
                snapshot,
            } => Ok(snapshot),
            Reply::Error { error } => Err(error),
            other => panic!("snapshot: {other:?}"),
        }
    }

    fn set(&mut self, r: Request, want: VmState) {
        match self.ask(&r) {
            Reply::State { state } if state == want => {}
            other => panic!("{r}: {other:?}"),
        }
    }

    /// Shuts the VMM down; it must exit 0.
    fn stop(mut self) {
        assert!(matches!(
            self.ask(&Request::Shutdown),
            Reply::Shutdown { .. }
        ));
        let status = self.child.wait().expect("wait");
        assert_eq!(status.code(), Some(0), "{}", log(&self.dir));
    }
}

fn log(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
    format!("VMM log:\n{text}")
}

/// A directory the jailed VMM (running as nobody) may write in.
fn snapshot_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    let JailUser { uid, gid } = JailUser::NOBODY;
    std::os::unix::fs::chown(d.path(), Some(uid), Some(gid)).expect("chown");
    d
}

fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read_dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn a_paused_vm_is_saved_into_two_files_from_inside_the_jail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let snaps = snapshot_dir();
    let mut vmm = Vmm::start(
        dir.path(),
        vec![DeviceConfig::Rng(RngConfig::default())],
        Some(snaps.path()),
    );

    let err = vmm.snapshot("vm.state", "vm.mem").expect_err("running");
    assert_eq!(
        err,
        "snapshot needs a paused VM (send {\"op\":\"pause\"} first); it is running"
    );
    vmm.set(Request::Pause, VmState::Paused);
    for (state, memory, want) in [
        (
            "../x",
            "vm.mem",
            "snapshot file name \"../x\": must be a plain file name",
        ),
        (
            "vm.state",
            "vm.state",
            "must have different names (both \"vm.state\")",
        ),
        ("", "vm.mem", "snapshot file name \"\": empty"),
    ] {
        let err = vmm.snapshot(state, memory).expect_err(want);
        assert!(err.contains(want), "{err}");
    }
    assert!(files(snaps.path()).is_empty(), "{:?}", files(snaps.path()));

    let info = vmm.snapshot("vm.state", "vm.mem").expect("snapshot");
    assert_eq!(files(snaps.path()), ["vm.mem", "vm.state"]);
    assert_eq!(info.id.len(), 32, "{info:?}");
    assert_eq!(info.memory_bytes, 4096 + (16 << 20));
    assert!(
        info.memory_data_bytes > 0 && info.memory_data_bytes < 1 << 20,
        "{info:?}"
    );
    for name in ["vm.state", "vm.mem"] {
        let m = std::fs::metadata(snaps.path().join(name)).expect("metadata");
        assert_eq!(
            (m.uid(), m.gid()),
            (65534, 65534),
            "{name}: the jail's user"
        );
        assert_eq!(m.mode() & 0o777, 0o600, "{name}");
    }
    let state_path = snaps.path().join("vm.state");
    let bytes = std::fs::read(&state_path).expect("state file");
    assert_eq!(bytes.len() as u64, info.state_bytes);
    let (header, body_bytes) = state_file::decode(&state_path, &bytes).expect("header");
    assert_eq!(header.id.to_string(), info.id);
    let body = body::decode(&state_path, body_bytes).expect("body");
    assert_eq!(body.vcpus.len(), 1);
    assert!(body.vcpus[0].lapic.is_some(), "saved with the irqchip");
    assert_eq!(body.devices.len(), 1);
    assert_eq!(body.devices[0].kind, "rng");

    // The files are never replaced: a second snapshot under the same
    // names is refused and the first stays as it was.
    let err = vmm.snapshot("vm.state", "vm.mem").expect_err("exists");
    assert!(
        err.contains("cannot create") && err.contains("File exists"),
        "{err}"
    );
    assert_eq!(std::fs::read(&state_path).expect("state file"), bytes);

    // The VM goes on after a snapshot.
    vmm.set(Request::Resume, VmState::Running);
    vmm.stop();
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn snapshots_are_refused_without_a_snapshot_dir_or_for_a_device_not_yet_saved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vmm = Vmm::start(dir.path(), Vec::new(), None);
    vmm.set(Request::Pause, VmState::Paused);
    assert_eq!(
        vmm.snapshot("vm.state", "vm.mem").expect_err("no dir"),
        "this VM takes no snapshots (no \"snapshot_dir\" in its config)"
    );
    vmm.stop();

    let dir = tempfile::tempdir().expect("tempdir");
    let snaps = snapshot_dir();
    let vsock = DeviceConfig::Vsock(VsockConfig {
        guest_cid: 3,
        uds_path: dir.path().join("vsock.sock"),
        host_ports: Vec::new(),
    });
    let mut vmm = Vmm::start(dir.path(), vec![vsock], Some(snaps.path()));
    vmm.set(Request::Pause, VmState::Paused);
    let err = vmm.snapshot("vm.state", "vm.mem").expect_err("vsock");
    assert!(
        err.contains("virtio device slot 0 (vsock)")
            && err.contains("snapshots of this device are not supported yet"),
        "{err}"
    );
    assert!(
        files(snaps.path()).is_empty(),
        "nothing left behind: {:?}",
        files(snaps.path())
    );
    vmm.stop();
}
