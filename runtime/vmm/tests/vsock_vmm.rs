//! vsock wired into the VMM: the config entry, and (root + /dev/kvm) the
//! `boxlite-vmm` binary serving the hybrid socket from its event loop.
//! Device behaviour itself is tested in `src/devices/virtio/vsock/tests.rs`.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use boxlite_vmm::config::{ConfigError, DeviceConfig, Validate, VsockConfig};
use common::raw_config;

fn vsock(guest_cid: u64, uds_path: &std::path::Path) -> DeviceConfig {
    DeviceConfig::Vsock(VsockConfig {
        guest_cid,
        uds_path: uds_path.to_path_buf(),
        host_ports: Vec::new(),
    })
}

#[test]
fn vsock_config_entry_validates() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vsock.sock");
    let cfg = raw_config(dir.path(), &[0xf4], vec![vsock(3, &uds)]);
    cfg.validate().expect("valid");
    assert!(matches!(cfg.devices[0], DeviceConfig::Vsock(ref v) if v.guest_cid == 3));

    let two = vec![vsock(3, &uds), vsock(4, &dir.path().join("vsock.sock2"))];
    let cfg = raw_config(dir.path(), &[0xf4], two);
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::VsockCount { got: 2 })
    ));

    let cfg = raw_config(dir.path(), &[0xf4], vec![vsock(2, &uds)]);
    assert_eq!(
        cfg.validate().expect_err("cid 2").to_string(),
        "vsock guest_cid = 2 is out of range 3..=4294967294"
    );
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn vmm_serves_the_hybrid_socket_from_its_event_loop() {
    let dir = tempfile::tempdir().expect("tempdir");
    let uds = dir.path().join("vsock.sock");
    // `jmp $`: the guest spins, the VMM's event loop serves the socket.
    let cfg = raw_config(dir.path(), &[0xeb, 0xfe], vec![vsock(3, &uds)]);
    let cfg_path = common::write_config(dir.path(), &cfg);
    let mut child = Command::new(env!("CARGO_BIN_EXE_boxlite-vmm"))
        .arg("--config")
        .arg(&cfg_path)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn boxlite-vmm");
    let end = Instant::now() + Duration::from_secs(10);
    while !uds.exists() {
        assert!(Instant::now() < end, "vsock socket never appeared");
        std::thread::sleep(Duration::from_millis(10));
    }
    // A malformed line is refused at once: the listener is polled.
    let mut s = UnixStream::connect(&uds).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    s.write_all(b"HELLO\n").expect("write");
    let mut b = [0u8; 8];
    assert_eq!(s.read(&mut b).expect("EOF"), 0);
    // A valid CONNECT waits for a guest driver that never comes; the VMM
    // gives up after the connect timeout and closes the stream.
    let mut s = UnixStream::connect(&uds).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    s.write_all(b"CONNECT 1024\n").expect("write");
    let t = Instant::now();
    assert_eq!(s.read(&mut b).expect("EOF"), 0);
    assert!(t.elapsed() >= Duration::from_secs(4), "{:?}", t.elapsed());
    let _ = child.kill();
    let _ = child.wait();
}
