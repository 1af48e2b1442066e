//! Guest-mode smoke test: boots the guest kernel with the agent as /init
//! under QEMU (TCG) with vhost-device-vsock, and talks to the agent over
//! the hybrid vsock socket (`CONNECT <port>\n` → `OK …\n`).
//!
//! Needs qemu-system-x86_64, vhost-device-vsock and virtiofsd on PATH, and
//!   BOXLITE_TEST_KERNEL=/var/cache/boxlite/kernel/<key>/vmlinux
//!   BOXLITE_TEST_INITRAMFS=<cargo xtask initramfs --out …>
//! Run: cargo test -p boxlite-agent --test guest_vm -- --ignored

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use boxlite_protocol::agent::{
    CreateContainerRequest, CreateSandboxRequest, DestroySandboxRequest, GuestInfoRequest,
    MountShareRequest, ReadFileRequest,
};
use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::health::health_check_response::ServingStatus;
use boxlite_protocol::health::CheckRequest;
use boxlite_protocol::health_ttrpc::HealthClient;
use boxlite_protocol::{AGENT_VSOCK_PORT, LOG_VSOCK_PORT};
use ttrpc::context;

const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn env_path(name: &str) -> Option<PathBuf> {
    std::env::var_os(name)
        .map(PathBuf::from)
        .filter(|p| p.exists())
}

/// Connects to a guest port through the hybrid vsock socket.
fn hybrid_connect(uds: &Path, port: u32) -> std::io::Result<UnixStream> {
    let mut s = UnixStream::connect(uds)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("CONNECT {port}\n").as_bytes())?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.last() != Some(&b'\n') {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::ConnectionReset.into());
        }
        line.push(byte[0]);
    }
    if !line.starts_with(b"OK") {
        return Err(std::io::Error::other(
            String::from_utf8_lossy(&line).into_owned(),
        ));
    }
    s.set_read_timeout(None)?;
    Ok(s)
}

