//! The shim binary (`containerd-shim-boxlite-v2`) against a real containerd
//! 1.6 and on its own (`start` grouping, `delete` after a crash).
//!
//! `#[ignore]`d: they need root (mounts, /run/containerd/s), and the
//! containerd test also `containerd`, `ctr`, QEMU, virtiofsd,
//! boxlite-vsock and the guest assets. Build the shim first, then:
//!
//! ```text
//! cargo build -p containerd-shim-boxlite-v2
//! cargo test -p boxlite-tests --test shim_containerd -- --ignored --test-threads=1
//! ```
//!
//! Each test runs a private containerd (its own config, root, state and
//! socket in a temp dir) — never the system's.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use boxlite_tests::containerd::{
    left_in_state_dir, mounts_under, shim_binary, test_backend, text, Containerd, IMAGE, RUNTIME,
    SHIM_RECORDS,
};
use boxlite_tests::oci_image::{busybox_image, run, sha256};
use boxlite_tests::{check_vm_cgroup, processes_mentioning, vm_memory_kib};

/// `ctr run --runtime io.containerd.boxlite.v2` reaches the shim, which boots
/// a VM and asks the agent to create the container; the container's output
/// and exit code reach ctr, and nothing is left behind. The guest assets
/// are `guest_assets()`'s (`BOXLITE_KERNEL` / `BOXLITE_INITRAMFS`, else
/// `build/guest/`, else `/usr/share/boxlite/`).
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn ctr_run_reaches_the_agent_through_the_shim() {
    let c = Containerd::with_image();
    let out = c.run_rm(&[], "run1", &["echo", "hello-boxlite"]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    eprintln!(
        "ctr run: status {:?}\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    // Whatever the outcome, --rm and the shim leave nothing behind.
    c.assert_nothing_left();
    let out_ls = c.ctr(&["containers", "list", "-q"]);
    assert_eq!(
        text(&out_ls.stdout).trim(),
        "",
        "ctr run --rm removed the container"
    );
    // The shim booted the VM before it asked: the agent answered.
    let log = c.log();
    assert!(
        log.contains("sandbox VM ready"),
        "no VM boot in the log:\n{log}"
    );
    c.assert_ran_on_the_test_backend();
    assert!(out.status.success(), "ctr run failed: {stderr}");
    assert_eq!(stdout, "hello-boxlite\n");
    let out = c.run_rm(&[], "run2", &["sh", "-c", "exit 7"]);
    assert_eq!(out.status.code(), Some(7), "stderr: {}", text(&out.stderr));
    c.assert_nothing_left();
}

/// The sandbox's VMM process runs under a seccomp filter from the start:
/// QEMU's `-sandbox` (qemu backend) or boxlite-vmm's own per-thread
/// filters (builtin), and without root: the jailed VM process of
/// boxlite-vmm, or QEMU and the jailed vsock backend, as the sandbox's
/// jail uid. Read from `/proc/<pid>/status` of the processes the shim
/// started for a running container.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn the_vmm_runs_under_seccomp_and_its_jail() {
    let c = Containerd::with_image();
    c.run_detached(&[], "sec1");
    let vmm: Vec<(u32, String)> = processes_mentioning(&c.state_dir().join("sec1"))
        .into_iter()
        .filter(|(_, cmd)| cmd.contains("qemu-system") || cmd.contains("boxlite-vmm"))
        .collect();
    let field = |pid: u32, name: &str| -> String {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .map(|v| v.trim().to_owned())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status:\n{status}"))
    };
    // QEMU: one process. boxlite-vmm: the process the shim spawned, which
    // only waits, and the VM process, its child in a pid namespace of its
    // own. Every one of them filtered.
    for (pid, cmd) in &vmm {
        assert_eq!(field(*pid, "Seccomp"), "2", "{cmd}: no seccomp filter");
    }
    if vmm.iter().any(|(_, cmd)| cmd.contains("boxlite-vmm")) {
        assert_eq!(vmm.len(), 2, "the waiting parent and the VM: {vmm:?}");
        let spawned: Vec<u32> = vmm.iter().map(|(pid, _)| *pid).collect();
        let vm = spawned
            .iter()
            .copied()
            .find(|pid| spawned.contains(&field(*pid, "PPid").parse().unwrap()))
            .unwrap_or_else(|| panic!("no VM process among {vmm:?}"));
        let uid = field(vm, "Uid");
        assert!(!uid.starts_with("0\t"), "the VM runs as root: {uid}");
        assert_eq!(field(vm, "CapEff"), "0000000000000000");
        assert_eq!(field(vm, "CapBnd"), "0000000000000000");
        assert_eq!(field(vm, "NSpid").split_whitespace().last(), Some("1"));
    } else {
        // QEMU: one process, as the sandbox's jail uid, no capabilities;
        // and the vsock backend jailed like boxlite-vmm (the process the
        // shim spawned waits; its child, pid 1 of its own namespace, runs).
        assert_eq!(vmm.len(), 1, "one VMM process: {vmm:?}");
        let qemu = vmm[0].0;
        let uid = field(qemu, "Uid");
        assert!(!uid.starts_with("0\t"), "QEMU runs as root: {uid}");
        assert_eq!(field(qemu, "CapEff"), "0000000000000000");
        let vsock: Vec<u32> = processes_mentioning(&c.state_dir().join("sec1"))
            .into_iter()
            .filter(|(_, cmd)| cmd.contains("boxlite-vsock"))
            .map(|(pid, _)| pid)
            .collect();
        let jailed: Vec<u32> = vsock
            .iter()
            .copied()
            .filter(|pid| field(*pid, "NSpid").split_whitespace().last() == Some("1"))
            .collect();
        assert_eq!((vsock.len(), jailed.len()), (2, 1), "{vsock:?}");
        let backend = jailed[0];
        assert_eq!(field(backend, "Seccomp"), "2");
        assert_eq!(field(backend, "CapEff"), "0000000000000000");
        assert_eq!(field(backend, "Uid"), uid, "the same jail uid as QEMU");
    }
    c.kill_and_delete("sec1");
    c.assert_nothing_left();
}

/// Every host process of the VM (the VMM and its VM process, virtiofsd,
/// the vsock backend) runs in the cgroup the container's spec names, in
/// every hierarchy, from `ctr run --cgroup` and from ctr's default
/// (`/<namespace>/<id>`); the sandbox's own cgroup is gone after delete,
/// the shared parent above it stays (as runc leaves it).
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn the_vms_processes_run_in_the_containers_cgroup() {
    let c = Containerd::with_image();
    let parent = format!("boxlite-e2e-{}", std::process::id());
    let named = format!("/{parent}/cg1");
    c.run_detached(&["--cgroup", &named], "cg1");
    c.run_detached(&[], "cg2");
    let hierarchies = boxlite_runtime::cgroup::host_hierarchies().unwrap();
    for (id, path) in [("cg1", named.clone()), ("cg2", "/default/cg2".to_owned())] {
        let procs = processes_mentioning(&c.state_dir().join(id));
        // The VMM (and, jailed, its VM process) and virtiofsd at least.
        assert!(procs.len() >= 2, "{id}: VM processes: {procs:?}");
        let pids: Vec<u32> = procs.iter().map(|(pid, _)| *pid).collect();
        for h in &hierarchies {
            let leaf = h.mount.join(path.trim_start_matches('/'));
            if let Err(e) = check_vm_cgroup(&leaf, &pids) {
                panic!("{id}: {e}; the VM's processes: {procs:?}");
            }
        }
    }
    c.kill_and_delete("cg1");
    c.kill_and_delete("cg2");
    c.assert_nothing_left();
    for h in &hierarchies {
        for leaf in [format!("{parent}/cg1"), "default/cg2".to_owned()] {
            assert!(
                !h.mount.join(&leaf).exists(),
                "{leaf} left in {}",
                h.mount.display()
            );
        }
        let shared = h.mount.join(&parent);
        assert!(shared.is_dir(), "{} was removed", shared.display());
        std::fs::remove_dir(&shared).unwrap();
    }
}

/// Density and concurrency: 20 containers started at once with `ctr run
/// -d` (each its own VM), and 2 more that fail (no such binary) started
/// with them: the 20 run and answer an exec, the 2 fail naming the binary;
/// all are deleted at once, and afterwards no process, mount, socket,
/// sandbox directory or cgroup of theirs is left.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn twenty_containers_at_once_and_nothing_left() {
    // Where 20 at once cannot run, the runner sets fewer and says why
    // (tests/nested/builtin-e2e.sh); the 20 are then reported skipped.
    let count = boxlite_tests::scaled_count(
        "BOXLITE_E2E_DENSITY",
        20,
        "twenty_containers_at_once_and_nothing_left (20 at once)",
    );
    let c = Containerd::with_image();
    // 20 guests booting at once share the host's CPUs: under TCG on two
    // cores that is minutes, not the default minute.
    c.set_config("agent_ready_secs", "300");
    let good: Vec<String> = (0..count).map(|i| format!("many{i:02}")).collect();
    let bad: Vec<String> = (0..2).map(|i| format!("fail{i}")).collect();
    let c = &c;
    std::thread::scope(|s| {
        let runs: Vec<_> = good
            .iter()
            .map(|id| {
                (
                    id,
                    s.spawn(move || {
                        c.ctr(&["run", "-d", "--runtime", RUNTIME, IMAGE, id, "sleep", "600"])
                    }),
                )
            })
            .chain(bad.iter().map(|id| {
                (
                    id,
                    s.spawn(move || {
                        c.ctr(&[
                            "run",
                            "-d",
                            "--runtime",
                            RUNTIME,
                            IMAGE,
                            id,
                            "/no/such/binary",
                        ])
                    }),
                )
            }))
            .collect();
        for (id, run) in runs {
            let out = run.join().unwrap();
            if id.starts_with("many") {
                assert!(
                    out.status.success(),
                    "ctr run -d {id}: {}",
                    text(&out.stderr)
                );
            } else {
                assert!(!out.status.success(), "{id} ran");
                assert!(
                    text(&out.stderr).contains("/no/such/binary"),
                    "{id}: {}",
                    text(&out.stderr)
                );
            }
        }
    });
    // One after the other: every VM answers. (Twenty execs at once on a
    // loaded two-core host under TCG can outlast the guest's 10 s wait for
    // an exec's stdio streams; what runs concurrently here is the create
    // and the delete.)
    for id in &good {
        let out = c.ctr(&["task", "exec", "--exec-id", "e1", id, "echo", id]);
        assert_output(&out, 0, &format!("{id}\n"), "exec");
    }
    std::thread::scope(|s| {
        for id in &good {
            s.spawn(move || c.kill_and_delete(id));
        }
    });
    for id in &bad {
        // The failed ones' container records (ctr run made them first).
        let _ = c.ctr(&["container", "delete", id]);
    }
    c.assert_nothing_left();
    let hierarchies = boxlite_runtime::cgroup::host_hierarchies().unwrap();
    for h in &hierarchies {
        for id in good.iter().chain(&bad) {
            let cg = h.mount.join("default").join(id);
            assert!(!cg.exists(), "{} left behind", cg.display());
        }
    }
}

