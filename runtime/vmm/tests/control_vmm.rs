//! The control socket on the jailed `boxlite-vmm` binary (root + /dev/kvm):
//! status, pause/resume through the vCPU state machine, metrics, bad
//! requests, and shutdown ending the process with exit code 0.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use boxlite_vmm::config::{
    CpuMode, DeviceConfig, RawImageConfig, RngConfig, VmConfig, VsockConfig,
};
use boxlite_vmm_api::control::{DeviceCounters, Reply, Request, VmState};

/// Real-mode guest: `out 0x80, al` in a loop — every iteration is a PIO
/// exit, so a paused VM shows a frozen exit count.
const PIO_LOOP: [u8; 4] = [0xe6, 0x80, 0xeb, 0xfc];

fn start(dir: &Path) -> (Child, std::path::PathBuf) {
    let img = dir.join("guest.bin");
    std::fs::write(&img, PIO_LOOP).expect("write guest");
    let ctl = dir.join("control.sock");
    let cfg = VmConfig {
        memory_mib: 16,
        irqchip: false,
        raw_image: Some(RawImageConfig {
            path: img,
            load_addr: 0x1000,
            mode: CpuMode::Real,
        }),
        console_log: Some(dir.join("console.log")),
        control_socket: Some(ctl.clone()),
        sandbox_dir: Some(dir.to_path_buf()),
        devices: vec![
            DeviceConfig::Vsock(VsockConfig {
                guest_cid: 3,
                uds_path: dir.join("vsock.sock"),
                host_ports: Vec::new(),
            }),
            DeviceConfig::Rng(RngConfig::default()),
        ],
        ..VmConfig::default()
    };
    let child = common::spawn_with_control(dir, &cfg);
    (child, ctl)
}

struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    fn connect(path: &Path) -> Self {
        let w = UnixStream::connect(path).expect("connect");
        w.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let r = BufReader::new(w.try_clone().expect("clone"));
        Client { w, r }
    }

    /// Sends raw bytes (plus a newline) and reads the reply.
    fn send(&mut self, line: &str) -> Reply {
        self.w.write_all(line.as_bytes()).expect("write");
        self.w.write_all(b"\n").expect("write");
        let mut line = String::new();
        self.r.read_line(&mut line).expect("reply");
        Reply::from_line(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }

    fn ask(&mut self, r: Request) -> Reply {
        self.send(r.to_line().trim_end())
    }

    fn state(&mut self, r: Request) -> VmState {
        match self.ask(r.clone()) {
            Reply::State { state } | Reply::Status { state, .. } => state,
            other => panic!("{r}: {other:?}"),
        }
    }

    fn error(&mut self, line: &str) -> String {
        match self.send(line) {
            Reply::Error { error } => error,
            other => panic!("{line}: {other:?}"),
        }
    }
}

fn metrics(c: &mut Client) -> boxlite_vmm_api::control::Metrics {
    match c.ask(Request::Metrics) {
        Reply::Metrics { metrics } => metrics,
        other => panic!("metrics: {other:?}"),
    }
}

fn exits(c: &mut Client) -> u64 {
    metrics(c).vcpus[0].pio_exits
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn control_socket_drives_the_jailed_vmm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, ctl) = start(dir.path());
    let mut c = Client::connect(&ctl);

    let s = c.ask(Request::Status);
    assert!(
        matches!(
            s,
            Reply::Status {
                state: VmState::Running,
                vcpus: 1,
                ..
            }
        ),
        "{s:?}"
    );

    // Metrics: the guest's PIO loop counts up; the devices are listed.
    let a = exits(&mut c);
    std::thread::sleep(Duration::from_millis(100));
    let b = exits(&mut c);
    assert!(b > a, "exits grow while running: {a} -> {b}");
    let m = metrics(&mut c);
    let Some(DeviceCounters::Vsock(v)) = m.devices.get("vsock0") else {
        panic!("vsock0: {m:?}");
    };
    assert_eq!(v.rx_bytes, 0);
    assert!(matches!(
        m.devices.get("rng1"),
        Some(DeviceCounters::Rng(_))
    ));

    // Pause: the exit count freezes; resume: it moves again.
    assert_eq!(c.state(Request::Pause), VmState::Paused);
    assert_eq!(c.state(Request::Status), VmState::Paused);
    let a = exits(&mut c);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(exits(&mut c), a, "no exits while paused");
    assert_eq!(c.state(Request::Resume), VmState::Running);
    std::thread::sleep(Duration::from_millis(100));
    assert!(exits(&mut c) > a, "exits resume");

    // Bad requests get an error naming the problem; the connection stays.
    // (Malformed on purpose: no typed Request can say this.)
    let e = c.error(r#"{"op":"reboot"}"#);
    assert!(e.contains("unknown op \"reboot\""), "{e}");
    let e = c.error("not json");
    assert!(e.contains("not valid JSON"), "{e}");

    // A second client at the same time.
    let mut c2 = Client::connect(&ctl);
    assert_eq!(c2.state(Request::Status), VmState::Running);

    assert_eq!(
        c.ask(Request::Shutdown),
        Reply::Shutdown {
            state: VmState::Stopping,
            exit_code: 0
        }
    );
    let end = Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < end, "VMM did not exit after shutdown");
        std::thread::sleep(Duration::from_millis(10));
    };
    let log = std::fs::read_to_string(dir.path().join("vmm.log")).expect("log");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(
        log.contains("seccomp filters loaded on every thread"),
        "{log}"
    );
    // The jailed VMM sees its directory read-only: whoever started it
    // removes the sockets (the runtime does, in its teardown).
    assert!(
        ctl.exists(),
        "the jailed VMM cannot remove its control socket"
    );
    assert!(dir.path().join("vsock.sock").exists());
}
