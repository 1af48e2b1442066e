//! `boxlite-nested-driver`: PID 1 of the nested test host
//! (docs/testing-nested.md, DESIGN.md §4 layer 2).
//!
//! The test host is a Linux kernel with KVM_AMD running under QEMU TCG with
//! an emulated SVM CPU, so `/dev/kvm` works here the way it does on a real
//! host. This program mounts the pseudo filesystems, reads the scenarios to
//! run from the kernel command line (`boxlite.scenarios=boot,health,smp,reboot,guest-connect,fs,blk,net`),
//! runs `boxlite-vmm` on the guest kernel and initramfs for each of them,
//! prints one verdict line per scenario on the console
//!
//! ```text
//! BOXLITE-NESTED <scenario> PASS|FAIL|SKIP <detail>
//! ```
//!
//! then `BOXLITE-NESTED-DONE`, and reboots (with `reboot=t` on the test
//! host's command line the reboot is a triple fault, and QEMU's `-no-reboot`
//! exits). On FAIL the guest console tail and the VMM log tail are printed
//! first, each line prefixed with `  | `.
//!
//! One more scenario is not a test but the benchmark's QEMU row
//! (scripts/bench-nested.sh): `boot-qemu`, the `boot` scenario under QEMU
//! microvm, in a test host built with `cargo xtask testhost --with-qemu`.
//!
//! Other command-line parameters: `boxlite.timeout=<secs>` (per scenario,
//! default 120), `boxlite.vmm_log=<filter>` (RUST_LOG for boxlite-vmm,
//! default `info`), `boxlite.guest_cmdline=<extra>` (appended to the
//! guest's command line; `+` stands for a space), `boxlite.verbose=1` (print
//! the console and VMM log tails of passing and skipped scenarios too),
//! `boxlite.jail=0` (run boxlite-vmm with `--no-jail`, debugging only).
//!
//! Outside PID 1 (on a host whose KVM boots Linux: tests/nested_vmm.rs's
//! `direct_on_this_host_or_skip`, or by hand) it mounts nothing and exits
//! instead of rebooting; `BOXLITE_NESTED_ROOT` then replaces `/` as the place
//! of `usr/bin/boxlite-vmm`, `usr/bin/virtiofsd` and `guest/`,
//! `BOXLITE_NESTED_WORK` replaces `/tmp/boxlite-nested`, and the parameters
//! come from `BOXLITE_NESTED_CMDLINE` (same `boxlite.x=y` words) instead of
//! `/proc/cmdline`.

mod disk;
mod host_net;

use std::ffi::CString;
use std::fmt::Write as _;
use std::fs;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::RawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use boxlite_protocol::agent::{
    DestroySandboxRequest, GuestInfoRequest, GuestInfoResponse, Interface, IpAddress,
    MountShareRequest, ReadFileRequest, UpdateInterfaceRequest,
};
use boxlite_protocol::health::health_check_response::ServingStatus;
use boxlite_protocol::ready::Announcement;
use boxlite_runtime::hypervisor::ready::{ReadyError, ReadyListener};
use boxlite_runtime::{AgentConnection, HybridVsock};

const ALL_SCENARIOS: &str = boxlite_tests::NESTED_SCENARIOS;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);
/// Guest RAM for each inner VM.
const GUEST_MEMORY_MIB: u32 = 256;
/// The agent's "ready" log line (docs/agent.md, guest-mode start-up step 9).
const AGENT_READY: &str = "agent ready";
/// Virtio device ids (GuestInfo `virtio_devices[].device_id`).
const VIRTIO_ID_NET: u32 = 1;
const VIRTIO_ID_BLOCK: u32 = 2;
const VIRTIO_ID_RNG: u32 = 4;
const VIRTIO_ID_VSOCK: u32 = 19;
const VIRTIO_ID_FS: u32 = 26;
/// The `fs` scenario's share: its tag, and a file the guest reads back.
const FS_TAG: &str = "nested";
const FS_FILE: &str = "hello.txt";
const FS_CONTENT: &str = "hello from the nested test host through virtio-fs\n";
/// The `blk` scenario's disk: its size, its one partition, its serial.
const DISK_SECTORS: u64 = 2048;
const DISK_PARTITION: disk::Partition = disk::Partition {
    start: 64,
    sectors: 1000,
};
const DISK_ID: &str = "nested-disk0";
/// The `net` scenario: the test host's tap and address, the guest's.
const TAP_NAME: &str = "bxnested0";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 213, 0, 2);
const NET_PREFIX: u8 = 24;
const GUEST_MAC: &str = "02:42:0a:d5:00:02";
/// A TCP port nothing in the guest listens on: the guest kernel answers
/// the SYN with a RST.
const CLOSED_PORT: u16 = 9;
/// How long a guest may take to end the VM after DestroySandbox replied.
const REBOOT_TIMEOUT: Duration = Duration::from_secs(60);
const RPC_TIMEOUT: Duration = Duration::from_secs(20);
/// Lines of the guest console / VMM log shown with a FAIL.
const CONSOLE_TAIL: usize = 60;
const VMM_LOG_TAIL: usize = 25;

/// The outcome of one scenario.
enum Verdict {
    Pass(String),
    Fail(String),
    Skip(String),
}

/// A scenario failure: a one-line reason and the VM whose logs explain it.
struct Failure {
    reason: String,
    vm: Option<VmFiles>,
}

impl<E: std::fmt::Display> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure {
            reason: e.to_string(),
            vm: None,
        }
    }
}

type ScenarioResult = Result<Verdict, Failure>;

/// Where things are and the settings from the command line.
struct Settings {
    root: PathBuf,
    work: PathBuf,
    timeout: Duration,
    vmm_log: String,
    guest_cmdline: String,
    /// Print the console and VMM log tails for passing scenarios too.
    verbose: bool,
    /// Run boxlite-vmm with its jail (default); `boxlite.jail=0` passes
    /// `--no-jail`, for debugging a test-host kernel without landlock.
    jail: bool,
}

