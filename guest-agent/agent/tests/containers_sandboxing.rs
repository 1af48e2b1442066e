//! Sandboxing inside containers, checked against runc, and reaping under
//! load. Everything here runs the real agent binary in host mode (see
//! `common`) as root, with a busybox rootfs from Debian's `/bin/busybox`.
//!
//! - Nested sandboxing: a container whose spec grants the capabilities can
//!   `unshare(CLONE_NEWNET)`, install a seccomp filter and `setresuid`; one
//!   whose spec does not gets EPERM / EACCES. "Exactly as under runc" is
//!   proven by running the same config.json and rootfs under `runc run`
//!   (`/usr/sbin/runc`) and comparing exit codes and output.
//! - A differential table: one probe script under the agent and under runc
//!   for a table of specs (env, cwd, user, capabilities, read-only rootfs,
//!   containerd's default seccomp profile, rlimits, masked paths).
//! - Reaping: an init that forks hundreds of short-lived children while
//!   twenty execs run in parallel; every exit status arrives where it
//!   belongs and the agent is left with no zombie.
//!
//! The seccomp and setresuid steps need a syscall busybox has no applet
//! for: the sandbox probe (`sandbox_probe.c` of the workspace's
//! boxlite-test-support crate) is built with `gcc -static` when the tests
//! first need it and copied into each rootfs as `/bin/sandbox-probe`.
//!
//! All tests need root (namespaces, cgroups, mounts, runc) and are
//! `#[ignore = "needs root"]`; run them with `--ignored`.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::health::CheckRequest;
use boxlite_protocol::stdio::StreamKind;
use serde_json::{json, Value};

use boxlite_test_support::caps::CONTAINERD_DEFAULT_CAPS;
use common::*;

const RUNC: &str = "/usr/sbin/runc";
/// Applets the probes use beyond `common::APPLETS`.
const EXTRA_APPLETS: &[&str] = &["unshare", "ip", "seq", "sort", "touch", "awk", "tr"];
/// The containerd default seccomp profile (a `linux.seccomp` object), a
/// fixture another test owns; the differential row that uses it is skipped
/// (and says so) when it is missing.
const CONTAINERD_SECCOMP: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/containerd-default-seccomp.json"
);

/// Builds the sandbox probe once per test binary.
fn probe_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("sandbox_probe-{}", std::process::id()));
        boxlite_test_support::sandbox_probe::build(&out);
        out
    })
}

/// Checks that Debian's busybox has the applets the probes need.
fn check_applets() {
    let out = Command::new(BUSYBOX).arg("--list").output().unwrap();
    let list = String::from_utf8_lossy(&out.stdout);
    for a in EXTRA_APPLETS {
        assert!(list.lines().any(|l| l == *a), "{BUSYBOX} has no {a} applet");
    }
}

/// A busybox rootfs with the extra applets and the probe binary; returns
/// (guest path for the agent, host path for runc).
fn sandbox_rootfs(agent: &Agent, name: &str) -> (String, PathBuf) {
    let guest = agent.rootfs(name);
    let host = agent.root().join(guest.trim_start_matches('/'));
    for a in EXTRA_APPLETS {
        // common may link some of them already.
        match std::os::unix::fs::symlink("busybox", host.join("bin").join(a)) {
            Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => panic!("link {a}: {e}"),
            _ => {}
        }
    }
    std::fs::copy(probe_binary(), host.join("bin/sandbox-probe")).unwrap();
    std::fs::write(
        host.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(
        host.join("etc/group"),
        "root:x:0:\nuser:x:1000:\ng1001:x:1001:\ng1002:x:1002:\ng1003:x:1003:\n",
    )
    .unwrap();
    (guest, host)
}

/// What a container printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Outcome {
    stdout: String,
    stderr: String,
    code: i32,
}

