//! OCI spec fidelity (issue 5, item 3): the spec fields that have no test in
//! `containers.rs`, each checked from inside the container (a `sh -c` script
//! whose stdout is compared) against what runc 1.1 gives for the same spec.
//!
//! Everything here creates containers, so every test needs root and is
//! `#[ignore = "needs root"]`; run them with
//! `cargo test -p boxlite-agent --test containers_spec -- --include-ignored`.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::mountinfo::{self, MountEntry};
use boxlite_test_support::caps::CONTAINERD_DEFAULT_CAPS;
use common::*;
use serde_json::{json, Value};
use ttrpc::Code;

/// busybox applets the scripts here use besides [`APPLETS`].
const MORE_APPLETS: &[&str] = &[
    "stat", "touch", "mkdir", "unshare", "readlink", "cut", "sed", "tr", "hostname", "mount", "dd",
    "ip", "httpd", "wget",
];

/// A busybox rootfs with the extra applets; returns (guest path, host dir).
fn make_rootfs(agent: &Agent, name: &str) -> (String, PathBuf) {
    let guest = agent.rootfs(name);
    let dir = agent.root().join("rootfs").join(name);
    for a in MORE_APPLETS {
        let link = dir.join("bin").join(a);
        if !link.exists() {
            std::os::unix::fs::symlink("busybox", link).unwrap();
        }
    }
    (guest, dir)
}

/// The common runc-like spec (see `common::spec`) running `sh -c script`.
fn sh_spec(id: &str, rootfs: &str, script: &str) -> Value {
    serde_json::from_slice(&spec(id, rootfs, process_json(&["sh", "-c", script], ""))).unwrap()
}

/// Adds a new network namespace to `spec` (the common spec has none: the
/// container would share the agent's).
fn add_network_namespace(spec: &mut Value) {
    spec["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "network"}));
}

/// Creates, starts and waits for a container from `spec`; returns (stdout,
/// stderr, exit status) and removes the container.
async fn run_spec(agent: &Agent, client: &AgentClient, id: &str, spec: &Value) -> Output {
    let (out, err, code) =
        common::run_spec(agent, client, id, serde_json::to_vec(spec).unwrap()).await;
    Output { out, err, code }
}

#[derive(Debug)]
struct Output {
    out: String,
    err: String,
    code: i32,
}

impl Output {
    /// `key=value` lines of stdout.
    fn vars(&self) -> BTreeMap<String, String> {
        self.out
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn var(&self, key: &str) -> String {
        self.vars()
            .get(key)
            .cloned()
            .unwrap_or_else(|| panic!("no {key}= in the output: {self:#?}"))
    }
}

/// The last (topmost) mount at `point`.
fn mount_at<'a>(mounts: &'a [MountEntry], point: &str) -> &'a MountEntry {
    mounts
        .iter()
        .rev()
        .find(|m| m.mount_point == Path::new(point))
        .unwrap_or_else(|| panic!("nothing mounted at {point}: {mounts:#?}"))
}

/// Makes `dir` a shared mount (a bind onto itself) in the test's mount
/// namespace, so that a slave of it shows `master:N`; undone on drop.
struct SharedMount(PathBuf);

impl SharedMount {
    fn new(dir: &Path) -> Self {
        use nix::mount::{mount, MsFlags};
        mount(Some(dir), dir, None::<&str>, MsFlags::MS_BIND, None::<&str>)
            .expect("bind the shared source onto itself");
        let guard = SharedMount(dir.to_path_buf());
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED,
            None::<&str>,
        )
        .expect("make the source shared");
        guard
    }
}

impl Drop for SharedMount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn is_cgroup2_host() -> bool {
    nix::sys::statfs::statfs("/sys/fs/cgroup")
        .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
        .unwrap_or(false)
}