impl Settings {
    fn vmm(&self) -> PathBuf {
        self.root.join("usr/bin/boxlite-vmm")
    }
    fn guest_kernel(&self) -> PathBuf {
        self.root.join("guest/vmlinux")
    }
    fn guest_initramfs(&self) -> PathBuf {
        self.root.join("guest/initramfs.cpio.gz")
    }
    fn virtiofsd(&self) -> PathBuf {
        self.root.join("usr/bin/virtiofsd")
    }
    /// Only in a test host built with `cargo xtask testhost --with-qemu`.
    fn qemu(&self) -> PathBuf {
        self.root.join("usr/bin/qemu-system-x86_64")
    }
    /// The `blk` scenario's raw image.
    fn disk_image(&self) -> PathBuf {
        self.work.join("disk.img")
    }
    /// virtiofsd's vhost-user socket for the `fs` scenario.
    fn fs_socket(&self) -> PathBuf {
        self.work.join("virtiofsd/fs.sock")
    }
}

fn main() {
    let pid1 = std::process::id() == 1;
    if pid1 {
        mount_pseudo_filesystems();
    }
    let result = std::panic::catch_unwind(run);
    if let Err(p) = result {
        let msg = p
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        println!("BOXLITE-NESTED driver FAIL the driver panicked: {msg}");
        println!("BOXLITE-NESTED-DONE");
    }
    let _ = std::io::stdout().flush();
    if pid1 {
        // SAFETY: sync and reboot take no pointers; as PID 1 we end the test
        // host here (reboot=t → triple fault → QEMU -no-reboot exits).
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_AUTOBOOT);
        }
        // Not reached unless reboot failed; PID 1 must not exit.
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

