//! Real guests under the `qemu` backend (TCG on hosts without a usable KVM):
//! our kernel, our initramfs with the agent as PID 1, virtio-fs through
//! virtiofsd and vsock through boxlite-vsock, driven the way the shim
//! drives them — through `boxlite_runtime`'s `Hypervisor` trait and the
//! hybrid vsock socket.
//!
//! `#[ignore]`d: they need root, QEMU, virtiofsd, boxlite-vsock and the
//! guest assets. scripts/test.sh builds the assets and runs them with
//! `cargo test -p boxlite-tests --test guest_vm -- --ignored --test-threads=1`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use boxlite_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, GuestInfoRequest, MountShareRequest,
    ReadFileRequest,
};
use boxlite_protocol::health::health_check_response::ServingStatus;
use boxlite_protocol::LOG_VSOCK_PORT;
use boxlite_runtime::hypervisor::{new_hypervisor, Hypervisor, VmSpec};
use boxlite_runtime::Config;
use boxlite_tests::{assert_nothing_left, guest_assets, processes_mentioning};
use xtask::initramfs::Initramfs;

/// A config whose state dir is a fresh temp dir (short enough for sockets).
fn config(state: &Path, kernel: PathBuf, initramfs: PathBuf) -> Config {
    let mut c = Config::default();
    c.runtime.state_dir = state.to_owned();
    c.guest.kernel = kernel;
    c.guest.initramfs = initramfs;
    c.guest.memory_mib = 256;
    c.timeouts.agent_ready_secs = 60;
    c.timeouts.shutdown_secs = 20;
    c.validate().expect("test config is valid");
    c
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(10).as_nanos() as i64)
}

fn read_req(path: &str) -> ReadFileRequest {
    ReadFileRequest {
        path: path.into(),
        ..Default::default()
    }
}

/// Starts VM `id` of `config` for a guest that must never get ready:
/// returns the VM, its sandbox directory, wait_ready's error and how long
/// wait_ready took to fail.
async fn start_and_fail_ready(
    config: &Config,
    id: &str,
) -> (Box<dyn Hypervisor>, PathBuf, String, Duration) {
    let spec = VmSpec::from_config(config, id).unwrap();
    let dir = spec.dir.clone();
    let vm = new_hypervisor(config, spec).unwrap();
    vm.start().await.unwrap();
    let started = Instant::now();
    let err = vm.wait_ready().await.unwrap_err().to_string();
    let took = started.elapsed();
    eprintln!("after {took:?}: {err}");
    (vm, dir, err, took)
}

fn console_text(vm: &dyn Hypervisor) -> String {
    String::from_utf8_lossy(&std::fs::read(vm.console_log_path()).unwrap_or_default()).into_owned()
}