/// The common spec (pid, mount, ipc, uts namespaces, /proc, /dev, /dev/pts)
/// plus a network namespace, with `sh -c script` as the process; `edit`
/// changes it. root.path and cgroupsPath are set per runtime by [`both`].
fn probe_spec(script: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let mut s: Value =
        serde_json::from_slice(&spec("x", "/", process_json(&["sh", "-c", script], ""))).unwrap();
    s["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "network"}));
    edit(&mut s);
    s
}

fn caps(list: &[&str]) -> Value {
    json!({"bounding": list, "effective": list, "permitted": list})
}

/// Runs the config.json under `runc run` in the foreground with the
/// container's stdio on pipes; deletes the container afterwards.
fn runc_run(state: &Path, bundle: &Path, id: &str, config: &Value) -> Outcome {
    std::fs::create_dir_all(bundle).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec_pretty(config).unwrap(),
    )
    .unwrap();
    let mut child = Command::new(RUNC)
        .arg("--root")
        .arg(state)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn runc");
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let readers = (
        std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut out, &mut s).unwrap();
            s
        }),
        std::thread::spawn(move || {
            let mut s = String::new();
            std::io::Read::read_to_string(&mut err, &mut s).unwrap();
            s
        }),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("runc run {id} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = Command::new(RUNC)
        .arg("--root")
        .arg(state)
        .args(["delete", "--force", id])
        .stderr(Stdio::null())
        .status();
    Outcome {
        stdout: readers.0.join().unwrap(),
        stderr: readers.1.join().unwrap(),
        // runc run exits with the container's status (128 + signal when a
        // signal killed it).
        code: status.code().unwrap_or(-1),
    }
}

/// Runs `config` as container `name` under the agent and under runc, each
/// with its own copy of the same rootfs and its own cgroup; everything else
/// in the config.json is the same.
async fn both(agent: &Agent, client: &AgentClient, name: &str, config: &Value) -> [Outcome; 2] {
    let pid = std::process::id();
    let (guest, _) = sandbox_rootfs(agent, &format!("{name}-agent"));
    let (_, host) = sandbox_rootfs(agent, &format!("{name}-runc"));
    let mut for_agent = config.clone();
    for_agent["root"]["path"] = json!(guest);
    for_agent["linux"]["cgroupsPath"] = json!(format!("/boxlite-test/{name}-{pid}"));
    let mut for_runc = config.clone();
    for_runc["root"]["path"] = json!(host);
    for_runc["linux"]["cgroupsPath"] = json!(format!("/boxlite-test-runc/{name}-{pid}"));

    let (stdout, stderr, code) =
        run_spec(agent, client, name, serde_json::to_vec(&for_agent).unwrap()).await;
    let under_agent = Outcome {
        stdout,
        stderr,
        code,
    };
    let state = agent.dir.path().join("runc-state");
    let bundle = agent.dir.path().join("runc-bundles").join(name);
    let id = name.to_string();
    let under_runc = tokio::task::spawn_blocking(move || runc_run(&state, &bundle, &id, &for_runc))
        .await
        .unwrap();
    [under_agent, under_runc]
}

/// Asserts the agent and runc gave the same outcome; returns it.
fn same(name: &str, [agent, runc]: [Outcome; 2]) -> Outcome {
    assert_eq!(
        agent, runc,
        "{name}: the agent (left) and runc (right) differ"
    );
    println!(
        "{name}: agent and runc agree: exit {}, stdout:\n{}",
        agent.code, agent.stdout
    );
    agent
}

/// The nested-sandboxing probe: each step prints its result and then its
/// exit status, then the capability, no_new_privs and seccomp status lines.
fn nested() -> String {
    boxlite_test_support::sandbox_probe::nested_script("CapEff|NoNewPrivs|Seccomp")
}

/// Asserts that `out` has `line` as a whole line.
fn has_line(name: &str, out: &str, line: &str) {
    assert!(
        out.lines().any(|l| l == line),
        "{name}: no line {line:?} in:\n{out}"
    );
}