fn run() {
    let host_up = uptime();
    let cmdline = match std::env::var("BOXLITE_NESTED_CMDLINE") {
        Ok(words) if std::process::id() != 1 => words,
        _ => fs::read_to_string("/proc/cmdline").unwrap_or_default(),
    };
    let param = |name: &str| {
        cmdline
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name).and_then(|v| v.strip_prefix('=')))
            .map(str::to_owned)
    };
    let scenarios = param("boxlite.scenarios").unwrap_or_else(|| ALL_SCENARIOS.to_owned());
    let settings = Settings {
        root: std::env::var_os("BOXLITE_NESTED_ROOT")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/")),
        work: std::env::var_os("BOXLITE_NESTED_WORK")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/tmp/boxlite-nested")),
        timeout: param("boxlite.timeout")
            .and_then(|v| v.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(DEFAULT_TIMEOUT),
        vmm_log: param("boxlite.vmm_log").unwrap_or_else(|| "info".to_owned()),
        verbose: param("boxlite.verbose").is_some_and(|v| v == "1"),
        jail: param("boxlite.jail").as_deref() != Some("0"),
        guest_cmdline: param("boxlite.guest_cmdline")
            .map(|v| v.replace('+', " "))
            .unwrap_or_default(),
    };
    let cpu_mhz = cpu_mhz();
    println!(
        "BOXLITE-NESTED-START test-host-uptime={host_up:.2}s scenarios={scenarios} kvm={} cpu-mhz={cpu_mhz:.3}",
        Path::new("/dev/kvm").exists()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    let mut counts = [0u32; 3];
    for name in scenarios.split(',').filter(|s| !s.is_empty()) {
        let started = Instant::now();
        let verdict = if cpu_mhz <= 0.0 {
            // KVM's kvm_guest_time_update() re-requests a clock update
            // forever while the host's tsc_khz is 0: the vCPU never enters
            // the guest and the scenario would only time out.
            Err(Failure {
                reason: "the test-host kernel does not know its TSC frequency (cpu MHz = 0: TSC \
                         calibration failed under TCG), so KVM would never enter a guest; boot the \
                         test host with tsc_early_khz=<the outer host's TSC kHz>"
                    .to_owned(),
                vm: None,
            })
        } else if !Path::new("/dev/kvm").exists() {
            Err(Failure {
                reason: format!(
                    "no /dev/kvm in the test host (KVM_AMD did not initialise: {})",
                    kvm_dmesg_hint()
                ),
                vm: None,
            })
        } else {
            rt.block_on(run_scenario(name, &settings))
        };
        let secs = started.elapsed().as_secs_f64();
        let (word, detail) = match verdict {
            Ok(Verdict::Pass(d)) => {
                counts[0] += 1;
                ("PASS", d)
            }
            Ok(Verdict::Skip(d)) => {
                counts[2] += 1;
                ("SKIP", d)
            }
            Ok(Verdict::Fail(d)) => {
                counts[1] += 1;
                ("FAIL", d)
            }
            Err(f) => {
                counts[1] += 1;
                if let Some(vm) = &f.vm {
                    vm.print_tails(name);
                }
                ("FAIL", f.reason)
            }
        };
        if settings.verbose && word != "FAIL" {
            VmFiles::in_dir(&settings.work.join(name)).print_tails(name);
        }
        println!(
            "BOXLITE-NESTED {name} {word} {} [{secs:.1}s]",
            one_line(&detail)
        );
        let _ = std::io::stdout().flush();
    }
    println!(
        "BOXLITE-NESTED-DONE pass={} fail={} skip={} test-host-uptime={:.2}s",
        counts[0],
        counts[1],
        counts[2],
        uptime()
    );
}

async fn run_scenario(name: &str, s: &Settings) -> ScenarioResult {
    match name {
        "boot" => scenario_boot(s).await,
        "smp" => scenario_smp(s).await,
        "health" => scenario_health(s).await,
        "reboot" => scenario_reboot(s).await,
        "guest-connect" => scenario_guest_connect(s).await,
        "fs" => scenario_fs(s).await,
        "blk" => scenario_blk(s).await,
        "net" => scenario_net(s).await,
        "boot-qemu" => scenario_boot_qemu(s).await,
        other => Ok(Verdict::Fail(format!(
            "unknown scenario {other:?} (known: {ALL_SCENARIOS})"
        ))),
    }
}

// ---------------------------------------------------------------- scenarios --

/// The guest kernel boots under boxlite-vmm and the agent (PID 1) starts.
async fn scenario_boot(s: &Settings) -> ScenarioResult {
    let vm = Vm::start(s, "boot", 1, &[Device::Rng])?;
    boot_to_agent_ready(s, vm, "boxlite-vmm").await
}

/// The benchmark's QEMU row (not a test): the same guest under QEMU
/// microvm with KVM, as the runtime's qemu backend runs it, with the rng
/// device only, like `boot`. Needs a test host built `--with-qemu`.
async fn scenario_boot_qemu(s: &Settings) -> ScenarioResult {
    if !s.qemu().is_file() {
        return Ok(Verdict::Skip(format!(
            "no {} in this test host (cargo xtask testhost --with-qemu)",
            s.qemu().display()
        )));
    }
    let vm = Vm::start_qemu(s, "boot-qemu")?;
    boot_to_agent_ready(s, vm, "qemu-system-x86_64").await
}

/// Waits for the agent's ready line and reports the time since `vmm` was
/// spawned, the guest clock then, and the kernel release.
async fn boot_to_agent_ready(s: &Settings, mut vm: Vm, vmm: &str) -> ScenarioResult {
    let ready = vm.wait_console(AGENT_READY, s.timeout).await?;
    let guest_t = vm.files.guest_time_of(AGENT_READY);
    let banner = vm
        .files
        .console_line("Linux version")
        .map(|l| l.split_whitespace().nth(4).unwrap_or("?").to_owned())
        .unwrap_or_default();
    vm.kill();
    Ok(Verdict::Pass(format!(
        "kernel {banner} booted, agent ready {:.2}s after {vmm} started (guest clock {})",
        ready.as_secs_f64(),
        guest_t
            .map(|t| format!("{t:.2}s"))
            .unwrap_or_else(|| "?".into())
    )))
}

/// Two vCPUs come up: the kernel brings up 2 CPUs, and GuestInfo (when the
/// VMM has vsock) reports 2 online.
async fn scenario_smp(s: &Settings) -> ScenarioResult {
    let vsock = vsock_support(s)?;
    let devices: &[Device] = if vsock.is_ok() {
        &[Device::Rng, Device::Vsock]
    } else {
        &[Device::Rng]
    };
    let mut vm = Vm::start(s, "smp", 2, devices)?;
    let ready = vm.wait_console(AGENT_READY, s.timeout).await?;
    let brought_up = vm.files.console_line("smp: Brought up");
    if !brought_up.as_deref().is_some_and(|l| l.contains(" 2 CPUs")) {
        return Err(vm.fail(format!(
            "the guest did not bring up 2 CPUs (console: {})",
            brought_up
                .as_deref()
                .unwrap_or("no \"smp: Brought up\" line")
        )));
    }
    let mut detail = format!(
        "guest brought up 2 CPUs, agent ready {:.2}s after start",
        ready.as_secs_f64()
    );
    if vsock.is_ok() {
        let conn = vm.connect(s.timeout).await?;
        let info = vm.guest_info(&conn).await?;
        if info.online_cpus != 2 {
            return Err(vm.fail(format!(
                "GuestInfo online_cpus = {}, want 2",
                info.online_cpus
            )));
        }
        let _ = write!(detail, "; GuestInfo online_cpus=2");
        vm.destroy(&conn).await?;
    } else {
        vm.kill();
    }
    Ok(Verdict::Pass(detail))
}

/// Through the hybrid vsock socket: Health.Check SERVING, Version, and
/// GuestInfo lists every virtio device the VMM gave the guest — one of each
/// kind: net, blk, rng, vsock, fs.
async fn scenario_health(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(reason));
    }
    let _fsd = Virtiofsd::start(s)?;
    write_disk_image(s)?;
    let tap = host_net::HostTap::create(TAP_NAME, HOST_IP, NET_PREFIX)?;
    let devices = [
        Device::Rng,
        Device::Vsock,
        Device::Fs,
        Device::Block,
        Device::Net(tap.inheritable_fd()?),
    ];
    let mut vm = Vm::start(s, "health", 1, &devices)?;
    drop(tap);
    let conn = vm.connect(s.timeout).await?;
    let answered = vm.started.elapsed();
    let status = conn
        .check(RPC_TIMEOUT)
        .await
        .map_err(|e| vm.fail(format!("Health.Check failed: {e}")))?;
    if status != ServingStatus::SERVING {
        return Err(vm.fail(format!("Health.Check answered {status:?}")));
    }
    let version = conn
        .version(RPC_TIMEOUT)
        .await
        .map_err(|e| vm.fail(format!("Health.Version failed: {e}")))?;
    let info = vm.guest_info(&conn).await?;
    let mut ids: Vec<u32> = info.virtio_devices.iter().map(|d| d.device_id).collect();
    ids.sort_unstable();
    let want = [
        VIRTIO_ID_NET,
        VIRTIO_ID_BLOCK,
        VIRTIO_ID_RNG,
        VIRTIO_ID_VSOCK,
        VIRTIO_ID_FS,
    ];
    if ids != want {
        return Err(vm.fail(format!(
            "GuestInfo lists virtio device ids {ids:?}, want {want:?} (net, blk, rng, vsock, fs)"
        )));
    }
    let devices = info
        .virtio_devices
        .iter()
        .map(|d| format!("{}={}", d.name, d.device_id))
        .collect::<Vec<_>>()
        .join(",");
    vm.destroy(&conn).await?;
    Ok(Verdict::Pass(format!(
        "Health SERVING {:.2}s after boxlite-vmm started; agent {} protocol {}; kernel {}; virtio {devices}",
        answered.as_secs_f64(),
        version.agent_version,
        version.protocol_version,
        info.kernel_release
    )))
}

