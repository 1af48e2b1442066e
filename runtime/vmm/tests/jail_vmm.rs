//! The jail of the `boxlite-vmm` binary, seen from outside (root + /dev/kvm):
//! a forbidden syscall in a jailed thread kills the process with SIGSYS,
//! landlock denies files outside the allowed set, the VMM enters the cgroup
//! it is given, and `--no-jail` says loudly that it is off.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};

use boxlite_vmm::config::{
    CpuMode, DeviceConfig, RawImageConfig, TestHooks, VmConfig, VsockConfig,
};

const I8042_RESET: [u8; 4] = [0xb0, 0xfe, 0xe6, 0x64];

fn raw_image(path: PathBuf) -> Option<RawImageConfig> {
    Some(RawImageConfig {
        path,
        load_addr: 0x1000,
        mode: CpuMode::Real,
    })
}

/// Writes `<dir>/vm.json`: an i8042-reset guest with a vsock device, then
/// whatever `edit` changes.
fn config(dir: &Path, edit: impl FnOnce(&mut VmConfig)) -> PathBuf {
    let img = dir.join("guest.bin");
    std::fs::write(&img, I8042_RESET).expect("write guest");
    let mut cfg = VmConfig {
        memory_mib: 16,
        irqchip: false,
        raw_image: raw_image(img),
        console_log: Some(dir.join("console.log")),
        sandbox_dir: Some(dir.to_path_buf()),
        devices: vec![DeviceConfig::Vsock(VsockConfig {
            guest_cid: 3,
            uds_path: dir.join("vsock.sock"),
        })],
        ..VmConfig::default()
    };
    edit(&mut cfg);
    let path = dir.join("vm.json");
    std::fs::write(&path, cfg.to_json_pretty()).expect("write cfg");
    path
}

fn run(cfg: &Path, args: &[&str]) -> (ExitStatus, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_boxlite-vmm"))
        .arg("--config")
        .arg(cfg)
        .args(args)
        .output()
        .expect("run boxlite-vmm");
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn jailed_vmm_runs_and_exits_cleanly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (st, log) = run(&config(dir.path(), |_| {}), &[]);
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(log.contains("jail applied"), "{log}");
    assert!(
        log.contains("seccomp filters loaded on every thread"),
        "{log}"
    );
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn forbidden_syscall_in_a_jailed_thread_kills_with_sigsys() {
    // getppid is in no profile; ioctl is, but only for the requests the VMM
    // makes (KVM_RUN, TUNSETOFFLOAD, FIONBIO, …), not TCGETS.
    for hook in ["forbidden_syscall", "forbidden_ioctl"] {
        for kind in ["vmm", "vcpu"] {
            let dir = tempfile::tempdir().expect("tempdir");
            let cfg = config(dir.path(), |c| {
                let mut hooks = TestHooks::default();
                match hook {
                    "forbidden_syscall" => hooks.forbidden_syscall = Some(kind.into()),
                    _ => hooks.forbidden_ioctl = Some(kind.into()),
                }
                c.test_hooks = Some(hooks);
            });
            let (st, log) = run(&cfg, &[]);
            assert_eq!(
                st.signal(),
                Some(libc::SIGSYS),
                "{hook} {kind}: {st:?} {log}"
            );
            assert!(log.contains("making a forbidden syscall"), "{log}");
            assert!(!log.contains("was allowed"), "{log}");
        }
    }
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn no_jail_switch_turns_it_off_loudly() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The forbidden syscall is harmless without the jail.
    let cfg = config(dir.path(), |c| {
        c.test_hooks = Some(TestHooks {
            forbidden_syscall: Some("vmm".into()),
            ..TestHooks::default()
        })
    });
    let (st, log) = run(&cfg, &["--no-jail"]);
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(log.contains("JAIL DISABLED"), "{log}");
    let cfg = config(dir.path(), |c| c.jail = false);
    let (st, log) = run(&cfg, &[]);
    assert_eq!(st.code(), Some(0), "{log}");
    assert!(log.contains("JAIL DISABLED"), "{log}");
}

#[test]
#[ignore = "needs root + /dev/kvm"]
fn landlock_denies_files_outside_the_allowed_set() {
    let outside = tempfile::tempdir().expect("tempdir");
    let secret = outside.path().join("secret");
    std::fs::write(&secret, "x").expect("write");
    let dir = tempfile::tempdir().expect("tempdir");
    let inside = dir.path().join("state.json");
    std::fs::write(&inside, "{}").expect("write");
    for (path, want) in [(&secret, "PermissionDenied"), (&inside, "Ok(())")] {
        let cfg = config(dir.path(), |c| {
            c.test_hooks = Some(TestHooks {
                open_after_landlock: Some(path.clone()),
                ..TestHooks::default()
            })
        });
        let (st, log) = run(&cfg, &[]);
        assert_eq!(st.code(), Some(0), "{log}");
        let line = log
            .lines()
            .find(|l| l.contains("test hook: open after landlock"))
            .unwrap_or_else(|| panic!("no hook line: {log}"));
        assert!(line.contains(want), "{path:?}: {line}");
    }
}

#[test]
#[ignore = "needs root + /dev/kvm + cgroup v2"]
fn vmm_enters_the_cgroup_it_is_given() {
    let root = ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.join("cgroup.procs").exists() && p.join("cgroup.controllers").exists())
        .expect("a cgroup v2 mount");
    let cg = root.join(format!("boxlite-jail-test-{}", std::process::id()));
    std::fs::create_dir(&cg).expect("create cgroup");
    let dir = tempfile::tempdir().expect("tempdir");
    // A guest that spins, so the VMM is alive while we look.
    let img = dir.path().join("spin.bin");
    std::fs::write(&img, [0xeb, 0xfe]).expect("write");
    let cfg = config(dir.path(), |c| {
        c.cgroup = Some(cg.clone());
        c.control_socket = Some(dir.path().join("control.sock"));
        c.raw_image = raw_image(img);
    });
    let mut child = Command::new(env!("CARGO_BIN_EXE_boxlite-vmm"))
        .arg("--config")
        .arg(&cfg)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    let pid = child.id().to_string();
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let procs = std::fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
        if procs.lines().any(|l| l == pid) {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "pid {pid} never entered {cg:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    std::fs::remove_dir(&cg).expect("remove cgroup");

    // A cgroup that cannot be entered is a jail error (exit code 5).
    let cfg = config(dir.path(), |c| c.cgroup = Some(dir.path().to_path_buf()));
    let out = Command::new(env!("CARGO_BIN_EXE_boxlite-vmm"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .expect("run");
    assert_eq!(
        out.status.code(),
        Some(5),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
