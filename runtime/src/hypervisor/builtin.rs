//! The `builtin` backend: our own VMM, `boxlite-vmm` (crate `runtime/vmm`),
//! one process per sandbox, plus one `virtiofsd` per share.
//!
//! Files in the sandbox directory:
//!
//! | file | what |
//! |---|---|
//! | `vm.json` | the VM config the VMM is started with (`boxlite-vmm --config vm.json`) |
//! | `console.log` | guest serial console (ttyS0) |
//! | `vsock.sock` | hybrid vsock socket, served by the VMM itself |
//! | `control.sock` | the VMM's control socket (shutdown, pause, resume, status, metrics) |
//! | `fs-<tag>.sock` (+ `.pid` lock) | vhost-user socket between the VMM and that share's virtiofsd |
//! | `boxlite-vmm.log`, `virtiofsd-<tag>.log` | each process's stdout and stderr |
//! | `boxlite-vmm.pid`, `virtiofsd-<tag>.pid` | pids, for [`super::cleanup_stale_processes`] |
//!
//! The VMM jails itself (landlock to the sandbox directory and the guest
//! assets, seccomp, no_new_privs) before the guest runs. Start order and
//! cleanup guarantees are `hypervisor/process_vm.rs`'s, shared with the qemu
//! backend: everything is checked first, virtiofsd daemons are spawned and
//! their sockets awaited, then the VMM (which inherits the tap fds, and
//! only it); any failure kills and reaps what was spawned and removes the
//! sockets. `stop` asks the agent (DestroySandbox: the guest reboots, the
//! VMM exits 0), then — this backend's fallback — the VMM's control socket
//! (`{"op":"shutdown"}`), then kills.

use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use boxlite_protocol::error_chain::chain;
use serde_json::{json, Value};

use super::launcher::{Launch, Launcher, VmSetup};
use super::process::{fs_socket_name, Role};
use super::process_vm::ProcessVm;
use super::{HypervisorError, NetDevice, Share, VmSpec, CONSOLE_LOG, VSOCK_SOCKET};
use crate::config::ResolvedHypervisor;
use crate::network::TapDevice;

/// The VM config file in the sandbox directory.
pub const VM_CONFIG: &str = "vm.json";
/// The VMM's control socket in the sandbox directory.
pub const CONTROL_SOCKET: &str = "control.sock";
/// Guest CID (each VM has its own VMM, so they never clash).
pub const GUEST_CID: u32 = 3;
/// After the agent's shutdown deadline, how long the VMM gets to exit after
/// a control-socket `shutdown` before it is killed.
const CONTROL_SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

/// The `builtin` backend. Build it with [`super::new_hypervisor`].
pub type BuiltinHypervisor = ProcessVm<BuiltinLauncher>;

/// How the `builtin` backend launches a VM: virtiofsd daemons, then
/// boxlite-vmm with a JSON config.
#[derive(Debug)]
pub struct BuiltinLauncher {
    bins: ResolvedHypervisor,
}

impl ProcessVm<BuiltinLauncher> {
    pub fn new(spec: VmSpec, bins: ResolvedHypervisor) -> Result<Self, HypervisorError> {
        let virtiofsd = bins.virtiofsd_binary.clone();
        ProcessVm::with_launcher(spec, &virtiofsd, BuiltinLauncher { bins })
    }

    /// The VMM's JSON config; see [`vm_config`].
    pub fn vm_config(&self, shares: &[Share], nets: &[(Option<RawFd>, &NetDevice)]) -> Value {
        vm_config(&self.setup, shares, nets)
    }

    /// Sends one control request and returns the reply line (blocking, with
    /// a short timeout: the VMM answers from its event loop).
    pub fn control_request(&self, op: &str) -> std::io::Result<Value> {
        control_request(&self.setup.path(CONTROL_SOCKET), op)
    }
}