/// The guest connects to the host: the agent's readiness announcement
/// (host port 1027) crosses boxlite-vmm's vsock device to the
/// `<uds>_1027` unix listener; host→guest still works after it.
async fn scenario_guest_connect(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(reason));
    }
    let mut vm = Vm::start(s, "guest-connect", 1, &[Device::Rng, Device::Vsock])?;
    let announcement = vm.announcement(s.timeout).await?;
    let announced = vm.started.elapsed();
    if announcement.protocol_version != boxlite_protocol::PROTOCOL_VERSION {
        return Err(vm.fail(format!("the agent announced {announcement:?}")));
    }
    let conn = vm.connect(s.timeout).await?;
    vm.destroy(&conn).await?;
    Ok(Verdict::Pass(format!(
        "guest → host port {} arrived on the <uds>_{} listener {:.2}s after boxlite-vmm started \
         (agent {}); host → guest Health answered after it",
        boxlite_protocol::READY_VSOCK_PORT,
        boxlite_protocol::READY_VSOCK_PORT,
        announced.as_secs_f64(),
        announcement.agent_version
    )))
}

/// DestroySandbox makes the guest reboot, and boxlite-vmm exits with 0.
async fn scenario_reboot(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (DestroySandbox goes over vsock)"
        )));
    }
    let mut vm = Vm::start(s, "reboot", 1, &[Device::Vsock])?;
    let conn = vm.connect(s.timeout).await?;
    let (status, took) = vm.destroy(&conn).await?;
    let reason = vm
        .files
        .vmm_log_line("VM ended")
        .and_then(|l| l.split_once("reason=").map(|(_, r)| r.to_owned()))
        .unwrap_or_else(|| "?".into());
    Ok(Verdict::Pass(format!(
        "DestroySandbox → guest reboot → boxlite-vmm exited {status} {:.2}s later; reason={reason}",
        took.as_secs_f64()
    )))
}

/// A virtio-fs share: virtiofsd (static, in the test host) serves a
/// directory, boxlite-vmm is its vhost-user frontend, the agent mounts the
/// share by tag and reads a file from it.
async fn scenario_fs(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (MountShare goes over vsock)"
        )));
    }
    let mut fsd = Virtiofsd::start(s)?;
    let mut vm = Vm::start(s, "fs", 1, &[Device::Rng, Device::Vsock, Device::Fs])?;
    let conn = vm.connect(s.timeout).await?;
    let ctx = || ttrpc::context::with_duration(RPC_TIMEOUT);
    let mounted = conn
        .agent()
        .mount_share(
            ctx(),
            &MountShareRequest {
                tag: FS_TAG.into(),
                read_only: true,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| vm.fail(format!("MountShare {FS_TAG:?} failed: {e}{}", fsd.exited())))?;
    let path = format!("{}/{FS_FILE}", mounted.mount_point);
    let read = vm
        .read_guest_file(&conn, &path)
        .await
        .map_err(|f| Failure {
            reason: format!("{}{}", f.reason, fsd.exited()),
            vm: f.vm,
        })?;
    if read != FS_CONTENT {
        return Err(vm.fail(format!(
            "ReadFile {path} returned {read:?}, want {FS_CONTENT:?}"
        )));
    }
    vm.expect_virtio_device(&conn, VIRTIO_ID_FS, "virtio-fs")
        .await?;
    vm.destroy(&conn).await?;
    let fsd_end = fsd.wait_exit(Duration::from_secs(10));
    Ok(Verdict::Pass(format!(
        "share {FS_TAG:?} mounted at {} and {FS_FILE} read back ({} bytes) through \
         boxlite-vmm's vhost-user frontend and virtiofsd; {fsd_end}",
        mounted.mount_point,
        read.len()
    )))
}

/// A read-only virtio-blk disk with an id: the guest kernel finds the
/// image's MBR partition (data read through the queue), the disk's size,
/// its read-only flag and its serial (GET_ID), as the agent reads them
/// from sysfs.
async fn scenario_blk(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (ReadFile goes over vsock)"
        )));
    }
    write_disk_image(s)?;
    let mut vm = Vm::start(s, "blk", 1, &[Device::Rng, Device::Vsock, Device::Block])?;
    let conn = vm.connect(s.timeout).await?;
    let want = [
        ("/sys/block/vda/size", DISK_SECTORS.to_string()),
        ("/sys/block/vda/ro", "1".to_owned()),
        ("/sys/block/vda/serial", DISK_ID.to_owned()),
        (
            "/sys/block/vda/vda1/start",
            DISK_PARTITION.start.to_string(),
        ),
        (
            "/sys/block/vda/vda1/size",
            DISK_PARTITION.sectors.to_string(),
        ),
    ];
    for (path, value) in &want {
        let got = vm.read_guest_file(&conn, path).await?;
        if got.trim() != value {
            return Err(vm.fail(format!(
                "guest {path} reads {:?}, want {value:?}",
                got.trim()
            )));
        }
    }
    vm.expect_virtio_device(&conn, VIRTIO_ID_BLOCK, "virtio-blk")
        .await?;
    vm.destroy(&conn).await?;
    Ok(Verdict::Pass(format!(
        "guest sees vda: {DISK_SECTORS} sectors, read-only, serial {DISK_ID:?} (GET_ID), and \
         the image's MBR partition vda1 at {} + {} sectors (sector 0 read through the queue)",
        DISK_PARTITION.start, DISK_PARTITION.sectors
    )))
}

/// The `blk` scenario's image at [`Settings::disk_image`].
fn write_disk_image(s: &Settings) -> Result<(), Failure> {
    fs::create_dir_all(&s.work)?;
    disk::write_mbr_image(&s.disk_image(), DISK_SECTORS, DISK_PARTITION)
        .map_err(|e| Failure::from(format!("cannot write {}: {e}", s.disk_image().display())))
}