/// Bind mounts (ro and rw), tmpfs options, proc, sysfs, devpts, mqueue,
/// cgroup, and bind propagation.
///
/// runc 1.1.5 with the same mounts (checked on this cgroup v1 host): the ro
/// bind refuses writes with "Read-only file system" and the rw bind writes
/// through to the host; the tmpfs has `size=1024k,mode=1770`; devpts has
/// `ptmxmode=666,mode=620`; mqueue is at /dev/mqueue; /sys/fs/cgroup refuses
/// writes (cgroup2 mounted ro on a unified host; on v1 the hierarchies are
/// ro and the tmpfs refuses the write; the agent makes the tmpfs ro too).
/// Propagation: the rootfs is made `rslave`, so the `rprivate` bind has no
/// optional field, the `rslave` bind of a shared host mount has `master:2`,
/// the `rshared` one `shared:3 master:2`. libcontainer 0.7 ignored both the
/// propagation options and `ro` on a v1 cgroup mount (all three binds were
/// `master:N`, /sys/fs/cgroup writable); the agent's helper now applies them.
#[tokio::test]
#[ignore = "needs root"]
async fn mounts_binds_tmpfs_pseudo_filesystems_and_propagation() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let id = "mounts";
    let (rootfs, dir) = make_rootfs(&agent, id);
    for d in [
        "mnt/ro",
        "mnt/rw",
        "mnt/tmp",
        "mnt/priv",
        "mnt/slave",
        "mnt/shared",
    ] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
    }
    let host = agent.dir.path().join("host");
    let (ro, rw, prop) = (host.join("ro"), host.join("rw"), host.join("prop"));
    for d in [&ro, &rw, &prop] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(ro.join("hello"), "from the host\n").unwrap();
    let _shared = SharedMount::new(&prop);
    let script = r#"
        echo hello=$(cat /mnt/ro/hello)
        if echo x 2>/dev/null > /mnt/ro/new; then echo ro_write=ok; else echo ro_write=refused; fi
        echo x > /mnt/ro/new
        echo rw > /mnt/rw/new && echo rw_write=ok
        echo tmp_mode=$(stat -c %a /mnt/tmp)
        echo proc_self=$(readlink /proc/self/ns/pid | cut -c1-4)
        echo sys_kernel=$(test -d /sys/kernel && echo yes)
        if touch /sys/fs/cgroup/x 2>/dev/null; then echo cgroup_write=ok; else echo cgroup_write=refused; fi
        if touch /sys/x 2>/dev/null; then echo sys_write=ok; else echo sys_write=refused; fi
        echo ---
        cat /proc/self/mountinfo
    "#;
    let mut spec = sh_spec(id, &rootfs, script);
    let bind = |src: &Path, dst: &str, opts: &[&str]| json!({"destination": dst, "type": "bind", "source": src, "options": opts});
    spec["mounts"] = json!([
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs",
         "options": ["nosuid", "noexec", "nodev", "ro"]},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]},
        bind(&ro, "/mnt/ro", &["rbind", "ro"]),
        bind(&rw, "/mnt/rw", &["rbind", "rw"]),
        {"destination": "/mnt/tmp", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "nodev", "size=1m", "mode=1770"]},
        bind(&prop, "/mnt/priv", &["rbind", "rprivate"]),
        bind(&prop, "/mnt/slave", &["rbind", "rslave"]),
        bind(&prop, "/mnt/shared", &["rbind", "rshared"]),
    ]);
    add_network_namespace(&mut spec);
    let o = run_spec(&agent, &client, id, &spec).await;
    assert_eq!(o.code, 0, "{o:#?}");
    assert_eq!(o.var("hello"), "from the host", "{o:#?}");
    assert_eq!(o.var("ro_write"), "refused");
    assert!(o.err.contains("Read-only file system"), "{o:#?}");
    assert_eq!(o.var("rw_write"), "ok", "{o:#?}");
    assert!(!ro.join("new").exists());
    assert_eq!(std::fs::read_to_string(rw.join("new")).unwrap(), "rw\n");
    assert_eq!(o.var("tmp_mode"), "1770");
    assert_eq!(o.var("proc_self"), "pid:");
    assert_eq!(o.var("sys_kernel"), "yes");
    assert_eq!(o.var("cgroup_write"), "refused", "{o:#?}");
    assert_eq!(o.var("sys_write"), "refused");

    let mounts = mountinfo::parse(o.out.split_once("---\n").unwrap().1.as_bytes());
    let has = |m: &MountEntry, opt: &str| m.has_option(opt);
    let sup = |m: &MountEntry, opt: &str| m.super_options.iter().any(|o| o == opt);
    let m = mount_at(&mounts, "/mnt/ro");
    assert!(has(m, "ro"), "{m:?}");
    let m = mount_at(&mounts, "/mnt/rw");
    assert!(has(m, "rw"), "{m:?}");
    let m = mount_at(&mounts, "/mnt/tmp");
    assert_eq!(m.fstype, "tmpfs");
    assert!(sup(m, "size=1024k") && sup(m, "mode=1770"), "{m:?}");
    assert!(has(m, "nosuid") && has(m, "nodev"), "{m:?}");
    assert_eq!(mount_at(&mounts, "/proc").fstype, "proc");
    let m = mount_at(&mounts, "/dev/pts");
    assert_eq!(m.fstype, "devpts");
    assert!(
        sup(m, "ptmxmode=666") && sup(m, "mode=620") && sup(m, "gid=5"),
        "{m:?}"
    );
    let m = mount_at(&mounts, "/dev/mqueue");
    assert_eq!(m.fstype, "mqueue");
    assert!(
        has(m, "nosuid") && has(m, "noexec") && has(m, "nodev"),
        "{m:?}"
    );
    let m = mount_at(&mounts, "/sys");
    assert_eq!(m.fstype, "sysfs");
    assert!(has(m, "ro"), "{m:?}");
    let m = mount_at(&mounts, "/sys/fs/cgroup");
    assert!(has(m, "ro"), "{m:?}");
    if is_cgroup2_host() {
        assert_eq!(m.fstype, "cgroup2", "{m:?}");
    } else {
        assert_eq!(m.fstype, "tmpfs", "{m:?}");
        let mem = mount_at(&mounts, "/sys/fs/cgroup/memory");
        assert_eq!(mem.fstype, "cgroup", "{mem:?}");
        assert!(has(mem, "ro"), "{mem:?}");
    }

    let fields = |point: &str| mount_at(&mounts, point).optional.clone();
    let tagged = |f: &[String], tag: &str| f.iter().any(|x| x.starts_with(tag));
    let f = fields("/mnt/priv");
    assert!(!tagged(&f, "shared:") && !tagged(&f, "master:"), "{f:?}");
    let f = fields("/mnt/slave");
    assert!(tagged(&f, "master:") && !tagged(&f, "shared:"), "{f:?}");
    let f = fields("/mnt/shared");
    assert!(tagged(&f, "shared:") && tagged(&f, "master:"), "{f:?}");
}

