//! Helpers shared by the integration tests that build a VM config.

use std::path::Path;

use boxlite_vmm::config::{CpuMode, DeviceConfig, RawImageConfig, VmConfig};

/// A 16 MiB real-mode `raw_image` guest without irqchip whose code is
/// `code` (written to `<dir>/guest.bin`, loaded at 0x1000), with `devices`.
/// Not validated.
#[allow(dead_code)] // not every test binary builds a VM
pub fn raw_config(dir: &Path, code: &[u8], devices: Vec<DeviceConfig>) -> VmConfig {
    let img = dir.join("guest.bin");
    std::fs::write(&img, code).expect("write guest");
    VmConfig {
        memory_mib: 16,
        irqchip: false,
        devices,
        raw_image: Some(RawImageConfig {
            path: img,
            load_addr: 0x1000,
            mode: CpuMode::Real,
        }),
        sandbox_dir: Some(dir.to_path_buf()),
        ..VmConfig::default()
    }
}

/// Writes `cfg` as `<dir>/vm.json` (the way the runtime writes it) and
/// returns the path.
#[allow(dead_code)] // not every test binary starts the VMM
pub fn write_config(dir: &Path, cfg: &VmConfig) -> std::path::PathBuf {
    let path = dir.join("vm.json");
    std::fs::write(&path, cfg.to_json_pretty()).expect("write vm.json");
    path
}

/// Starts the `boxlite-vmm` binary on `cfg` (written to `<dir>/vm.json`,
/// its stderr to `<dir>/vmm.log`) and waits up to 10 s for the control
/// socket the config names.
#[allow(dead_code)] // not every test binary uses the control socket
pub fn spawn_with_control(dir: &Path, cfg: &VmConfig) -> std::process::Child {
    use std::time::{Duration, Instant};
    let ctl = cfg.control_socket.clone().expect("a control_socket");
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_boxlite-vmm"))
        .arg("--config")
        .arg(write_config(dir, cfg))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("vmm.log")).expect("log"))
        .spawn()
        .expect("spawn boxlite-vmm");
    let end = Instant::now() + Duration::from_secs(10);
    while !ctl.exists() {
        assert!(
            Instant::now() < end,
            "control socket never appeared; VMM log:\n{}",
            std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// `Name:\tvalue` from `/proc/<pid>/status`.
#[allow(dead_code)] // not every test binary looks at processes
pub fn status_field(pid: u32, name: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

#[allow(dead_code)]
pub fn same_namespace(pid: u32, ns: &str) -> bool {
    let ours = std::fs::read_link(format!("/proc/self/ns/{ns}")).expect("our ns");
    std::fs::read_link(format!("/proc/{pid}/ns/{ns}")).expect("its ns") == ours
}

/// The jailed process behind the one the test spawned: its only child
/// (pid 1 of its own pid namespace), once its seccomp filter is on.
#[allow(dead_code)]
pub fn jailed_child(parent: u32) -> u32 {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if let [child] = boxlite_vmm_api::process::vm_pids(parent)[..] {
            if status_field(child, "Seccomp") == "2" {
                return child;
            }
        }
        assert!(
            std::time::Instant::now() < end,
            "no jailed child of {parent}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

/// Checks what every jailed process of ours is: `user`'s uid and gid in
/// every slot, no supplementary group, every capability set empty,
/// `no_new_privs`, pid 1 of its own pid namespace, mount, net, pid, ipc
/// and uts namespaces not the host's, and an empty root (it uses no path
/// once jailed).
#[allow(dead_code)]
pub fn assert_jailed(pid: u32, user: boxlite_vmm::config::JailUser) {
    for (field, want) in [("Uid", user.uid), ("Gid", user.gid)] {
        let want = want.to_string();
        let ids = status_field(pid, field);
        assert_eq!(
            ids.split_whitespace().collect::<Vec<_>>(),
            [&*want; 4],
            "{field}"
        );
    }
    assert_eq!(status_field(pid, "Groups"), "");
    for caps in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(pid, caps), "0000000000000000", "{caps}");
    }
    assert_eq!(status_field(pid, "NoNewPrivs"), "1");
    assert_eq!(
        status_field(pid, "NSpid").split_whitespace().last(),
        Some("1")
    );
    for ns in ["mnt", "net", "pid", "ipc", "uts"] {
        assert!(
            !same_namespace(pid, ns),
            "{ns} namespace shared with the host"
        );
    }
    let root = std::path::PathBuf::from(format!("/proc/{pid}/root"));
    let entries: Vec<_> = std::fs::read_dir(&root)
        .expect("its root")
        .map(|e| e.map(|e| e.file_name()))
        .collect();
    assert!(entries.is_empty(), "its root holds {entries:?}");
}

/// What the escape tests try to reach from inside a jail: a listening host
/// socket, a host file, a host directory, a host process; and, once the
/// tries are over, the proof none of it was reached.
#[allow(dead_code)]
pub struct EscapeTargets {
    host: tempfile::TempDir,
    listener: std::os::unix::net::UnixListener,
    bystander: std::process::Child,
}

#[allow(dead_code)]
impl EscapeTargets {
    pub fn new() -> Self {
        let host = tempfile::tempdir().expect("tempdir");
        let listener =
            std::os::unix::net::UnixListener::bind(host.path().join("host.sock")).expect("bind");
        std::fs::write(host.path().join("secret"), "x").expect("write");
        let bystander = std::process::Command::new("sleep")
            .arg("600")
            .spawn()
            .expect("sleep");
        EscapeTargets {
            host,
            listener,
            bystander,
        }
    }

    /// Every escape to try from a jail whose sandbox directory is
    /// `sandbox`: connect to the host socket, open the host file, create a
    /// file on the host, in the jail's own root and in the sandbox
    /// directory, signal the host process (pid 1 in the jail's namespace
    /// is the jailed process itself; the host's init has no pid it can
    /// name), make an AF_INET socket.
    pub fn probes(&self, sandbox: &Path) -> Vec<boxlite_vmm::config::EscapeProbe> {
        use boxlite_vmm::config::EscapeProbe;
        vec![
            EscapeProbe::ConnectUnix {
                path: self.host.path().join("host.sock"),
            },
            EscapeProbe::OpenFile {
                path: self.host.path().join("secret"),
            },
            EscapeProbe::CreateFile {
                path: self.host.path().join("written"),
            },
            EscapeProbe::CreateFile {
                path: "/escaped".into(),
            },
            EscapeProbe::CreateFile {
                path: sandbox.join("written"),
            },
            EscapeProbe::Signal {
                pid: self.bystander.id() as i32,
            },
            EscapeProbe::InetSocket,
        ]
    }

    /// Nothing connected to the host socket, no file appeared on the host
    /// or in `sandbox`, the host process lives (then it is ended).
    pub fn assert_untouched(mut self, sandbox: &Path) {
        assert!(
            self.listener.set_nonblocking(true).is_ok() && self.listener.accept().is_err(),
            "nothing connected to the host socket"
        );
        assert!(!self.host.path().join("written").exists());
        assert!(!sandbox.join("written").exists());
        assert_eq!(
            self.bystander.try_wait().expect("wait"),
            None,
            "bystander alive"
        );
        let _ = self.bystander.kill();
        let _ = self.bystander.wait();
    }
}
