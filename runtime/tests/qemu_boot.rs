//! Real VMs under the `qemu` backend (TCG on hosts without a usable KVM).
//!
//! `#[ignore]`d: they need root (or at least /dev/kvm access when KVM is
//! used), QEMU, virtiofsd, vhost-device-vsock and the guest assets. Run with
//! `cargo test -p boxlite-runtime --test qemu_boot -- --ignored --test-threads=1`
//! after `cargo xtask guest`. Assets are taken from `BOXLITE_KERNEL` /
//! `BOXLITE_INITRAMFS`, else `build/guest/`, else `/usr/share/boxlite/`
//! (the kernel also from `/var/cache/boxlite/kernel/*/vmlinux`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use boxlite_protocol::agent::{GuestInfoRequest, MountShareRequest, ReadFileRequest};
use boxlite_runtime::config::Config;
use boxlite_runtime::hypervisor::{new_hypervisor, Hypervisor, VmSpec};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("runtime/ has a parent")
        .to_owned()
}

fn first_file(candidates: impl IntoIterator<Item = PathBuf>) -> Option<PathBuf> {
    candidates.into_iter().find(|p| p.is_file())
}

fn kernel() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("BOXLITE_KERNEL")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(workspace_root().join("build/guest/vmlinux"));
    candidates.push("/usr/share/boxlite/vmlinux".into());
    if let Ok(dirs) = std::fs::read_dir("/var/cache/boxlite/kernel") {
        candidates.extend(dirs.flatten().map(|d| d.path().join("vmlinux")));
    }
    first_file(candidates).expect(
        "guest kernel not found: set BOXLITE_KERNEL or run `cargo xtask guest` (scripts/test.sh does)",
    )
}

fn initramfs() -> PathBuf {
    let mut candidates: Vec<PathBuf> = std::env::var_os("BOXLITE_INITRAMFS")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    candidates.push(workspace_root().join("build/guest/initramfs.cpio.gz"));
    candidates.push("/usr/share/boxlite/initramfs".into());
    first_file(candidates).expect(
        "guest initramfs not found: set BOXLITE_INITRAMFS or run `cargo xtask guest` (scripts/test.sh does)",
    )
}

/// A config whose state dir is a fresh temp dir (short enough for sockets).
fn config(state: &Path, kernel: PathBuf, initramfs: PathBuf) -> Config {
    let mut c = Config::default();
    c.runtime.state_dir = state.to_owned();
    c.guest.kernel = kernel;
    c.guest.initramfs = initramfs;
    c.guest.memory_mib = 256;
    c.timeouts.agent_ready_secs = 60;
    c.timeouts.shutdown_secs = 20;
    c.validate().unwrap();
    c
}

/// Pids of processes whose command line mentions `needle`.
fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if cmdline.contains(&needle) {
            found.push((pid, cmdline));
        }
    }
    found
}

fn sockets_in(dir: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "sock" || e == "pid"))
                .collect()
        })
        .unwrap_or_default()
}

fn assert_nothing_left(dir: &Path) {
    // Reaping is synchronous in stop/kill, so nothing should linger.
    assert_eq!(processes_mentioning(dir), Vec::<(u32, String)>::new());
    assert_eq!(sockets_in(dir), Vec::<PathBuf>::new());
}