/// Memory goes back: a container that fills and frees a 400 MiB buffer,
/// then idles — the guest reports the freed pages (virtio-balloon free page
/// reporting) and the VM's host processes drop back to within 64 MiB of
/// their idle baseline within 10 s.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn freed_guest_memory_goes_back_to_the_host() {
    let c = Containerd::with_image();
    c.set_config("memory_mib", "768");
    c.run_detached(&[], "bal1");
    let vm_mib = || {
        let procs = processes_mentioning(&c.state_dir().join("bal1"));
        vm_memory_kib(procs.iter().map(|(pid, _)| *pid)) / 1024
    };
    // Idle baseline: after the boot's own freed pages were reported.
    std::thread::sleep(Duration::from_secs(5));
    let baseline = vm_mib();
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "fill",
        "bal1",
        "dd",
        "if=/dev/zero",
        "of=/dev/null",
        "bs=400M",
        "count=1",
    ]);
    assert!(out.status.success(), "dd: {}", text(&out.stderr));
    let peak = vm_mib();
    let freed_at = Instant::now();
    let mut now = peak;
    while now > baseline + 64 && freed_at.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(200));
        now = vm_mib();
    }
    eprintln!(
        "VM host memory: baseline {baseline} MiB, after the fill {peak} MiB, \
         {now} MiB {:?} later",
        freed_at.elapsed()
    );
    // The fill really reached the host, or the test proves nothing.
    assert!(
        peak >= baseline + 300,
        "baseline {baseline} MiB, peak {peak} MiB"
    );
    assert!(
        now <= baseline + 64,
        "still {now} MiB 10 s after the free (baseline {baseline} MiB)"
    );
    c.kill_and_delete("bal1");
    c.assert_nothing_left();
}

/// A bad runtime config gives a clear error in ctr's output, and nothing runs.
#[test]
#[ignore = "needs root, containerd and ctr"]
fn missing_kernel_is_a_clear_error() {
    let c = Containerd::with_image();
    c.set_config("kernel", "\"/nonexistent/vmlinux\"");
    let out = c.run_rm(&[], "nokernel", &["true"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("/nonexistent/vmlinux") && stderr.contains("guest.kernel"),
        "{stderr}"
    );
    c.assert_nothing_left();
}

/// A host without the memory to boot one more VM refuses the sandbox with
/// the figures (here: a floor no host has), instead of booting it into the
/// host's OOM killer; nothing runs, nothing is left.
#[test]
#[ignore = "needs root, containerd and ctr"]
fn a_host_short_of_memory_refuses_the_sandbox_clearly() {
    let c = Containerd::with_image();
    c.set_config("host_memory_floor_mib", "1048576");
    let out = c.run_rm(&[], "lowmem", &["true"]);
    let stderr = text(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("not booted")
            && stderr.contains("MiB of memory available")
            && stderr.contains("runtime.host_memory_floor_mib = 1048576 MiB must stay free"),
        "{stderr}"
    );
    c.assert_nothing_left();
}

/// An `io.boxlite.*` annotation the config allows sizes the VM; one it does
/// not allow fails the create with a message naming it, leaving nothing.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn annotation_overrides_allowed_and_refused() {
    let c = Containerd::with_image();
    let mem_total_kib = |out: &Output| -> u64 {
        text(&out.stdout)
            .split_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("MemTotal: {out:?}"))
    };
    // The first line of /proc/meminfo is "MemTotal: <n> kB".
    let meminfo = [
        "sh",
        "-c",
        "read -r key kib unit < /proc/meminfo; echo \"$key $kib\"",
    ];
    let out = c.run_rm(&[], "mem0", &meminfo);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let default_kib = mem_total_kib(&out);
    let out = c.run_rm(
        &["--annotation", "io.boxlite.guest.memory_mib=160"],
        "mem1",
        &meminfo,
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let small_kib = mem_total_kib(&out);
    // 256 MiB (the harness's guest.memory_mib) against 160 MiB, less what
    // the kernel keeps for itself.
    assert!(default_kib > 200 * 1024, "default guest: {default_kib} KiB");
    assert!(
        small_kib < 160 * 1024 && small_kib > 100 * 1024,
        "160 MiB guest: {small_kib} KiB"
    );
    let out = c.run_rm(
        &["--annotation", "io.boxlite.guest.vcpus=2"],
        "cpu1",
        &["true"],
    );
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains(
            "annotation io.boxlite.guest.vcpus is not allowed on this node: the admin can add \
             it to runtime.allowed_annotations in boxlite.toml"
        ),
        "{}",
        text(&out.stderr)
    );
    c.assert_nothing_left();
}

