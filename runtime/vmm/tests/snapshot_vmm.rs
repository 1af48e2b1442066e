//! The `snapshot` control op on the jailed `boxlite-vmm` binary (root +
//! /dev/kvm): a paused real-mode guest with an irqchip and an rng is saved
//! into two new files in `snapshot_dir`, created under the jail's landlock
//! rule and its event loop's snapshot seccomp profile, owned by the jail's
//! user; the state file reads back; and each refusal (running VM, no
//! snapshot_dir, an existing file, a path for a name, a VM whose RAM is a
//! copy-on-write mapping of the snapshot it was restored from) is a clear
//! error that leaves nothing behind.
//!
//! Restore: a guest counting on COM1 (its counter in RAM) is saved, then
//! two VMMs restored from the files at once, copy-on-write, and a third
//! into copied memory, each jailed: they come up `restored`, run only on
//! the `restore` op, and every console continues from the byte after the
//! last one the saved VM printed; the memory file stays as it was. A
//! corrupt file, or a config describing another VM, is refused with exit
//! code 1 and a message naming the file or the difference.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::MetadataExt as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::Duration;

use boxlite_vmm::config::{DeviceConfig, JailUser, MemoryMode, RestoreConfig, RngConfig, VmConfig};
use boxlite_vmm::snapshot::{body, state_file};
use boxlite_vmm_api::control::{Reply, Request, RestoreInfo, SnapshotInfo, VmState};

/// Real-mode guest: `out 0x80, al` in a loop.
const PIO_LOOP: [u8; 4] = [0xe6, 0x80, 0xeb, 0xfc];

struct Vmm {
    child: Child,
    w: UnixStream,
    r: BufReader<UnixStream>,
    dir: PathBuf,
}

/// Real-mode guest: forever load the word at 0x500, add one, store it,
/// print its low byte on COM1, wait a little. The console shows
/// consecutive bytes, and a restored VM continues them only if both its
/// registers and its RAM came back.
const COM1_COUNTER: [u8; 18] = [
    0xba, 0xf8, 0x03, // mov dx, 0x3f8
    0xa1, 0x00, 0x05, // loop: mov ax, [0x500]
    0x40, // inc ax
    0xa3, 0x00, 0x05, // mov [0x500], ax
    0xee, // out dx, al
    0xb9, 0xff, 0xff, // mov cx, 0xffff
    0xe2, 0xfe, // loop $
    0xeb, 0xf1, // jmp loop
];

/// The config of a jailed VMM running `code` with an irqchip, `devices`,
/// a control socket and a console log in `dir`.
fn config(dir: &Path, code: &[u8], devices: Vec<DeviceConfig>) -> VmConfig {
    VmConfig {
        irqchip: true,
        control_socket: Some(dir.join("control.sock")),
        console_log: Some(dir.join("console.log")),
        ..common::raw_config(dir, code, devices)
    }
}

/// `config` for a VM restored from `snaps`' vm.state and vm.mem.
fn restore_config(dir: &Path, snaps: &Path, mode: MemoryMode) -> VmConfig {
    VmConfig {
        raw_image: None,
        restore: Some(RestoreConfig {
            state: snaps.join("vm.state"),
            memory: snaps.join("vm.mem"),
            memory_mode: mode,
        }),
        ..config(dir, &[], vec![DeviceConfig::Rng(RngConfig::default())])
    }
}

impl Vmm {
    /// Starts the jailed VMM on the PIO loop with an irqchip, `devices`
    /// and, if given, `snapshot_dir`.
    fn start(dir: &Path, devices: Vec<DeviceConfig>, snapshot_dir: Option<&Path>) -> Self {
        let cfg = VmConfig {
            snapshot_dir: snapshot_dir.map(Path::to_path_buf),
            ..config(dir, &PIO_LOOP, devices)
        };
        Self::start_with(dir, &cfg)
    }

