//! The qemu backend against fake binaries (shell scripts): command line,
//! preflight checks, start order, failures and cleanup.

use super::*;
use crate::config::ResolvedBackend;
use crate::hypervisor::test_rig::{assert_stops_in_time, Bins, Rig};
use crate::hypervisor::Hypervisor;
use boxlite_test_support::fake_bin::{listen_and_sleep, pid_alive};
use std::fs::File;
use std::time::Duration;

/// The fds a command line is rendered with (nothing is opened).
fn fds(shares: usize) -> QemuFds {
    QemuFds {
        console: 7,
        kernel: 5,
        initramfs: 6,
        vhost_vsock: 10,
        fs: (0..shares).map(|i| 11 + i as RawFd).collect(),
        qmp: 20,
    }
}

fn bins(qemu: PathBuf, vhost_vsock: PathBuf, virtiofsd: PathBuf) -> ResolvedHypervisor {
    let vmm = "boxlite-vmm".into();
    Bins {
        qemu,
        virtiofsd,
        vhost_vsock,
        vmm,
    }
    .resolve(ResolvedBackend::Qemu, ResolvedAccel::Tcg)
}

/// A helper that creates the socket named after `flag` and sleeps. With
/// `--socket-path` (virtiofsd) it also writes `<socket>.pid`, as virtiofsd
/// does.
fn fake_helper(rig: &Rig, name: &str, flag: &str) -> PathBuf {
    rig.socket_helper(name, flag, flag == "--socket-path")
}

#[test]
fn qemu_command_line() {
    let rig = Rig::new();
    let bins = bins("/q".into(), "/v".into(), "/f".into());
    let mut spec = rig.spec();
    spec.vcpus = 2;
    spec.memory_mib = 256;
    let vm = QemuHypervisor::new(spec, bins).unwrap();
    let shares = vec![Share {
        tag: "rootfs".into(),
        host_dir: "/srv/x".into(),
        read_only: false,
    }];
    let net_fd = NetDevice {
        tap: TapDevice::Fd(File::open("/dev/null").unwrap().into()),
        mac: "02:00:00:00:00:01".parse().unwrap(),
    };
    let net_name = NetDevice {
        tap: TapDevice::Name("tap0".into()),
        mac: "02:00:00:00:00:02".parse().unwrap(),
    };
    let args = vm.qemu_args(&shares, &[(Some(42), &net_fd), (None, &net_name)], &fds(1));
    let line = render_cmdline(Path::new("qemu-system-x86_64"), &args);
    let expected =         "qemu-system-x86_64 -name boxlite-sb1 -M microvm,acpi=off,memory-backend=mem \
         -accel tcg -cpu max -smp 2 -m 256M \
         -object memory-backend-memfd,id=mem,size=256M,share=on \
         -nodefaults -no-user-config -nographic -no-reboot \
         -sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny \
         -chardev file,id=console,path=/dev/fd/7 -serial chardev:console \
         -kernel /dev/fd/5 -initrd /dev/fd/6 -append 'console=ttyS0 reboot=t panic=-1 no_timer_check loglevel=5 quiet' \
         -device virtio-rng-device \
         -chardev socket,id=vsock,fd=10 -device vhost-user-vsock-device,chardev=vsock \
         -chardev socket,id=fs0,fd=11 -device vhost-user-fs-device,chardev=fs0,tag=rootfs \
         -netdev tap,id=net0,fd=42 -device virtio-net-device,netdev=net0,mac=02:00:00:00:00:01 \
         -netdev tap,id=net1,ifname=tap0,script=no,downscript=no -device virtio-net-device,netdev=net1,mac=02:00:00:00:00:02 \
         -device virtio-balloon-device,deflate-on-oom=on,free-page-reporting=on \
         -chardev socket,id=qmp,fd=20 -mon chardev=qmp,mode=control";
    assert_eq!(line, expected);
}

#[test]
fn kvm_uses_the_host_cpu() {
    let rig = Rig::new();
    let mut bins = bins("/q".into(), "/v".into(), "/f".into());
    bins.accel = ResolvedAccel::Kvm;
    let vm = QemuHypervisor::new(rig.spec(), bins).unwrap();
    let line = render_cmdline(Path::new("q"), &vm.qemu_args(&[], &[], &fds(0)));
    assert!(line.contains("-accel kvm -cpu host"), "{line}");
}