/// A command that does not exist fails `ctr run` with a message naming it,
/// and the sandbox goes away.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn bad_command_is_a_clear_error() {
    let c = Containerd::with_image();
    let out = c.run_rm(&[], "bad1", &["/no/such/binary", "arg"]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(stderr.contains("/no/such/binary"), "{stderr}");
    c.assert_nothing_left();
}

/// A guest whose agent never comes up: `ctr run` fails after
/// `agent_ready_secs` naming the sandbox, the port and the console log, and
/// nothing is left.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock, busybox-static and the guest assets"]
fn guest_that_never_answers_fails_clearly() {
    let c = Containerd::with_image();
    let initramfs = c.dir.path().join("silent.cpio.gz");
    boxlite_tests::write_silent_initramfs(&initramfs);
    c.set_config("initramfs", &format!("{initramfs:?}"));
    // Long enough for the guest to reach its init and print its mark in
    // the slowest place this runs: the nested node, where a loaded host
    // made an 8 s budget end while the guest kernel was still printing a
    // boot-time warning (the emulated CPU's XSAVE sizes) to its console.
    c.set_config("agent_ready_secs", "20");
    let started = Instant::now();
    let out = c.run_rm(&[], "silent1", &["true"]);
    assert!(!out.status.success(), "{out:?}");
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("sandbox silent1: the agent did not announce itself on vsock port 1027")
            && stderr.contains("within 20s")
            && stderr.contains("console log: "),
        "{stderr}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
    // The console's last lines reach the shim log even though the sandbox
    // directory is gone.
    assert!(
        c.log().contains(boxlite_tests::SILENT_GUEST_MARK),
        "shim log has no console tail"
    );
    c.assert_nothing_left();
}