/// With CAP_SYS_ADMIN, CAP_SETUID and CAP_SETGID granted and no
/// no_new_privileges, a container can build its own sandbox: a new network
/// namespace (only `lo` in it), a seccomp filter (with and without
/// PR_SET_NO_NEW_PRIVS) that makes getpid fail with EPERM, and setresuid
/// to another uid. Also with a permissive seccomp profile of the runtime
/// in place, and with no_new_privileges set. runc gives the same output.
#[tokio::test]
#[ignore = "needs root"]
async fn nested_sandboxing_works_when_the_spec_grants_it() {
    let nested = nested();
    check_applets();
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let mut granted: Vec<&str> = CONTAINERD_DEFAULT_CAPS.to_vec();
    granted.push("CAP_SYS_ADMIN");
    let permissive_seccomp = json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{"names": ["kexec_load"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]
    });
    let variants: Vec<(&str, Value)> = vec![
        (
            "granted",
            probe_spec(&nested, |s| {
                s["process"]["capabilities"] = caps(&granted);
            }),
        ),
        (
            "granted-seccomp",
            probe_spec(&nested, |s| {
                s["process"]["capabilities"] = caps(&granted);
                s["linux"]["seccomp"] = permissive_seccomp.clone();
            }),
        ),
        (
            "granted-nnp",
            probe_spec(&nested, |s| {
                s["process"]["capabilities"] = caps(&granted);
                s["process"]["noNewPrivileges"] = json!(true);
            }),
        ),
    ];
    for (name, config) in variants {
        let out = same(name, both(&agent, &client, name, &config).await);
        assert_eq!((out.code, out.stderr.as_str()), (0, ""), "{name}: {out:?}");
        let o = &out.stdout;
        // The new network namespace has lo and nothing else.
        assert!(o.starts_with("1: lo: <LOOPBACK>"), "{name}:\n{o}");
        assert!(!o.lines().any(|l| l.starts_with("2: ")), "{name}:\n{o}");
        for line in [
            "unshare=0",
            "unshare(CLONE_NEWNET): ok",
            "probe-unshare=0",
            "seccomp(nnp): filter installed, getpid -> -1 EPERM",
            "seccomp-nnp=0",
            "seccomp: filter installed, getpid -> -1 EPERM",
            "seccomp=0",
            "setresuid: ok, uid=1234 euid=1234 suid=1234",
            "setresuid=0",
        ] {
            has_line(name, o, line);
        }
        let nnp = if name == "granted-nnp" { 1 } else { 0 };
        has_line(name, o, &format!("NoNewPrivs:\t{nnp}"));
        let filtered = if name == "granted-seccomp" { 2 } else { 0 };
        has_line(name, o, &format!("Seccomp:\t{filtered}"));
    }
}