/// virtio-net over a tap: the agent gives the guest NIC (found by MAC) an
/// address, and a TCP connection from the test host to a closed port in
/// the guest is refused: an ARP exchange and a SYN went in, the guest
/// kernel's answers and RST came out.
async fn scenario_net(s: &Settings) -> ScenarioResult {
    if let Err(reason) = vsock_support(s)? {
        return Ok(Verdict::Skip(format!(
            "{reason} (UpdateInterface goes over vsock)"
        )));
    }
    let tap = host_net::HostTap::create(TAP_NAME, HOST_IP, NET_PREFIX)?;
    let tap_fd = tap.inheritable_fd()?;
    let mut vm = Vm::start(
        s,
        "net",
        1,
        &[Device::Rng, Device::Vsock, Device::Net(tap_fd)],
    )?;
    // The VMM holds the tap now; the tap goes when the VMM does.
    drop(tap);
    let conn = vm.connect(s.timeout).await?;
    let req = UpdateInterfaceRequest {
        interface: Some(Interface {
            hw_addr: GUEST_MAC.into(),
            addresses: vec![IpAddress {
                address: GUEST_IP.to_string(),
                prefix_len: NET_PREFIX.into(),
                ..Default::default()
            }],
            ..Default::default()
        })
        .into(),
        ..Default::default()
    };
    conn.agent()
        .update_interface(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
        .await
        .map_err(|e| {
            vm.fail(format!(
                "UpdateInterface {GUEST_MAC} {GUEST_IP}/{NET_PREFIX} failed: {e}"
            ))
        })?;
    let target = std::net::SocketAddr::from((GUEST_IP, CLOSED_PORT));
    let t = Instant::now();
    let attempt = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::net::TcpStream::connect(target),
    )
    .await;
    match attempt {
        Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
        Ok(Err(e)) => return Err(vm.fail(format!("TCP connect to {target}: {e}, want refused"))),
        Ok(Ok(_)) => {
            return Err(vm.fail(format!(
                "TCP connect to {target} succeeded: something listens there, want refused"
            )))
        }
        Err(_) => {
            return Err(vm.fail(format!(
                "TCP connect to {target} got no answer within 20s (no frames through the tap?)"
            )))
        }
    }
    let refused_after = t.elapsed();
    vm.expect_virtio_device(&conn, VIRTIO_ID_NET, "virtio-net")
        .await?;
    vm.destroy(&conn).await?;
    let tap_gone = !Path::new("/sys/class/net").join(TAP_NAME).exists();
    if !tap_gone {
        return Err(Failure::from(format!(
            "tap {TAP_NAME} still exists after boxlite-vmm exited"
        )));
    }
    Ok(Verdict::Pass(format!(
        "guest NIC {GUEST_MAC} got {GUEST_IP}/{NET_PREFIX}; TCP from the test host's tap \
         ({HOST_IP}) to {target} refused by the guest after {:.0} ms (ARP + SYN in, RST out); \
         tap gone with the VMM",
        refused_after.as_secs_f64() * 1000.0
    )))
}

/// virtiofsd serving the `fs` scenario's share on [`Settings::fs_socket`].
struct Virtiofsd {
    child: Child,
}

impl Virtiofsd {
    /// Writes the share, starts virtiofsd and waits for its socket.
    /// `--sandbox none --seccomp none`: virtiofsd's own confinement is not
    /// what this tests (boxlite-vmm's jail is).
    fn start(s: &Settings) -> Result<Self, Failure> {
        let dir = s.work.join("virtiofsd");
        let _ = fs::remove_dir_all(&dir);
        let share = dir.join("share");
        fs::create_dir_all(&share)?;
        fs::write(share.join(FS_FILE), FS_CONTENT)?;
        let socket = s.fs_socket();
        let log_path = dir.join("virtiofsd.log");
        let log = fs::File::create(&log_path)?;
        let mut child = Command::new(s.virtiofsd())
            .arg("--socket-path")
            .arg(&socket)
            .arg("--shared-dir")
            .arg(&share)
            .args(["--sandbox", "none", "--seccomp", "none", "--cache", "never"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", s.virtiofsd().display()))?;
        let deadline = Instant::now() + Duration::from_secs(20);
        while !socket.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(Failure::from(format!(
                    "virtiofsd exited ({st}) before it listened: {}",
                    one_line(&fs::read_to_string(&log_path).unwrap_or_default())
                )));
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(Failure::from(format!(
                    "virtiofsd did not create {} within 20s",
                    socket.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Virtiofsd { child })
    }

    /// "; virtiofsd exited (status)" if it has, for failure messages.
    fn exited(&mut self) -> String {
        match self.child.try_wait() {
            Ok(Some(st)) => format!("; virtiofsd exited ({st})"),
            _ => String::new(),
        }
    }

    /// Waits for virtiofsd to end on its own (it does when its frontend
    /// disconnects); kills it after `timeout`. Says which happened.
    fn wait_exit(&mut self, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => return format!("virtiofsd exited {st} after the VM"),
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return format!(
                        "virtiofsd still ran {}s after the VM; killed",
                        timeout.as_secs()
                    );
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(50)),
                Err(e) => return format!("cannot wait for virtiofsd: {e}"),
            }
        }
    }
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ----------------------------------------------------------------- the VMs --

#[derive(Clone, Copy)]
enum Device {
    Rng,
    Vsock,
    /// virtio-fs, tag [`FS_TAG`], backed by [`Settings::fs_socket`].
    Fs,
    /// virtio-blk, read-only, on [`Settings::disk_image`] with id [`DISK_ID`].
    Block,
    /// virtio-net on this inherited tap fd, guest MAC [`GUEST_MAC`].
    Net(RawFd),
}

/// Does this boxlite-vmm know the vsock device? Decided by its config
/// schema: a config with a vsock entry and `vcpus = 0` either fails to
/// parse (`unknown variant`) or parses and fails validation on `vcpus`.
/// `Ok(Err(reason))`: not supported. Memoised per process.
fn vsock_support(s: &Settings) -> Result<Result<(), String>, Failure> {
    static ANSWER: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    if let Some(a) = ANSWER.get() {
        return Ok(a.clone());
    }
    let dir = s.work.join("probe");
    fs::create_dir_all(&dir)?;
    let cfg = serde_json::json!({
        "vcpus": 0,
        "kernel": s.guest_kernel(),
        "devices": [{"kind": "vsock", "guest_cid": 3, "uds_path": dir.join("v.sock")}],
    });
    let path = dir.join("vm.json");
    fs::write(&path, cfg.to_string())?;
    let out = Command::new(s.vmm())
        .arg("--config")
        .arg(&path)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", s.vmm().display()))?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let answer = if stderr.contains("unknown variant `vsock`") {
        Err("vsock device not in boxlite-vmm yet (its config refuses a vsock entry)".to_owned())
    } else if stderr.contains("vcpus = 0") {
        Ok(())
    } else {
        return Err(Failure::from(format!(
            "vsock probe: unexpected answer from boxlite-vmm ({}): {}",
            out.status,
            one_line(&stderr)
        )));
    };
    Ok(ANSWER.get_or_init(|| answer).clone())
}

/// A scenario's files: config, guest console, VMM log.
#[derive(Clone)]
struct VmFiles {
    dir: PathBuf,
    console: PathBuf,
    vmm_log: PathBuf,
}

impl VmFiles {
    fn in_dir(dir: &Path) -> VmFiles {
        VmFiles {
            dir: dir.to_owned(),
            console: dir.join("console.log"),
            vmm_log: dir.join("vmm.log"),
        }
    }

