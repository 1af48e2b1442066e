//! The agent's container service inside a real guest (QEMU TCG): a busybox
//! rootfs the test builds on the host reaches the guest through virtio-fs,
//! the agent runs containers from it with the guest's cgroup v2, and stdio
//! travels over dedicated vsock streams through the hybrid socket — the path
//! the shim will use.
//!
//! `#[ignore]`d like every VM test: root, QEMU, virtiofsd, boxlite-vsock,
//! gcc (the sandbox probe) and the guest assets (scripts/test.sh provides
//! them). Device cgroup rules and nested sandboxing are checked here too.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use boxlite_protocol::agent::{
    CreateContainerRequest, ExecProcessRequest, GetOOMEventRequest, PauseContainerRequest,
    RemoveContainerRequest, ResumeContainerRequest, SignalProcessRequest, StartContainerRequest,
    StatsContainerRequest, StdioConfig, WaitProcessRequest,
};
use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::stdio::{read_ack, StreamHeader, StreamKind};
use boxlite_protocol::STDIO_VSOCK_PORT;
use boxlite_runtime::HybridVsock;
use boxlite_tests::sandbox_vm::SandboxVm;

const SHARE_TAG: &str = "shared";
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "sleep", "hostname", "true", "head", "unshare", "ip", "grep", "dd",
];
// containerd's default capabilities (no CAP_SYS_ADMIN), the list the
// agent's own sandboxing tests use.
use boxlite_test_support::caps::CONTAINERD_DEFAULT_CAPS;

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

/// Writes a busybox rootfs for container `id` under the host share and
/// returns its path as the guest sees it.
fn busybox_rootfs(share: &Path, id: &str) -> String {
    let root = share.join(id).join("rootfs");
    for d in ["bin", "proc", "dev", "tmp", "etc", "sys"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static installed");
    for applet in APPLETS {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
    format!(
        "{}/{id}/rootfs",
        boxlite_protocol::default_share_mount_point(SHARE_TAG)
    )
}

/// A runc-like spec for container `id` (cgroup namespace included, as
/// containerd's CRI plugin adds it on cgroup v2 hosts).
fn spec(id: &str, rootfs: &str, args: &[&str]) -> Vec<u8> {
    boxlite_tests::runc_like_spec(id, rootfs, &format!("/boxlite/{id}"), args)
}

fn stdio(stdout: bool, stderr: bool) -> protobuf::MessageField<StdioConfig> {
    Some(StdioConfig {
        stdout,
        stderr,
        ..Default::default()
    })
    .into()
}

/// Opens one stdio stream through the hybrid socket and returns it after the
/// agent's ack, as a blocking std stream.
async fn open_stream(vsock: &HybridVsock, id: &str, exec: &str, kind: StreamKind) -> UnixStream {
    let stream = vsock
        .connect(STDIO_VSOCK_PORT, Duration::from_secs(10))
        .await
        .unwrap()
        .into_std()
        .unwrap();
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let header = StreamHeader {
        stream: kind,
        container_id: id.into(),
        exec_id: exec.into(),
    };
    (&stream).write_all(&header.encode().unwrap()).unwrap();
    read_ack(&mut &stream).unwrap();
    stream
}

fn drain(mut stream: UnixStream) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut out = String::new();
        stream.read_to_string(&mut out).unwrap();
        out
    })
}

async fn wait(agent: &AgentClient, id: &str, exec: &str) -> i32 {
    let req = WaitProcessRequest {
        container_id: id.into(),
        exec_id: exec.into(),
        ..Default::default()
    };
    agent.wait_process(ctx(), &req).await.unwrap().exit_status
}

async fn remove(agent: &AgentClient, id: &str) {
    let req = RemoveContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    agent.remove_container(ctx(), &req).await.unwrap();
}

/// Container `id` running `sh -c script` under a 16 MiB memory limit, for
/// the OOM-kill steps.
fn memory_limited_spec(share: &Path, id: &str, script: &str) -> serde_json::Value {
    let rootfs = busybox_rootfs(share, id);
    let mut limited: serde_json::Value =
        serde_json::from_slice(&spec(id, &rootfs, &["sh", "-c", script])).unwrap();
    limited["linux"]["resources"]["memory"] = serde_json::json!({"limit": 16 << 20});
    limited
}