/// A guest that floods its console while `ctr run` waits for its agent:
/// `console.log` never passes `runtime.sandbox_log_max_kib` (16 KiB here), the older part
/// is dropped with a marker line, and the run still fails cleanly.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock, busybox-static and the guest assets"]
fn console_flood_is_capped() {
    let c = Containerd::with_image();
    let initramfs = c.dir.path().join("flood.cpio.gz");
    boxlite_tests::write_flooding_initramfs(&initramfs);
    c.set_config("initramfs", &format!("{initramfs:?}"));
    // The smallest cap, and time enough to pass it several times over even
    // on the builtin backend in the nested node, whose emulated UART
    // manages ~4 KB/s (one VM exit per byte under nested virtualization),
    // and less on a loaded machine: with the node sharing the CPUs with
    // other QEMUs the guest once began flooding ~16 s into 20 and wrote
    // only 12 KB. 45 s leaves ~29 s of flood even then.
    let agent_ready_secs = match test_backend().as_deref() {
        Some("builtin") => "45",
        _ => "20",
    };
    c.set_config("agent_ready_secs", agent_ready_secs);
    c.set_config("sandbox_log_max_kib", "16");
    let mut ctr = c
        .ctr_cmd(&["run", "--rm", "--runtime", RUNTIME, IMAGE, "flood1", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let console = c.state_dir().join("flood1/console.log");
    let (mut largest, mut compacted) = (0, false);
    let status = loop {
        if let Ok(meta) = std::fs::metadata(&console) {
            largest = largest.max(meta.len());
            let mut head = [0u8; 10];
            let n = std::fs::File::open(&console)
                .and_then(|mut f| f.read(&mut head))
                .unwrap_or(0);
            compacted |= head[..n] == *b"[boxlite: ";
        }
        if let Some(status) = ctr.try_wait().unwrap() {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    ctr.stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains("sandbox flood1: the agent did not announce itself"),
        "{stderr}"
    );
    assert!(largest <= 16 * 1024, "console.log reached {largest} bytes");
    assert!(
        compacted,
        "the flood never filled the cap ({largest} bytes seen)"
    );
    c.assert_nothing_left();
}

/// A network namespace with a veth pair: `eth0` inside (`10.124.0.2/24`,
/// default route via `.1`), its peer on the host (`10.124.0.1/24`), as a
/// CNI bridge plugin would leave it. Deleted on drop.
struct TestNetns {
    name: String,
    peer: String,
}

impl TestNetns {
    fn new(tag: &str) -> TestNetns {
        let name = format!("bxt{tag}{}", std::process::id());
        let peer = format!("bxp{tag}{}", std::process::id() % 100000);
        let ip = |args: &[&str]| {
            let out = run(Command::new("ip").args(args));
            assert!(out.status.success(), "ip {args:?}: {}", text(&out.stderr));
        };
        ip(&["netns", "add", &name]);
        let netns = TestNetns { name, peer };
        let (n, p) = (netns.name.as_str(), netns.peer.as_str());
        ip(&[
            "link", "add", p, "type", "veth", "peer", "name", "eth0", "netns", n,
        ]);
        ip(&["addr", "add", "10.124.0.1/24", "dev", p]);
        ip(&["link", "set", p, "up"]);
        ip(&[
            "-n",
            n,
            "link",
            "set",
            "eth0",
            "address",
            "02:42:0a:7c:00:02",
        ]);
        ip(&["-n", n, "link", "set", "eth0", "mtu", "1400"]);
        ip(&["-n", n, "addr", "add", "10.124.0.2/24", "dev", "eth0"]);
        ip(&["-n", n, "link", "set", "eth0", "up"]);
        ip(&["-n", n, "link", "set", "lo", "up"]);
        ip(&["-n", n, "route", "add", "default", "via", "10.124.0.1"]);
        netns
    }

    fn path(&self) -> String {
        format!("/var/run/netns/{}", self.name)
    }

    /// `ip -n <ns> args…` output.
    fn ip(&self, args: &[&str]) -> String {
        let out = run(Command::new("ip").arg("-n").arg(&self.name).args(args));
        text(&out.stdout)
    }

    /// `tc -n <ns> args…` output.
    fn tc(&self, args: &[&str]) -> String {
        let out = run(Command::new("tc").arg("-n").arg(&self.name).args(args));
        text(&out.stdout)
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.peer])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// `ctr run --with-ns network:<netns>`: the VM's NIC takes the pod
/// interface's MAC, address, MTU and routes; a server in the VM answers
/// from the host through the veth; after the container is gone the netns
/// has no tap and no tc filter left.
#[test]
#[ignore = "needs root, containerd, ctr, iproute2, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn pod_network_namespace_is_wired_to_the_vm() {
    let c = Containerd::with_image();
    let ns = TestNetns::new("w");
    let with_ns = format!("network:{}", ns.path());
    let out = c.run_rm(
        &["--with-ns", &with_ns],
        "net1",
        &[
            "sh",
            "-c",
            "ip -o addr show; ip -o link show; ip route show",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("inet 10.124.0.2/24"), "{shown}");
    assert!(shown.contains("02:42:0a:7c:00:02"), "{shown}");
    assert!(shown.contains("mtu 1400"), "{shown}");
    assert!(shown.contains("default via 10.124.0.1"), "{shown}");
    assert!(shown.contains("inet 127.0.0.1/8"), "lo is up: {shown}");
    assert!(shown.contains("inet6 ::1/128"), "lo is up: {shown}");
    assert!(!ns.ip(&["link", "show"]).contains("_bx"), "tap left behind");

    // A server in the VM, reached from the host through the veth.
    c.run_detached_cmd(
        &["--with-ns", &with_ns],
        "net2",
        &[
            "sh",
            "-c",
            "mkdir -p /www && echo hello-over-tap > /www/index.html && exec httpd -f -p 8080 -h /www",
        ],
    );
    assert!(
        ns.ip(&["link", "show"]).contains("tap0_bx"),
        "no tap while running"
    );
    assert!(
        ns.tc(&["filter", "show", "dev", "eth0", "ingress"])
            .contains("mirred"),
        "no mirred filter on eth0 while running"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let answer = loop {
        let attempt = Command::new("timeout")
            .args([
                "5",
                "bash",
                "-c",
                "exec 3<>/dev/tcp/10.124.0.2/8080; printf 'GET / HTTP/1.0\r\n\r\n' >&3; cat <&3",
            ])
            .output()
            .unwrap();
        let body = text(&attempt.stdout);
        if body.contains("hello-over-tap") || Instant::now() > deadline {
            break body;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        answer.contains("hello-over-tap"),
        "HTTP from the host: {answer:?}"
    );
    c.kill_and_delete("net2");
    c.assert_nothing_left();
    assert!(!ns.ip(&["link", "show"]).contains("_bx"), "tap left behind");
    assert!(
        !ns.tc(&["qdisc", "show", "dev", "eth0"]).contains("ingress"),
        "ingress qdisc left behind"
    );
}

/// What nerdctl does: a spec with a new network namespace (no path) and a
/// createRuntime hook that sets up the pod's network through the state's
/// pid (`/proc/<pid>/ns/net`, as nerdctl's CNI hook does). The hook runs
/// before the VM boots, in the runtime's namespace, and what it made (a
/// veth, an address, a default route) is wired to the VM; afterwards the
/// namespace the shim made, and with it the veth, are gone.
#[test]
#[ignore = "needs root, containerd, ctr, iproute2, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn create_runtime_hook_network_is_wired_to_the_vm() {
    let c = Containerd::with_image();
    let host_veth = format!("bxhk{}", std::process::id() % 100000);
    // Reads the state on stdin, puts a veth's far end into the pod's
    // namespace as eth0 and configures both ends.
    let hook = c.dir.path().join("cni-like-hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\nset -e\nstate=$(cat)\n\
             pid=$(printf '%s' \"$state\" | sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p')\n\
             ip link add {host_veth} type veth peer name eth0 netns /proc/$pid/ns/net\n\
             ip addr add 10.126.0.1/24 dev {host_veth}\n\
             ip link set {host_veth} up\n\
             nsenter --net=/proc/$pid/ns/net sh -c 'ip addr add 10.126.0.2/24 dev eth0 && \
             ip link set eth0 up && ip route add default via 10.126.0.1'\n"
        ),
    )
    .unwrap();
    std::fs::set_permissions(&hook, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let out = run(Command::new("ctr").args(["oci", "spec"]));
    assert!(out.status.success(), "ctr oci spec: {}", text(&out.stderr));
    let mut spec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    spec["process"]["args"] = serde_json::json!(["sh", "-c", "ip -o addr show; ip route show"]);
    spec["process"]["env"] = serde_json::json!(["PATH=/bin"]);
    spec["hooks"] = serde_json::json!({
        "createRuntime": [{"path": hook, "args": ["cni-like-hook.sh"]}]
    });
    // `ctr run --config` takes no image: the rootfs is a directory, the
    // busybox tree the image builder lays out.
    let img = c.dir.path().join("hook-rootfs");
    std::fs::create_dir_all(&img).unwrap();
    busybox_image(&img, IMAGE, &["sh"]);
    spec["root"] = serde_json::json!({"path": img.join("layer"), "readonly": false});
    let spec_path = c.dir.path().join("hook-spec.json");
    std::fs::write(&spec_path, serde_json::to_vec_pretty(&spec).unwrap()).unwrap();
    let out = c.ctr(&[
        "run",
        "--rm",
        "--runtime",
        RUNTIME,
        "--config",
        spec_path.to_str().unwrap(),
        "hooknet1",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let shown = text(&out.stdout);
    assert!(shown.contains("inet 10.126.0.2/24"), "{shown}");
    assert!(shown.contains("default via 10.126.0.1"), "{shown}");
    c.assert_nothing_left();
    // The kernel dismantles a namespace (and the veth pair with it) in a
    // work queue after its last reference goes: give it a moment.
    let veth = std::path::Path::new("/sys/class/net").join(&host_veth);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while veth.exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(
        !veth.exists(),
        "the hook's veth outlived the sandbox by 10 s"
    );
}

/// `ctr run --net-host` asks for the host's network: refused, naming why.
#[test]
#[ignore = "needs root, containerd, ctr and the guest assets"]
fn host_network_is_refused() {
    let c = Containerd::with_image();
    let out = c.run_rm(&["--net-host"], "hostnet1", &["true"]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("a VM cannot share the host's network stack"),
        "{}",
        text(&out.stderr)
    );
    c.assert_nothing_left();
}

/// `start` for a pod member returns the sandbox shim's address when that
/// shim answers, and writes it to the bundle's `address` file.
#[test]
#[ignore = "needs root (listens under /run/containerd/s)"]
fn start_groups_a_pod_member_with_its_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        r#"{"ociVersion":"1.0.2","annotations":{"io.kubernetes.cri.container-type":"container","io.kubernetes.cri.sandbox-id":"pod-sandbox-1"}}"#,
    )
    .unwrap();
    let address = format!(
        "/tmp/{}/c.sock",
        dir.path().file_name().unwrap().to_string_lossy()
    );
    // containerd-shim's socket_address: sha256 of "<address>/<ns>/<group>".
    let key = dir.path().join("key");
    std::fs::write(&key, format!("{address}/k8s.io/pod-sandbox-1")).unwrap();
    let socket = PathBuf::from(format!("/run/containerd/s/{}", sha256(&key)));
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&socket);
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let out = run(Command::new(shim_binary())
        .current_dir(&bundle)
        .env("TTRPC_ADDRESS", format!("{address}.ttrpc"))
        .args([
            "-namespace",
            "k8s.io",
            "-id",
            "app-container",
            "-address",
            &address,
            "start",
        ])
        .stdin(Stdio::null()));
    drop(listener);
    let _ = std::fs::remove_file(&socket);
    assert!(out.status.success(), "start failed: {}", text(&out.stderr));
    let want = format!("unix://{}", socket.display());
    assert_eq!(text(&out.stdout), want);
    assert_eq!(
        std::fs::read_to_string(bundle.join("address")).unwrap(),
        want
    );
}

/// `delete` after a crashed shim: the VM processes named by pid files die,
/// mounts under the share go, the sandbox directory is removed.
#[test]
#[ignore = "needs root (mounts)"]
fn delete_after_a_crash_cleans_the_sandbox() {
    let dir = tempfile::Builder::new()
        .prefix("bxd")
        .tempdir_in("/tmp")
        .unwrap();
    let state_dir = dir.path().join("run");
    let sandbox = state_dir.join("crashed1");
    let rootfs = sandbox.join("shared/crashed1/rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    let config = dir.path().join("boxlite.toml");
    std::fs::write(&config, format!("[runtime]\nstate_dir = {state_dir:?}\n")).unwrap();
    // A "VM process" that names the sandbox dir, as QEMU and its helpers do.
    let mut vm = Command::new("sleep")
        .arg0(sandbox.join("qemu"))
        .arg("60")
        .spawn()
        .unwrap();
    std::fs::write(sandbox.join("qemu.pid"), vm.id().to_string()).unwrap();
    std::fs::create_dir_all(state_dir.join(SHIM_RECORDS)).unwrap();
    std::fs::write(
        state_dir.join(SHIM_RECORDS).join("crashed1.json"),
        format!(
            r#"{{"sandbox_id":"crashed1","namespace":"default","shim_pid":1,"vm_pid":{},"containers":["crashed1"]}}"#,
            vm.id()
        ),
    )
    .unwrap();
    let src = dir.path().join("snapshot");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("keep"), "data").unwrap();
    assert!(Command::new("mount")
        .arg("--bind")
        .arg(&src)
        .arg(&rootfs)
        .status()
        .unwrap()
        .success());
    let bundle = dir.path().join("bundle");
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(bundle.join("config.json"), r#"{"ociVersion":"1.0.2"}"#).unwrap();

    let out = run(Command::new(shim_binary())
        .current_dir(&bundle)
        .env("BOXLITE_CONFIG", &config)
        .env("TTRPC_ADDRESS", "/nonexistent.ttrpc")
        .args([
            "-namespace",
            "default",
            "-id",
            "crashed1",
            "-address",
            "/nonexistent",
            "-bundle",
        ])
        .arg(&bundle)
        .arg("delete")
        .stdin(Stdio::null()));
    assert!(out.status.success(), "delete failed: {}", text(&out.stderr));
    assert!(!out.stdout.is_empty(), "delete prints a DeleteResponse");
    let status = vm.wait().unwrap();
    assert!(
        status.code().is_none(),
        "the VM process was killed: {status:?}"
    );
    assert!(mounts_under(dir.path()).is_empty());
    assert!(!sandbox.exists(), "sandbox dir removed");
    assert!(
        left_in_state_dir(&state_dir).is_empty(),
        "the shim's record removed: {:?}",
        left_in_state_dir(&state_dir)
    );
    assert_eq!(std::fs::read_to_string(src.join("keep")).unwrap(), "data");
}

fn assert_output(out: &Output, code: i32, stdout: &str, what: &str) {
    // Short excerpts: a failing big-output test must not flood the log.
    let short = |b: &[u8]| -> String { text(&b[..b.len().min(400)]) };
    assert_eq!(
        out.status.code(),
        Some(code),
        "{what}: status {:?}, stdout {:?}, stderr {:?}",
        out.status,
        short(&out.stdout),
        short(&out.stderr)
    );
    assert!(
        out.stdout == stdout.as_bytes(),
        "{what}: stdout {:?} ({} bytes), want {:?} ({} bytes); stderr {:?}",
        short(&out.stdout),
        out.stdout.len(),
        &stdout[..stdout.len().min(400)],
        stdout.len(),
        short(&out.stderr)
    );
}

/// `ctr task exec` without and with a terminal: output and exit code.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn exec_output_exit_code_and_tty() {
    let c = Containerd::with_image();
    c.run_detached(&[], "ex1");
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        "x1",
        "ex1",
        "sh",
        "-c",
        "echo exec-out; exit 3",
    ]);
    assert_output(&out, 3, "exec-out\n", "exec");
    // ctr deleted x1 when it exited: the id can be used again, as under runc
    // (the guest forgets an exec on delete).
    let again = c.ctr(&["task", "exec", "--exec-id", "x1", "ex1", "echo", "again"]);
    assert_output(&again, 0, "again\n", "exec with a reused id");
    // -t needs a terminal on ctr's side: a pty of the test's own, as a
    // user's shell would give it (ctr in the terminal's foreground process
    // group, stdin open). The guest pty turns "\n" into "\r\n".
    let address = c.dir.path().join("c.sock");
    let (status, output) = run_on_a_terminal(
        "ctr",
        &[
            "--address",
            &address.to_string_lossy(),
            "task",
            "exec",
            "-t",
            "--exec-id",
            "x2",
            "ex1",
            "sh",
            "-c",
            // stty size: ctr sent our terminal's size (24x80) as a
            // resize, and the guest pty has it.
            "[ -t 0 ] && [ -t 1 ] && echo is-a-tty; busybox stty size; exit 4",
        ],
        Duration::from_secs(120),
    );
    let stdout = text(&output);
    assert_eq!(status, Some(4), "exec -t: {stdout:?}");
    assert!(stdout.contains("is-a-tty\r"), "exec -t output: {stdout:?}");
    assert!(stdout.contains("24 80\r"), "exec -t size: {stdout:?}");
    c.kill_and_delete("ex1");
    c.assert_nothing_left();
}

/// What a sandbox's guest says about its identity: a fresh random UUID,
/// 16 bytes of `/dev/urandom` (hex), and its clock (Unix seconds) with the
/// host's just before and just after it was read.
struct GuestIdentity {
    uuid: String,
    random: String,
    clock: u64,
    host_before: u64,
    host_after: u64,
}

fn guest_identity(c: &Containerd, id: &str, exec_id: &str) -> GuestIdentity {
    let now = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    };
    let host_before = now();
    let out = c.ctr(&[
        "task",
        "exec",
        "--exec-id",
        exec_id,
        id,
        "sh",
        "-c",
        "cat /proc/sys/kernel/random/uuid; \
         head -c 16 /dev/urandom | busybox od -An -tx1 | busybox tr -d ' \\n'; echo; \
         busybox date +%s",
    ]);
    let host_after = now();
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{id}: {stdout} {}", text(&out.stderr));
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{id}: {stdout:?}");
    GuestIdentity {
        uuid: lines[0].to_owned(),
        random: lines[1].to_owned(),
        clock: lines[2]
            .parse()
            .unwrap_or_else(|_| panic!("{id}: {stdout:?}")),
        host_before,
        host_after,
    }
}