    fn console_text(&self) -> String {
        fs::read(&self.console)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn console_line(&self, needle: &str) -> Option<String> {
        self.console_text()
            .lines()
            .find(|l| l.contains(needle))
            .map(|l| l.trim().to_owned())
    }

    fn vmm_log_line(&self, needle: &str) -> Option<String> {
        fs::read_to_string(&self.vmm_log)
            .ok()?
            .lines()
            .rev()
            .find(|l| l.contains(needle))
            .map(str::to_owned)
    }

    /// The guest clock (`[  secs.micros]` prefix) of the first console line
    /// containing `needle`.
    fn guest_time_of(&self, needle: &str) -> Option<f64> {
        let line = self.console_line(needle)?;
        let inner = line.strip_prefix('[')?.split(']').next()?;
        inner.trim().parse().ok()
    }

    fn print_tails(&self, scenario: &str) {
        let mut out = String::new();
        for (what, path, n) in [
            ("guest console", &self.console, CONSOLE_TAIL),
            ("boxlite-vmm log", &self.vmm_log, VMM_LOG_TAIL),
        ] {
            let text = fs::read(path)
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
            let lines: Vec<&str> = text.lines().collect();
            let _ = writeln!(
                out,
                "  | --- {scenario}: {what} ({}), last {} of {} lines ---",
                path.display(),
                n.min(lines.len()),
                lines.len()
            );
            for l in &lines[lines.len().saturating_sub(n)..] {
                let _ = writeln!(out, "  | {l}");
            }
        }
        print!("{out}");
    }
}

/// One running boxlite-vmm.
struct Vm {
    files: VmFiles,
    child: Child,
    started: Instant,
    vsock: Option<HybridVsock>,
    /// `<uds>_1027`, bound before the VMM starts (as the runtime does).
    ready: Option<ReadyListener>,
}

impl Vm {
    fn start(s: &Settings, name: &str, vcpus: u8, devices: &[Device]) -> Result<Vm, Failure> {
        let dir = s.work.join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let files = VmFiles::in_dir(&dir);
        let uds = dir.join("vsock.sock");
        let devs: Vec<serde_json::Value> = devices
            .iter()
            .map(|d| match d {
                Device::Rng => serde_json::json!({"kind": "rng"}),
                Device::Vsock => {
                    serde_json::json!({"kind": "vsock", "guest_cid": 3, "uds_path": uds})
                }
                Device::Fs => {
                    serde_json::json!({"kind": "fs", "tag": FS_TAG, "socket_path": s.fs_socket()})
                }
                Device::Block => serde_json::json!({
                    "kind": "block", "path": s.disk_image(), "read_only": true, "id": DISK_ID
                }),
                Device::Net(fd) => {
                    serde_json::json!({"kind": "net", "tap_fd": fd, "mac": GUEST_MAC})
                }
            })
            .collect();
        let cfg = serde_json::json!({
            "vcpus": vcpus,
            "memory_mib": GUEST_MEMORY_MIB,
            "kernel": s.guest_kernel(),
            "initramfs": s.guest_initramfs(),
            "console_log": files.console,
            "cmdline": s.guest_cmdline,
            "devices": devs,
        });
        let has_vsock = devices.iter().any(|d| matches!(d, Device::Vsock));
        let ready = if has_vsock {
            Some(
                ReadyListener::bind(&uds)
                    .map_err(|e| format!("cannot bind {}_1027: {e}", uds.display()))?,
            )
        } else {
            None
        };
        let cfg_path = dir.join("vm.json");
        fs::write(&cfg_path, serde_json::to_string_pretty(&cfg)?)?;
        let log = fs::File::create(&files.vmm_log)?;
        let started = Instant::now();
        let mut cmd = Command::new(s.vmm());
        cmd.arg("--config").arg(&cfg_path);
        if !s.jail {
            cmd.arg("--no-jail");
        }
        let child = cmd
            .env("RUST_LOG", &s.vmm_log)
            // Plain log lines: they are printed on the console on failure.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", s.vmm().display()))?;
        let vsock = has_vsock.then(|| HybridVsock::new(&uds).with_console_log(&files.console));
        Ok(Vm {
            files,
            child,
            started,
            vsock,
            ready,
        })
    }

