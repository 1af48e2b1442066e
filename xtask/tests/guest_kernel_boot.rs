//! Boots the guest kernel under QEMU (microvm, TCG) with a busybox initramfs
//! written by `xtask::initramfs`, and checks what the agent relies on: init
//! runs, cgroup2 with its controllers, every namespace, seccomp, virtio-mmio
//! devices from the command line probed (rng, net, blk), and `reboot -f`
//! (triple fault with `reboot=t`) ending QEMU.
//!
//! Kernel: `$BOXLITE_KERNEL`, else the cached build of the guest fragment
//! (`cargo xtask kernel`).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use xtask::guest;
use xtask::initramfs::Initramfs;
use xtask::kernel::KernelBuild;

const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const BUSYBOX: &str = "/bin/busybox";
/// Printed by the init script first thing, to time the boot.
const INIT_MARKER: &str = "BOXLITE-TEST-INIT";
/// Printed last, right before `reboot -f`.
const DONE_MARKER: &str = "BOXLITE-TEST-DONE";

const INIT_SCRIPT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /bin /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
echo BOXLITE-TEST-INIT
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t cgroup2 cgroup2 /sys/fs/cgroup && echo "CHECK cgroup2-mounted"
echo "CHECK controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
echo "+cpu +cpuset +memory +pids +io" > /sys/fs/cgroup/cgroup.subtree_control
mkdir /sys/fs/cgroup/t
for f in cpu.max cpu.weight cpuset.cpus memory.max memory.swap.max pids.max io.max cgroup.freeze; do
  [ -e /sys/fs/cgroup/t/$f ] && echo "CHECK cgroup-file $f"