/// Without the capabilities the same steps fail exactly as under runc:
/// - root with containerd's default capabilities (no CAP_SYS_ADMIN):
///   unshare EPERM, a seccomp filter without PR_SET_NO_NEW_PRIVS EACCES
///   (with it: allowed, as for anyone), setresuid works (CAP_SETUID);
/// - the same with a permissive runtime seccomp profile and no
///   no_new_privileges: the runtime has to load its own filter while it
///   still holds CAP_SYS_ADMIN, then the container gets the same errors;
/// - root without CAP_SETUID and CAP_SETGID: setresuid to another uid is
///   EPERM, even for uid 0;
/// - uid 1000 with the default capabilities in the spec: they are gone
///   after execve (no ambient set, no file capabilities), so setresuid to
///   another uid is EPERM too.
#[tokio::test]
#[ignore = "needs root"]
async fn nested_sandboxing_fails_as_under_runc_without_the_capabilities() {
    let nested = nested();
    check_applets();
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let variants: Vec<(&str, Value)> = vec![
        (
            "denied-root",
            probe_spec(&nested, |s| {
                s["process"]["capabilities"] = caps(CONTAINERD_DEFAULT_CAPS);
            }),
        ),
        (
            "denied-root-seccomp",
            probe_spec(&nested, |s| {
                s["process"]["capabilities"] = caps(CONTAINERD_DEFAULT_CAPS);
                s["linux"]["seccomp"] = json!({
                    "defaultAction": "SCMP_ACT_ALLOW",
                    "architectures": ["SCMP_ARCH_X86_64"],
                    "syscalls": [{"names": ["kexec_load"], "action": "SCMP_ACT_ERRNO",
                                  "errnoRet": 1}]
                });
            }),
        ),
        (
            "denied-root-nosetuid",
            probe_spec(&nested, |s| {
                let no_setid: Vec<&str> = CONTAINERD_DEFAULT_CAPS
                    .iter()
                    .copied()
                    .filter(|c| *c != "CAP_SETUID" && *c != "CAP_SETGID")
                    .collect();
                s["process"]["capabilities"] = caps(&no_setid);
            }),
        ),
        (
            "denied-user",
            probe_spec(&nested, |s| {
                s["process"]["capabilities"] = caps(CONTAINERD_DEFAULT_CAPS);
                s["process"]["user"] = json!({"uid": 1000, "gid": 1000});
            }),
        ),
    ];
    for (name, config) in variants {
        let out = same(name, both(&agent, &client, name, &config).await);
        assert_eq!((out.code, out.stderr.as_str()), (0, ""), "{name}: {out:?}");
        let o = &out.stdout;
        for line in [
            "unshare: unshare(0x40000000): Operation not permitted",
            "unshare=1",
            "unshare(CLONE_NEWNET): error EPERM (Operation not permitted)",
            "probe-unshare=1",
            "seccomp(nnp): filter installed, getpid -> -1 EPERM",
            "seccomp-nnp=0",
            "seccomp: error EACCES (Permission denied)",
            "seccomp=1",
            "NoNewPrivs:\t0",
        ] {
            has_line(name, o, line);
        }
        if name == "denied-user" || name == "denied-root-nosetuid" {
            has_line(name, o, "setresuid: error EPERM (Operation not permitted)");
            has_line(name, o, "setresuid=1");
            // None left after execve as uid 1000; root without bits 6, 7.
            let eff = if name == "denied-user" {
                "0000000000000000"
            } else {
                "00000000a804253b"
            };
            has_line(name, o, &format!("CapEff:\t{eff}"));
        } else {
            has_line(name, o, "setresuid: ok, uid=1234 euid=1234 suid=1234");
            has_line(name, o, "setresuid=0");
            // containerd's default set: 0xa80425fb.
            has_line(name, o, "CapEff:\t00000000a80425fb");
        }
        let filtered = if name == "denied-root-seccomp" { 2 } else { 0 };
        has_line(name, o, &format!("Seccomp:\t{filtered}"));
    }
}

/// The differential probe: identity, cwd, environment, capability and
/// seccomp state, rlimits, the root and /proc/sys writability, masked
/// paths.
///
/// `/proc/kcore` is read with `head -c 16`, not `cat … | wc -c`: unmasked
/// and readable it is as large as the kernel's address space.
/// `/proc/keys` without the serial (random): a non-root process sees its
/// session keyring (runc's `_ses.<id>`). Not listed for root, who also
/// sees every other uid-0 keyring on the host.
/// Writability comes from the first mount option in /proc/self/mounts:
/// busybox `test -w` says yes to root whatever the mount.
const DIFFERENTIAL: &str = "exec 2>&1
id; pwd; env | sort
grep -E '^(Cap(Inh|Prm|Eff|Bnd|Amb)|NoNewPrivs|Seccomp):' /proc/self/status
echo nofile=$(ulimit -n)/$(ulimit -Hn) nproc=$(ulimit -u) core=$(ulimit -c)
for f in /proc/kcore /proc/keys /proc/timer_list; do
  echo $f=$(head -c 16 $f 2>/dev/null | wc -c)