    /// Starts the jailed VMM on `cfg` (whose files are in `dir`).
    fn start_with(dir: &Path, cfg: &VmConfig) -> Self {
        let ctl = cfg.control_socket.clone().expect("control socket");
        let child = common::spawn_with_control(dir, cfg);
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

    fn restore(&mut self, snapshot_id: Option<&str>) -> Result<RestoreInfo, String> {
        match self.ask(&Request::Restore {
            snapshot_id: snapshot_id.map(str::to_owned),
        }) {
            Reply::Restored {
                state: VmState::Running,
                restore,
            } => Ok(restore),
            Reply::Error { error } => Err(error),
            other => panic!("restore: {other:?}"),
        }
    }

    fn status(&mut self) -> VmState {
        match self.ask(&Request::Status) {
            Reply::Status { state, .. } => state,
            other => panic!("status: {other:?}"),
        }
    }

    /// The console so far, once it holds at least `n` bytes (10 s at most).
    fn console(&self, n: usize) -> Vec<u8> {
        let end = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let bytes = std::fs::read(self.dir.join("console.log")).unwrap_or_default();
            if bytes.len() >= n {
                return bytes;
            }
            assert!(
                std::time::Instant::now() < end,
                "the console has {} bytes, waited for {n}; {}",
                bytes.len(),
                log(&self.dir)
            );
            std::thread::sleep(Duration::from_millis(5));
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
fn snapshots_are_refused_without_a_snapshot_dir_or_of_copy_on_write_ram() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut vmm = Vmm::start(dir.path(), Vec::new(), None);
    vmm.set(Request::Pause, VmState::Paused);
    assert_eq!(
        vmm.snapshot("vm.state", "vm.mem").expect_err("no dir"),
        "this VM takes no snapshots (no \"snapshot_dir\" in its config)"
    );
    vmm.stop();

    // A first snapshot, of a counting guest.
    let dir_a = tempfile::tempdir().expect("tempdir");
    let snaps = snapshot_dir();
    let mut a = counting_vm(dir_a.path(), snaps.path());
    a.console(100);
    a.set(Request::Pause, VmState::Paused);
    a.snapshot("vm.state", "vm.mem").expect("snapshot");
    a.stop();

    // Restored copy-on-write, its RAM is the memory file's pages: it
    // cannot be saved again, and the refusal leaves nothing behind.
    let dir_b = tempfile::tempdir().expect("tempdir");
    let snaps_b = snapshot_dir();
    let mut b = restored_saving_into(
        dir_b.path(),
        snaps.path(),
        MemoryMode::Private,
        snaps_b.path(),
    );
    b.set(Request::Pause, VmState::Paused);
    let err = b.snapshot("vm.state", "vm.mem").expect_err("private RAM");
    assert!(
        err.contains("copy-on-write mapping of the snapshot it was restored from")
            && err.contains("memory_mode \"copy\""),
        "{err}"
    );
    assert!(
        files(snaps_b.path()).is_empty(),
        "nothing left behind: {:?}",
        files(snaps_b.path())
    );
    b.stop();

    // Restored into copied RAM, it can: and a VM restored from that second
    // snapshot goes on from where the restored one was saved.
    let dir_c = tempfile::tempdir().expect("tempdir");
    let snaps_c = snapshot_dir();
    let mut c = restored_saving_into(dir_c.path(), snaps.path(), MemoryMode::Copy, snaps_c.path());
    c.console(100);
    c.set(Request::Pause, VmState::Paused);
    let last = *c.console(1).last().expect("a byte");
    c.snapshot("vm.state", "vm.mem")
        .expect("a restored VM's snapshot");
    c.stop();
    let dir_d = tempfile::tempdir().expect("tempdir");
    let mut d = Vmm::start_with(
        dir_d.path(),
        &restore_config(dir_d.path(), snaps_c.path(), MemoryMode::Private),
    );
    d.restore(None).expect("restore");
    let out = d.console(100);
    assert_eq!(out[0], last.wrapping_add(1));
    assert!(consecutive(&out));
    d.stop();
}

/// A jailed VMM in `dir` running [`COM1_COUNTER`] with an rng, saving its
/// snapshots in `snaps`.
fn counting_vm(dir: &Path, snaps: &Path) -> Vmm {
    let cfg = VmConfig {
        snapshot_dir: Some(snaps.to_path_buf()),
        ..config(
            dir,
            &COM1_COUNTER,
            vec![DeviceConfig::Rng(RngConfig::default())],
        )
    };
    Vmm::start_with(dir, &cfg)
}

/// A jailed VMM in `dir` restored (`mode` memory) from the snapshot in
/// `from`, running, with `into` as its own `snapshot_dir`.
fn restored_saving_into(dir: &Path, from: &Path, mode: MemoryMode, into: &Path) -> Vmm {
    let cfg = VmConfig {
        snapshot_dir: Some(into.to_path_buf()),
        ..restore_config(dir, from, mode)
    };
    let mut vmm = Vmm::start_with(dir, &cfg);
    vmm.restore(None).expect("restore");
    vmm
}

/// Whether each byte is the one before it plus one (mod 256).
fn consecutive(bytes: &[u8]) -> bool {
    bytes.windows(2).all(|w| w[1] == w[0].wrapping_add(1))
}

/// Runs the jailed VMM on `cfg`, which it must refuse; returns its exit
/// code and log.
fn refused(dir: &Path, cfg: &VmConfig) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_boxlite-vmm"))
        .arg("--config")
        .arg(common::write_config(dir, cfg))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("vmm.log")).expect("log"))
        .spawn()
        .expect("spawn boxlite-vmm");
    let end = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if std::time::Instant::now() > end {
            let _ = child.kill();
            panic!("the VMM did not refuse the config; {}", log(dir));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    (status.code(), log(dir))
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn two_vms_restored_from_one_snapshot_continue_the_saved_one() {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let snaps = snapshot_dir();
    let mut a = counting_vm(dir_a.path(), snaps.path());
    a.console(300);
    a.set(Request::Pause, VmState::Paused);
    let printed = a.console(1);
    let last = *printed.last().expect("a byte");
    assert!(consecutive(&printed), "A counts on COM1");
    let info = a.snapshot("vm.state", "vm.mem").expect("snapshot");
    let memory_file = snaps.path().join("vm.mem");
    let memory_before = std::fs::read(&memory_file).expect("memory file");
    // The counter in the saved RAM is the last byte printed, or the next
    // one if the vCPU stopped between storing it and printing it.
    let counter = memory_before[4096 + 0x500];
    assert!(
        counter == last || counter == last.wrapping_add(1),
        "saved counter {counter}, last printed {last}"
    );

    // Two VMMs restored from the same files at once, copy-on-write.
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let mut clones: Vec<Vmm> = dirs
        .iter()
        .map(|d| {
            Vmm::start_with(
                d.path(),
                &restore_config(d.path(), snaps.path(), MemoryMode::Auto),
            )
        })
        .collect();
    for c in &mut clones {
        assert_eq!(c.status(), VmState::Restored);
        let err = match c.ask(&Request::Resume) {
            Reply::Error { error } => error,
            other => panic!("resume before restore: {other:?}"),
        };
        assert_eq!(
            err,
            "cannot resume: the VM was restored from a snapshot and has not run yet; send \
             {\"op\":\"restore\"}"
        );
        let err = c.restore(Some("00")).expect_err("another snapshot");
        assert_eq!(
            err,
            format!(
                "restore: expected snapshot 00, this VM was restored from {}",
                info.id
            )
        );
        // Nothing ran while it waited.
        assert!(c.console(0).is_empty(), "output before restore");
    }
    for c in &mut clones {
        let restored = c.restore(Some(&info.id)).expect("restore");
        assert_eq!(restored.id, info.id);
        assert_eq!(restored.memory_mode, "private");
        assert!(restored.setup_us > 0, "{restored:?}");
    }
    for c in &mut clones {
        let out = c.console(200);
        assert_eq!(
            out[0],
            last.wrapping_add(1),
            "a restored VM prints the byte after the saved one's last"
        );
        assert!(consecutive(&out), "and counts on from there");
        assert_eq!(c.status(), VmState::Running);
        let err = c.restore(None).expect_err("twice");
        assert_eq!(err, "restore: already done; the VM has run since");
    }
    // The saved VM goes on too, from the same place.
    a.set(Request::Resume, VmState::Running);
    let after = a.console(printed.len() + 100);
    assert_eq!(after[printed.len()], last.wrapping_add(1));
    assert!(consecutive(&after));

    // The clones' writes stayed in their own copies of the pages.
    for c in clones {
        c.stop();
    }
    assert!(
        std::fs::read(&memory_file).expect("memory file") == memory_before,
        "the memory file changed under the VMs mapping it"
    );

    // Restored into copied memory, as a VM with virtio-fs would be.
    let dir_copy = tempfile::tempdir().unwrap();
    let mut copy = Vmm::start_with(
        dir_copy.path(),
        &restore_config(dir_copy.path(), snaps.path(), MemoryMode::Copy),
    );
    assert_eq!(copy.restore(None).expect("restore").memory_mode, "copy");
    let out = copy.console(200);
    assert_eq!(out[0], last.wrapping_add(1));
    assert!(consecutive(&out));
    copy.stop();
    a.stop();
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn a_corrupt_snapshot_or_another_vms_config_is_refused_at_start() {
    let dir_a = tempfile::tempdir().expect("tempdir");
    let snaps = snapshot_dir();
    let mut a = counting_vm(dir_a.path(), snaps.path());
    a.set(Request::Pause, VmState::Paused);
    a.snapshot("vm.state", "vm.mem").expect("snapshot");
    a.stop();

    let dir = tempfile::tempdir().unwrap();
    let good = restore_config(dir.path(), snaps.path(), MemoryMode::Auto);
    let state = snaps.path().join("vm.state");
    let cases: Vec<(VmConfig, &str)> = vec![
        (
            VmConfig {
                vcpus: 2,
                ..good.clone()
            },
            "restore: the snapshot has 1 vCPUs, the config asks for 2",
        ),
        (
            VmConfig {
                memory_mib: 32,
                ..good.clone()
            },
            "restore: the snapshot has 16 MiB of memory",
        ),
        (
            VmConfig {
                devices: Vec::new(),
                ..good.clone()
            },
            "restore: the snapshot has 1 virtio devices (rng), the config 0 ()",
        ),
    ];
    for (cfg, want) in cases {
        let (code, log) = refused(dir.path(), &cfg);
        assert_eq!(code, Some(1), "{want}: {log}");
        assert!(log.contains(want), "{want}: {log}");
    }

    // A byte of the body flipped: the trailing checksum no longer holds.
    let mut bytes = std::fs::read(&state).unwrap();
    bytes[200] ^= 0x20;
    std::fs::write(&state, &bytes).unwrap();
    let (code, log) = refused(dir.path(), &good);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("checksum mismatch"), "{log}");
    // Another file altogether.
    std::fs::write(&state, b"#!/bin/sh\nexit 0\n").unwrap();
    let (code, log) = refused(dir.path(), &good);
    assert_eq!(code, Some(1), "{log}");
    assert!(log.contains("not a boxlite-vmm snapshot"), "{log}");
    assert!(
        !dir.path().join("control.sock").exists(),
        "a refused restore leaves no socket behind"
    );
}