done
echo 1 > /sys/fs/cgroup/t/cgroup.freeze && grep -q 'frozen 1' /sys/fs/cgroup/t/cgroup.events && echo "CHECK cgroup-freeze"
echo "CHECK ns: $(ls /proc/self/ns | tr '\n' ' ')"
unshare -U -p -n -u -i -m -f true && echo "CHECK unshare-all"
grep -q '^Seccomp:' /proc/self/status && echo "CHECK seccomp"
echo "CHECK filesystems: $(grep -E 'overlay|fuse|virtiofs|ext4|tmpfs|devpts' /proc/filesystems | tr '\n\t' '  ')"
for d in /sys/bus/virtio/devices/*; do echo "CHECK virtio-device $(cat $d/device)"; done
echo "CHECK hwrng: $(cat /sys/devices/virtual/misc/hw_random/rng_current)"
[ -e /sys/class/net/eth0 ] && echo "CHECK eth0"
[ -e /sys/block/vda ] && echo "CHECK vda"
echo BOXLITE-TEST-DONE
reboot -f
"#;

fn kernel() -> PathBuf {
    if let Some(path) = std::env::var_os("BOXLITE_KERNEL") {
        return path.into();
    }
    match KernelBuild::new(vec![guest::default_fragment()]).cached() {
        Ok(Some(artefact)) => artefact.vmlinux,
        Ok(None) => panic!("no guest kernel: run `cargo xtask kernel` or set BOXLITE_KERNEL"),
        Err(e) => panic!("cannot look up the cached guest kernel: {e}"),
    }
}

/// Kills QEMU if the test ends before it exits on its own.
struct Qemu(Child);

impl Drop for Qemu {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
#[ignore = "needs qemu-system-x86_64, busybox-static and the guest kernel (cargo xtask kernel)"]
fn guest_kernel_boots_busybox_and_reboots() {
    let kernel = kernel();
    assert!(kernel.is_file(), "kernel {} not found", kernel.display());
    let dir = tempfile::tempdir().expect("tempdir");
    let initrd = dir.path().join("init.cpio.gz");
    std::fs::write(dir.path().join("init.sh"), INIT_SCRIPT).expect("write init script");
    Initramfs::new()
        .file("/init", dir.path().join("init.sh"), 0o755)
        .file("/bin/busybox", BUSYBOX, 0o755)
        .char_device("/dev/console", 0o600, 5, 1)
        .dir("/dev", 0o755)
        .dir("/proc", 0o555)
        .dir("/sys", 0o555)
        .dir("/tmp", 0o1777)
        .write_to(&initrd)
        .expect("write initramfs");
    let disk = dir.path().join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("write disk image");

    let started = Instant::now();
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "microvm,acpi=off",
            "-accel",
            "tcg",
            "-cpu",
            "max",
            "-m",
            "256M",
        ])
        .args([
            "-smp",
            "2",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-no-reboot",
        ])
        .args(["-serial", "stdio"])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(&initrd)
        .args(["-append", "console=ttyS0 reboot=t panic=-1 no_timer_check"])
        .args(["-device", "virtio-rng-device"])
        .args([
            "-netdev",
            "user,id=n0",
            "-device",
            "virtio-net-device,netdev=n0",
        ])
        .arg("-drive")
        .arg(format!("if=none,id=d0,format=raw,file={}", disk.display()))
        .args(["-device", "virtio-blk-device,drive=d0"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn qemu-system-x86_64 (install qemu-system-x86)");
    let mut qemu = Qemu(child);

    let stdout = qemu.0.stdout.take().expect("qemu stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send((line, started.elapsed())).is_err() {
                break;
            }
        }
    });

    let mut lines = Vec::new();
    let mut init_at = None;
    loop {
        let left = BOOT_TIMEOUT.saturating_sub(started.elapsed());
        match rx.recv_timeout(left) {
            Ok((line, at)) => {
                println!("[{:6.3}s] {line}", at.as_secs_f64());
                if line.contains(INIT_MARKER) && init_at.is_none() {
                    init_at = Some(at);
                }
                lines.push(line);
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                panic!("guest did not finish within {BOOT_TIMEOUT:?}")
            }
        }
    }
    let status = qemu.0.wait().expect("wait for qemu");
    let total = started.elapsed();
    let init_at = init_at.expect("init never ran");
    println!(
        "QEMU start -> init: {:.3}s; QEMU start -> exit: {:.3}s ({status})",
        init_at.as_secs_f64(),
        total.as_secs_f64()
    );

    let has = |needle: &str| lines.iter().any(|l| l.contains(needle));
    let line_of = |prefix: &str| {
        lines
            .iter()
            .find_map(|l| l.trim_end().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix:?} line"))
            .to_owned()
    };
    assert!(has(DONE_MARKER), "init script did not finish");
    assert!(has("CHECK cgroup2-mounted"));
    let controllers = line_of("CHECK controllers: ");
    for c in ["cpuset", "cpu", "io", "memory", "pids"] {
        assert!(
            controllers.split(' ').any(|x| x == c),
            "controller {c} missing from {controllers:?}"
        );
    }
    for f in [
        "cpu.max",
        "cpu.weight",
        "cpuset.cpus",
        "memory.max",
        "memory.swap.max",
        "pids.max",
        "io.max",
        "cgroup.freeze",
    ] {
        assert!(has(&format!("CHECK cgroup-file {f}")), "cgroup file {f}");
    }
    assert!(has("CHECK cgroup-freeze"), "freezing a cgroup2 group");
    let ns = line_of("CHECK ns: ");
    for n in ["cgroup", "ipc", "mnt", "net", "pid", "time", "user", "uts"] {
        assert!(
            ns.split(' ').any(|x| x == n),
            "namespace {n} missing from {ns:?}"
        );
    }
    assert!(has("CHECK unshare-all"), "unshare of every namespace");
    assert!(has("CHECK seccomp"));
    let fs = line_of("CHECK filesystems: ");
    for f in ["overlay", "fuse", "virtiofs", "ext4", "tmpfs", "devpts"] {
        assert!(fs.contains(f), "filesystem {f} missing from {fs:?}");
    }
    // virtio device ids: 1 net, 2 blk, 4 rng.
    for id in ["0x0001", "0x0002", "0x0004"] {
        assert!(
            has(&format!("CHECK virtio-device {id}")),
            "virtio device {id}"
        );
    }
    assert!(
        line_of("CHECK hwrng: ").starts_with("virtio_rng"),
        "virtio-rng is not the current hwrng"
    );
    assert!(has("CHECK eth0") && has("CHECK vda"));
    assert!(
        has("reboot: Restarting system"),
        "kernel did not reboot after `reboot -f`"
    );
    assert!(status.success(), "qemu exited with {status}");
}