/// Templates (builtin backend; docs/templates.md): the first sandbox
/// boots and is saved as the template once its agent answers; the next
/// two are restored from it. Each has its own random streams and the
/// host's clock (within a second). A template whose state file is
/// corrupted is refused: that sandbox boots instead, the template is
/// discarded, and the next sandbox saves a new one. Nothing is left
/// behind.
#[test]
#[ignore = "needs root, containerd, ctr, boxlite-vmm on KVM, virtiofsd and the guest assets"]
fn sandboxes_restored_from_one_template_are_their_own() {
    const TEST: &str = "sandboxes_restored_from_one_template_are_their_own";
    if test_backend().as_deref() != Some("builtin") {
        let why =
            "templates are the builtin backend's (boxlite-vmm snapshots); this run is on another";
        boxlite_tests::report_skip(TEST, why);
        return;
    }
    const SAVED: &str = "VM template saved from this sandbox's boot";
    const RESTORED: &str = "VM restored from its template";
    let c = Containerd::with_image();
    let templates = c.dir.path().join("own-templates");
    c.set_config("enabled", "true");
    c.set_config("dir", &format!("{:?}", templates.display().to_string()));
    let count = |what: &str| c.log().matches(what).count();
    c.run_detached(&[], "t1");
    assert_eq!(count(SAVED), 1, "{}", c.log());
    c.run_detached(&[], "t2");
    c.run_detached(&[], "t3");
    assert_eq!(count(RESTORED), 2, "{}", c.log());
    let ids: Vec<GuestIdentity> = ["t1", "t2", "t3"]
        .iter()
        .map(|id| guest_identity(&c, id, "i1"))
        .collect();
    let (a, b) = (&ids[1], &ids[2]);
    assert_ne!(a.uuid, b.uuid, "one random stream");
    assert_ne!(a.random, b.random, "one random stream");
    assert_ne!(ids[0].random, a.random, "the template's stream");
    for g in &ids {
        assert!(
            g.clock + 1 >= g.host_before && g.clock <= g.host_after + 1,
            "guest clock {} vs host {}..={}",
            g.clock,
            g.host_before,
            g.host_after
        );
    }

    // A flipped byte in the middle of the state file: its checksum fails.
    let template_dirs: Vec<PathBuf> = std::fs::read_dir(&templates)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(template_dirs.len(), 1, "{template_dirs:?}");
    let state = template_dirs[0].join("vm.state");
    let mut bytes = std::fs::read(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&state, bytes).unwrap();
    c.run_detached(&[], "t4");
    assert_eq!(
        count("restoring the VM from its template failed; booting it instead"),
        1,
        "{}",
        c.log()
    );
    assert!(!template_dirs[0].exists(), "the bad template was discarded");
    let g = guest_identity(&c, "t4", "i1");
    assert_ne!(g.uuid, a.uuid);
    // The next sandbox saves a new one; the one after is restored from it.
    for id in ["t5", "t6"] {
        let out = c.run_rm(&[], id, &["echo", "from-a-new-template"]);
        let stderr = text(&out.stderr);
        assert_eq!(text(&out.stdout), "from-a-new-template\n", "{stderr}");
    }
    assert_eq!(count(SAVED), 2, "{}", c.log());
    assert_eq!(count(RESTORED), 3, "{}", c.log());
    for id in ["t1", "t2", "t3", "t4"] {
        c.kill_and_delete(id);
    }
    c.assert_nothing_left();
    c.assert_ran_on_the_test_backend();
}