/// maskedPaths and readonlyPaths, as runc: a masked file is /dev/null (reads
/// empty: /proc/timer_list, 7 KiB unmasked), a masked directory an empty
/// read-only tmpfs (/proc/acpi, a rootfs directory), a masked path that does
/// not exist is skipped; a read-only path refuses writes with EROFS
/// while the rest stays writable.
#[tokio::test]
#[ignore = "needs root"]
async fn masked_and_readonly_paths() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let id = "masked";
    let (rootfs, dir) = make_rootfs(&agent, id);
    std::fs::create_dir_all(dir.join("etc/secret")).unwrap();
    std::fs::write(dir.join("etc/secret/key"), "k").unwrap();
    std::fs::create_dir_all(dir.join("etc/frozen")).unwrap();
    std::fs::write(dir.join("etc/frozen/f"), "f\n").unwrap();
    let script = r#"
        echo timer_list_bytes=$(wc -c < /proc/timer_list)
        echo kcore=$(test -e /proc/kcore && echo present || echo absent)
        echo acpi=[$(ls -A /proc/acpi)]
        echo secret=[$(ls -A /etc/secret)]
        if touch /etc/secret/x 2>/dev/null; then echo secret_write=ok; else echo secret_write=refused; fi
        echo sys_hostname=$(cat /proc/sys/kernel/hostname)
        echo box2 > /proc/sys/kernel/hostname
        echo sys_write=$?
        echo frozen=$(cat /etc/frozen/f)
        touch /etc/frozen/g
        echo frozen_write=$?
        touch /etc/ok && echo etc_write=ok
        echo ---
        cat /proc/self/mountinfo
    "#;
    let mut spec = sh_spec(id, &rootfs, script);
    spec["linux"]["maskedPaths"] = json!([
        "/proc/timer_list",
        "/proc/kcore",
        "/proc/acpi",
        "/etc/secret",
    ]);
    spec["linux"]["readonlyPaths"] = json!(["/proc/sys", "/etc/frozen"]);
    let o = run_spec(&agent, &client, id, &spec).await;
    assert_eq!(o.code, 0, "{o:#?}");
    assert_eq!(o.var("timer_list_bytes"), "0", "{o:#?}");
    // Absent on this kernel (no CONFIG_PROC_KCORE): skipped, as by runc.
    if !Path::new("/proc/kcore").exists() {
        assert_eq!(o.var("kcore"), "absent");
    }
    assert_eq!(o.var("acpi"), "[]");
    assert_eq!(o.var("secret"), "[]");
    assert_eq!(o.var("secret_write"), "refused");
    assert_eq!(o.var("sys_hostname"), "box");
    assert_eq!(o.var("sys_write"), "1");
    assert_eq!(o.var("frozen"), "f");
    assert_eq!(o.var("frozen_write"), "1");
    assert_eq!(o.var("etc_write"), "ok");
    let erofs = o.err.matches("Read-only file system").count();
    assert_eq!(erofs, 2, "{o:#?}");
    let mounts = mountinfo::parse(o.out.split_once("---\n").unwrap().1.as_bytes());
    let m = mount_at(&mounts, "/etc/secret");
    assert_eq!(m.fstype, "tmpfs", "{m:?}");
    assert!(m.is_read_only(), "{m:?}");
    // /proc/timer_list is covered by a bind of the container's /dev/null.
    mount_at(&mounts, "/proc/timer_list");
    let m = mount_at(&mounts, "/proc/sys");
    assert!(m.is_read_only(), "{m:?}");
    // The rootfs itself is untouched.
    assert!(dir.join("etc/secret/key").exists());
    assert!(dir.join("etc/ok").exists());
}

