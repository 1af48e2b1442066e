//! virtio-balloon wired into the VMM: the config section, and (root +
//! /dev/kvm) the jailed `boxlite-vmm` binary serving a tiny guest that
//! plays the balloon driver, reads the target set from boot and reports one
//! page free, while the control socket's `balloon` op moves the target. Device behaviour is
//! tested in `src/devices/virtio/balloon/tests.rs`; Linux's balloon driver
//! needs the nested test host (docs/testing-nested.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

mod common;

use boxlite_vmm::config::{
    BalloonConfig, ConfigError, CpuMode, DeviceConfig, RawImageConfig, RngConfig, Validate,
    VmConfig,
};
use boxlite_vmm_api::control::{BalloonState, DeviceCounters, Reply, Request};

const BALLOON: BalloonConfig = BalloonConfig {
    deflate_on_oom: true,
    free_page_reporting: true,
    target_mib: 0,
};

#[test]
fn the_balloon_takes_a_virtio_slot() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = common::raw_config(
        dir.path(),
        &[0xf4],
        vec![DeviceConfig::Rng(RngConfig::default()); 15],
    );
    cfg.balloon = Some(BALLOON);
    cfg.validate().expect("15 devices and the balloon");
    cfg.devices.push(DeviceConfig::Rng(RngConfig::default()));
    assert!(matches!(
        cfg.validate(),
        Err(ConfigError::TooManyDevices { got: 17, max: 16 })
    ));
    // The binary refuses it as a configuration error.
    let path = common::write_config(dir.path(), &cfg);
    let out = Command::new(env!("CARGO_BIN_EXE_boxlite-vmm"))
        .arg("--config")
        .arg(&path)
        .output()
        .expect("run boxlite-vmm");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(boxlite_vmm::exit_code::CONFIG_ERROR),
        "{stderr}"
    );
    assert!(
        stderr.contains("17 virtio devices configured (devices and the balloon), the limit is 16"),
        "{stderr}"
    );
}

const SERIAL: u16 = 0x3f8;
const MMIO: u32 = 0xd000_0000;
const LOAD: u32 = 0x1_0000;
/// The page the guest reports free, and its neighbour.
const FREED: u32 = 0x4_0000;
const KEPT: u32 = 0x4_1000;
const FREED_PATTERN: u32 = 0x5a5a_5a5a;
const KEPT_PATTERN: u32 = 0x3c3c_3c3c;
/// Rings (desc, avail, used) of the inflate, deflate and reporting queues.
const QUEUES: [(u32, u32, u32); 3] = [
    (0x2_0000, 0x2_0100, 0x2_0200),
    (0x2_1000, 0x2_1100, 0x2_1200),
    (0x2_2000, 0x2_2100, 0x2_2200),
];

/// 64-bit code: `mov dword [rbx + off], imm` for each (off, imm), rbx =
/// the balloon's MMIO window.
fn mmio_writes(writes: &[(u32, u32)]) -> Vec<u8> {
    let mut c = vec![0xbb];
    c.extend_from_slice(&MMIO.to_le_bytes()); // mov ebx, base
    for (off, v) in writes {
        c.extend_from_slice(&[0xc7, 0x83]); // mov dword [rbx + disp32], imm32
        c.extend_from_slice(&off.to_le_bytes());
        c.extend_from_slice(&v.to_le_bytes());
    }
    c
}

/// 64-bit code: write the 4 bytes of the dword at `addr` to COM1.
fn print_dword(addr: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xba];
    c.extend_from_slice(&SERIAL.to_le_bytes()); // mov dx, SERIAL
    c.push(0xb9);
    c.extend_from_slice(&addr.to_le_bytes()); // mov ecx, addr
    c.extend_from_slice(&[0x8b, 0x01]); // mov eax, [rcx]
    for i in 0..4 {
        c.push(0xee); // out dx, al
        if i < 3 {
            c.extend_from_slice(&[0xc1, 0xe8, 0x08]); // shr eax, 8
        }
    }
    c
}