    /// QEMU microvm instead of boxlite-vmm: the runtime's qemu backend
    /// command line (runtime/src/hypervisor/qemu.rs: microvm without ACPI,
    /// memfd RAM, KVM with `-cpu host`, console to a file, `-no-reboot`)
    /// with only a virtio-rng device. QEMU's stderr goes to the `vmm.log`.
    fn start_qemu(s: &Settings, name: &str) -> Result<Vm, Failure> {
        let dir = s.work.join(name);
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir)?;
        let files = VmFiles::in_dir(&dir);
        let mem = format!("{GUEST_MEMORY_MIB}M");
        let mut cmdline = boxlite_runtime::hypervisor::qemu::BASE_CMDLINE.to_owned();
        if !s.guest_cmdline.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(&s.guest_cmdline);
        }
        let log = fs::File::create(&files.vmm_log)?;
        let started = Instant::now();
        let child = Command::new(s.qemu())
            .args(["-M", "microvm,acpi=off,memory-backend=mem"])
            .args(["-accel", "kvm", "-cpu", "host", "-smp", "1", "-m", &mem])
            .arg("-object")
            .arg(format!("memory-backend-memfd,id=mem,size={mem},share=on"))
            .args(["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"])
            .arg("-chardev")
            .arg(format!("file,id=console,path={}", files.console.display()))
            .args(["-serial", "chardev:console"])
            .arg("-kernel")
            .arg(s.guest_kernel())
            .arg("-initrd")
            .arg(s.guest_initramfs())
            .arg("-append")
            .arg(&cmdline)
            .args(["-device", "virtio-rng-device"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", s.qemu().display()))?;
        Ok(Vm {
            files,
            child,
            started,
            vsock: None,
            ready: None,
        })
    }

    fn fail(&self, reason: String) -> Failure {
        Failure {
            reason,
            vm: Some(self.files.clone()),
        }
    }

    /// One line per VMM thread: name, state, user/system/guest ticks and the
    /// kernel function it sleeps in — tells a spinning guest from a vCPU
    /// blocked in the host. Written to the VMM log, printed with a FAIL.
    fn record_threads(&self) {
        let pid = self.child.id();
        let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) else {
            return;
        };
        let mut out = String::from(
            "boxlite-nested-driver: VMM threads (name state utime stime guest_time wchan):\n",
        );
        for t in tasks.flatten() {
            let stat = fs::read_to_string(t.path().join("stat")).unwrap_or_default();
            let wchan = fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
            // comm is in parentheses; the fields after it are space-separated.
            let (comm, rest) = match (stat.find('('), stat.rfind(')')) {
                (Some(a), Some(b)) if b > a => (&stat[a + 1..b], &stat[b + 1..]),
                _ => continue,
            };
            let f: Vec<&str> = rest.split_whitespace().collect();
            // After comm: state=0, utime=11, stime=12, guest_time=40.
            let get = |i: usize| f.get(i).copied().unwrap_or("?");
            let _ = writeln!(
                out,
                "  {comm} {} utime={} stime={} guest={} wchan={wchan}",
                get(0),
                get(11),
                get(12),
                get(40)
            );
        }
        if let Ok(mut f) = fs::OpenOptions::new()
            .append(true)
            .open(&self.files.vmm_log)
        {
            let _ = f.write_all(out.as_bytes());
        }
    }

