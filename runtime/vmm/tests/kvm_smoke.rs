//! KVM smoke tests: tiny hand-assembled guests on the host's /dev/kvm.
//!
//! They need root (or access to /dev/kvm) and run with `-- --ignored`; see
//! tests/README.md. They use only port I/O and MMIO, which work even on the
//! nested, software-paged `kvm_pvm` of our development machines.

use std::path::{Path, PathBuf};
use std::process::Command;

use boxlite_vmm::config::{CpuMode, DeviceConfig, RawImageConfig, RngConfig, VmConfig};
use boxlite_vmm::{run_vm, ExitReason};

const SERIAL: u16 = 0x3f8;
const VIRTIO_MMIO_BASE: u32 = 0xd000_0000;

/// `mov dx, SERIAL` (16-bit code) then `mov al, b; out dx, al` per byte.
fn real_mode_print(s: &[u8]) -> Vec<u8> {
    let mut c = vec![0xba];
    c.extend_from_slice(&SERIAL.to_le_bytes());
    for b in s {
        c.extend_from_slice(&[0xb0, *b, 0xee]);
    }
    c
}

/// `mov al, 0xfe; out 0x64, al` — i8042 CPU reset.
const I8042_RESET: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64];
const HLT: u8 = 0xf4;

/// 64-bit code: for each register offset, `mov ebx, addr; mov eax, [rbx]`
/// and write EAX's four bytes (little endian) to the serial port.
fn long_mode_dump_mmio(offsets: &[u32]) -> Vec<u8> {
    let mut c = vec![0x66, 0xba];
    c.extend_from_slice(&SERIAL.to_le_bytes());
    for off in offsets {
        c.push(0xbb);
        c.extend_from_slice(&(VIRTIO_MMIO_BASE + off).to_le_bytes());
        c.extend_from_slice(&[0x8b, 0x03]);
        for i in 0..4 {
            c.push(0xee); // out dx, al
            if i < 3 {
                c.extend_from_slice(&[0xc1, 0xe8, 0x08]); // shr eax, 8
            }
        }
    }
    c
}

struct Guest {
    dir: tempfile::TempDir,
}