/// root.readonly: "/" is mounted read-only (EROFS on write, as runc), the
/// mounts on top of it stay writable.
#[tokio::test]
#[ignore = "needs root"]
async fn root_readonly() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let id = "rootro";
    let (rootfs, dir) = make_rootfs(&agent, id);
    let script = r#"
        touch /file
        echo root_write=$?
        touch /tmp/file && echo tmp_write=ok
        echo ---
        cat /proc/self/mountinfo
    "#;
    let mut spec = sh_spec(id, &rootfs, script);
    spec["root"]["readonly"] = json!(true);
    spec["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}));
    let o = run_spec(&agent, &client, id, &spec).await;
    assert_eq!(o.code, 0, "{o:#?}");
    assert_eq!(o.var("root_write"), "1");
    assert!(
        o.err.contains("touch: /file: Read-only file system"),
        "{o:#?}"
    );
    assert_eq!(o.var("tmp_write"), "ok");
    let mounts = mountinfo::parse(o.out.split_once("---\n").unwrap().1.as_bytes());
    let m = mount_at(&mounts, "/");
    assert!(m.is_read_only(), "{m:?}");
    assert!(!dir.join("file").exists());

    // The same spec with readonly false: writable.
    spec["root"]["readonly"] = json!(false);
    let id = "rootrw";
    let (rootfs, dir) = make_rootfs(&agent, id);
    spec["root"]["path"] = json!(rootfs);
    spec["linux"]["cgroupsPath"] = json!(format!("/boxlite-test/{id}-{}", std::process::id()));
    let o = run_spec(&agent, &client, id, &spec).await;
    assert_eq!(o.var("root_write"), "0", "{o:#?}");
    assert!(dir.join("file").exists());
}

/// process.rlimits: soft and hard limits as set (runc: setrlimit in the
/// container process before exec; unlisted limits are inherited).
#[tokio::test]
#[ignore = "needs root"]
async fn rlimits() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let id = "rlimits";
    let (rootfs, _) = make_rootfs(&agent, id);
    let script = r#"
        echo nofile_soft=$(ulimit -n)
        echo nofile_hard=$(ulimit -Hn)
        echo nproc=$(grep '^Max processes' /proc/self/limits | tr -s ' ' | cut -d' ' -f3,4)
        echo core=$(grep '^Max core file size' /proc/self/limits | tr -s ' ' | cut -d' ' -f5,6)
        echo exec_nofile=$(sh -c 'ulimit -n')
    "#;
    let mut spec = sh_spec(id, &rootfs, script);
    spec["process"]["rlimits"] = json!([
        {"type": "RLIMIT_NOFILE", "soft": 1000, "hard": 2000},
        {"type": "RLIMIT_NPROC", "soft": 300, "hard": 400},
        {"type": "RLIMIT_CORE", "soft": 0, "hard": 1048576},
    ]);
    let o = run_spec(&agent, &client, id, &spec).await;
    assert_eq!(o.code, 0, "{o:#?}");
    assert_eq!(o.var("nofile_soft"), "1000", "{o:#?}");
    assert_eq!(o.var("nofile_hard"), "2000");
    assert_eq!(o.var("nproc"), "300 400");
    assert_eq!(o.var("core"), "0 1048576");
    assert_eq!(o.var("exec_nofile"), "1000");

    // A soft limit above the hard one is refused at create (runc fails too:
    // its setrlimit gets EINVAL; libcontainer's error said only
    // "intermediate process error EINVAL", the agent now names the limit).
    let id = "rlimits-bad";
    let (rootfs, _) = make_rootfs(&agent, id);
    let mut spec = sh_spec(id, &rootfs, "true");
    spec["process"]["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 3000, "hard": 2000}]);
    let r = create(
        &client,
        id,
        serde_json::to_vec(&spec).unwrap(),
        stdio(false, false, false, false),
    )
    .await;
    let (code, msg) = status(r);
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(
        msg.ends_with(
            "process.rlimits[0] RLIMIT_NOFILE: the soft limit 3000 is above the hard limit 2000"
        ),
        "{msg}"
    );
}