/// The whole foundation: helpers + QEMU up; the agent answers Health and
/// Version over the hybrid socket; PID 1 set up mounts, hostname and `lo`; a
/// file the host writes into a virtio-fs share is read back by the guest;
/// the log stream replays the boot; DestroySandbox ends the VM and nothing
/// is left behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU, virtiofsd, boxlite-vsock and the guest assets (cargo xtask guest)"]
async fn guest_boots_serves_the_agent_and_stops_clean() {
    let assets = guest_assets();
    let state = tempfile::tempdir().unwrap();
    let share = tempfile::tempdir().unwrap();
    std::fs::write(
        share.path().join("before-boot.txt"),
        "written before boot\n",
    )
    .unwrap();
    let mut config = config(state.path(), assets.kernel, assets.initramfs);
    config.guest.kernel_cmdline_extra = "boxlite.hostname=e2e-guest boxlite.log=debug".into();
    let spec = VmSpec::from_config(&config, "boot1").unwrap();
    let dir = spec.dir.clone();
    let vm = new_hypervisor(&config, spec).unwrap();
    vm.add_share("share0", share.path(), false).await.unwrap();

    let started = Instant::now();
    vm.start().await.unwrap();
    let pid = vm.pid().expect("qemu runs after start");
    let conn = match vm.wait_ready().await {
        Ok(conn) => conn,
        Err(e) => {
            let console = console_text(vm.as_ref());
            vm.kill().await.unwrap();
            panic!("{e}\n--- console ---\n{console}");
        }
    };
    eprintln!("agent ready {:?} after start", started.elapsed());

    // Health and Version through the hybrid socket.
    assert_eq!(
        conn.check(Duration::from_secs(5)).await.unwrap(),
        ServingStatus::SERVING
    );
    let version = conn.version(Duration::from_secs(5)).await.unwrap();
    assert_eq!(version.protocol_version, boxlite_protocol::PROTOCOL_VERSION);
    assert_eq!(version.agent_version, env!("CARGO_PKG_VERSION"));

    // What the guest found: every device the backend gave it.
    let agent = conn.agent();
    let info = agent
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .unwrap();
    let ids: Vec<u32> = info.virtio_devices.iter().map(|d| d.device_id).collect();
    for (id, what) in [(19, "vsock"), (26, "fs"), (4, "rng"), (5, "balloon")] {
        assert!(ids.contains(&id), "virtio {what} ({id}) missing: {ids:?}");
    }
    // The balloon's driver bound and negotiated what the runtime asks for:
    // sysfs shows the driver's features as a string of bits (all 0 when no
    // driver took the device).
    let balloon = &info.virtio_devices[ids.iter().position(|id| *id == 5).unwrap()];
    let path = format!("/sys/bus/virtio/devices/{}/features", balloon.name);
    let features = agent.read_file(ctx(), &read_req(&path)).await.unwrap();
    let features = String::from_utf8_lossy(&features.data).into_owned();
    for (bit, what) in [(2, "DEFLATE_ON_OOM"), (5, "FREE_PAGE_REPORTING")] {
        assert_eq!(
            features.as_bytes().get(bit),
            Some(&b'1'),
            "balloon feature {what} not negotiated: {path} = {features:?}"
        );
    }
    assert!(info.mem_total_kib > 100 * 1024 && info.mem_total_kib <= 256 * 1024);
    assert_eq!(info.online_cpus, 1);
    let host_boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_ne!(
        info.boot_id.trim(),
        host_boot_id.trim(),
        "a separate kernel"
    );

    // PID 1 duties: hostname from the kernel command line, mounts, lo.
    for path in ["/etc/hostname", "/proc/sys/kernel/hostname"] {
        let got = agent.read_file(ctx(), &read_req(path)).await.unwrap();
        assert_eq!(got.data, b"e2e-guest\n", "{path}");
    }
    let mounts = agent
        .read_file(ctx(), &read_req("/proc/mounts"))
        .await
        .unwrap();
    let mounts = String::from_utf8_lossy(&mounts.data).into_owned();
    for want in [
        " /proc proc",
        " /sys sysfs",
        " /dev devtmpfs",
        " /dev/pts devpts",
        " /dev/shm tmpfs",
        " /run tmpfs",
        " /tmp tmpfs",
        " /sys/fs/cgroup cgroup2",
    ] {
        assert!(mounts.contains(want), "{want:?} missing from\n{mounts}");
    }
    let lo = agent
        .read_file(ctx(), &read_req("/sys/class/net/lo/operstate"))
        .await
        .unwrap();
    assert_ne!(lo.data, b"down\n", "lo is up");

    // Bad input to the container service is a clear INVALID_ARGUMENT, and
    // the agent keeps serving.
    match agent
        .create_container(ctx(), &CreateContainerRequest::new())
        .await
        .unwrap_err()
    {
        ttrpc::Error::RpcStatus(status) => {
            assert_eq!(status.code(), ttrpc::Code::INVALID_ARGUMENT, "{status:?}");
            assert!(status.message().contains("container_id"), "{status:?}");
        }
        other => panic!("expected an RPC status, got {other:?}"),
    }

    // virtio-fs: CreateSandbox mounts the share; a file written before boot
    // and one written by the host now both read back through the guest.
    let share_req = MountShareRequest {
        tag: "share0".into(),
        ..Default::default()
    };
    let create = CreateSandboxRequest {
        sandbox_id: "boot1".into(),
        shares: vec![share_req.clone()],
        ..Default::default()
    };
    agent.create_sandbox(ctx(), &create).await.unwrap();
    let mount_point = boxlite_protocol::default_share_mount_point("share0");
    std::fs::write(share.path().join("live.txt"), "written while running\n").unwrap();
    for (file, want) in [
        ("before-boot.txt", "written before boot\n"),
        ("live.txt", "written while running\n"),
    ] {
        let got = agent
            .read_file(ctx(), &read_req(&format!("{mount_point}/{file}")))
            .await
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&got.data), want, "{file}");
    }
    // Mounting again is idempotent; a tag no device carries is NOT_FOUND and
    // the message names the tag and the mount point.
    let again = agent.mount_share(ctx(), &share_req).await.unwrap();
    assert_eq!(again.mount_point, mount_point);
    let bad = MountShareRequest {
        tag: "nosuchtag".into(),
        ..Default::default()
    };
    match agent.mount_share(ctx(), &bad).await.unwrap_err() {
        ttrpc::Error::RpcStatus(status) => {
            assert_eq!(status.code(), ttrpc::Code::NOT_FOUND, "{status:?}");
            assert!(
                status
                    .message()
                    .starts_with("mount virtiofs tag nosuchtag on /run/boxlite/shares/nosuchtag"),
                "{status:?}"
            );
        }
        other => panic!("expected an RPC status, got {other:?}"),
    }

    // The log stream replays what the agent logged since boot.
    let log = vm
        .hybrid_vsock()
        .connect(LOG_VSOCK_PORT, Duration::from_secs(10))
        .await
        .unwrap()
        .into_std()
        .unwrap();
    log.set_nonblocking(false).unwrap();
    log.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let first = BufReader::new(log).lines().next().unwrap().unwrap();
    assert!(first.contains("boxlite-agent starting as PID 1"), "{first}");

    // DestroySandbox through stop(): the guest reboots, QEMU exits, helpers
    // are reaped, sockets removed — well before the 20 s kill deadline.
    let stopping = Instant::now();
    vm.stop().await.unwrap();
    let took = stopping.elapsed();
    eprintln!("stop took {took:?}");
    assert!(took < Duration::from_secs(15), "stop took {took:?}");
    assert_eq!(vm.pid(), None);
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert_nothing_left(&dir);
    let console = console_text(vm.as_ref());
    assert!(console.contains("rebooting to end the VM"), "{console}");
    assert!(
        !console.contains(" ERROR "),
        "errors on the console:\n{console}"
    );
}