/// The guest: prints the balloon's `num_pages` (config space), then the
/// page it is about to report (so a zero read afterwards means something),
/// negotiates VERSION_1 + FREE_PAGE_REPORTING,
/// sets up the three queues (reporting is queue 2: no stats queue), hands
/// the page to the reporting queue (its descriptor and avail entry are in
/// the image), notifies, polls the used ring, then prints used.idx,
/// used[0].len, the reported page and its neighbour, and spins in a `pause`
/// loop so the test can read the VMM's metrics.
fn guest_image() -> Vec<u8> {
    let mut code = print_dword(MMIO + 0x100);
    code.extend(print_dword(FREED));
    let mut regs = vec![
        (0x70, 1),
        (0x70, 3),
        (0x24, 0),
        (0x20, 1 << 5), // FREE_PAGE_REPORTING
        (0x24, 1),
        (0x20, 1), // VERSION_1
        (0x70, 0xb),
    ];
    for (i, (desc, avail, used)) in QUEUES.iter().enumerate() {
        regs.extend_from_slice(&[
            (0x30, i as u32),
            (0x38, 16),
            (0x80, *desc),
            (0x90, *avail),
            (0xa0, *used),
            (0x44, 1),
        ]);
    }
    regs.extend_from_slice(&[(0x70, 0xf), (0x50, 2)]); // DRIVER_OK, notify queue 2
    code.extend(mmio_writes(&regs));
    let used = QUEUES[2].2;
    code.push(0xbe);
    code.extend_from_slice(&200_000_000u32.to_le_bytes()); // mov esi, spin limit
    code.push(0xb9);
    code.extend_from_slice(&(used + 2).to_le_bytes()); // loop: mov ecx, &used.idx
    code.extend_from_slice(&[0x0f, 0xb7, 0x01]); // movzx eax, word [rcx]
    code.extend_from_slice(&[0x83, 0xf8, 0x01]); // cmp eax, 1
    code.extend_from_slice(&[0x74, 0x04]); // je found
    code.extend_from_slice(&[0xff, 0xce]); // dec esi
    code.extend_from_slice(&[0x75, 0xef]); // jnz loop
    code.extend(print_dword(used)); // found: flags + idx
    code.extend(print_dword(used + 8)); // used[0].len
    code.extend(print_dword(FREED));
    code.extend(print_dword(KEPT));
    code.extend_from_slice(&[0xf3, 0x90, 0xeb, 0xfc]); // pause; jmp $-2

    let mut image = code;
    let at = |a: u32| (a - LOAD) as usize;
    // Reporting descriptor 0: the page, device-writable.
    image.resize(at(QUEUES[2].0), 0);
    image.extend_from_slice(&u64::from(FREED).to_le_bytes());
    image.extend_from_slice(&4096u32.to_le_bytes());
    image.extend_from_slice(&2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
    image.extend_from_slice(&0u16.to_le_bytes());
    image.resize(at(QUEUES[2].1), 0);
    image.extend_from_slice(&[0, 0, 1, 0, 0, 0]); // flags 0, idx 1, ring[0] = 0
    image.resize(at(FREED), 0);
    image.extend(FREED_PATTERN.to_le_bytes().repeat(1024));
    image.extend(KEPT_PATTERN.to_le_bytes().repeat(1024));
    image
}

fn metrics(ctl: &std::path::Path) -> boxlite_vmm_api::control::Metrics {
    let mut s = UnixStream::connect(ctl).expect("connect control socket");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(Request::Metrics.to_line().as_bytes()).unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).expect("reply");
    match Reply::from_line(&line).expect("reply line") {
        Reply::Metrics { metrics } => metrics,
        other => panic!("metrics: {other:?}"),
    }
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn a_reported_page_goes_back_under_the_jail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("guest.bin");
    std::fs::write(&img, guest_image()).expect("write guest");
    let console = dir.path().join("console.log");
    let ctl = dir.path().join("control.sock");
    let cfg = VmConfig {
        memory_mib: 16,
        irqchip: false,
        raw_image: Some(RawImageConfig {
            path: img,
            load_addr: u64::from(LOAD),
            mode: CpuMode::Long,
        }),
        console_log: Some(console.clone()),
        control_socket: Some(ctl.clone()),
        sandbox_dir: Some(dir.path().to_path_buf()),
        balloon: Some(BalloonConfig {
            target_mib: 4,
            ..BALLOON
        }),
        ..VmConfig::default()
    };
    assert!(cfg.jail, "the jail (and its seccomp filters) is on");
    let path = common::write_config(dir.path(), &cfg);
    let log = dir.path().join("vmm.log");
    let mut child = Command::new(env!("CARGO_BIN_EXE_boxlite-vmm"))
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).expect("log"))
        .spawn()
        .expect("spawn boxlite-vmm");
    // 2 dwords before and 4 after: 24 bytes.
    let end = Instant::now() + Duration::from_secs(20);
    let out = loop {
        let out = std::fs::read(&console).unwrap_or_default();
        if out.len() >= 24 {
            break out;
        }
        if let Some(status) = child.try_wait().expect("wait") {
            panic!(
                "boxlite-vmm ended ({status}) before the guest was done; console {out:?}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < end,
            "guest output {out:?}; log:\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let m = metrics(&ctl);
    // The balloon op, through the jailed VMM's control socket: a new
    // target is taken (the guest here writes no `actual`), one that would
    // leave the guest nothing is refused.
    let set = |target_mib| -> Result<Reply, std::io::Error> {
        let mut s = UnixStream::connect(&ctl)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        let req = Request::Balloon {
            target_mib: Some(target_mib),
        };
        s.write_all(req.to_line().as_bytes())?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line)?;
        Ok(Reply::from_line(&line).expect("reply line"))
    };
    let moved = set(3);
    let refused = set(16);
    let alive = child.try_wait().expect("wait").is_none();
    let _ = child.kill();
    let status = child.wait();
    let vmm_log = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        vmm_log.contains("seccomp filters loaded on every thread"),
        "jail not applied: {vmm_log}"
    );
    let dword = |i: usize| u32::from_le_bytes(out[4 * i..4 * i + 4].try_into().unwrap());
    assert_eq!(dword(0), 4 * 256, "num_pages: balloon.target_mib from boot");
    assert_eq!(dword(1), FREED_PATTERN, "the page held data before");
    assert_eq!(dword(2) >> 16, 1, "used.idx: the chain came back");
    assert_eq!(dword(3), 0, "used length 0");
    assert_eq!(dword(4), 0, "the reported page reads zeros: discarded");
    assert_eq!(dword(5), KEPT_PATTERN, "its neighbour is untouched");
    assert!(
        alive,
        "boxlite-vmm ended ({status:?}) after the balloon op; log:\n{vmm_log}"
    );
    assert_eq!(
        moved.unwrap_or_else(|e| panic!("no reply to the first balloon op ({e}); log:\n{vmm_log}")),
        Reply::Balloon {
            balloon: BalloonState {
                target_mib: 3,
                actual_mib: 0
            }
        }
    );
    assert_eq!(
        refused.expect("a reply to the second balloon op"),
        Reply::Error {
            error: "balloon target 16 MiB would leave the guest nothing of its 16 MiB".into()
        }
    );
    let Some(DeviceCounters::Balloon(b)) = m.devices.get("balloon0") else {
        panic!("no balloon0 in {m:?}");
    };
    assert_eq!(
        (b.reports, b.reported_bytes, b.bad_ranges, b.discard_errors),
        (1, 4096, 0, 0),
        "{b:?}"
    );
}