/// The VMM's JSON config (see `docs/vmm.md`). `nets` pairs each device with
/// the raw fd the VMM inherits for it (None for named taps).
pub fn vm_config(vm: &VmSetup, shares: &[Share], nets: &[(Option<RawFd>, &NetDevice)]) -> Value {
    let mut devices = vec![
        json!({"kind": "rng"}),
        json!({"kind": "vsock", "guest_cid": GUEST_CID, "uds_path": vm.path(VSOCK_SOCKET)}),
    ];
    for share in shares {
        devices.push(json!({
            "kind": "fs",
            "tag": share.tag,
            "socket_path": vm.path(&fs_socket_name(&share.tag)),
        }));
    }
    for (fd, net) in nets {
        let mut d = json!({"kind": "net", "mac": net.mac.to_string()});
        match (&net.tap, fd) {
            (TapDevice::Name(name), _) => d["tap_name"] = json!(name),
            (TapDevice::Fd(_), Some(fd)) => d["tap_fd"] = json!(fd),
            (TapDevice::Fd(f), None) => d["tap_fd"] = json!(f.as_raw_fd()),
        }
        devices.push(d);
    }
    json!({
        "vcpus": vm.vcpus,
        "memory_mib": vm.memory_mib,
        "kernel": vm.kernel,
        "initramfs": vm.initramfs,
        "cmdline": vm.cmdline_extra.join(" "),
        "console_log": vm.path(CONSOLE_LOG),
        "control_socket": vm.path(CONTROL_SOCKET),
        "sandbox_dir": vm.dir,
        "devices": devices,
    })
}

/// One request on a VMM control socket: writes `{"op": op}`, reads the
/// reply line (2 s timeout each way).
pub fn control_request(socket: &Path, op: &str) -> std::io::Result<Value> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(format!("{}\n", json!({ "op": op })).as_bytes())?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(std::io::Error::other)
}

#[async_trait]
impl Launcher for BuiltinLauncher {
    const VMM: Role = Role::Vmm;

    fn binaries(&self) -> Vec<(&'static str, &Path)> {
        vec![(
            "boxlite-vmm (hypervisor.vmm_binary)",
            self.bins.vmm_binary.as_path(),
        )]
    }

    fn own_sockets(&self, vm: &VmSetup) -> Vec<PathBuf> {
        vec![vm.path(CONTROL_SOCKET)]
    }

    /// virtiofsd daemons (sockets awaited), then the VMM with the taps.
    async fn spawn(&self, vm: &VmSetup, launch: &mut Launch<'_>) -> Result<(), HypervisorError> {
        launch.spawn_virtiofsd(vm)?;
        launch.wait_for_helper_sockets(vm).await?;

        let fds = launch.tap_fds();
        let nets: Vec<(Option<RawFd>, &NetDevice)> =
            fds.iter().copied().zip(launch.nets.iter()).collect();
        let cfg = vm_config(vm, launch.shares, &nets);
        let cfg_path = vm.path(VM_CONFIG);
        std::fs::write(&cfg_path, format!("{cfg:#}\n")).map_err(|error| HypervisorError::Io {
            id: vm.id.clone(),
            op: "cannot write the VM config",
            path: cfg_path.clone(),
            error,
        })?;
        let args: Vec<OsString> = vec!["--config".into(), cfg_path.into_os_string()];
        tracing::info!(sandbox_id = %vm.id, binary = %self.bins.vmm_binary.display(), "starting boxlite-vmm");
        let inherit: Vec<RawFd> = fds.into_iter().flatten().collect();
        launch.spawn(vm, Role::Vmm, &self.bins.vmm_binary, args, None, inherit)
    }