    /// The VMM's exit, if it has ended, as a failure reason.
    fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(format!("boxlite-vmm exited early ({st})")),
            Ok(None) => None,
            Err(e) => Some(format!("cannot wait for boxlite-vmm: {e}")),
        }
    }

    /// Waits until the console shows `needle`; fails on a guest panic, a
    /// VMM exit or the timeout. Returns the time since the VMM started.
    async fn wait_console(&mut self, needle: &str, timeout: Duration) -> Result<Duration, Failure> {
        loop {
            let text = self.files.console_text();
            if text.contains(needle) {
                return Ok(self.started.elapsed());
            }
            if let Some(l) = text.lines().find(|l| l.contains("Kernel panic")) {
                let reason = format!("guest kernel panic: {}", l.trim());
                self.kill();
                return Err(self.fail(reason));
            }
            if let Some(why) = self.exited() {
                return Err(self.fail(format!("{why} before the console showed {needle:?}")));
            }
            if self.started.elapsed() > timeout {
                self.record_threads();
                self.kill();
                return Err(self.fail(format!(
                    "the console did not show {needle:?} within {}s",
                    timeout.as_secs()
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits for the agent's connection to host port 1027 and its line.
    async fn announcement(&mut self, timeout: Duration) -> Result<Announcement, Failure> {
        let deadline = self.started + timeout;
        let mut last = String::from("no connection");
        loop {
            if let Some(why) = self.exited() {
                return Err(self.fail(format!(
                    "{why} before the agent announced itself (last: {last})"
                )));
            }
            if Instant::now() > deadline {
                self.record_threads();
                self.kill();
                return Err(self.fail(format!(
                    "the agent did not announce itself on host port 1027 within {}s (last: {last})",
                    timeout.as_secs()
                )));
            }
            let ready = self.ready.as_ref().expect("a VM with a vsock device");
            let until = tokio::time::Instant::now() + Duration::from_millis(200);
            match ready.accept_until(until).await {
                Ok(a) => return Ok(a),
                Err(ReadyError::NotYet) => {}
                Err(e) => last = boxlite_protocol::error_chain::chain(&e),
            }
        }
    }

    /// Connects to the agent through the hybrid socket and waits for SERVING.
    async fn connect(&mut self, timeout: Duration) -> Result<AgentConnection, Failure> {
        let vsock = self.vsock.clone().expect("a VM with a vsock device");
        let deadline = self.started + timeout;
        let mut last = String::from("no attempt");
        loop {
            if let Some(why) = self.exited() {
                return Err(self.fail(format!("{why} before the agent answered (last: {last})")));
            }
            if Instant::now() > deadline {
                self.record_threads();
                self.kill();
                return Err(self.fail(format!(
                    "the agent did not answer Health.Check through {} within {}s (last: {last})",
                    vsock.socket_path().display(),
                    timeout.as_secs()
                )));
            }
            match vsock
                .try_connect(boxlite_protocol::AGENT_VSOCK_PORT, Duration::from_secs(2))
                .await
            {
                Ok(stream) => {
                    let conn =
                        AgentConnection::new(boxlite_runtime::hybrid_vsock::ttrpc_client(stream));
                    match conn.check(Duration::from_secs(5)).await {
                        Ok(ServingStatus::SERVING) => return Ok(conn),
                        Ok(st) => last = format!("Health.Check answered {st:?}"),
                        Err(e) => last = format!("Health.Check failed: {e}"),
                    }
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn guest_info(&self, conn: &AgentConnection) -> Result<GuestInfoResponse, Failure> {
        conn.agent()
            .guest_info(
                ttrpc::context::with_duration(RPC_TIMEOUT),
                &GuestInfoRequest::default(),
            )
            .await
            .map_err(|e| self.fail(format!("GuestInfo failed: {e}")))
    }

    /// A guest file's text, read by the agent (ReadFile).
    async fn read_guest_file(&self, conn: &AgentConnection, path: &str) -> Result<String, Failure> {
        let req = ReadFileRequest {
            path: path.to_owned(),
            ..Default::default()
        };
        let read = conn
            .agent()
            .read_file(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
            .await
            .map_err(|e| self.fail(format!("ReadFile {path} failed: {e}")))?;
        Ok(String::from_utf8_lossy(&read.data).into_owned())
    }

    /// GuestInfo lists a virtio device with this id.
    async fn expect_virtio_device(
        &self,
        conn: &AgentConnection,
        id: u32,
        what: &str,
    ) -> Result<(), Failure> {
        let info = self.guest_info(conn).await?;
        if info.virtio_devices.iter().any(|d| d.device_id == id) {
            return Ok(());
        }
        let ids: Vec<u32> = info.virtio_devices.iter().map(|d| d.device_id).collect();
        Err(self.fail(format!(
            "GuestInfo lists no {what} device ({id}); it lists {ids:?}"
        )))
    }

    /// DestroySandbox, then waits for boxlite-vmm to exit with 0. Returns the
    /// exit status and the time from the call to the exit.
    async fn destroy(&mut self, conn: &AgentConnection) -> Result<(ExitStatus, Duration), Failure> {
        let t = Instant::now();
        let req = DestroySandboxRequest {
            timeout_secs: 1,
            ..Default::default()
        };
        // The connection may drop right after the reply (docs/agent.md).
        if let Err(e) = conn
            .agent()
            .destroy_sandbox(ttrpc::context::with_duration(RPC_TIMEOUT), &req)
            .await
        {
            if self.exited().is_none() {
                return Err(self.fail(format!("DestroySandbox failed: {e}")));
            }
        }
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) if st.success() => return Ok((st, t.elapsed())),
                Ok(Some(st)) => {
                    return Err(self.fail(format!(
                        "after DestroySandbox boxlite-vmm exited with {st}, want 0 (docs/vmm.md: guest reset/triple fault)"
                    )))
                }
                Ok(None) if t.elapsed() > REBOOT_TIMEOUT => {
                    self.kill();
                    return Err(self.fail(format!(
                        "boxlite-vmm still running {}s after DestroySandbox",
                        REBOOT_TIMEOUT.as_secs()
                    )));
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(e) => return Err(self.fail(format!("cannot wait for boxlite-vmm: {e}"))),
            }
        }
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
        }
        let _ = &self.files.dir;
    }
}

// ---------------------------------------------------------------- helpers --

fn one_line(s: &str) -> String {
    s.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The test host's CPU frequency from /proc/cpuinfo (its `cpu_khz`, which
/// is 0 when TSC calibration failed), or 0.
fn cpu_mhz() -> f64 {
    fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("cpu MHz"))
                .and_then(|l| l.split(':').nth(1))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0.0)
}

/// Seconds since the test host booted.
fn uptime() -> f64 {
    fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(-1.0)
}

/// Kernel messages about KVM/SVM, for the "no /dev/kvm" failure.
fn kvm_dmesg_hint() -> String {
    // /dev/kmsg gives the ring buffer without the syslog syscall.
    let Ok(f) = fs::OpenOptions::new()
        .read(true)
        .custom_flags_nonblock()
        .open("/dev/kmsg")
    else {
        return "cannot read /dev/kmsg".to_owned();
    };
    use std::io::BufRead;
    let lines: Vec<String> = std::io::BufReader::new(f)
        .lines()
        .map_while(Result::ok)
        .filter(|l| {
            let l = l.to_ascii_lowercase();
            l.contains("kvm") || l.contains("svm")
        })
        .map(|l| l.split_once(';').map(|(_, m)| m.to_owned()).unwrap_or(l))
        .collect();
    if lines.is_empty() {
        "no kvm/svm kernel messages".to_owned()
    } else {
        lines.join(" / ")
    }
}

trait NonBlock {
    fn custom_flags_nonblock(&mut self) -> &mut Self;
}

impl NonBlock for fs::OpenOptions {
    fn custom_flags_nonblock(&mut self) -> &mut Self {
        use std::os::unix::fs::OpenOptionsExt;
        self.custom_flags(libc::O_NONBLOCK)
    }
}

fn mount_pseudo_filesystems() {
    for (src, target, fstype, mode) in [
        ("proc", "/proc", "proc", None),
        ("sysfs", "/sys", "sysfs", None),
        ("devtmpfs", "/dev", "devtmpfs", Some("mode=0755")),
        ("tmpfs", "/tmp", "tmpfs", Some("mode=1777")),
        ("tmpfs", "/run", "tmpfs", Some("mode=0755")),
    ] {
        let _ = fs::create_dir_all(target);
        let c = |s: &str| CString::new(s).expect("no NUL");
        let (src_c, target_c, fstype_c) = (c(src), c(target), c(fstype));
        let data = mode.map(c);
        // SAFETY: every pointer is a NUL-terminated string that outlives the
        // call, or null for no data.
        let rc = unsafe {
            libc::mount(
                src_c.as_ptr(),
                target_c.as_ptr(),
                fstype_c.as_ptr(),
                0,
                data.as_ref()
                    .map_or(std::ptr::null(), |d| d.as_ptr().cast()),
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EBUSY) {
                println!("boxlite-nested-driver: mount {fstype} on {target}: {e}");
            }
        }
    }
}