fn wait_for(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
#[ignore = "needs qemu, vhost-device-vsock, a guest kernel and initramfs (see file docs)"]
async fn boots_and_serves_over_vsock() {
    let (Some(kernel), Some(initramfs)) = (
        env_path("BOXLITE_TEST_KERNEL"),
        env_path("BOXLITE_TEST_INITRAMFS"),
    ) else {
        eprintln!("skipped: set BOXLITE_TEST_KERNEL and BOXLITE_TEST_INITRAMFS");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let vhost = dir.path().join("vhost.sock");
    let uds = dir.path().join("vsock.sock");
    let console = dir.path().join("console.log");
    let _vsock = Killed(
        Command::new("vhost-device-vsock")
            .args(["--guest-cid", "3", "--socket"])
            .arg(&vhost)
            .arg("--uds-path")
            .arg(&uds)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("vhost-device-vsock"),
    );
    let shared = dir.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::write(shared.join("hello.txt"), "from the host\n").unwrap();
    let fs_sock = dir.path().join("fs.sock");
    let _virtiofsd = Killed(
        Command::new("virtiofsd")
            .arg("--socket-path")
            .arg(&fs_sock)
            .arg("--shared-dir")
            .arg(&shared)
            .args(["--sandbox", "none"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("virtiofsd"),
    );
    wait_for(&vhost);
    wait_for(&fs_sock);
    let mut qemu = Killed(
        Command::new("qemu-system-x86_64")
            .args([
                "-M",
                "microvm,acpi=off,memory-backend=mem",
                "-accel",
                "tcg",
                "-cpu",
                "max",
            ])
            .args([
                "-m",
                "256M",
                "-object",
                "memory-backend-memfd,id=mem,size=256M,share=on",
            ])
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-chardev")
            .arg(format!("socket,id=vs,path={}", vhost.display()))
            .args(["-device", "vhost-user-vsock-device,chardev=vs"])
            .arg("-chardev")
            .arg(format!("socket,id=fs,path={}", fs_sock.display()))
            .args(["-device", "vhost-user-fs-device,chardev=fs,tag=share0"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-kernel")
            .arg(&kernel)
            .arg("-initrd")
            .arg(&initramfs)
            .args([
                "-append",
                "console=ttyS0 reboot=t panic=-1 boxlite.hostname=e2e-guest boxlite.log=debug",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-system-x86_64"),
    );
    let console_text = || std::fs::read_to_string(&console).unwrap_or_default();

    // The agent answers once the guest has booted.
    let started = Instant::now();
    let (health, agent) = loop {
        if let Ok(s) = hybrid_connect(&uds, AGENT_VSOCK_PORT) {
            s.set_nonblocking(true).unwrap();
            let s = tokio::net::UnixStream::from_std(s).unwrap();
            let c = ttrpc::asynchronous::Client::new(s.into());
            let health = HealthClient::new(c.clone());
            let ctx = context::with_timeout(5_000_000_000);
            if health.check(ctx, &CheckRequest::new()).await.is_ok() {
                break (health, AgentClient::new(c));
            }
        }
        assert!(
            started.elapsed() < BOOT_TIMEOUT,
            "agent never answered; console:\n{}",
            console_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!("agent answered {:?} after QEMU start", started.elapsed());
    let ctx = || context::with_timeout(10_000_000_000);

    let r = health.check(ctx(), &CheckRequest::new()).await.unwrap();
    assert_eq!(r.status.enum_value(), Ok(ServingStatus::SERVING));

    let info = agent
        .guest_info(ctx(), &GuestInfoRequest::new())
        .await
        .unwrap();
    assert!(
        info.virtio_devices.iter().any(|d| d.device_id == 19),
        "no vsock device in {:?}",
        info.virtio_devices
    );
    assert!(info.mem_total_kib > 100 * 1024 && info.mem_total_kib <= 256 * 1024);

    let read = |path: &str| {
        let mut r = ReadFileRequest::new();
        r.path = path.into();
        r
    };
    let hostname = agent
        .read_file(ctx(), &read("/etc/hostname"))
        .await
        .unwrap();
    assert_eq!(hostname.data, b"e2e-guest\n");
    let uts = agent
        .read_file(ctx(), &read("/proc/sys/kernel/hostname"))
        .await
        .unwrap();
    assert_eq!(uts.data, b"e2e-guest\n");
    let mounts = agent.read_file(ctx(), &read("/proc/mounts")).await.unwrap();
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
        .read_file(ctx(), &read("/sys/class/net/lo/operstate"))
        .await
        .unwrap();
    assert_ne!(lo.data, b"down\n");

    let e = agent
        .create_container(ctx(), &CreateContainerRequest::new())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("container service not implemented yet"),
        "{e}"
    );

    // Shares: CreateSandbox mounts share0 read-only at its default place.
    let mut share = MountShareRequest::new();
    share.tag = "share0".into();
    share.read_only = true;
    let mut create = CreateSandboxRequest::new();
    create.sandbox_id = "sb-e2e".into();
    create.shares.push(share.clone());
    agent.create_sandbox(ctx(), &create).await.unwrap();
    let data = agent
        .read_file(ctx(), &read("/run/boxlite/shares/share0/hello.txt"))
        .await
        .unwrap();
    assert_eq!(data.data, b"from the host\n");
    // Again on the same mount point: idempotent.
    let r = agent.mount_share(ctx(), &share).await.unwrap();
    assert_eq!(r.mount_point, "/run/boxlite/shares/share0");
    // Same tag, other flags: refused.
    share.read_only = false;
    let e = agent.mount_share(ctx(), &share).await.unwrap_err();
    assert!(e.to_string().contains("already mounted"), "{e}");
    // A tag no device carries: the error names tag and mount point.
    share.tag = "nosuchtag".into();
    let e = agent.mount_share(ctx(), &share).await.unwrap_err();
    let ttrpc::Error::RpcStatus(status) = &e else {
        panic!("{e:?}")
    };
    assert_eq!(status.code(), ttrpc::Code::NOT_FOUND, "{e}");
    assert!(
        status.message().starts_with(
            "mount virtiofs tag nosuchtag on /run/boxlite/shares/nosuchtag failed: \
             no virtio-fs device seems to have this tag"
        ),
        "{e}"
    );

    // The log stream starts with what was logged at boot.
    let log = hybrid_connect(&uds, LOG_VSOCK_PORT).unwrap();
    log.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut lines = BufReader::new(log).lines();
    let first_lines: Vec<String> = (&mut lines).take(3).map(|l| l.unwrap()).collect();
    assert!(
        first_lines[0].contains("boxlite-agent starting as PID 1"),
        "{first_lines:?}"
    );

    agent
        .destroy_sandbox(ctx(), &DestroySandboxRequest::new())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = qemu.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "QEMU still running after DestroySandbox; console:\n{}",
            console_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");
    let text = console_text();
    eprintln!("guest console:\n{text}");
    assert!(text.contains("rebooting to end the VM"), "{text}");
    assert!(!text.contains(" ERROR "), "errors on the console:\n{text}");
}