/// No init in the initramfs: the kernel panics, `panic=-1` + `-no-reboot`
/// end QEMU, and wait_ready fails at once (not after the 60 s timeout) with
/// QEMU's exit and the console log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU, boxlite-vsock and the guest kernel"]
async fn kernel_panic_fails_wait_ready_fast() {
    let assets = guest_assets();
    let state = tempfile::tempdir().unwrap();
    let empty = state.path().join("empty.cpio.gz");
    Initramfs::new()
        .dir("/dev", 0o755)
        .write_to(&empty)
        .unwrap();
    let config = config(state.path(), assets.kernel, empty);
    let (vm, dir, err, took) = start_and_fail_ready(&config, "panic1").await;
    assert!(took < Duration::from_secs(50), "{took:?}");
    assert!(err.starts_with("sandbox panic1: qemu (pid "), "{err}");
    assert!(err.contains("exited unexpectedly"), "{err}");
    let console_log = dir.join("console.log");
    assert!(
        err.contains(&format!("console log: {}", console_log.display())),
        "{err}"
    );
    let console = console_text(vm.as_ref());
    assert!(console.contains("Kernel panic"), "{console}");
    vm.stop().await.unwrap();
    assert_nothing_left(&dir);
}

/// A guest that boots but never announces itself: wait_ready times out with
/// the sandbox, the port, the timeout and the console log; kill() cleans up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU, boxlite-vsock, the guest kernel and busybox-static"]
async fn silent_guest_times_out_naming_the_console_log() {
    let assets = guest_assets();
    let state = tempfile::tempdir().unwrap();
    let initramfs = state.path().join("silent.cpio.gz");
    boxlite_tests::write_silent_initramfs(&initramfs);
    let mut config = config(state.path(), assets.kernel, initramfs);
    config.timeouts.agent_ready_secs = 8;
    let (vm, dir, err, took) = start_and_fail_ready(&config, "silent1").await;
    assert!(took < Duration::from_secs(11), "{took:?}");
    assert!(
        err.starts_with(&format!(
            "sandbox silent1: the agent did not announce itself on vsock port 1027 ({}) within 8s",
            dir.join("vsock.sock_1027").display()
        )),
        "{err}"
    );
    let console_log = dir.join("console.log");
    assert!(
        err.ends_with(&format!("console log: {}", console_log.display())),
        "{err}"
    );
    assert!(console_text(vm.as_ref()).contains(boxlite_tests::SILENT_GUEST_MARK));
    assert!(!processes_mentioning(&dir).is_empty(), "VM still up");
    vm.kill().await.unwrap();
    assert_nothing_left(&dir);
}