done
ls /proc/acpi | wc -l
awk '$2 == \"/\" || $2 == \"/proc/sys\" || $2 == \"/proc/sysrq-trigger\" {
  split($4, o, \",\"); print $2, o[1] }' /proc/self/mounts
[ $(id -u) = 0 ] || awk '{ print $5, $6, $7, $8, $9 }' /proc/keys
touch /probe-write; echo touch=$?
kill -0 1; echo kill=$?
unshare -n true; echo unshare=$?
exit 7";

/// One probe script under the agent and under runc for each row; the
/// outputs (stdout, stderr, exit status) must be equal. Nothing is
/// filtered: the script prints no pid, the hostname is the spec's and the
/// same under both, and the network namespace is new in both.
#[tokio::test]
#[ignore = "needs root"]
async fn runc_differential_table() {
    check_applets();
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let all_caps: Vec<&str> = vec![];
    let mut rows: Vec<(&str, Value)> = vec![
        ("default", probe_spec(DIFFERENTIAL, |_| {})),
        (
            "env",
            probe_spec(DIFFERENTIAL, |s| {
                s["process"]["env"] = json!([
                    "PATH=/bin:/usr/bin",
                    "FOO=bar",
                    "EMPTY=",
                    "SPACED=a b  c",
                    "EQUALS=x=y=z",
                    "HOME=/tmp"
                ]);
            }),
        ),
        (
            "cwd",
            probe_spec(DIFFERENTIAL, |s| {
                s["process"]["cwd"] = json!("/tmp");
            }),
        ),
        (
            "user",
            probe_spec(DIFFERENTIAL, |s| {
                s["process"]["user"] =
                    json!({"uid": 1000, "gid": 1001, "additionalGids": [1002, 1003]});
                s["process"]["capabilities"] = caps(CONTAINERD_DEFAULT_CAPS);
            }),
        ),
        (
            "default-caps",
            probe_spec(DIFFERENTIAL, |s| {
                s["process"]["capabilities"] = caps(CONTAINERD_DEFAULT_CAPS);
            }),
        ),
        (
            "no-caps",
            probe_spec(DIFFERENTIAL, |s| {
                s["process"]["capabilities"] = caps(&all_caps);
            }),
        ),
        (
            "readonly-rootfs",
            probe_spec(DIFFERENTIAL, |s| {
                s["root"]["readonly"] = json!(true);
            }),
        ),
        (
            "rlimits",
            probe_spec(DIFFERENTIAL, |s| {
                s["process"]["rlimits"] = json!([
                    {"type": "RLIMIT_NOFILE", "soft": 1000, "hard": 2000},
                    {"type": "RLIMIT_NPROC", "soft": 300, "hard": 300},
                    {"type": "RLIMIT_CORE", "soft": 0, "hard": 0}
                ]);
            }),
        ),
        (
            "masked-paths",
            probe_spec(DIFFERENTIAL, |s| {
                s["linux"]["maskedPaths"] = json!([
                    "/proc/kcore",
                    "/proc/keys",
                    "/proc/timer_list",
                    "/proc/acpi"
                ]);
                s["linux"]["readonlyPaths"] = json!(["/proc/sys", "/proc/sysrq-trigger"]);
            }),
        ),
    ];
    match std::fs::read(CONTAINERD_SECCOMP) {
        Ok(profile) => {
            let profile: Value = serde_json::from_slice(&profile).unwrap();
            rows.push((
                "containerd-seccomp",
                probe_spec(DIFFERENTIAL, |s| {
                    s["process"]["capabilities"] = caps(CONTAINERD_DEFAULT_CAPS);
                    s["linux"]["seccomp"] = profile;
                }),
            ));
        }
        Err(e) => println!(
            "SKIPPED row containerd-seccomp: {CONTAINERD_SECCOMP}: {e} \
             (the fixture belongs to tests/containers_spec.rs)"
        ),
    }
    // Every row runs; the differences are reported together.
    let mut seen = Vec::new();
    let mut differ = Vec::new();
    for (name, config) in rows {
        let [agent_out, runc_out] = both(&agent, &client, name, &config).await;
        if agent_out != runc_out {
            differ.push(format!(
                "{name}:\n  agent: {agent_out:?}\n  runc:  {runc_out:?}"
            ));
            continue;
        }
        let out = same(name, [agent_out, runc_out]);
        assert_eq!(out.code, 7, "{name}: {out:?}");
        seen.push((name, out.stdout));
    }
    assert!(
        differ.is_empty(),
        "the agent and runc differ:\n{}",
        differ.join("\n")
    );
    // The rows did change what the probe sees (else the comparison proves
    // little): every row's output differs from the default row's, except
    // no-caps: a spec without `capabilities` means none at all, as in runc.
    let default = seen[0].1.clone();
    for (name, out) in &seen[1..] {
        if *name == "no-caps" {
            assert_eq!(*out, default, "{name}: differs from the default row");
        } else {
            assert_ne!(*out, default, "{name}: same output as the default row");
        }
    }
    let row = |n: &str| &seen.iter().find(|(name, _)| *name == n).unwrap().1;
    has_line("env", row("env"), "SPACED=a b  c");
    has_line("cwd", row("cwd"), "/tmp");
    has_line("readonly-rootfs", row("readonly-rootfs"), "/ ro");
    // /proc/kcore reads nothing without CAP_SYS_RAWIO anyway; the other
    // two are readable unless masked.
    has_line("default", row("default"), "/proc/keys=16");
    has_line("default", row("default"), "/proc/timer_list=16");
    has_line("masked-paths", row("masked-paths"), "/proc/keys=0");
    has_line("masked-paths", row("masked-paths"), "/proc/timer_list=0");
    has_line("masked-paths", row("masked-paths"), "/proc/sys ro");
    has_line(
        "rlimits",
        row("rlimits"),
        "nofile=1000/2000 nproc=300 core=0",
    );
    has_line("no-caps", row("no-caps"), "CapBnd:\t0000000000000000");
    // Its own session keyring, owned by root (created before setuid).
    assert!(
        row("user")
            .lines()
            .any(|l| l.ends_with(" 0 0 keyring _ses.user:")),
        "user: no session keyring _ses.user:\n{}",
        row("user")
    );
}

/// Z-state processes whose parent is `pid`.
fn zombie_children(pid: u32) -> Vec<String> {
    let mut zombies = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // pid (comm) state ppid …; comm may contain spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
            continue;
        };
        let mut fields = rest.split(' ');
        let (state, ppid) = (fields.next(), fields.next());
        if state == Some("Z") && ppid == Some(&pid.to_string()) {
            zombies.push(stat.trim().to_string());
        }
    }
    zombies
}

