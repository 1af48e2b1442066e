//! Support code for BoxLite's end-to-end tests: where the guest assets are,
//! and how to prove that nothing was left behind.
//!
//! The VM tests are `#[ignore]`d because they need root, QEMU, virtiofsd,
//! boxlite-vsock and a built guest kernel and initramfs; `.ci/run`
//! (scripts/test.sh) builds those and runs them with `--ignored`.

pub mod containerd;
pub mod cri;
pub mod debian_image;
pub mod differential;
pub mod oci_image;
pub mod sandbox_vm;

use std::path::{Path, PathBuf};

/// Guest kernel and initramfs the tests boot.
#[derive(Debug, Clone)]
pub struct GuestAssets {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

/// Finds the guest assets: `BOXLITE_KERNEL` / `BOXLITE_INITRAMFS` (set by
/// scripts/test.sh), else what `cargo xtask guest` left in `build/guest/`,
/// else the installed ones under /usr/share/boxlite. Panics with the fix when
/// they are missing: a VM test without assets is a broken set-up, not a skip.
pub fn guest_assets() -> GuestAssets {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace");
    let pick = |var: &str, built: &str, installed: &str| {
        let candidates: Vec<PathBuf> = match std::env::var_os(var) {
            Some(path) => vec![PathBuf::from(path)],
            None => vec![workspace.join(built), PathBuf::from(installed)],
        };
        candidates
            .iter()
            .find(|p| p.is_file())
            .cloned()
            .unwrap_or_else(|| {
                panic!(
                    "guest asset not found at {candidates:?} (set {var} or run `cargo xtask guest`; scripts/test.sh does both)"
                )
            })
    };
    GuestAssets {
        kernel: pick(
            "BOXLITE_KERNEL",
            "build/guest/vmlinux",
            "/usr/share/boxlite/vmlinux",
        ),
        initramfs: pick(
            "BOXLITE_INITRAMFS",
            "build/guest/initramfs.cpio.gz",
            "/usr/share/boxlite/initramfs",
        ),
    }
}

/// Checks that the cgroup directory `leaf` holds exactly the VM's host
/// processes `pids` and, besides them, only KVM's own kernel threads for
/// the VM (the NX huge page recovery worker, `kvm-nx-lpage-re…`, which KVM
/// puts in the cgroup of the process that made the VM: they are the VM's
/// too). Err says what is missing or what else is there.
pub fn check_vm_cgroup(leaf: &Path, pids: &[u32]) -> Result<(), String> {
    let procs = std::fs::read_to_string(leaf.join("cgroup.procs"))
        .map_err(|e| format!("{}: {e}", leaf.display()))?;
    let members: Vec<u32> = procs
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let comm = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    let kvm_thread = |pid: u32| {
        std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
            && comm(pid).starts_with("kvm")
    };
    let missing: Vec<u32> = pids
        .iter()
        .copied()
        .filter(|p| !members.contains(p))
        .collect();
    let others: Vec<String> = members
        .iter()
        .copied()
        .filter(|p| !pids.contains(p) && !kvm_thread(*p))
        .map(|p| format!("{p} {}", comm(p).trim()))
        .collect();
    if missing.is_empty() && others.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}: VM processes missing {missing:?}, others there {others:?}",
            leaf.display()
        ))
    }
}

/// The guest RAM a VM's host processes hold: the sum of their anonymous
/// and shared resident memory in KiB (`RssAnon` + `RssShmem` of
/// `/proc/<pid>/status`; the guest's RAM is one or the other, by backend).
/// Processes gone by the time they are read count 0.
pub fn vm_memory_kib(pids: impl IntoIterator<Item = u32>) -> u64 {
    pids.into_iter()
        .map(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            let kib = |field: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(field))
                    .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                    .unwrap_or(0)
            };
            kib("RssAnon:") + kib("RssShmem:")
        })
        .sum()
}

/// Processes whose command line or environment mentions `needle` (e.g. a
/// sandbox directory: every process the runtime spawns for a sandbox has
/// it in `BOXLITE_SANDBOX_DIR`, and most in their arguments too; QEMU's
/// arguments name only fds).
pub fn processes_mentioning(needle: &Path) -> Vec<(u32, String)> {
    let needle = needle.to_string_lossy().into_owned();
    let me = std::process::id();
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.flatten() {
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
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&raw).replace('\0', " ");
        let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
        if cmdline.contains(&needle) || String::from_utf8_lossy(&environ).contains(&needle) {
            found.push((pid, cmdline.trim_end().to_string()));
        }
    }
    found
}

/// Unix sockets left anywhere under `dir`.
pub fn sockets_under(dir: &Path) -> Vec<PathBuf> {
    use std::os::unix::fs::FileTypeExt;
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let Ok(ft) = entry.file_type() else { continue };
            if ft.is_dir() {
                stack.push(entry.path());
            } else if ft.is_socket() {
                found.push(entry.path());
            }
        }
    }
    found
}

/// Asserts that no process mentions `sandbox_dir` and no socket is left in it.
pub fn assert_nothing_left(sandbox_dir: &Path) {
    let procs = processes_mentioning(sandbox_dir);
    assert!(
        procs.is_empty(),
        "processes left behind for {}: {procs:?}",
        sandbox_dir.display()
    );
    let sockets = sockets_under(sandbox_dir);
    assert!(
        sockets.is_empty(),
        "sockets left behind in {}: {sockets:?}",
        sandbox_dir.display()
    );
}

/// A shell command printing the guest's online CPUs (a count) and its
/// `MemTotal:` line; [`assert_cpus_and_memory`] checks what it printed.
pub const CPUS_AND_MEMTOTAL: &str =
    "grep -c ^processor /proc/cpuinfo; grep ^MemTotal: /proc/meminfo";