/// A newc cpio archive (uncompressed; the kernel takes it as is).
fn cpio(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    fn pad(out: &mut Vec<u8>) {
        while out.len() % 4 != 0 {
            out.push(0);
        }
    }
    let mut out = Vec::new();
    let trailer: (&str, u32, &[u8]) = ("TRAILER!!!", 0, &[]);
    for (i, (name, mode, data)) in entries.iter().chain([&trailer]).enumerate() {
        let fields = [
            i as u32 + 1,
            *mode,
            0,
            0,
            1,
            0,
            data.len() as u32,
            0,
            0,
            0,
            0,
            name.len() as u32 + 1,
            0,
        ];
        out.extend_from_slice(b"070701");
        for f in fields {
            out.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad(&mut out);
        out.extend_from_slice(data);
        pad(&mut out);
    }
    out
}

fn console_text(vm: &dyn Hypervisor) -> String {
    String::from_utf8_lossy(&std::fs::read(vm.console_log_path()).unwrap_or_default()).into_owned()
}

/// The whole path: helpers + QEMU up, agent answers Health and Version over
/// the hybrid socket, a virtio-fs share is readable from the guest, stop()
/// shuts the guest down through the agent and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU, virtiofsd, vhost-device-vsock and the guest assets (cargo xtask guest)"]
async fn boots_answers_health_and_stops_clean() {
    let state = tempfile::tempdir().unwrap();
    let share = tempfile::tempdir().unwrap();
    std::fs::write(share.path().join("hello.txt"), "hello from the host\n").unwrap();
    let config = config(state.path(), kernel(), initramfs());
    let spec = VmSpec::from_config(&config, "boot1").unwrap();
    let dir = spec.dir.clone();
    let vm = new_hypervisor(&config, spec).unwrap();
    vm.add_share("share0", share.path(), true).await.unwrap();

    let started = Instant::now();
    vm.start().await.unwrap();
    let pid = vm.pid().expect("qemu runs");
    eprintln!(
        "qemu pid {pid}; processes: {:#?}",
        processes_mentioning(&dir)
    );
    let conn = match vm.wait_ready().await {
        Ok(conn) => conn,
        Err(e) => {
            let console = console_text(vm.as_ref());
            vm.kill().await.unwrap();
            panic!("{e}\n--- console ---\n{console}");
        }
    };
    eprintln!("agent ready after {:?}", started.elapsed());

    let version = conn.version(Duration::from_secs(5)).await.unwrap();
    eprintln!("agent version {version:?}");
    assert_eq!(version.protocol_version, boxlite_protocol::PROTOCOL_VERSION);

    let ctx = || ttrpc::context::with_timeout(Duration::from_secs(10).as_nanos() as i64);
    let info = conn
        .agent()
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .unwrap();
    let ids: Vec<u32> = info.virtio_devices.iter().map(|d| d.device_id).collect();
    eprintln!(
        "guest: kernel {} cpus {} mem {} KiB virtio {ids:?}",
        info.kernel_release, info.online_cpus, info.mem_total_kib
    );
    for (id, what) in [(19, "vsock"), (26, "fs"), (4, "rng")] {
        assert!(ids.contains(&id), "virtio {what} ({id}) missing: {ids:?}");
    }

    let mounted = conn
        .agent()
        .mount_share(
            ctx(),
            &MountShareRequest {
                tag: "share0".into(),
                read_only: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let file = conn
        .agent()
        .read_file(
            ctx(),
            &ReadFileRequest {
                path: format!("{}/hello.txt", mounted.mount_point),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(file.data, b"hello from the host\n");

    let stopping = Instant::now();
    vm.stop().await.unwrap();
    let took = stopping.elapsed();
    eprintln!("stop took {took:?}");
    // Graceful: the guest rebooted (QEMU exited) well before the 20 s
    // shutdown timeout after which stop() kills.
    assert!(took < Duration::from_secs(15), "stop took {took:?}");
    assert_eq!(vm.pid(), None);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert_nothing_left(&dir);
    let console = console_text(vm.as_ref());
    let tail: Vec<&str> = console.lines().rev().take(15).collect();
    eprintln!("--- console (last lines) ---");
    for line in tail.iter().rev() {
        eprintln!("{line}");
    }
    assert!(console.contains("Linux version"));
}

/// No init in the initramfs: the kernel panics, `panic=-1` + `-no-reboot`
/// end QEMU, and wait_ready fails at once (not after the 60 s timeout) with
/// QEMU's exit and the console log. Needs only the kernel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU, vhost-device-vsock and the guest kernel"]
async fn kernel_panic_fails_wait_ready_fast() {
    let state = tempfile::tempdir().unwrap();
    let empty = state.path().join("empty.cpio");
    std::fs::write(&empty, cpio(&[])).unwrap();
    let config = config(state.path(), kernel(), empty);
    let spec = VmSpec::from_config(&config, "panic1").unwrap();
    let dir = spec.dir.clone();
    let vm = new_hypervisor(&config, spec).unwrap();
    vm.start().await.unwrap();
    let started = Instant::now();
    let err = vm.wait_ready().await.unwrap_err().to_string();
    let took = started.elapsed();
    eprintln!("after {took:?}: {err}");
    assert!(took < Duration::from_secs(50), "{took:?}");
    assert!(err.starts_with("sandbox panic1: qemu (pid "), "{err}");
    assert!(err.contains("exited unexpectedly"), "{err}");
    assert!(
        err.contains(&format!(
            "console log: {}",
            dir.join("console.log").display()
        )),
        "{err}"
    );
    let console = console_text(vm.as_ref());
    assert!(console.contains("Linux version"), "{console}");
    assert!(console.contains("Kernel panic"), "{console}");
    vm.stop().await.unwrap();
    assert_nothing_left(&dir);
}

/// A guest that boots but never listens on vsock: wait_ready times out with
/// the sandbox, the port, the timeout and the console log; kill() cleans up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs QEMU, vhost-device-vsock, the guest kernel and /bin/busybox (static)"]
async fn silent_guest_times_out_with_a_clear_error() {
    let state = tempfile::tempdir().unwrap();
    let busybox = std::fs::read("/bin/busybox").expect("busybox-static installed");
    let init =
        b"#!/bin/busybox sh\necho silent-guest-up > /dev/console\nexec /bin/busybox sleep 3600\n";
    let archive = cpio(&[
        ("bin", 0o040755, &[]),
        ("bin/busybox", 0o100755, &busybox),
        ("dev", 0o040755, &[]),
        ("init", 0o100755, init),
    ]);
    let initramfs = state.path().join("silent.cpio");
    std::fs::write(&initramfs, archive).unwrap();
    let mut config = config(state.path(), kernel(), initramfs);
    config.timeouts.agent_ready_secs = 8;
    let spec = VmSpec::from_config(&config, "silent1").unwrap();
    let dir = spec.dir.clone();
    let vm = new_hypervisor(&config, spec).unwrap();
    vm.start().await.unwrap();
    let started = Instant::now();
    let err = vm.wait_ready().await.unwrap_err().to_string();
    let took = started.elapsed();
    eprintln!("after {took:?}: {err}");
    assert!(took < Duration::from_secs(11), "{took:?}");
    assert!(
        err.starts_with("sandbox silent1: VM did not answer on vsock port 1024 within 8s"),
        "{err}"
    );
    assert!(
        err.ends_with(&format!(
            "console log: {}",
            dir.join("console.log").display()
        )),
        "{err}"
    );
    let console = console_text(vm.as_ref());
    assert!(console.contains("silent-guest-up"), "{console}");
    vm.kill().await.unwrap();
    assert_nothing_left(&dir);
}