/// SIGKILLs container `id`'s init, checks it ends with 137, removes it.
async fn kill_and_remove(agent: &AgentClient, id: &str) {
    let kill = SignalProcessRequest {
        container_id: id.into(),
        signal: 9,
        ..Default::default()
    };
    agent.signal_process(ctx(), &kill).await.unwrap();
    assert_eq!(wait(agent, id, "").await, 137, "{id} after SIGKILL");
    remove(agent, id).await;
}

/// A booted guest with a host directory shared as [`SHARE_TAG`] and its
/// sandbox created; the agent logs at debug level to the console, which is
/// printed if the test fails.
async fn boot(id: &str) -> SandboxVm {
    SandboxVm::boot(id, SHARE_TAG, "boxlite.log=debug").await
}

/// Runs container `id` from `spec` to its end with stdout (stderr merged by
/// the script if it wants) and returns its exit status and output.
async fn run_to_end(g: &SandboxVm, id: &str, spec: &serde_json::Value) -> (i32, String) {
    let agent = g.conn.agent();
    let vsock = g.vm.hybrid_vsock();
    let create = CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: serde_json::to_vec(spec).unwrap(),
        stdio: stdio(true, false),
        ..Default::default()
    };
    agent.create_container(ctx(), &create).await.unwrap();
    let out = drain(open_stream(&vsock, id, "", StreamKind::Stdout).await);
    let start = StartContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    agent.start_container(ctx(), &start).await.unwrap();
    let code = wait(agent, id, "").await;
    let out = out.join().unwrap();
    remove(agent, id).await;
    (code, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU, virtiofsd, boxlite-vsock, busybox-static and the guest assets"]
async fn containers_run_inside_the_guest() {
    let g = boot("ctr1").await;
    let share = &g.share;
    let agent = g.conn.agent();
    let vsock = g.vm.hybrid_vsock();

    // 1. Output on both streams, drained before the exit status is reported.
    let rootfs = busybox_rootfs(share.path(), "c1");
    let script = "echo hello from $(hostname); echo to-stderr >&2; exit 3";
    let create = CreateContainerRequest {
        container_id: "c1".into(),
        oci_spec_json: spec("c1", &rootfs, &["sh", "-c", script]),
        stdio: stdio(true, true),
        ..Default::default()
    };
    agent.create_container(ctx(), &create).await.unwrap();
    let out = drain(open_stream(&vsock, "c1", "", StreamKind::Stdout).await);
    let err = drain(open_stream(&vsock, "c1", "", StreamKind::Stderr).await);
    let start = StartContainerRequest {
        container_id: "c1".into(),
        ..Default::default()
    };
    let pid = agent.start_container(ctx(), &start).await.unwrap().pid;
    assert!(pid > 1);
    assert_eq!(wait(agent, "c1", "").await, 3);
    assert_eq!(out.join().unwrap(), "hello from c1\n");
    assert_eq!(err.join().unwrap(), "to-stderr\n");
    remove(agent, "c1").await;

    // 2. A long-running container: exec, stats from the guest's cgroup v2,
    //    pause refuses exec, resume, SIGKILL gives 137.
    let rootfs = busybox_rootfs(share.path(), "c2");
    let create = CreateContainerRequest {
        container_id: "c2".into(),
        oci_spec_json: spec("c2", &rootfs, &["sleep", "300"]),
        stdio: stdio(false, false),
        ..Default::default()
    };
    agent.create_container(ctx(), &create).await.unwrap();
    let start = StartContainerRequest {
        container_id: "c2".into(),
        ..Default::default()
    };
    agent.start_container(ctx(), &start).await.unwrap();

    let exec_req = |exec_id: &str| ExecProcessRequest {
        container_id: "c2".into(),
        exec_id: exec_id.into(),
        process_json: serde_json::to_vec(&serde_json::json!({
            "cwd": "/", "args": ["cat", "/proc/self/cgroup"], "env": ["PATH=/bin"],
            "user": {"uid": 0, "gid": 0},
        }))
        .unwrap(),
        stdio: stdio(true, false),
        ..Default::default()
    };
    let e1 = exec_req("e1");
    let (pid, out) = tokio::join!(
        agent.exec_process(ctx(), &e1),
        open_stream(&vsock, "c2", "e1", StreamKind::Stdout)
    );
    assert!(pid.unwrap().pid > 1);
    let out = drain(out);
    assert_eq!(wait(agent, "c2", "e1").await, 0);
    assert_eq!(out.join().unwrap(), "0::/\n", "cgroup namespace view");

    let stats = agent
        .stats_container(
            ctx(),
            &StatsContainerRequest {
                container_id: "c2".into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(stats.memory.usage > 0, "{stats:?}");
    assert!(stats.pids.current >= 1, "{stats:?}");

    let pause = PauseContainerRequest {
        container_id: "c2".into(),
        ..Default::default()
    };
    agent.pause_container(ctx(), &pause).await.unwrap();
    let refused = agent
        .exec_process(ctx(), &exec_req("e2"))
        .await
        .unwrap_err();
    match refused {
        ttrpc::Error::RpcStatus(s) => {
            assert_eq!(s.code(), ttrpc::Code::FAILED_PRECONDITION, "{s:?}")
        }
        other => panic!("expected an RPC status, got {other:?}"),
    }
    let resume = ResumeContainerRequest {
        container_id: "c2".into(),
        ..Default::default()
    };
    agent.resume_container(ctx(), &resume).await.unwrap();
    kill_and_remove(agent, "c2").await;

    // 3. Device cgroup rules under cgroup v2 (the agent's eBPF program): a
    //    listed node that no rule allows cannot be opened; runc's standard
    //    set stays usable despite the leading "deny all".
    let rootfs = busybox_rootfs(share.path(), "c3");
    let script = "head -c1 /dev/fuse >/dev/null 2>/tmp/e; echo fuse=$?; cat /tmp/e; \
                  cat /dev/null && echo null=ok";
    let mut c3: serde_json::Value =
        serde_json::from_slice(&spec("c3", &rootfs, &["sh", "-c", script])).unwrap();
    c3["linux"]["devices"] = serde_json::json!([
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o666}
    ]);
    c3["linux"]["resources"]["devices"] = serde_json::json!([
        {"allow": false, "access": "rwm"},
        {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rwm"}
    ]);
    let (code, out) = run_to_end(&g, "c3", &c3).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.starts_with("fuse=1\n")
            && out.contains("Operation not permitted")
            && out.ends_with("null=ok\n"),
        "{out:?}"
    );

    // 4. An OOM kill under the guest's cgroup v2 memory limit reaches
    //    GetOOMEvent (memory.events oom_kill), long-polled from before.
    let c4 = memory_limited_spec(
        share.path(),
        "c4",
        "dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null; echo dd=$?",
    );
    let poll = {
        let agent = agent.clone();
        tokio::spawn(async move {
            agent
                .get_oom_event(
                    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64),
                    &GetOOMEventRequest::default(),
                )
                .await
        })
    };
    let (code, out) = run_to_end(&g, "c4", &c4).await;
    assert_eq!((code, out.as_str()), (0, "dd=137\n"), "OOM-killed dd");
    let event = tokio::time::timeout(Duration::from_secs(60), poll)
        .await
        .expect("GetOOMEvent answered")
        .unwrap()
        .unwrap();
    assert_eq!(event.container_id, "c4");

    // 5. The same kill while the container's init lives on: no process the
    //    agent tracks exits, so only the watcher on memory.events can report
    //    it (inotify in the guest; nothing polls there).
    let c5 = memory_limited_spec(
        share.path(),
        "c5",
        "dd if=/dev/zero of=/dev/null bs=64M count=1 2>/dev/null; echo dd=$?; exec sleep 3600",
    );
    let create = CreateContainerRequest {
        container_id: "c5".into(),
        oci_spec_json: serde_json::to_vec(&c5).unwrap(),
        stdio: stdio(true, false),
        ..Default::default()
    };
    agent.create_container(ctx(), &create).await.unwrap();
    let out = open_stream(&vsock, "c5", "", StreamKind::Stdout).await;
    let start = StartContainerRequest {
        container_id: "c5".into(),
        ..Default::default()
    };
    agent.start_container(ctx(), &start).await.unwrap();
    let event = agent
        .get_oom_event(
            ttrpc::context::with_timeout(Duration::from_secs(60).as_nanos() as i64),
            &GetOOMEventRequest::default(),
        )
        .await
        .expect("GetOOMEvent answered while c5's init still runs");
    assert_eq!(event.container_id, "c5");
    // The event may come before sh has printed dd's status (the stream
    // has a 60 s read timeout).
    let first_line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line).unwrap();
        line
    })
    .await
    .unwrap();
    assert_eq!(first_line, "dd=137\n", "c5's dd was OOM-killed");
    kill_and_remove(agent, "c5").await;

    g.stop().await;
}