/// linux.sysctl: namespaced sysctls are set in the container's new net and
/// ipc namespaces and read back from /proc/sys; the host keeps its values.
/// Sysctls outside the container's namespaces are refused at create, with
/// runc's checks ("sysctl … is not in a separate kernel namespace", "… not
/// allowed in host network namespace").
#[tokio::test]
#[ignore = "needs root"]
async fn sysctls() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let read = |p: &str| std::fs::read_to_string(p).unwrap().trim().to_string();
    let host_forward = read("/proc/sys/net/ipv4/ip_forward");
    let host_rmid = read("/proc/sys/kernel/shm_rmid_forced");
    let forward = if host_forward == "1" { "0" } else { "1" };
    let rmid = if host_rmid == "1" { "0" } else { "1" };
    let id = "sysctl";
    let (rootfs, _) = make_rootfs(&agent, id);
    let script = r#"
        echo ip_forward=$(cat /proc/sys/net/ipv4/ip_forward)
        echo shm_rmid_forced=$(cat /proc/sys/kernel/shm_rmid_forced)
        echo ping_group_range=$(cat /proc/sys/net/ipv4/ping_group_range | tr '\t' ' ')
    "#;
    let mut spec = sh_spec(id, &rootfs, script);
    add_network_namespace(&mut spec);
    spec["linux"]["sysctl"] = json!({
        "net.ipv4.ip_forward": forward,
        "kernel.shm_rmid_forced": rmid,
        "net.ipv4.ping_group_range": "0 2147483647",
    });
    let o = run_spec(&agent, &client, id, &spec).await;
    assert_eq!(o.code, 0, "{o:#?}");
    assert_eq!(o.var("ip_forward"), forward);
    assert_eq!(o.var("shm_rmid_forced"), rmid);
    assert_eq!(o.var("ping_group_range"), "0 2147483647");
    assert_eq!(read("/proc/sys/net/ipv4/ip_forward"), host_forward);
    assert_eq!(read("/proc/sys/kernel/shm_rmid_forced"), host_rmid);

    // Not namespaced, and a net sysctl without a network namespace. The
    // values are the host's own, so nothing changes even if one got through.
    let host_panic = read("/proc/sys/kernel/panic");
    for (n, (key, value, want)) in [
        (
            "kernel.panic",
            host_panic.as_str(),
            "is not in a separate kernel namespace",
        ),
        (
            "net.ipv4.ip_forward",
            host_forward.as_str(),
            "not allowed in host network namespace",
        ),
    ]
    .into_iter()
    .enumerate()
    {
        let id = format!("sysctl-bad{n}");
        let (rootfs, _) = make_rootfs(&agent, &id);
        let mut spec = sh_spec(&id, &rootfs, "true");
        spec["linux"]["sysctl"] = json!({ key: value });
        let (code, msg) = status(
            create(
                &client,
                &id,
                serde_json::to_vec(&spec).unwrap(),
                stdio(false, false, false, false),
            )
            .await,
        );
        assert_ne!(code, Code::OK);
        assert!(msg.contains(want) && msg.contains(key), "{key}: {msg}");
    }
    assert_eq!(read("/proc/sys/kernel/panic"), host_panic);
}

/// The standard device set and containerd's device cgroup rules (deny all,
/// then allow each standard device and each device of linux.devices).
fn containerd_device_rules(extra: &[Value]) -> Value {
    let mut rules = vec![json!({"allow": false, "access": "rwm"})];
    for (t, major, minor) in [
        ("c", Some(1), Some(3)),
        ("c", Some(1), Some(8)),
        ("c", Some(1), Some(7)),
        ("c", Some(5), Some(0)),
        ("c", Some(1), Some(5)),
        ("c", Some(1), Some(9)),
        ("c", Some(5), Some(1)),
        ("c", Some(136), None),
        ("c", Some(5), Some(2)),
        ("c", Some(10), Some(200)),
    ] {
        let mut r = json!({"allow": true, "type": t, "major": major, "access": "rwm"});
        if let Some(minor) = minor {
            r["minor"] = json!(minor);
        }
        rules.push(r);
    }
    rules.extend(extra.iter().cloned());
    Value::Array(rules)
}

