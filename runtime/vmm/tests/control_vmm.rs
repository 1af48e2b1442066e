//! The control socket on the jailed `boxlite-vmm` binary (root + /dev/kvm):
//! status, pause/resume through the vCPU state machine, metrics, bad
//! requests, and shutdown ending the process with exit code 0.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Real-mode guest: `out 0x80, al` in a loop — every iteration is a PIO
/// exit, so a paused VM shows a frozen exit count.
const PIO_LOOP: [u8; 4] = [0xe6, 0x80, 0xeb, 0xfc];

fn start(dir: &Path) -> (Child, std::path::PathBuf) {
    let img = dir.join("guest.bin");
    std::fs::write(&img, PIO_LOOP).expect("write guest");
    let ctl = dir.join("control.sock");
    let cfg = serde_json::json!({
        "memory_mib": 16,
        "irqchip": false,
        "raw_image": {"path": img, "load_addr": 0x1000, "mode": "real"},
        "console_log": dir.join("console.log"),
        "control_socket": ctl,
        "sandbox_dir": dir,
        "devices": [
            {"kind": "vsock", "guest_cid": 3, "uds_path": dir.join("vsock.sock")},
            {"kind": "rng"}
        ]
    });
    let cfg_path = dir.join("vm.json");
    std::fs::write(&cfg_path, cfg.to_string()).expect("write cfg");
    let child = Command::new(env!("CARGO_BIN_EXE_boxlite-vmm"))
        .arg("--config")
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("vmm.log")).expect("log"))
        .spawn()
        .expect("spawn boxlite-vmm");
    let end = Instant::now() + Duration::from_secs(10);
    while !ctl.exists() {
        assert!(Instant::now() < end, "control socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
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

    fn ask(&mut self, req: &str) -> Value {
        self.w.write_all(req.as_bytes()).expect("write");
        self.w.write_all(b"\n").expect("write");
        let mut line = String::new();
        self.r.read_line(&mut line).expect("reply");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

fn exits(c: &mut Client) -> u64 {
    let m = c.ask(r#"{"op":"metrics"}"#);
    assert_eq!(m["ok"], true, "{m}");
    m["metrics"]["vcpus"][0]["pio_exits"]
        .as_u64()
        .expect("pio_exits")
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn control_socket_drives_the_jailed_vmm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut child, ctl) = start(dir.path());
    let mut c = Client::connect(&ctl);

    let s = c.ask(r#"{"op":"status"}"#);
    assert_eq!(s["ok"], true, "{s}");
    assert_eq!(s["state"], "running");
    assert_eq!(s["vcpus"], 1);
    assert!(s["uptime_ms"].is_u64());

    // Metrics: the guest's PIO loop counts up; the devices are listed.
    let a = exits(&mut c);
    std::thread::sleep(Duration::from_millis(100));
    let b = exits(&mut c);
    assert!(b > a, "exits grow while running: {a} -> {b}");
    let m = c.ask(r#"{"op":"metrics"}"#);
    assert_eq!(m["metrics"]["devices"]["vsock0"]["kind"], "vsock", "{m}");
    assert_eq!(m["metrics"]["devices"]["vsock0"]["rx_bytes"], 0);
    assert_eq!(m["metrics"]["devices"]["rng1"]["kind"], "rng");

    // Pause: the exit count freezes; resume: it moves again.
    assert_eq!(c.ask(r#"{"op":"pause"}"#)["state"], "paused");
    assert_eq!(c.ask(r#"{"op":"status"}"#)["state"], "paused");
    let a = exits(&mut c);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(exits(&mut c), a, "no exits while paused");
    assert_eq!(c.ask(r#"{"op":"resume"}"#)["state"], "running");
    std::thread::sleep(Duration::from_millis(100));
    assert!(exits(&mut c) > a, "exits resume");

    // Bad requests get an error naming the problem; the connection stays.
    let e = c.ask(r#"{"op":"reboot"}"#);
    assert_eq!(e["ok"], false);
    assert!(
        e["error"]
            .as_str()
            .expect("error")
            .contains("unknown op \"reboot\""),
        "{e}"
    );
    let e = c.ask("not json");
    assert!(
        e["error"]
            .as_str()
            .expect("error")
            .contains("not valid JSON"),
        "{e}"
    );

    // A second client at the same time.
    let mut c2 = Client::connect(&ctl);
    assert_eq!(c2.ask(r#"{"op":"status"}"#)["state"], "running");

    let r = c.ask(r#"{"op":"shutdown"}"#);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["exit_code"], 0);
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
    assert!(!ctl.exists(), "control socket removed at exit");
    assert!(
        !dir.path().join("vsock.sock").exists(),
        "vsock socket removed at exit"
    );
}