/// `ctr run -t`: the container's init on a guest pty sized like ctr's
/// terminal, its exit code back through ctr, nothing left.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn run_with_a_terminal() {
    let c = Containerd::with_image();
    let address = c.dir.path().join("c.sock");
    let (status, output) = run_on_a_terminal(
        "ctr",
        &[
            "--address",
            &address.to_string_lossy(),
            "run",
            "-t",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "tty1",
            "sh",
            "-c",
            "[ -t 0 ] && [ -t 1 ] && echo init-on-a-tty; busybox stty size; exit 5",
        ],
        Duration::from_secs(120),
    );
    let stdout = text(&output);
    assert_eq!(status, Some(5), "run -t: {stdout:?}");
    assert!(
        stdout.contains("init-on-a-tty\r"),
        "run -t output: {stdout:?}"
    );
    assert!(stdout.contains("24 80\r"), "run -t size: {stdout:?}");
    c.assert_nothing_left();
}

/// A container over its memory limit is OOM-killed in the guest: ctr sees
/// exit 137 and containerd publishes the task's `/tasks/oom` event.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn oom_kill_and_its_event() {
    let c = Containerd::with_image();
    let events_log = c.dir.path().join("events.log");
    let mut events = c
        .ctr_cmd(&["events"])
        .stdout(std::fs::File::create(&events_log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .expect("ctr events");
    // A shell variable doubling in size until the 32 MiB limit kills it.
    let out = c.run_rm(
        &["--memory-limit", "33554432"],
        "oom1",
        &["sh", "-c", "x=0123456789; while true; do x=$x$x; done"],
    );
    assert_eq!(
        out.status.code(),
        Some(137),
        "stderr: {}",
        text(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let oom_event = loop {
        let seen = std::fs::read_to_string(&events_log).unwrap_or_default();
        if let Some(line) = seen
            .lines()
            .find(|l| l.contains("/tasks/oom") && l.contains("oom1"))
        {
            break Some(line.to_owned());
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = events.kill();
    let _ = events.wait();
    assert!(
        oom_event.is_some(),
        "no /tasks/oom event for oom1; events:\n{}",
        std::fs::read_to_string(&events_log).unwrap_or_default()
    );
    c.assert_nothing_left();
}

/// Runs `program` as the session leader of a new pty, as a terminal's
/// foreground process: stdin, stdout and stderr are the pty, stdin stays
/// open (nothing is typed), and everything the program writes is collected
/// until it exits. Returns its exit code (None: killed after `limit`).
///
/// Not script(1): it runs the command through $SHELL, and where that is
/// dash the command lands in a background process group, so ctr's
/// tcsetattr stops it with SIGTTOU.
fn run_on_a_terminal(program: &str, args: &[&str], limit: Duration) -> (Option<i32>, Vec<u8>) {
    use std::io::Read as _;
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut master, mut slave) = (-1, -1);
    let size = libc::winsize {
        ws_row: 24,
        ws_col: 80,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds into the locals; the name buffer and
    // termios are null (not wanted), the winsize points to a live local.
    let rc = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &size,
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both fds were just returned by openpty and are owned here.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave);
    // SAFETY: setsid and ioctl are async-signal-safe; fd 0 is the pty slave.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    // The Command holds the slave's copies: close them, so the master reads
    // EIO once the child and its children are gone.
    drop(cmd);
    let mut reader = std::fs::File::from(master.try_clone().unwrap());
    let collector = std::thread::spawn(move || {
        let mut output = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO: no process holds the slave any more.
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            output.extend_from_slice(&buf[..n]);
        }
        output
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status.code();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let output = collector.join().unwrap();
    drop(master);
    (status, output)
}

/// Runs `cmd` with `input` on its stdin, closed after it.
fn run_with_input(cmd: &mut Command, input: &[u8]) -> Output {
    use std::io::Write as _;
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input).unwrap();
    drop(stdin);
    child.wait_with_output().unwrap()
}

/// Piped stdin reaches the init and the exec, and its end is their EOF
/// (`cat` returns), as under runc.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn piped_stdin_reaches_the_process_and_ends() {
    let c = Containerd::with_image();
    let input = b"line one\nline two\n";
    let out = run_with_input(
        &mut c.ctr_cmd(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "in1",
            "sh",
            "-c",
            "cat; echo eof",
        ]),
        input,
    );
    assert_output(&out, 0, "line one\nline two\neof\n", "run with piped stdin");
    c.run_detached(&[], "in2");
    let out = run_with_input(
        &mut c.ctr_cmd(&[
            "task",
            "exec",
            "--exec-id",
            "cat1",
            "in2",
            "sh",
            "-c",
            "cat; echo eof",
        ]),
        input,
    );
    assert_output(
        &out,
        0,
        "line one\nline two\neof\n",
        "exec with piped stdin",
    );
    c.kill_and_delete("in2");
    c.assert_nothing_left();
}

/// SIGTERM ends an exec with 143 (the init, PID 1 of its namespace, ignores
/// SIGTERM without a handler, as under runc); SIGKILL ends the init with 137.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn kill_exit_statuses() {
    let c = Containerd::with_image();
    let init = c
        .ctr_cmd(&["run", "--runtime", RUNTIME, IMAGE, "k1", "sleep", "600"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.task_status("k1") != "RUNNING" {
        assert!(Instant::now() < deadline, "k1 did not start");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The exec says when it runs: a second pid in `ctr task ps` is not
    // enough, since the exec's set-up process shows there before the exec
    // has started (a signal then finds no started process).
    let mut exec = c
        .ctr_cmd(&[
            "task",
            "exec",
            "--exec-id",
            "s1",
            "k1",
            "sh",
            "-c",
            "echo started; exec sleep 600",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = exec.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line);
        let _ = tx.send(line);
    });
    let started = rx.recv_timeout(Duration::from_secs(120));
    assert_eq!(started.as_deref(), Ok("started\n"), "exec s1 did not start");
    let out = c.ctr(&["task", "kill", "-s", "SIGTERM", "--exec-id", "s1", "k1"]);
    assert!(out.status.success(), "kill exec: {}", text(&out.stderr));
    let st = exec.wait_with_output().unwrap();
    assert_eq!(st.status.code(), Some(143), "exec after SIGTERM");
    let out = c.ctr(&["task", "kill", "-s", "SIGKILL", "k1"]);
    assert!(out.status.success(), "kill init: {}", text(&out.stderr));
    let st = init.wait_with_output().unwrap();
    assert_eq!(st.status.code(), Some(137), "init after SIGKILL");
    let out = c.ctr(&["container", "delete", "k1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    c.assert_nothing_left();
}

/// pause/resume show in `ctr task ls`; `ctr task ps` lists the processes;
/// `ctr task metrics` has memory and cpu figures.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn pause_resume_ps_and_metrics() {
    let c = Containerd::with_image();
    c.run_detached(&[], "p1");
    assert_eq!(c.task_status("p1"), "RUNNING");
    let out = c.ctr(&["task", "pause", "p1"]);
    assert!(out.status.success(), "pause: {}", text(&out.stderr));
    assert_eq!(c.task_status("p1"), "PAUSED");
    let out = c.ctr(&["task", "resume", "p1"]);
    assert!(out.status.success(), "resume: {}", text(&out.stderr));
    assert_eq!(c.task_status("p1"), "RUNNING");

    let out = c.ctr(&["task", "ps", "p1"]);
    let ps = text(&out.stdout);
    assert!(out.status.success(), "ps: {}", text(&out.stderr));
    let pids: Vec<u32> = ps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert_eq!(pids.len(), 1, "one process (sleep): {ps}");
    assert!(pids[0] > 0, "{ps}");

    let out = c.ctr(&["task", "metrics", "p1"]);
    let m = text(&out.stdout);
    assert!(out.status.success(), "metrics: {}", text(&out.stderr));
    eprintln!("{m}");
    let figure = |key: &str| -> u64 {
        m.lines()
            .find(|l| l.split_whitespace().next() == Some(key))
            .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
            .unwrap_or_else(|| panic!("no {key} in metrics:\n{m}"))
    };
    assert!(figure("memory.usage") > 0, "{m}");
    assert!(figure("cpu.usage_usec") > 0, "{m}");
    assert!(figure("pids.current") >= 1, "{m}");
    c.kill_and_delete("p1");
    c.assert_nothing_left();
}

/// --env, --cwd, --read-only; a process that exits at once (0 and 1).
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn env_cwd_read_only_and_immediate_exit() {
    let c = Containerd::with_image();
    let out = c.run_rm(
        &["--env", "BOXLITE_E2E=hello env", "--cwd", "/etc"],
        "env1",
        &["sh", "-c", "echo \"$BOXLITE_E2E\"; busybox pwd"],
    );
    assert_output(&out, 0, "hello env\n/etc\n", "env/cwd");
    let out = c.run_rm(
        &["--read-only"],
        "ro1",
        &["sh", "-c", "echo x > /etc/written && exit 0; exit 9"],
    );
    assert_output(&out, 9, "", "read-only rootfs");
    assert!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        text(&out.stderr)
    );
    // Without --read-only the same write works.
    let out = c.run_rm(
        &[],
        "rw1",
        &["sh", "-c", "echo x > /etc/written && exit 0; exit 9"],
    );
    assert_output(&out, 0, "", "writable rootfs");
    let out = c.run_rm(&[], "true1", &["true"]);
    assert_output(&out, 0, "", "true");
    let out = c.run_rm(&[], "false1", &["false"]);
    assert_output(&out, 1, "", "false");
    c.assert_nothing_left();
}

/// Bind mounts: rw (the host sees the write) and ro (a write fails).
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn bind_mounts_ro_and_rw() {
    let c = Containerd::with_image();
    let rw = c.dir.path().join("vol-rw");
    let ro = c.dir.path().join("vol-ro");
    std::fs::create_dir_all(&rw).unwrap();
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::write(rw.join("in"), "from-host-rw\n").unwrap();
    std::fs::write(ro.join("in"), "from-host-ro\n").unwrap();
    let rw_opt = format!("type=bind,src={},dst=/rw,options=rbind:rw", rw.display());
    let ro_opt = format!("type=bind,src={},dst=/ro,options=rbind:ro", ro.display());
    let out = c.run_rm(
        &["--mount", &rw_opt, "--mount", &ro_opt],
        "bm1",
        &[
            "sh",
            "-c",
            "cat /rw/in /ro/in; echo from-guest > /rw/out || exit 5; \
             echo x > /ro/out && exit 6; exit 0",
        ],
    );
    assert_output(&out, 0, "from-host-rw\nfrom-host-ro\n", "bind mounts");
    assert!(
        text(&out.stderr).contains("Read-only file system"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(rw.join("out")).unwrap(),
        "from-guest\n"
    );
    assert!(!ro.join("out").exists());
    c.assert_nothing_left();
    // The volumes' content survives the cleanup.
    assert_eq!(
        std::fs::read_to_string(rw.join("in")).unwrap(),
        "from-host-rw\n"
    );
}

/// `ctr run` limits of 2 CPUs (`--cpu-quota 200000 --cpu-period 100000`)
/// and 1 GiB (`--memory-limit`).
const TWO_CPUS_ONE_GIB: [&str; 6] = [
    "--cpu-quota",
    "200000",
    "--cpu-period",
    "100000",
    "--memory-limit",
    "1073741824",
];

/// A container that is its own sandbox sizes its VM from its limits:
/// 2 CPUs are 2 online CPUs in the guest, and 1 GiB is guest memory of
/// more than 1 GiB (the guest's own needs come on top).
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn the_vm_is_sized_from_the_containers_limits() {
    let c = Containerd::with_image();
    let out = c.run_rm(
        &TWO_CPUS_ONE_GIB,
        "size1",
        &["sh", "-c", boxlite_tests::CPUS_AND_MEMTOTAL],
    );
    assert!(out.status.success(), "{out:?}");
    boxlite_tests::assert_cpus_and_memory(&text(&out.stdout), 2, 1 << 20);
    let log = c.log();
    assert!(
        log.contains("VM sized from the pod") && log.contains("vcpus=2"),
        "no sizing in the shim log:\n{log}"
    );
    c.assert_nothing_left();
}

/// A container limited to 1 GiB can really use it: the guest's reserve
/// (guest.reserved_memory_mib) covers the guest kernel and agent, so a
/// 960 MiB buffer is filled without an OOM kill.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn a_container_limited_to_1_gib_fills_960_mib() {
    let c = Containerd::with_image();
    let out = c.run_rm(
        &TWO_CPUS_ONE_GIB,
        "fill1",
        &[
            "sh",
            "-c",
            // dd fills its whole block buffer from /dev/zero: 960 MiB touched.
            "dd if=/dev/zero of=/dev/null bs=960M count=1 2>/dev/null && echo filled",
        ],
    );
    assert_output(&out, 0, "filled\n", "a 960 MiB buffer");
    c.assert_nothing_left();
}

/// --memory-limit shows as memory.max of the container's cgroup in the guest.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn memory_limit_in_the_guest_cgroup() {
    let c = Containerd::with_image();
    let out = c.run_rm(
        // ctr's default spec has no /sys/fs/cgroup mount (CRI adds this one).
        &[
            "--memory-limit",
            "67108864",
            "--mount",
            "type=cgroup,src=cgroup,dst=/sys/fs/cgroup,options=ro:nosuid:nodev:noexec",
        ],
        "mem1",
        &[
            "sh",
            "-c",
            // The container's cgroup: at its /proc/self/cgroup path under
            // the cgroupfs, or at the root of a namespaced view (the guest's
            // root cgroup has no memory.max, so that file is the container's).
            "p=$(cat /proc/self/cgroup); p=${p#0::}; f=/sys/fs/cgroup$p/memory.max; \
             [ -e $f ] || f=/sys/fs/cgroup/memory.max; cat $f",
        ],
    );
    assert_output(&out, 0, "67108864\n", "memory.max");
    c.assert_nothing_left();
}

/// 100 MiB of stdout arrive intact: the checksum computed in the guest
/// matches the host's of what ctr printed.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn hundred_mib_of_stdout_intact() {
    const N: u64 = 104_857_600;
    let c = Containerd::with_image();
    let file = c.dir.path().join("stdout.bin");
    let started = Instant::now();
    let out = c
        .ctr_cmd(&[
            "run",
            "--rm",
            "--runtime",
            RUNTIME,
            IMAGE,
            "big1",
            "sh",
            "-c",
            // 1 MiB of random bytes, 100 times: the guest hashes the
            // stream, then writes it to stdout.
            "busybox head -c 1048576 /dev/urandom > /tmp/block; \
             gen() { i=0; while [ $i -lt 100 ]; do cat /tmp/block; i=$((i+1)); done; }; \
             gen | busybox sha256sum >&2; gen",
        ])
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&file).unwrap())
        .output()
        .unwrap();
    eprintln!("100 MiB through ctr in {:?}", started.elapsed());
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(std::fs::metadata(&file).unwrap().len(), N);
    let inside = text(&out.stderr)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_owned();
    assert_eq!(sha256(&file), inside, "stderr: {}", text(&out.stderr));
    c.assert_nothing_left();
}