impl Guest {
    fn new() -> Self {
        Guest {
            dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn config(&self, code: &[u8], mode: CpuMode, irqchip: bool) -> VmConfig {
        let img = self.path("guest.bin");
        std::fs::write(&img, code).expect("write guest");
        VmConfig {
            memory_mib: 16,
            console_log: Some(self.path("console.log")),
            irqchip,
            raw_image: Some(RawImageConfig {
                path: img,
                load_addr: match mode {
                    CpuMode::Real => 0x1000,
                    CpuMode::Long => 0x1_0000,
                },
                mode,
            }),
            sandbox_dir: Some(self.dir.path().to_path_buf()),
            ..VmConfig::default()
        }
    }

    fn console(&self) -> Vec<u8> {
        std::fs::read(self.path("console.log")).expect("console log")
    }

    /// Runs the binary on `cfg` with the jail on (the default) and checks
    /// that every seccomp filter was loaded; returns the exit code.
    fn run_jailed(&self, cfg: &VmConfig) -> i32 {
        assert!(cfg.jail, "the jail is on by default");
        let (code, stderr) = self.run_binary(cfg);
        assert!(
            stderr.contains("seccomp filters loaded on every thread"),
            "jail not applied: {stderr}"
        );
        code
    }

    /// Runs the binary on `cfg`; returns (exit code, stderr).
    fn run_binary(&self, cfg: &VmConfig) -> (i32, String) {
        let cfg_path = self.path("vm.json");
        std::fs::write(&cfg_path, cfg.to_json_pretty()).expect("write cfg");
        run_binary_args(&["--config".as_ref(), cfg_path.as_os_str()])
    }
}

fn run_binary_args(args: &[&std::ffi::OsStr]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_boxlite-vmm"))
        .args(args)
        .env("RUST_LOG", "info")
        .output()
        .expect("run boxlite-vmm");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn kvm_available() -> bool {
    Path::new("/dev/kvm").exists()
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn serial_output_reaches_console_log() {
    assert!(kvm_available());
    let g = Guest::new();
    let mut code = real_mode_print(b"hello from the guest\n");
    code.extend_from_slice(&I8042_RESET);
    code.push(HLT);
    // In-process through the library, jail off (a jail would confine the
    // test harness itself); every other test runs the jailed binary.
    let mut cfg = g.config(&code, CpuMode::Real, false);
    cfg.jail = false;
    let reason = run_vm(&cfg, None).expect("run");
    assert_eq!(reason, ExitReason::GuestReset);
    assert_eq!(g.console(), b"hello from the guest\n");
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn serial_output_with_in_kernel_irqchip_and_pit() {
    let g = Guest::new();
    let mut code = real_mode_print(b"irqchip ok\n");
    code.extend_from_slice(&I8042_RESET);
    code.push(HLT);
    assert_eq!(g.run_jailed(&g.config(&code, CpuMode::Real, true)), 0);
    assert_eq!(g.console(), b"irqchip ok\n");
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn virtio_mmio_magic_version_and_device_id() {
    let g = Guest::new();
    // Magic, version, device id, vendor id, QueueNumMax (queue 0).
    let mut code = long_mode_dump_mmio(&[0x000, 0x004, 0x008, 0x00c, 0x034]);
    code.extend_from_slice(&I8042_RESET);
    code.push(HLT);
    let mut cfg = g.config(&code, CpuMode::Long, false);
    cfg.devices = vec![DeviceConfig::Rng(RngConfig::default())];
    assert_eq!(g.run_jailed(&cfg), 0, "i8042 reset");
    let out = g.console();
    let words: Vec<u32> = out
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    assert_eq!(&out[..4], b"virt");
    assert_eq!(words, vec![0x7472_6976, 2, 4, 0x004c_5842, 256]);
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn i8042_reset_exits_with_code_0() {
    let g = Guest::new();
    let mut code = real_mode_print(b"bye");
    code.extend_from_slice(&I8042_RESET);
    code.push(HLT);
    let (rc, err) = g.run_binary(&g.config(&code, CpuMode::Real, false));
    assert_eq!(rc, 0, "{err}");
    assert!(err.contains("GuestReset"), "{err}");
    assert_eq!(g.console(), b"bye");
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn hlt_without_irqchip_exits_with_code_3() {
    let g = Guest::new();
    let (rc, err) = g.run_binary(&g.config(&[HLT], CpuMode::Real, false));
    assert_eq!(rc, 3, "{err}");
    assert!(err.contains("rip=0x1001"), "registers logged: {err}");
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn jump_into_the_mmio_gap_is_a_vcpu_error_with_code_2() {
    let g = Guest::new();
    // mov eax, 0xd0002000; jmp rax — fetch from an address with no RAM.
    let code = [0xb8, 0x00, 0x20, 0x00, 0xd0, 0xff, 0xe0];
    let (rc, err) = g.run_binary(&g.config(&code, CpuMode::Long, false));
    assert_eq!(rc, 2, "{err}");
    assert!(err.contains("vCPU stopped on an error"), "{err}");
    assert!(
        err.contains("rip=0xd0002000"),
        "last registers logged: {err}"
    );
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn raw_image_flag_overrides_the_config() {
    let g = Guest::new();
    let mut code = real_mode_print(b"flag");
    code.extend_from_slice(&I8042_RESET);
    let img = g.path("flag.bin");
    std::fs::write(&img, &code).expect("write");
    let cfg_path = g.path("vm.json");
    let console = g.path("console.log");
    // No boot source in the file: the flags supply it.
    let cfg = VmConfig {
        memory_mib: 16,
        irqchip: false,
        console_log: Some(console),
        sandbox_dir: Some(g.path("")),
        ..VmConfig::default()
    };
    std::fs::write(&cfg_path, cfg.to_json_pretty()).expect("cfg");
    let (rc, err) = run_binary_args(&[
        "--config".as_ref(),
        cfg_path.as_os_str(),
        "--raw-image".as_ref(),
        img.as_os_str(),
        "--load-addr".as_ref(),
        "0x1000".as_ref(),
        "--mode".as_ref(),
        "real".as_ref(),
    ]);
    assert_eq!(rc, 0, "{err}");
    assert_eq!(g.console(), b"flag");
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn two_vcpus_run_on_their_own_threads() {
    let g = Guest::new();
    // Both vCPUs start at the entry (no LAPIC without irqchip): each prints
    // one byte and halts; the first halt ends the VM (code 3).
    let mut code = real_mode_print(b"x");
    code.push(HLT);
    let mut cfg = g.config(&code, CpuMode::Real, false);
    cfg.vcpus = 2;
    assert_eq!(g.run_jailed(&cfg), 3, "a vCPU halted");
    let out = g.console();
    assert!(!out.is_empty() && out.iter().all(|b| *b == b'x'), "{out:?}");
}

/// 64-bit code: `mov dword [rbx + off], imm` for each (off, imm).
fn mmio_writes(writes: &[(u32, u32)]) -> Vec<u8> {
    let mut c = vec![0xbb];
    c.extend_from_slice(&VIRTIO_MMIO_BASE.to_le_bytes()); // mov ebx, base
    for (off, v) in writes {
        c.extend_from_slice(&[0xc7, 0x83]); // mov dword [rbx + disp32], imm32
        c.extend_from_slice(&off.to_le_bytes());
        c.extend_from_slice(&v.to_le_bytes());
    }
    c
}

/// 64-bit code: write the 4 bytes of the dword at guest address `addr` to COM1.
fn print_dword(addr: u32) -> Vec<u8> {
    let mut c = vec![0x66, 0xba];
    c.extend_from_slice(&SERIAL.to_le_bytes());
    c.push(0xb9);
    c.extend_from_slice(&addr.to_le_bytes()); // mov ecx, addr
    c.extend_from_slice(&[0x8b, 0x01]); // mov eax, [rcx]
    for i in 0..4 {
        c.push(0xee);
        if i < 3 {
            c.extend_from_slice(&[0xc1, 0xe8, 0x08]);
        }
    }
    c
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn guest_driver_gets_entropy_from_virtio_rng() {
    // The guest plays the virtio driver: handshake, one queue of 16 at
    // 0x20000 (desc) / 0x20100 (avail) / 0x20200 (used), one 16-byte
    // write-only buffer at 0x30000, QueueNotify (a KVM ioeventfd), then it
    // polls used.idx, and prints used[0].len, Status and the buffer.
    const LOAD: u64 = 0x1_0000;
    let (desc, avail, used, buf) = (0x2_0000u32, 0x2_0100u32, 0x2_0200u32, 0x3_0000u32);
    let mut code = mmio_writes(&[
        (0x70, 1),
        (0x70, 3),
        (0x24, 1),
        (0x20, 1), // VERSION_1
        (0x70, 0xb),
        (0x30, 0),
        (0x38, 16),
        (0x80, desc),
        (0x90, avail),
        (0xa0, used),
        (0x44, 1),
        (0x70, 0xf),
        (0x50, 0), // notify queue 0
    ]);
    code.push(0xbe);
    code.extend_from_slice(&200_000_000u32.to_le_bytes()); // mov esi, spin limit
    code.push(0xb9);
    code.extend_from_slice(&(used + 2).to_le_bytes()); // loop: mov ecx, &used.idx
    code.extend_from_slice(&[0x0f, 0xb7, 0x01]); // movzx eax, word [rcx]
    code.extend_from_slice(&[0x83, 0xf8, 0x01]); // cmp eax, 1
    code.extend_from_slice(&[0x74, 0x04]); // je found
    code.extend_from_slice(&[0xff, 0xce]); // dec esi
    code.extend_from_slice(&[0x75, 0xef]); // jnz loop
    code.extend(print_dword(used + 8)); // found: used[0].len
    code.extend(print_dword(VIRTIO_MMIO_BASE + 0x70));
    for i in 0..4 {
        code.extend(print_dword(buf + 4 * i));
    }
    code.extend_from_slice(&I8042_RESET);
    code.push(HLT);

    // The image carries the rings too: desc[0] and avail at their addresses.
    let mut image = code;
    image.resize((u64::from(desc) - LOAD) as usize, 0);
    image.extend_from_slice(&u64::from(buf).to_le_bytes());
    image.extend_from_slice(&16u32.to_le_bytes());
    image.extend_from_slice(&2u16.to_le_bytes()); // VIRTQ_DESC_F_WRITE
    image.extend_from_slice(&0u16.to_le_bytes());
    image.resize((u64::from(avail) - LOAD) as usize, 0);
    image.extend_from_slice(&[0, 0, 1, 0, 0, 0]); // flags 0, idx 1, ring[0] = 0

    let g = Guest::new();
    let mut cfg = g.config(&image, CpuMode::Long, false);
    cfg.devices = vec![DeviceConfig::Rng(RngConfig::default())];
    assert_eq!(g.run_jailed(&cfg), 0, "i8042 reset");
    let out = g.console();
    assert_eq!(out.len(), 24, "{out:?}");
    assert_eq!(
        u32::from_le_bytes([out[0], out[1], out[2], out[3]]),
        16,
        "used len"
    );
    assert_eq!(
        u32::from_le_bytes([out[4], out[5], out[6], out[7]]),
        0xf,
        "status"
    );
    assert_ne!(&out[8..], &[0u8; 16], "entropy written");
}