/// How many exits nobody waited for the agent has reaped so far (its
/// debug log has one "reaped unclaimed child" line for each).
fn unclaimed_reaps(agent: &Agent) -> usize {
    agent.stderr().matches("reaped unclaimed child").count()
}

/// Creates and starts container `id` from `config` (its init prints
/// `init_output` and then waits for /tmp/stop), runs 20 execs at once while
/// the init is busy (exec n forks 20 children and exits with n; exec 13
/// kills itself: 128 + 9), checks every exec's WaitProcess, stops the init
/// and checks its status and output, and removes the container.
async fn init_with_parallel_execs(
    agent: &Agent,
    client: &AgentClient,
    id: &'static str,
    config: Vec<u8>,
    init_output: &str,
    init_status: i32,
) {
    create(client, id, config, stdio(false, true, false, false))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.stderr()));
    let out = agent.stream(id, "", StreamKind::Stdout).unwrap();
    let reader = std::thread::spawn(move || read_all(out));
    start(client, id).await.unwrap();
    let execs: Vec<_> = (1..=20)
        .map(|n| {
            let client = client.clone();
            let script = if n == 13 {
                "for j in $(seq 20); do (exit 1) & done; wait; kill -9 $$".to_string()
            } else {
                format!("for j in $(seq 20); do (exit $j) & done; wait; exit {n}")
            };
            tokio::spawn(async move {
                let exec_id = format!("e{n}");
                exec(
                    &client,
                    id,
                    &exec_id,
                    process_json(&["sh", "-c", &script], ""),
                    stdio(false, false, false, false),
                )
                .await
                .map_err(|e| format!("exec {exec_id}: {e:?}"))?;
                let w = wait(&client, id, &exec_id)
                    .await
                    .map_err(|e| format!("wait {exec_id}: {e:?}"))?;
                Ok::<_, String>((n, w.exit_status))
            })
        })
        .collect();
    for task in execs {
        let (n, status) = task
            .await
            .unwrap()
            .unwrap_or_else(|e| panic!("{id}: {e}\n{}", agent.stderr()));
        let want = if n == 13 { 128 + 9 } else { n };
        assert_eq!(status, want, "{id}: exec e{n}");
    }
    exec(
        client,
        id,
        "stop",
        process_json(&["touch", "/tmp/stop"], ""),
        stdio(false, false, false, false),
    )
    .await
    .unwrap();
    assert_eq!(wait(client, id, "stop").await.unwrap().exit_status, 0);
    assert_eq!(
        wait(client, id, "").await.unwrap().exit_status,
        init_status,
        "{id}: init"
    );
    assert_eq!(reader.join().unwrap(), init_output, "{id}: init output");
    remove(client, id).await;
}