#[tokio::test]
async fn missing_kernel_fails_before_spawning() {
    let rig = Rig::new();
    let marker = rig.path("spawned");
    let bin = rig.script("bin", &format!(": > {}", marker.display()));
    let mut spec = rig.spec();
    spec.kernel = rig.path("no-vmlinux");
    let vm = QemuHypervisor::new(spec, bins(bin.clone(), bin.clone(), bin)).unwrap();
    let err = vm.start().await.unwrap_err().to_string();
    assert!(
        err.contains(&rig.path("no-vmlinux").display().to_string()),
        "{err}"
    );
    assert!(err.contains("guest.kernel"), "{err}");
    assert!(!marker.exists());
    assert!(!rig.sandbox().exists(), "nothing created");
    // A preflight failure leaves the VM unstarted: a retry checks again.
    let err = vm.start().await.unwrap_err().to_string();
    assert!(err.contains("guest.kernel"), "{err}");
}

#[tokio::test]
async fn missing_initramfs_and_share_dir_are_named() {
    let rig = Rig::new();
    let bin = rig.script("bin", "exit 0");
    let mut spec = rig.spec();
    spec.initramfs = rig.path("no-initramfs");
    let vm = QemuHypervisor::new(spec, bins(bin.clone(), bin.clone(), bin.clone())).unwrap();
    let err = vm.start().await.unwrap_err().to_string();
    assert!(err.contains("guest.initramfs"), "{err}");

    let vm = QemuHypervisor::new(rig.spec(), bins(bin.clone(), bin.clone(), bin)).unwrap();
    vm.add_share("rootfs", &rig.path("nope"), false)
        .await
        .unwrap();
    let err = vm.start().await.unwrap_err().to_string();
    assert!(err.contains("share \"rootfs\""), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

#[tokio::test]
async fn missing_binary_fails_before_spawning() {
    let rig = Rig::new();
    let marker = rig.path("spawned");
    let bin = rig.script("bin", &format!(": > {}", marker.display()));
    let vm = QemuHypervisor::new(rig.spec(), bins(rig.path("no-qemu"), bin.clone(), bin)).unwrap();
    let err = vm.start().await.unwrap_err().to_string();
    assert!(err.contains("hypervisor.qemu_binary"), "{err}");
    assert!(err.contains("no-qemu"), "{err}");
    assert!(!marker.exists());
}

#[tokio::test]
async fn socket_paths_are_bounded() {
    let rig = Rig::new();
    let bin = rig.script("bin", "exit 0");
    let mut spec = rig.spec();
    spec.dir = rig.path(&"d".repeat(100));
    let vm = QemuHypervisor::new(spec, bins(bin.clone(), bin.clone(), bin)).unwrap();
    let err = vm.start().await.unwrap_err().to_string();
    assert!(err.contains("unix socket limit of 107"), "{err}");
}

#[tokio::test]
async fn helper_dying_at_start_is_reported_and_cleaned_up() {
    let rig = Rig::new();
    let marker = rig.path("qemu-ran");
    let qemu = rig.script("qemu", &format!(": > {}", marker.display()));
    let vsock = rig.script("vsock", "echo 'error: cannot bind socket' >&2; exit 3");
    let fs = fake_helper(&rig, "fs", "--socket-path");
    let vm = QemuHypervisor::new(rig.spec(), bins(qemu, vsock, fs)).unwrap();
    vm.add_share("rootfs", rig.root(), true).await.unwrap();
    let err = vm.start().await.unwrap_err().to_string();
    assert!(
        err.contains("the vsock backend exited with exit status: 3"),
        "{err}"
    );
    assert!(err.contains("vsock-backend.log"), "{err}");
    assert!(err.contains("cannot bind socket"), "{err}");
    assert!(!marker.exists(), "qemu must not start");
    assert_eq!(rig.leftovers(), Vec::<String>::new());
    assert_eq!(vm.pid(), None);
    // The fake virtiofsd was killed and reaped.
    let err = vm.start().await.unwrap_err().to_string();
    assert!(
        err.contains("cannot start while the VM is stopped"),
        "{err}"
    );
}

#[tokio::test]
async fn qemu_dying_early_fails_wait_ready_fast() {
    let rig = Rig::new();
    let qemu = rig.script("qemu", "echo 'qemu: could not load kernel' >&2; exit 1");
    let vsock = fake_helper(&rig, "vsock", "--socket");
    let fs = fake_helper(&rig, "fs", "--socket-path");
    let vm = QemuHypervisor::new(rig.spec(), bins(qemu, vsock, fs)).unwrap();
    vm.add_share("rootfs", rig.root(), false).await.unwrap();
    vm.start().await.unwrap();
    let helper_pids: Vec<u32> = {
        let st = vm.state.lock().await;
        st.procs.iter().map(|p| p.pid).collect()
    };
    assert_eq!(helper_pids.len(), 3);
    assert_eq!(
        rig.leftovers(),
        [
            "fs-rootfs.sock",
            "fs-rootfs.sock.pid",
            "qemu.pid",
            "vhost-vsock.sock",
            "virtiofsd-rootfs.pid",
            "vsock-backend.pid"
        ]
    );
    let started = std::time::Instant::now();
    let err = vm.wait_ready().await.unwrap_err().to_string();
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert!(err.contains("qemu (pid"), "{err}");
    assert!(
        err.contains("exited unexpectedly with exit status: 1"),
        "{err}"
    );
    assert!(err.contains("could not load kernel"), "{err}");
    assert!(
        err.contains(&format!(
            "console log: {}",
            rig.sandbox().join("console.log").display()
        )),
        "{err}"
    );
    vm.stop().await.unwrap();
    assert_eq!(rig.leftovers(), Vec::<String>::new());
    for pid in helper_pids {
        assert!(!pid_alive(pid), "pid {pid} left behind");
    }
    // Logs stay.
    assert!(rig.sandbox().join("qemu.log").exists());
}

#[tokio::test]
async fn wait_ready_times_out_naming_sandbox_port_and_console() {
    let rig = Rig::new();
    let qemu = rig.script("qemu", "exec sleep 30");
    let vsock = fake_helper(&rig, "vsock", "--socket");
    let vm = QemuHypervisor::new(rig.spec(), bins(qemu, vsock.clone(), vsock)).unwrap();
    vm.start().await.unwrap();
    let pid = vm.pid().unwrap();
    let started = std::time::Instant::now();
    let err = vm.wait_ready().await.unwrap_err().to_string();
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_secs(3), "{elapsed:?}");
    assert!(
        err.starts_with(&format!(
            "sandbox sb1: the agent did not announce itself on vsock port 1027 ({}) within 2s",
            rig.sandbox().join("vsock.sock_1027").display()
        )),
        "{err}"
    );
    assert!(
        err.ends_with(&format!(
            "console log: {}",
            rig.sandbox().join("console.log").display()
        )),
        "{err}"
    );
    // stop: no agent to ask, QEMU does not exit by itself → killed after
    // the 1 s shutdown timeout.
    assert_stops_in_time(&vm).await;
    assert!(!pid_alive(pid));
    assert_eq!(vm.pid(), None);
    assert_eq!(rig.leftovers(), Vec::<String>::new());
    vm.stop().await.unwrap();
    vm.kill().await.unwrap();
}

#[tokio::test]
async fn kill_and_drop_leave_nothing_behind() {
    let rig = Rig::new();
    let qemu = rig.script("qemu", "exec sleep 30");
    let vsock = fake_helper(&rig, "vsock", "--socket");
    let vm =
        QemuHypervisor::new(rig.spec(), bins(qemu.clone(), vsock.clone(), vsock.clone())).unwrap();
    vm.start().await.unwrap();
    let pid = vm.pid().unwrap();
    vm.kill().await.unwrap();
    assert!(!pid_alive(pid));
    assert_eq!(rig.leftovers(), Vec::<String>::new());

    let vm = QemuHypervisor::new(rig.spec(), bins(qemu, vsock.clone(), vsock)).unwrap();
    vm.start().await.unwrap();
    let pids: Vec<u32> = vm.state.lock().await.procs.iter().map(|p| p.pid).collect();
    drop(vm);
    for pid in pids {
        assert!(!pid_alive(pid), "pid {pid} left behind");
    }
    assert_eq!(rig.leftovers(), Vec::<String>::new());
}

#[tokio::test]
async fn qemu_starts_unprivileged_with_its_files_inherited_and_the_vsock_backend_jails_itself() {
    let rig = Rig::new();
    // The fake QEMU records its credentials and what its fds point at;
    // written to a temp file and renamed, so the test never reads half.
    let seen = rig.path("qemu-seen");
    let qemu = rig.script(
        "qemu",
        &format!(
            r#"{{ id -u; id -g; id -G; readlink /proc/$$/ns/net /proc/$$/ns/ipc /proc/$$/ns/uts; for f in /proc/$$/fd/*; do readlink "$f"; done; }} > {s}.tmp
mv {s}.tmp {s}; exec sleep 30"#,
            s = seen.display()
        ),
    );
    // Named as ours, the vsock backend is told to jail itself.
    let vsock_args = rig.path("vsock-args");
    let vsock = rig.script(
        "boxlite-vsock",
        &format!(
            r#"echo "$@" > {}
while [ $# -gt 0 ]; do case "$1" in --socket) shift; s="$1";; esac; shift; done
{}"#,
            vsock_args.display(),
            listen_and_sleep("$s")
        ),
    );
    let virtiofsd = fake_helper(&rig, "virtiofsd", "--socket-path");
    let vm = QemuHypervisor::new(rig.spec(), bins(qemu, vsock, virtiofsd)).unwrap();
    vm.add_share("rootfs", rig.root(), false).await.unwrap();
    vm.start().await.unwrap();
    let uid = rig.spec().jail_ids.range.home("sb1");
    assert_eq!(rig.jail_leases(), [uid]);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !seen.exists() {
        assert!(std::time::Instant::now() < deadline, "QEMU never ran");
        std::thread::sleep(Duration::from_millis(20));
    }
    let seen = std::fs::read_to_string(&seen).unwrap();
    let lines: Vec<&str> = seen.lines().collect();
    // uid, gid, and no other group under TCG.
    assert_eq!(
        lines[..3],
        [uid.to_string(), uid.to_string(), uid.to_string()]
    );
    // The boot files it reopens by /dev/fd, and a connection to each
    // helper's socket (not their paths).
    assert!(
        lines.contains(&&*rig.path("vmlinux").display().to_string()),
        "{seen}"
    );
    assert!(
        lines.contains(&&*rig.path("initramfs").display().to_string()),
        "{seen}"
    );
    let sockets = lines.iter().filter(|l| l.starts_with("socket:")).count();
    assert_eq!(sockets, 3, "vsock, one share and QMP: {seen}");
    let args = std::fs::read_to_string(&vsock_args).unwrap();
    assert!(
        args.contains(&format!("--host-port 1027 --jail-user {uid}:{uid}")),
        "{args}"
    );
    // Neither needs a path of the sandbox directory: it stays root's alone.
    let dir = std::fs::metadata(rig.sandbox()).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!((dir.uid(), dir.gid(), dir.mode() & 0o777), (0, 0, 0o700));
    vm.kill().await.unwrap();
    assert_eq!(rig.jail_leases(), Vec::<u32>::new(), "released");
}

#[tokio::test]
async fn tap_fd_reaches_qemu_only() {
    let rig = Rig::new();
    // Each fake records what its fds point at. Compared by target, not by
    // number: fd numbers of other open files in a forked shell can equal
    // the tap's number in this process, which made a number check flaky.
    // Written to a temp file and renamed, so the test never reads a
    // half-written list.
    let record = |out: &Path| {
        format!(
            "for f in /proc/$$/fd/*; do readlink \"$f\"; done > {out}.tmp; mv {out}.tmp {out}",
            out = out.display()
        )
    };
    let fds_file = rig.path("qemu-fds");
    let qemu = rig.script("qemu", &format!("{}; exec sleep 30", record(&fds_file)));
    let helper_fds = rig.path("helper-fds");
    let vsock = rig.script(
        "vsock",
        &format!(
            r#"{}
while [ $# -gt 0 ]; do case "$1" in --socket) shift; s="$1";; esac; shift; done
{}"#,
            record(&helper_fds),
            listen_and_sleep("$s")
        ),
    );
    let vm = QemuHypervisor::new(rig.spec(), bins(qemu, vsock.clone(), vsock)).unwrap();
    // A stand-in for the tap: a file with a name nothing else has open.
    let fake_tap = rig.path("fake-tap");
    let tap: std::os::fd::OwnedFd = File::create(&fake_tap).unwrap().into();
    let target = fake_tap.display().to_string();
    vm.add_net(TapDevice::Fd(tap), "02:00:00:00:00:01".parse().unwrap())
        .await
        .unwrap();
    vm.start().await.unwrap();
    let read_targets = |file: &Path| -> Vec<String> {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !file.exists() || std::fs::read_to_string(file).unwrap().is_empty() {
            assert!(
                std::time::Instant::now() < deadline,
                "{} not written",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::fs::read_to_string(file)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    };
    let fds = read_targets(&fds_file);
    assert!(fds.contains(&target), "qemu fds {fds:?}, tap {target}");
    let helper = read_targets(&helper_fds);
    assert!(
        !helper.contains(&target),
        "helper fds {helper:?}, tap {target}"
    );
    vm.kill().await.unwrap();
}

#[tokio::test]
async fn shares_and_nets_only_before_start() {
    let rig = Rig::new();
    let qemu = rig.script("qemu", "exec sleep 30");
    let vsock = fake_helper(&rig, "vsock", "--socket");
    let vm = QemuHypervisor::new(rig.spec(), bins(qemu, vsock.clone(), vsock)).unwrap();
    let err = vm.add_share("a,b", rig.root(), false).await.unwrap_err();
    assert!(err.to_string().contains("','"), "{err}");
    vm.add_share("a", rig.root(), false).await.unwrap();
    let err = vm.add_share("a", rig.root(), false).await.unwrap_err();
    assert!(err.to_string().contains("already added"), "{err}");
    let err = vm
        .add_share("b", Path::new("rel"), false)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("not an absolute path"), "{err}");
    let err = vm
        .add_net(
            TapDevice::Name("tap,0".into()),
            "02:00:00:00:00:01".parse().unwrap(),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tap name"), "{err}");
    vm.kill().await.unwrap();
    let err = vm.add_share("c", rig.root(), false).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("cannot add a share while the VM is stopped"),
        "{err}"
    );
}

#[test]
fn free_page_reporting_follows_the_config() {
    let rig = Rig::new();
    for (reporting, held, want) in [
        (true, 0, "deflate-on-oom=on,free-page-reporting=on"),
        (false, 0, "deflate-on-oom=on,free-page-reporting=off"),
        // Room to grow held from boot is not the guest's to take on OOM.
        (true, 512, "deflate-on-oom=off,free-page-reporting=on"),
    ] {
        let mut spec = rig.spec();
        spec.free_page_reporting = reporting;
        spec.balloon_mib = held;
        let vm = QemuHypervisor::new(spec, bins("/q".into(), "/v".into(), "/f".into())).unwrap();
        let line = render_cmdline(Path::new("q"), &vm.qemu_args(&[], &[], &fds(0)));
        let balloon = line
            .split(' ')
            .find(|a| a.starts_with("virtio-balloon-device"))
            .unwrap();
        assert_eq!(balloon, format!("virtio-balloon-device,{want}"), "{line}");
    }
}

#[tokio::test]
async fn a_qmp_session_that_failed_once_is_not_used_again() {
    let rig = Rig::new();
    let vm = VmSetup {
        spec: rig.spec(),
        virtiofsd_binary: "/f".into(),
    };
    let launcher = QemuLauncher {
        bins: bins("/q".into(), "/v".into(), "/f".into()),
        qmp: Arc::new(Mutex::new(Err("QEMU has not started".to_owned()))),
        balloon_target_mib: Arc::default(),
    };
    let err = launcher.balloon(&vm, None).await.unwrap_err().to_string();
    assert_eq!(err, "sandbox sb1: the VM's balloon: QEMU has not started");
    // A QEMU that has closed its end: the first exchange fails with why,
    // every later one says the session is gone and why.
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    drop(theirs);
    *launcher.qmp.lock().unwrap() = Ok(Qmp::new(ours));
    let err = launcher
        .balloon(&vm, Some(64))
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "sandbox sb1: the VM's balloon: QMP: QEMU closed the monitor"
    );
    let err = launcher.balloon(&vm, None).await.unwrap_err().to_string();
    assert_eq!(
        err,
        "sandbox sb1: the VM's balloon: an earlier QMP exchange failed \
         (QMP: QEMU closed the monitor)"
    );
}