/// What [`CPUS_AND_MEMTOTAL`] printed shows `cpus` online CPUs and a
/// MemTotal above `min_kib`.
pub fn assert_cpus_and_memory(out: &str, cpus: u32, min_kib: u64) {
    let mut lines = out.lines();
    assert_eq!(
        lines.next(),
        Some(cpus.to_string().as_str()),
        "online CPUs: {out}"
    );
    let mem_kib: u64 = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {out:?}"));
    assert!(
        mem_kib > min_kib,
        "guest MemTotal {mem_kib} kB ≤ {min_kib} kB"
    );
}

/// How many of `full` repetitions a scaled test runs here: `$<var>` when
/// the runner set fewer (the nested node, tests/nested/builtin-e2e.sh),
/// else `full`. Fewer is reported as a skip of the full run (`what`, e.g.
/// "twenty_cycles_leak_nothing (20 cycles)") with `$<var>_WHY`, so the
/// summary never counts the smaller run as the full one.
pub fn scaled_count(var: &str, full: usize, what: &str) -> usize {
    match std::env::var(var).ok().and_then(|v| v.parse().ok()) {
        Some(n) if n < full => {
            let why = std::env::var(format!("{var}_WHY")).unwrap_or_default();
            report_skip(what, &format!("ran {n} here: {why}"));
            n
        }
        _ => full,
    }
}

/// Records that `test` could not run here and why. Cargo's harness has no
/// run-time skip, so the test returns (and cargo counts it as passed); the
/// line written to `$BOXLITE_SKIP_LOG` lets scripts/test.sh subtract it and
/// report it as skipped. Use only for what truly cannot run on this host
/// (e.g. no VMX/SVM), never for a missing install step.
pub fn report_skip(test: &str, reason: &str) {
    use std::io::Write;
    eprintln!("skipped: {test}: {reason}");
    if let Some(path) = std::env::var_os("BOXLITE_SKIP_LOG") {
        let line = format!("{test}: {reason}\n");
        let written = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!(
                "cannot record the skip of {test} in {}: {e}",
                Path::new(&path).display()
            );
        }
    }
}

/// Every scenario of the nested test host's driver, in the order it runs
/// them by default (tests/src/bin/boxlite-nested-driver/, tests/nested_vmm.rs).
pub const NESTED_SCENARIOS: &str =
    "boot,health,smp,reboot,guest-connect,fs,blk,net,balloon,snapshot,snapshot-fs,snapshot-net";

/// What a guest without an agent prints on its console before it sleeps.
pub const SILENT_GUEST_MARK: &str = "silent-guest-up";

/// Writes an initramfs whose `/init` (busybox) prints
/// [`SILENT_GUEST_MARK`] and sleeps: a guest that boots but never serves
/// the agent, for the "VM never answers" tests.
pub fn write_silent_initramfs(path: &Path) {
    let init = format!(
        "#!/bin/busybox sh\necho {SILENT_GUEST_MARK} > /dev/console\nexec /bin/busybox sleep 3600\n"
    );
    write_busybox_initramfs(path, init);
}

/// An initramfs whose `/init` writes numbered lines to the console without
/// end and never starts an agent: a guest flooding the host's log.
pub fn write_flooding_initramfs(path: &Path) {
    let init = "#!/bin/busybox sh\ni=0\nwhile :; do i=$((i+1)); \
                echo \"console flood line $i ....................................\"; \
                done > /dev/console\n";
    write_busybox_initramfs(path, init.to_owned());
}

/// An initramfs of busybox and `init` (a busybox sh script) as `/init`.
fn write_busybox_initramfs(path: &Path, init: String) {
    xtask::initramfs::Initramfs::new()
        .dir("/bin", 0o755)
        .dir("/dev", 0o755)
        .char_device("/dev/console", 0o600, 5, 1)
        .file("/bin/busybox", "/bin/busybox", 0o755)
        .file_bytes("/init", init, 0o755)
        .write_to(path)
        .expect("write the test initramfs");
}

/// The runtime config the guest tests and benchmarks boot with: the guest
/// assets, sandbox state under `state_dir`, 60 s for the agent (TCG boots
/// are slow). Callers adjust it, then validate.
pub fn guest_config(state_dir: &Path) -> boxlite_runtime::Config {
    let assets = guest_assets();
    let mut config = boxlite_runtime::Config::default();
    config.runtime.state_dir = state_dir.to_owned();
    config.guest.kernel = assets.kernel;
    config.guest.initramfs = assets.initramfs;
    config.timeouts.agent_ready_secs = 60;
    config
}

/// An OCI process running `args` as root in `/` with `PATH=/bin`.
pub fn root_process(args: &[&str]) -> serde_json::Value {
    serde_json::json!({"cwd": "/", "args": args, "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})
}

/// A runc-like OCI spec as containerd's CRI plugin would ask for: new pid,
/// mount, ipc, uts and cgroup namespaces, /proc and a tmpfs /dev, running
/// `args` as root in `rootfs` (a guest path), in cgroup `cgroups_path`.
pub fn runc_like_spec(hostname: &str, rootfs: &str, cgroups_path: &str, args: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ociVersion": "1.0.2",
        "process": root_process(args),
        "root": {"path": rootfs, "readonly": false},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        ],
        "linux": {
            "cgroupsPath": cgroups_path,
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"},
                           {"type": "cgroup"}],
        },
    }))
    .expect("a JSON value serialises")
}

/// The `p`-quantile (0.0..=1.0) of sorted durations, nearest rank.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}