/// An init that forks 500 short-lived children while 20 execs (each
/// forking children of its own) run in parallel: every WaitProcess reports
/// its own process's status, the init's status is right. The same without
/// a pid namespace, where 300 orphans land on the agent's reaper. The
/// agent has no zombie child afterwards and still serves. Then an init that exits with
/// hundreds of children still running (the kernel kills them with the pid
/// namespace) is reported with its own status.
#[tokio::test]
#[ignore = "needs root"]
async fn reaping_under_fork_storm_and_parallel_execs() {
    check_applets();
    // The zombie check sees a zombie: an exited, unwaited child of ours.
    let mut child = Command::new("/bin/true").spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while zombie_children(std::process::id()).is_empty() {
        assert!(Instant::now() < deadline, "zombie_children misses a zombie");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait().unwrap();

    let agent = Agent::start();
    let (health, client) = agent.connect().await;
    let agent_pid = agent.pid();
    let init = "for i in $(seq 500); do (exit $((i % 7))) & done; wait; echo forked; \
                while [ ! -e /tmp/stop ]; do sleep 0.05; done; exit 42";
    let (guest, _) = sandbox_rootfs(&agent, "storm");
    let config = spec("storm", &guest, process_json(&["sh", "-c", init], ""));
    init_with_parallel_execs(&agent, &client, "storm", config, "forked\n", 42).await;

    // No pid namespace (as for containers that share the host's or the
    // pod's): orphans are re-parented to the agent itself (PID 1 in the
    // guest, a child subreaper here), 300 of them while the execs run, and
    // its reaper collects them without mixing them up with the execs.
    let init = "for i in $(seq 300); do (sh -c 'exit 3' &); done; echo orphaned; \
                while [ ! -e /tmp/stop ]; do sleep 0.05; done; exit 9";
    let (guest, _) = sandbox_rootfs(&agent, "shared");
    let mut config: Value = serde_json::from_slice(&spec(
        "shared",
        &guest,
        process_json(&["sh", "-c", init], ""),
    ))
    .unwrap();
    config["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .retain(|ns| ns["type"] != "pid");
    let before = unclaimed_reaps(&agent);
    init_with_parallel_execs(
        &agent,
        &client,
        "shared",
        serde_json::to_vec(&config).unwrap(),
        "orphaned\n",
        9,
    )
    .await;
    let orphans = unclaimed_reaps(&agent) - before;
    assert!(
        orphans >= 300,
        "the agent reaped {orphans} unclaimed exits, not the 300 orphans"
    );

    // An init that leaves 300 children running when it exits.
    let (out, err, code) = run(
        &agent,
        &client,
        "orphans",
        process_json(
            &[
                "sh",
                "-c",
                "i=0; while [ $i -lt 300 ]; do sleep 100 & i=$((i+1)); done; echo spawned; exit 5",
            ],
            "",
        ),
    )
    .await;
    assert_eq!((out.as_str(), err.as_str(), code), ("spawned\n", "", 5));

    // Every exit the agent was parent of has been collected. Reaping is
    // asynchronous (SIGCHLD), so allow it a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let zombies = zombie_children(agent_pid);
        if zombies.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "zombie children of the agent:\n{}",
            zombies.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // And it still serves: health, and a new container.
    assert!(health.check(ctx(), &CheckRequest::new()).await.is_ok());
    let (out, _, code) = run(
        &agent,
        &client,
        "after",
        process_json(&["echo", "still here"], ""),
    )
    .await;
    assert_eq!((out.as_str(), code), ("still here\n", 0));
}

/// `runc delete --force` when dropped, so a failed assertion leaves no
/// detached container behind.
struct RuncDelete {
    state: PathBuf,
    id: String,
}

impl Drop for RuncDelete {
    fn drop(&mut self) {
        let _ = Command::new(RUNC)
            .arg("--root")
            .arg(&self.state)
            .args(["delete", "--force", &self.id])
            .stderr(Stdio::null())
            .status();
    }
}

/// An exec whose Process has no `capabilities` gets the container's (runc
/// exec's reading), one with `capabilities` gets exactly those: compared
/// with `runc exec` on a container from the same config.json.
#[tokio::test]
#[ignore = "needs root"]
async fn exec_capabilities_as_under_runc_exec() {
    check_applets();
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let name = "execcaps";
    let pid = std::process::id();
    let config = probe_spec("sleep 1000", |s| {
        s["process"]["capabilities"] = caps(CONTAINERD_DEFAULT_CAPS);
    });
    let script = "grep -E '^Cap(Inh|Prm|Eff|Bnd|Amb):' /proc/self/status";
    let execs = [
        ("inherit", process_json(&["sh", "-c", script], "")),
        (
            "kill-only",
            process_json(
                &["sh", "-c", script],
                r#"{"capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
                                     "permitted": ["CAP_KILL"]}}"#,
            ),
        ),
    ];

    // Under the agent.
    let (guest, _) = sandbox_rootfs(&agent, &format!("{name}-agent"));
    let mut for_agent = config.clone();
    for_agent["root"]["path"] = json!(guest);
    for_agent["linux"]["cgroupsPath"] = json!(format!("/boxlite-test/{name}-{pid}"));
    create(
        &client,
        name,
        serde_json::to_vec(&for_agent).unwrap(),
        stdio(false, false, false, false),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.stderr()));
    start(&client, name).await.unwrap();
    let mut under_agent = Vec::new();
    for (exec_id, process) in &execs {
        let streams = {
            let dir = agent.dir.path().to_path_buf();
            let exec_id = exec_id.to_string();
            std::thread::spawn(move || {
                let s = AgentStreams { dir }
                    .stream(name, &exec_id, StreamKind::Stdout)
                    .unwrap();
                read_all(s)
            })
        };
        exec(
            &client,
            name,
            exec_id,
            process.clone(),
            stdio(false, true, false, false),
        )
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.stderr()));
        let code = wait(&client, name, exec_id).await.unwrap().exit_status;
        under_agent.push((code, streams.join().unwrap()));
    }
    remove(&client, name).await;

    // Under runc: a detached container, then runc exec --process.
    let (_, host) = sandbox_rootfs(&agent, &format!("{name}-runc"));
    let mut for_runc = config.clone();
    for_runc["root"]["path"] = json!(host);
    for_runc["linux"]["cgroupsPath"] = json!(format!("/boxlite-test-runc/{name}-{pid}"));
    let state = agent.dir.path().join("runc-state");
    let bundle = agent.dir.path().join("runc-bundles").join(name);
    std::fs::create_dir_all(&bundle).unwrap();
    std::fs::write(
        bundle.join("config.json"),
        serde_json::to_vec(&for_runc).unwrap(),
    )
    .unwrap();
    let runc = |args: &[&str]| {
        let mut c = Command::new(RUNC);
        c.arg("--root").arg(&state).args(args);
        c
    };
    // The detached init keeps runc's stdio: a file, not a pipe that would
    // never reach EOF.
    let log = bundle.join("run.stderr");
    let detached = runc(&["run", "--detach", "--bundle"])
        .arg(&bundle)
        .arg(name)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .status()
        .unwrap();
    assert!(
        detached.success(),
        "runc run --detach: {}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let _delete = RuncDelete {
        state: state.clone(),
        id: name.to_string(),
    };
    let mut under_runc = Vec::new();
    for (exec_id, process) in &execs {
        let file = bundle.join(format!("{exec_id}.json"));
        std::fs::write(&file, serde_json::to_vec(process).unwrap()).unwrap();
        let out = runc(&["exec", "--process"])
            .arg(&file)
            .arg(name)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stderr),
            "",
            "runc exec {exec_id}"
        );
        under_runc.push((
            out.status.code().unwrap_or(-1),
            String::from_utf8(out.stdout).unwrap(),
        ));
    }

    assert_eq!(
        under_agent, under_runc,
        "execs: the agent (left) and runc (right) differ"
    );
    // The container's default set (0xa80425fb) and CAP_KILL (bit 5).
    assert!(
        under_agent[0].1.contains("CapEff:\t00000000a80425fb\n"),
        "{under_agent:?}"
    );
    assert!(
        under_agent[1].1.contains("CapEff:\t0000000000000020\n"),
        "{under_agent:?}"
    );
}