/// linux.devices: nodes created with the given type, major:minor, mode and
/// owner (runc 1.1.5 gives the same `stat` output: mknod with umask 0, then
/// chown). Device cgroup rules are enforced as under runc: with "deny all"
/// and no rule for 10:229, opening /dev/fuse fails with EPERM; runc's
/// standard set is always allowed, so a deny rule for c 1:3 has no effect.
/// On this (v1) host libcontainer's devices controller enforces them; in the
/// guest (v2) the agent's eBPF device program does (device_filter.rs; its
/// own tests load it into the kernel, and tests/guest_containers.rs runs
/// this check in a VM). A rule that does not parse is INVALID_ARGUMENT.
#[tokio::test]
#[ignore = "needs root"]
async fn devices_nodes_and_device_cgroup_rules() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let id = "devices";
    let (rootfs, _) = make_rootfs(&agent, id);
    let script = r#"
        stat -c 'mynull=%F %t:%T %a %u:%g' /dev/mynull
        stat -c 'fuse=%F %t:%T %a %u:%g' /dev/fuse
        echo data > /dev/mynull && echo mynull_write=ok
        echo mynull_read=[$(cat /dev/mynull)]
        stat -c 'null=%F %t:%T %a' /dev/null
    "#;
    let mut spec = sh_spec(id, &rootfs, script);
    spec["linux"]["devices"] = json!([
        {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3,
         "fileMode": 0o666, "uid": 0, "gid": 0},
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229,
         "fileMode": 0o640, "uid": 1000, "gid": 1001},
    ]);
    spec["linux"]["resources"] = json!({"devices": containerd_device_rules(&[
        json!({"allow": true, "type": "c", "major": 10, "minor": 229, "access": "rwm"}),
    ])});
    let o = run_spec(&agent, &client, id, &spec).await;
    assert_eq!(o.code, 0, "{o:#?}");
    assert_eq!(o.var("mynull"), "character special file 1:3 666 0:0");
    assert_eq!(o.var("fuse"), "character special file a:e5 640 1000:1001");
    assert_eq!(o.var("mynull_write"), "ok");
    assert_eq!(o.var("mynull_read"), "[]");
    // libcontainer's default devices are there too.
    assert_eq!(o.var("null"), "character special file 1:3 666");

    // Allow-all (a privileged container) is accepted.
    let id = "devices-all";
    let (rootfs, _) = make_rootfs(&agent, id);
    let mut spec = sh_spec(id, &rootfs, "echo ok=yes");
    spec["linux"]["resources"] = json!({"devices": [
        {"allow": false, "access": "rwm"}, {"allow": true, "access": "rwm"}]});
    let o = run_spec(&agent, &client, id, &spec).await;
    assert_eq!(o.var("ok"), "yes", "{o:#?}");

    // Enforced: a listed node no rule allows cannot be opened; a deny rule
    // for /dev/null is overridden by the standard set.
    let id = "devices-enforced";
    let (rootfs, _) = make_rootfs(&agent, id);
    let script = r#"
        head -c1 /dev/fuse >/dev/null 2>/tmp/err; echo fuse_rc=$?
        echo fuse_err=$(cat /tmp/err)
        echo x > /dev/null && echo null=ok
    "#;
    let mut spec = sh_spec(id, &rootfs, script);
    spec["linux"]["devices"] = json!([
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o666},
    ]);
    spec["linux"]["resources"] = json!({"devices": containerd_device_rules(&[
        json!({"allow": false, "type": "c", "major": 1, "minor": 3, "access": "rwm"}),
    ])});
    let o = run_spec(&agent, &client, id, &spec).await;
    assert_eq!(o.var("fuse_rc"), "1", "{o:#?}");
    assert!(
        o.var("fuse_err").contains("Operation not permitted"),
        "{o:#?}"
    );
    assert_eq!(o.var("null"), "ok", "{o:#?}");

    // A rule that does not parse is refused by name.
    let id = "devices-bad";
    let (rootfs, _) = make_rootfs(&agent, id);
    let mut spec = sh_spec(id, &rootfs, "true");
    spec["linux"]["resources"] = json!({"devices": containerd_device_rules(&[
        json!({"allow": true, "type": "c", "major": 1, "minor": 9, "access": "rwx"}),
    ])});
    let (code, msg) = status(
        create(
            &client,
            id,
            serde_json::to_vec(&spec).unwrap(),
            stdio(false, false, false, false),
        )
        .await,
    );
    assert_eq!(code, Code::INVALID_ARGUMENT, "{msg}");
    assert!(msg.contains("linux.resources.devices["), "{msg}");
}