/// The sandbox probe the agent's sandboxing tests use too, static.
fn sandbox_probe() -> std::path::PathBuf {
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sandbox_probe-guest-{}", std::process::id()));
    boxlite_test_support::sandbox_probe::build(&out);
    out
}

/// Nested sandboxing in a container of a real guest (issue 5, item 4; the
/// host-side tests compare the same probe with runc): with CAP_SYS_ADMIN
/// granted a container makes a network namespace, installs seccomp
/// filters and changes uid; with containerd's default capabilities the
/// namespace is EPERM and a filter without no_new_privs EACCES, as under
/// runc.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root, QEMU, virtiofsd, boxlite-vsock, busybox-static, gcc and the guest assets"]
async fn nested_sandboxing_inside_the_guest() {
    let probe = sandbox_probe();
    let g = boot("nest1").await;
    let script: &str = &boxlite_test_support::sandbox_probe::nested_script("CapEff|NoNewPrivs");
    let mut granted = CONTAINERD_DEFAULT_CAPS.to_vec();
    granted.push("CAP_SYS_ADMIN");
    let cases: [(&str, &[&str], &[&str]); 2] = [
        (
            "granted",
            &granted,
            &[
                "unshare=0",
                "unshare(CLONE_NEWNET): ok",
                "probe-unshare=0",
                "seccomp(nnp): filter installed, getpid -> -1 EPERM",
                "seccomp: filter installed, getpid -> -1 EPERM",
                "seccomp=0",
                "setresuid: ok, uid=1234 euid=1234 suid=1234",
                "NoNewPrivs:\t0",
            ],
        ),
        (
            "denied",
            CONTAINERD_DEFAULT_CAPS,
            &[
                "unshare: unshare(0x40000000): Operation not permitted",
                "unshare=1",
                "unshare(CLONE_NEWNET): error EPERM (Operation not permitted)",
                "probe-unshare=1",
                "seccomp(nnp): filter installed, getpid -> -1 EPERM",
                "seccomp: error EACCES (Permission denied)",
                "seccomp=1",
                "setresuid: ok, uid=1234 euid=1234 suid=1234",
                "CapEff:\t00000000a80425fb",
            ],
        ),
    ];
    for (name, caps, want) in cases {
        let rootfs = busybox_rootfs(g.share.path(), name);
        std::fs::copy(
            &probe,
            g.share.path().join(name).join("rootfs/bin/sandbox-probe"),
        )
        .unwrap();
        let mut spec: serde_json::Value =
            serde_json::from_slice(&spec(name, &rootfs, &["sh", "-c", script])).unwrap();
        spec["process"]["capabilities"] =
            serde_json::json!({"bounding": caps, "effective": caps, "permitted": caps});
        spec["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "network"}));
        let (code, out) = run_to_end(&g, name, &spec).await;
        assert_eq!(code, 0, "{name}:\n{out}");
        for line in want {
            assert!(
                out.lines().any(|l| l == *line),
                "{name}: no line {line:?} in:\n{out}"
            );
        }
        if name == "granted" {
            assert!(
                out.starts_with("1: lo: <LOOPBACK>"),
                "{name}: a new netns:\n{out}"
            );
        }
    }
    g.stop().await;
}