    /// The VMM's control socket: it stops its vCPUs and exits (code 0).
    async fn last_resort_shutdown(&self, vm: &VmSetup) -> Option<Duration> {
        let id = &vm.id;
        tracing::warn!(sandbox_id = %id, "VM did not exit after the agent shutdown; asking the VMM over its control socket");
        let socket = vm.path(CONTROL_SOCKET);
        match tokio::task::spawn_blocking(move || control_request(&socket, "shutdown")).await {
            Ok(Ok(reply)) => tracing::debug!(sandbox_id = %id, %reply, "control shutdown"),
            Ok(Err(e)) => tracing::warn!(sandbox_id = %id, error = %e, "control shutdown failed"),
            Err(e) => {
                tracing::warn!(sandbox_id = %id, error = %chain(&e), "control shutdown task failed")
            }
        }
        Some(CONTROL_SHUTDOWN_GRACE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{ResolvedAccel, ResolvedBackend};
    use crate::hypervisor::test_rig::{Bins, Rig};
    use crate::hypervisor::Hypervisor;
    use boxlite_test_support::fake_bin::pid_alive;
    use std::fs::File;

    fn bins(vmm: PathBuf, virtiofsd: PathBuf) -> ResolvedHypervisor {
        let (qemu, vhost_vsock) = ("qemu-system-x86_64".into(), "boxlite-vsock".into());
        Bins {
            qemu,
            virtiofsd,
            vhost_vsock,
            vmm,
        }
        .resolve(ResolvedBackend::Builtin, ResolvedAccel::Kvm)
    }

    /// virtiofsd stand-in: creates its socket (and lock file), sleeps.
    fn fake_virtiofsd(rig: &Rig) -> PathBuf {
        rig.socket_helper("virtiofsd", "--socket-path", true)
    }

    /// VMM stand-in: records its arguments and config, lists its open fds,
    /// creates the sockets a real one would, sleeps.
    fn fake_vmm(rig: &Rig) -> PathBuf {
        rig.script(
            "boxlite-vmm",
            &format!(
                r#"echo "$@" > {args}
cp "$2" {cfg}
ls /proc/$$/fd > {fds}
d=$(dirname "$2"); : > "$d/vsock.sock"; : > "$d/control.sock"
exec sleep 30"#,
                args = rig.path("vmm.args").display(),
                cfg = rig.path("vmm.json").display(),
                fds = rig.path("vmm.fds").display(),
            ),
        )
    }

    #[tokio::test]
    async fn start_writes_the_vm_config_and_hands_the_tap_fd_to_the_vmm_only() {
        let rig = Rig::new();
        let hv =
            BuiltinHypervisor::new(rig.spec(), bins(fake_vmm(&rig), fake_virtiofsd(&rig))).unwrap();
        let share = rig.path("share");
        std::fs::create_dir(&share).unwrap();
        hv.add_share("rootfs", &share, true).await.unwrap();
        // Any fd stands in for a tap: the backend only passes it on.
        let tap: std::os::fd::OwnedFd = File::open("/dev/null").unwrap().into();
        let tap_fd = tap.as_raw_fd();
        hv.add_net(TapDevice::Fd(tap), "02:00:00:00:00:01".parse().unwrap())
            .await
            .unwrap();
        hv.start().await.unwrap();
        let pid = hv.pid().expect("running");
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !rig.path("vmm.fds").exists() {
            assert!(std::time::Instant::now() < end, "fake vmm did not run");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let sb = rig.sandbox();
        let args = std::fs::read_to_string(rig.path("vmm.args")).unwrap();
        assert_eq!(
            args.trim(),
            format!("--config {}", sb.join("vm.json").display())
        );
        let cfg: Value =
            serde_json::from_str(&std::fs::read_to_string(rig.path("vmm.json")).unwrap()).unwrap();
        assert_eq!(cfg["vcpus"], 1, "{cfg}");
        assert_eq!(cfg["cmdline"], "quiet");
        assert_eq!(cfg["sandbox_dir"], json!(sb));
        assert_eq!(cfg["control_socket"], json!(sb.join("control.sock")));
        assert_eq!(cfg["console_log"], json!(sb.join("console.log")));
        let devs = cfg["devices"].as_array().unwrap();
        assert_eq!(devs[0]["kind"], "rng");
        assert_eq!(devs[1]["kind"], "vsock");
        assert_eq!(devs[1]["uds_path"], json!(sb.join("vsock.sock")));
        assert_eq!(devs[2]["kind"], "fs");
        assert_eq!(devs[2]["tag"], "rootfs");
        assert_eq!(devs[2]["socket_path"], json!(sb.join("fs-rootfs.sock")));
        assert_eq!(devs[3]["kind"], "net");
        assert_eq!(devs[3]["tap_fd"], tap_fd);
        assert_eq!(devs[3]["mac"], "02:00:00:00:00:01");
        let fds = std::fs::read_to_string(rig.path("vmm.fds")).unwrap();
        assert!(
            fds.lines().any(|l| l == tap_fd.to_string()),
            "tap fd {tap_fd} not inherited: {fds}"
        );
        assert!(std::fs::read_to_string(sb.join("boxlite-vmm.pid"))
            .unwrap()
            .starts_with(&pid.to_string()));
        hv.check_alive().await.unwrap();

        hv.kill().await.unwrap();
        assert!(!pid_alive(pid));
        assert_eq!(rig.leftovers(), Vec::<String>::new());
        assert!(hv.pid().is_none());
    }

    #[tokio::test]
    async fn missing_vmm_binary_fails_before_spawning() {
        let rig = Rig::new();
        let hv =
            BuiltinHypervisor::new(rig.spec(), bins(rig.path("nope"), rig.path("nope2"))).unwrap();
        let err = hv.start().await.unwrap_err().to_string();
        assert!(err.contains("hypervisor.vmm_binary"), "{err}");
        assert!(!rig.sandbox().exists());
    }

    #[tokio::test]
    async fn vmm_dying_early_is_reported_with_its_log() {
        let rig = Rig::new();
        let vmm = rig.script(
            "boxlite-vmm",
            "echo 'ERROR Jail setup failed: landlock' >&2; exit 5",
        );
        let hv = BuiltinHypervisor::new(rig.spec(), bins(vmm, rig.path("nope"))).unwrap();
        hv.start().await.unwrap();
        let started = std::time::Instant::now();
        let err = hv.wait_ready().await.unwrap_err().to_string();
        assert!(started.elapsed() < Duration::from_secs(2), "fails fast");
        assert!(err.contains("boxlite-vmm"), "{err}");
        assert!(err.contains("exit status: 5"), "{err}");
        assert!(err.contains("Jail setup failed"), "{err}");
        hv.stop().await.unwrap();
        assert_eq!(rig.leftovers(), Vec::<String>::new());
    }

    #[tokio::test]
    async fn stop_falls_back_to_the_control_socket() {
        let rig = Rig::new();
        // A VMM that serves the control socket (python3) but whose guest
        // agent never answers.
        let vmm = rig.script(
            "boxlite-vmm",
            &format!(
                r#"exec python3 - "$2" <<'EOF'
import json, os, socket, sys
cfg = json.load(open(sys.argv[1]))
s = socket.socket(socket.AF_UNIX); s.bind(cfg["control_socket"]); s.listen(1)
c, _ = s.accept()
req = json.loads(c.makefile().readline())
open("{marker}", "w").write(req["op"])
c.sendall(b'{{"ok":true,"state":"stopping","exit_code":0}}\n')
os.unlink(cfg["control_socket"])
EOF"#,
                marker = rig.path("control.op").display()
            ),
        );
        let hv = BuiltinHypervisor::new(rig.spec(), bins(vmm, rig.path("nope"))).unwrap();
        hv.start().await.unwrap();
        let pid = hv.pid().unwrap();
        let end = std::time::Instant::now() + Duration::from_secs(5);
        while !rig.sandbox().join(CONTROL_SOCKET).exists() {
            assert!(std::time::Instant::now() < end, "control socket");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let started = std::time::Instant::now();
        hv.stop().await.unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(
            std::fs::read_to_string(rig.path("control.op")).unwrap(),
            "shutdown"
        );
        assert!(!pid_alive(pid));
        assert_eq!(rig.leftovers(), Vec::<String>::new());
        // Idempotent.
        hv.stop().await.unwrap();
        hv.kill().await.unwrap();
    }

    #[tokio::test]
    async fn drop_kills_everything() {
        let rig = Rig::new();
        let hv =
            BuiltinHypervisor::new(rig.spec(), bins(fake_vmm(&rig), fake_virtiofsd(&rig))).unwrap();
        let share = rig.path("share");
        std::fs::create_dir(&share).unwrap();
        hv.add_share("s0", &share, false).await.unwrap();
        hv.start().await.unwrap();
        let pid = hv.pid().unwrap();
        assert!(hv.add_share("s1", &share, false).await.is_err());
        drop(hv);
        assert!(!pid_alive(pid));
        assert_eq!(rig.leftovers(), Vec::<String>::new());
    }
}