/// Joining a sibling's namespaces by path (what CRI does for a pod's
/// containers): B names A's /proc/<pid>/ns/{ipc,uts,net,pid} and sees A's
/// hostname, A's POSIX message queue (an ipc-namespace object, on B's own
/// mqueue mount), and A's processes; the namespace ids match. runc gives
/// the same.
#[tokio::test]
#[ignore = "needs root"]
async fn joining_a_sibling_containers_namespaces_by_path() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let a = "ns-a";
    let (rootfs_a, _) = make_rootfs(&agent, a);
    let mut spec_a = sh_spec(a, &rootfs_a, "touch /dev/mqueue/from-a && exec sleep 1000");
    spec_a["hostname"] = json!("alpha");
    add_network_namespace(&mut spec_a);
    spec_a["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"}));
    create(
        &client,
        a,
        serde_json::to_vec(&spec_a).unwrap(),
        stdio(false, false, false, false),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.stderr()));
    let pid = start(&client, a).await.unwrap();
    // A's queue exists once A has exec'd sleep.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default() != "sleep\n" {
        assert!(std::time::Instant::now() < deadline, "A did not start");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let ns = |kind: &str| {
        std::fs::read_link(format!("/proc/{pid}/ns/{kind}"))
            .unwrap()
            .display()
            .to_string()
    };

    let b = "ns-b";
    let (rootfs_b, _) = make_rootfs(&agent, b);
    let script = r#"
        for n in ipc uts net pid mnt; do echo ns_$n=$(readlink /proc/self/ns/$n); done
        echo hostname=$(hostname)
        echo mqueue=$(ls /dev/mqueue)
        echo init_comm=$(cat /proc/1/comm)
        echo self_is_init=$(test $$ = 1 && echo yes || echo no)
        echo lo=$(ip -o addr show dev lo | tr -s ' ' | cut -d' ' -f3,4 | tr '\n' ' ')
    "#;
    let mut spec_b = sh_spec(b, &rootfs_b, script);
    spec_b.as_object_mut().unwrap().remove("hostname");
    let path = |kind: &str| format!("/proc/{pid}/ns/{kind}");
    spec_b["linux"]["namespaces"] = json!([
        {"type": "mount"},
        {"type": "pid", "path": path("pid")},
        {"type": "ipc", "path": path("ipc")},
        {"type": "uts", "path": path("uts")},
        {"type": "network", "path": path("net")},
    ]);
    spec_b["mounts"]
        .as_array_mut()
        .unwrap()
        .push(json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue"}));
    let o = run_spec(&agent, &client, b, &spec_b).await;
    assert_eq!(o.code, 0, "{o:#?}");
    for kind in ["ipc", "uts", "net", "pid"] {
        assert_eq!(o.var(&format!("ns_{kind}")), ns(kind), "{kind}: {o:#?}");
    }
    assert_eq!(o.var("hostname"), "alpha");
    assert_eq!(o.var("mqueue"), "from-a");
    assert_eq!(o.var("init_comm"), "sleep");
    assert_eq!(o.var("self_is_init"), "no");
    // A's new namespace got `lo` up (as runc does); B, joining it, sees it.
    assert_eq!(o.var("lo"), "inet 127.0.0.1/8 inet6 ::1/128", "{o:#?}");
    // B has its own mount namespace.
    assert_ne!(o.var("ns_mnt"), ns("mnt"));
    remove(&client, a).await;
}