/// Two containers in one sandbox via the CRI annotations: the same guest
/// kernel (boot_id), not the host's.
/// `ctr run` without CNI gives the container a new network namespace: as
/// under runc its `lo` is up with 127.0.0.1/8 and ::1, and a server bound
/// to localhost answers a client in the same container (the agent once
/// left `lo` down: EADDRNOTAVAIL for every localhost program).
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn loopback_is_up_in_a_new_network_namespace() {
    let c = Containerd::with_image();
    let out = c.run_rm(
        &[],
        "lo1",
        &[
            "sh",
            "-c",
            "ip -o addr show dev lo; httpd -p 127.0.0.1:8080 -h /etc && \
             wget -q -O - http://127.0.0.1:8080/passwd && \
             httpd -p [::1]:8081 -h /etc && wget -q -O - http://[::1]:8081/passwd",
        ],
    );
    let shown = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{shown}{}", text(&out.stderr));
    assert!(shown.contains("inet 127.0.0.1/8"), "{shown}");
    assert!(shown.contains("inet6 ::1/128"), "{shown}");
    assert_eq!(
        shown.matches("root:x:0:0:root:/root:/bin/sh").count(),
        2,
        "both servers answered: {shown}"
    );
    c.assert_nothing_left();
}

#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn two_containers_in_one_sandbox() {
    let c = Containerd::with_image();
    c.run_detached(&[], "pod1");
    // Two pod members (not exec: see the EXTEND note) each read boot_id.
    let member = |id: &str| {
        let out = c.run_rm(
            &[
                "--annotation",
                "io.kubernetes.cri.sandbox-id=pod1",
                "--annotation",
                "io.kubernetes.cri.container-type=container",
            ],
            id,
            &["cat", "/proc/sys/kernel/random/boot_id"],
        );
        assert!(out.status.success(), "{id}: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let sandbox_boot = member("app0");
    let app_boot = member("app1");
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    assert_eq!(sandbox_boot.trim().len(), 36, "{sandbox_boot:?}");
    assert_eq!(app_boot, sandbox_boot, "one VM for both containers");
    assert_ne!(app_boot, host_boot, "the guest's kernel, not the host's");
    // Only one sandbox directory (one VM) was made.
    let dirs: Vec<_> = left_in_state_dir(&c.state_dir())
        .into_iter()
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(dirs.len(), 1, "{dirs:?}");
    c.kill_and_delete("pod1");
    c.assert_nothing_left();
}

/// The shim SIGKILLed: `ctr task delete` and `ctr container delete` still
/// leave no VM process, mount, socket or sandbox directory.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn shim_sigkill_then_delete_leaves_nothing() {
    let c = Containerd::with_image();
    c.run_detached(&[], "crash1");
    let state =
        std::fs::read_to_string(c.state_dir().join(SHIM_RECORDS).join("crash1.json")).unwrap();
    let shim_pid: i32 = state
        .split("\"shim_pid\":")
        .nth(1)
        .and_then(|r| r.trim_start().split(|ch: char| !ch.is_ascii_digit()).next())
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no shim_pid in {state}"));
    assert!(!processes_mentioning(&c.state_dir()).is_empty(), "VM runs");
    assert!(Command::new("kill")
        .args(["-KILL", &shim_pid.to_string()])
        .status()
        .unwrap()
        .success());
    // containerd notices the dead shim; the task may be gone already.
    let out = c.ctr(&["task", "delete", "-f", "crash1"]);
    eprintln!(
        "task delete: {:?} {} {}",
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let out = c.ctr(&["container", "delete", "crash1"]);
    assert!(
        out.status.success(),
        "container delete: {}",
        text(&out.stderr)
    );
    c.assert_nothing_left();
    let out = c.ctr(&["container", "ls", "-q"]);
    assert_eq!(text(&out.stdout).trim(), "");
}

/// 20 create/run/delete cycles leak no process, mount, containerd fd or
/// state entry.
#[test]
#[ignore = "needs root, containerd, ctr, QEMU, virtiofsd, boxlite-vsock and the guest assets"]
fn twenty_cycles_leak_nothing() {
    let c = Containerd::with_image();
    let fds = || {
        std::fs::read_dir(format!("/proc/{}/fd", c.child.id()))
            .unwrap()
            .count()
    };
    // Only what this containerd started (the host may run other tests):
    // processes whose command line names its temp dir — containerd itself,
    // the shims (-address), QEMU and its helpers (the sandbox dirs).
    let count_procs = || processes_mentioning(c.dir.path()).len();
    let count_mounts = || mounts_under(c.dir.path()).len();
    // One warm-up cycle: containerd opens what it keeps (plugins, content).
    let out = c.run_rm(&[], "warm", &["true"]);
    assert_output(&out, 0, "", "warm-up");
    c.assert_nothing_left();
    let fds_before = fds();
    let procs_before = count_procs();
    let mounts_before = count_mounts();
    // The nested node runs fewer (tests/nested/builtin-e2e.sh says why);
    // a leak of one per cycle shows after any number of them.
    let cycles = boxlite_tests::scaled_count(
        "BOXLITE_E2E_CYCLES",
        20,
        "twenty_cycles_leak_nothing (20 cycles)",
    );
    let started = Instant::now();
    for i in 0..cycles {
        let id = format!("cycle{i}");
        let out = c.run_rm(&[], &id, &["sh", "-c", &format!("echo {i}")]);
        assert_output(&out, 0, &format!("{i}\n"), &id);
    }
    eprintln!("{cycles} cycles in {:?}", started.elapsed());
    c.assert_nothing_left();
    // Give containerd a moment to close what it closes lazily.
    let deadline = Instant::now() + Duration::from_secs(10);
    while fds() > fds_before && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        fds() <= fds_before,
        "containerd fds {} → {}",
        fds_before,
        fds()
    );
    assert_eq!(count_procs(), procs_before, "VM/shim processes");
    let mounts_after = count_mounts();
    assert_eq!(mounts_after, mounts_before, "mounts");
    let out = c.ctr(&["container", "ls", "-q"]);
    assert_eq!(text(&out.stdout).trim(), "");
}