/// A container in a new network namespace (what `ctr run` gives without
/// CNI) has `lo` up with 127.0.0.1/8 and ::1, as runc brings it up: a
/// server bound to 127.0.0.1 and to [::1] answers a client in the same
/// container. libcontainer alone left `lo` down, and `bind(127.0.0.1)`
/// failed with EADDRNOTAVAIL.
#[tokio::test]
#[ignore = "needs root"]
async fn new_network_namespace_has_loopback_up() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let id = "lo-up";
    let (rootfs, _) = make_rootfs(&agent, id);
    let script = r#"
        echo lo=$(ip -o addr show dev lo | tr -s ' ' | cut -d' ' -f3,4 | tr '\n' ' ')
        mkdir -p /www && echo served > /www/index.html
        httpd -p 127.0.0.1:8080 -h /www && echo v4=$(wget -q -O - http://127.0.0.1:8080/)
        httpd -p [::1]:8081 -h /www && echo v6=$(wget -q -O - http://[::1]:8081/)
    "#;
    let mut spec = sh_spec(id, &rootfs, script);
    add_network_namespace(&mut spec);
    let o = run_spec(&agent, &client, id, &spec).await;
    assert_eq!(o.code, 0, "{o:#?}");
    assert_eq!(o.var("lo"), "inet 127.0.0.1/8 inet6 ::1/128", "{o:#?}");
    assert_eq!(o.var("v4"), "served", "{o:#?}");
    assert_eq!(o.var("v6"), "served", "{o:#?}");
}

/// containerd's default seccomp profile (tests/fixtures, written from
/// contrib/seccomp/seccomp_default.go as of containerd 1.6/1.7 for amd64,
/// kernel ≥ 4.8 and containerd's default capabilities: defaultAction
/// SCMP_ACT_ERRNO (EPERM), the allow list, personality by argument, ptrace,
/// arch_prctl/modify_ldt, chroot for CAP_SYS_CHROOT, clone without
/// namespace flags and clone3 → ENOSYS since CAP_SYS_ADMIN is absent) loads;
/// ordinary commands work under it; a syscall it does not allow fails with
/// EPERM: `unshare -U` (a user namespace needs no capability, so only
/// seccomp stops it: without the profile the same container succeeds).
/// runc 1.1.5 with the same profile and capabilities prints the same:
/// "Seccomp: 2", "unshare: unshare(0x10000000): Operation not permitted",
/// and without the profile "Seccomp: 0" and a successful unshare.
#[tokio::test]
#[ignore = "needs root"]
async fn containerd_default_seccomp_profile() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let profile: Value =
        serde_json::from_str(include_str!("fixtures/containerd-default-seccomp.json")).unwrap();
    let caps = json!({
        "bounding": CONTAINERD_DEFAULT_CAPS, "effective": CONTAINERD_DEFAULT_CAPS, "permitted": CONTAINERD_DEFAULT_CAPS,
    });
    let script = r#"
        echo ls=$(ls /bin | grep -c busybox)
        echo pipe=$(echo hi | cat | wc -c)
        echo id=$(id -u):$(id -g)
        echo sub=$(sh -c 'echo $((6 * 7))')
        echo seccomp=$(grep '^Seccomp:' /proc/self/status | cut -f2)
        unshare -U true
        echo unshare=$?
    "#;
    let mut outputs = Vec::new();
    for (id, seccomp) in [("seccomp-default", true), ("seccomp-none", false)] {
        let (rootfs, _) = make_rootfs(&agent, id);
        let mut spec = sh_spec(id, &rootfs, script);
        spec["process"]["capabilities"] = caps.clone();
        if seccomp {
            spec["linux"]["seccomp"] = profile.clone();
        }
        outputs.push(run_spec(&agent, &client, id, &spec).await);
    }
    let (with, without) = (&outputs[0], &outputs[1]);
    assert_eq!(with.code, 0, "{with:#?}");
    assert_eq!(with.var("ls"), "1");
    assert_eq!(with.var("pipe"), "3");
    assert_eq!(with.var("id"), "0:0");
    assert_eq!(with.var("sub"), "42");
    assert_eq!(with.var("seccomp"), "2");
    assert_eq!(with.var("unshare"), "1", "{with:#?}");
    assert!(
        with.err
            .contains("unshare(0x10000000): Operation not permitted"),
        "{with:#?}"
    );
    assert_eq!(without.var("seccomp"), "0", "{without:#?}");
    assert_eq!(without.var("unshare"), "0", "{without:#?}");
    assert_eq!(without.err, "", "{without:#?}");
}

/// GetOOMEvent: `dd bs=64M` in a container limited to 16 MiB is OOM-killed
/// (the shell reports 137 and goes on), and the long-poll started before
/// the container returns its id. The container is removed right after its
/// init exits, inside one poll interval of the OOM watcher: the event must
/// still arrive (RemoveContainer reports a kill the watcher has not seen).
#[tokio::test]
#[ignore = "needs root"]
async fn oom_kill_is_reported_by_get_oom_event() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let id = "oom";
    let (rootfs, _) = make_rootfs(&agent, id);
    let mut spec = sh_spec(
        id,
        &rootfs,
        "dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null; echo dd=$?",
    );
    spec["linux"]["resources"] = json!({"memory": {"limit": 16 << 20, "swap": 16 << 20}});
    let poll = {
        let client = client.clone();
        tokio::spawn(async move {
            client
                .get_oom_event(
                    ttrpc::context::with_timeout(60_000_000_000),
                    &boxlite_protocol::agent::GetOOMEventRequest::default(),
                )
                .await
        })
    };
    let o = run_spec(&agent, &client, id, &spec).await;
    assert_eq!((o.code, o.var("dd")), (0, "137".to_string()), "{o:#?}");
    let event = tokio::time::timeout(std::time::Duration::from_secs(30), poll)
        .await
        .expect("GetOOMEvent answered within 30s")
        .unwrap()
        .unwrap_or_else(|e| panic!("GetOOMEvent: {e:?}\n{}", agent.stderr()));
    assert_eq!(event.container_id, id);
}
