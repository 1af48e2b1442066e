//! The container service in host mode: the real agent binary on unix
//! sockets with a temporary root, running containers from a busybox rootfs
//! the test builds from Debian's busybox-static (`/bin/busybox`).
//!
//! Tests that create containers need root (namespaces, cgroups, mounts) and
//! are `#[ignore = "needs root"]`; CI runs them as root with `--ignored`.
//! The bad-input tests that never reach the helper run everywhere.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use boxlite_protocol::agent::{
    CloseStdinRequest, CreateContainerRequest, ExecProcessRequest, ListProcessesRequest,
    PauseContainerRequest, RemoveContainerRequest, ResizePtyRequest, ResumeContainerRequest,
    SignalProcessRequest, StartContainerRequest, StatsContainerRequest, StdioConfig,
    UpdateContainerRequest, WaitProcessRequest, WaitProcessResponse,
};
use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::health::CheckRequest;
use boxlite_protocol::health_ttrpc::HealthClient;
use boxlite_protocol::stdio::{read_ack, StreamHeader, StreamKind};
use ttrpc::context::{self, Context};
use ttrpc::Code;

const BUSYBOX: &str = "/bin/busybox";
const APPLETS: &[&str] = &[
    "sh", "echo", "cat", "id", "pwd", "sleep", "env", "true", "false", "kill", "stty", "tty",
    "head", "wc", "ls", "grep",
];

struct Agent {
    child: Child,
    dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let stderr = std::fs::File::create(dir.path().join("agent.stderr")).expect("stderr");
        let unix = |name: &str| format!("unix://{}", dir.path().join(name).display());
        let child = Command::new(env!("CARGO_BIN_EXE_boxlite-agent"))
            .args(["--listen", &unix("agent.sock")])
            .args(["--stdio-listen", &unix("stdio.sock")])
            .arg("--root")
            .arg(dir.path().join("root"))
            .args(["--log", "debug"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn boxlite-agent");
        Agent { child, dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.stderr")).unwrap_or_default()
    }

    async fn connect(&self) -> (HealthClient, AgentClient) {
        let sock = self.dir.path().join("agent.sock");
        let addr = format!("unix://{}", sock.display());
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if sock.exists() {
                if let Ok(c) = ttrpc::asynchronous::Client::connect(&addr).await {
                    let health = HealthClient::new(c.clone());
                    if health.check(ctx(), &CheckRequest::new()).await.is_ok() {
                        return (health, AgentClient::new(c));
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "agent did not come up:\n{}",
                self.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A busybox rootfs at guest path `/rootfs/<name>`.
    fn rootfs(&self, name: &str) -> String {
        let dir = self.root().join("rootfs").join(name);
        for d in ["bin", "proc", "dev", "tmp", "etc", "sys"] {
            std::fs::create_dir_all(dir.join(d)).unwrap();
        }
        std::fs::copy(BUSYBOX, dir.join("bin/busybox")).unwrap();
        for a in APPLETS {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(a)).unwrap();
        }
        std::fs::write(dir.join("etc/passwd"), "root:x:0:0::/:/bin/sh\n").unwrap();
        format!("/rootfs/{name}")
    }

    /// Opens one stdio stream; returns the connection after its ack.
    fn stream(&self, id: &str, exec: &str, kind: StreamKind) -> Result<UnixStream, String> {
        let mut s = UnixStream::connect(self.dir.path().join("stdio.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let header = StreamHeader {
            stream: kind,
            container_id: id.into(),
            exec_id: exec.into(),
        };
        s.write_all(&header.encode().unwrap()).unwrap();
        read_ack(&mut s).map_err(|e| e.to_string())?;
        Ok(s)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn ctx() -> Context {
    context::with_timeout(Duration::from_secs(30).as_nanos() as i64)
}

fn status<T: std::fmt::Debug>(result: ttrpc::Result<T>) -> (Code, String) {
    match result {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_string()),
        other => panic!("expected an RPC status, got {other:?}"),
    }
}

fn process_json(args: &[&str], extra: &str) -> serde_json::Value {
    let mut p = serde_json::json!({
        "cwd": "/",
        "args": args,
        "env": ["PATH=/bin"],
        "user": {"uid": 0, "gid": 0},
    });
    if !extra.is_empty() {
        let extra: serde_json::Value = serde_json::from_str(extra).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
    }
    p
}

/// A small runc-like spec: new pid, mount, ipc and uts namespaces, proc and
/// a tmpfs /dev, a cgroup per test under /boxlite-test.
fn spec(id: &str, rootfs: &str, process: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": rootfs, "readonly": false},
        "hostname": "box",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
        ],
        "linux": {
            "cgroupsPath": format!("/boxlite-test/{id}-{}", std::process::id()),
            "namespaces": [{"type": "pid"}, {"type": "mount"}, {"type": "ipc"}, {"type": "uts"}],
        },
    }))
    .unwrap()
}

fn stdio(stdin: bool, stdout: bool, stderr: bool, terminal: bool) -> StdioConfig {
    StdioConfig {
        stdin,
        stdout,
        stderr,
        terminal,
        ..Default::default()
    }
}

async fn create(
    client: &AgentClient,
    id: &str,
    spec: Vec<u8>,
    io: StdioConfig,
) -> ttrpc::Result<()> {
    let req = CreateContainerRequest {
        container_id: id.into(),
        oci_spec_json: spec,
        stdio: Some(io).into(),
        ..Default::default()
    };
    client.create_container(ctx(), &req).await.map(|_| ())
}

async fn start(client: &AgentClient, id: &str) -> ttrpc::Result<u32> {
    let req = StartContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    client.start_container(ctx(), &req).await.map(|r| r.pid)
}

async fn wait(client: &AgentClient, id: &str, exec: &str) -> ttrpc::Result<WaitProcessResponse> {
    let req = WaitProcessRequest {
        container_id: id.into(),
        exec_id: exec.into(),
        ..Default::default()
    };
    client.wait_process(ctx(), &req).await
}

async fn remove(client: &AgentClient, id: &str) {
    let req = RemoveContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    client.remove_container(ctx(), &req).await.unwrap();
}

async fn signal(
    client: &AgentClient,
    id: &str,
    exec: &str,
    sig: u32,
    all: bool,
) -> ttrpc::Result<()> {
    let req = SignalProcessRequest {
        container_id: id.into(),
        exec_id: exec.into(),
        signal: sig,
        all,
        ..Default::default()
    };
    client.signal_process(ctx(), &req).await.map(|_| ())
}

async fn exec(
    client: &AgentClient,
    id: &str,
    exec_id: &str,
    process: serde_json::Value,
    io: StdioConfig,
) -> ttrpc::Result<u32> {
    let req = ExecProcessRequest {
        container_id: id.into(),
        exec_id: exec_id.into(),
        process_json: serde_json::to_vec(&process).unwrap(),
        stdio: Some(io).into(),
        ..Default::default()
    };
    client.exec_process(ctx(), &req).await.map(|r| r.pid)
}

fn read_all(mut s: UnixStream) -> String {
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Runs `args` as a container's init with stdout and stderr streams;
/// returns (stdout, stderr, exit status).
async fn run(
    agent: &Agent,
    client: &AgentClient,
    id: &str,
    process: serde_json::Value,
) -> (String, String, i32) {
    let rootfs = agent.rootfs(id);
    create(
        client,
        id,
        spec(id, &rootfs, process),
        stdio(false, true, true, false),
    )
    .await
    .unwrap_or_else(|e| panic!("create {id}: {e:?}\n{}", agent.stderr()));
    let out = agent.stream(id, "", StreamKind::Stdout).unwrap();
    let err = agent.stream(id, "", StreamKind::Stderr).unwrap();
    let readers = (
        std::thread::spawn(move || read_all(out)),
        std::thread::spawn(move || read_all(err)),
    );
    start(client, id).await.unwrap();
    let w = wait(client, id, "").await.unwrap();
    let stdout = readers.0.join().unwrap();
    let stderr = readers.1.join().unwrap();
    remove(client, id).await;
    (stdout, stderr, w.exit_status)
}

#[tokio::test]
#[ignore = "needs root"]
async fn echo_hello_over_the_stdout_stream() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let before = std::time::SystemTime::now();
    let (out, err, code) = run(
        &agent,
        &client,
        "hello",
        process_json(&["echo", "hello"], ""),
    )
    .await;
    assert_eq!((out.as_str(), err.as_str(), code), ("hello\n", "", 0));
    // The exit time is a real wall-clock time.
    let w = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    assert!(w > 0);
}

#[tokio::test]
#[ignore = "needs root"]
async fn exit_codes_stderr_and_large_output_arrive_whole() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let (out, err, code) = run(
        &agent,
        &client,
        "codes",
        process_json(&["sh", "-c", "echo out; echo err >&2; exit 3"], ""),
    )
    .await;
    assert_eq!((out.as_str(), err.as_str(), code), ("out\n", "err\n", 3));
    // 1 MiB of output, then an immediate exit: every byte arrives before
    // WaitProcess reports the exit.
    let (out, _, code) = run(
        &agent,
        &client,
        "big",
        process_json(
            &[
                "sh",
                "-c",
                "head -c 1048576 /dev/zero | wc -c; head -c 1048576 /dev/zero",
            ],
            "",
        ),
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(out.len(), "1048576\n".len() + 1048576, "{}", &out[..20]);
}

#[tokio::test]
#[ignore = "needs root"]
async fn env_cwd_user_and_hostname() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let (out, err, code) = run(
        &agent,
        &client,
        "envs",
        process_json(
            &[
                "sh",
                "-c",
                "echo $FOO; pwd; id -u; id -g; id -G; cat /proc/sys/kernel/hostname",
            ],
            r#"{"env": ["PATH=/bin", "FOO=bar"], "cwd": "/tmp",
                "user": {"uid": 1000, "gid": 1001, "additionalGids": [1002]}}"#,
        ),
    )
    .await;
    assert_eq!(err, "");
    assert_eq!(out, "bar\n/tmp\n1000\n1001\n1001 1002\nbox\n");
    assert_eq!(code, 0);
}

#[tokio::test]
#[ignore = "needs root"]
async fn signals_exec_stdin_pause_resume_stats_and_list() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let id = "sig";
    let rootfs = agent.rootfs(id);
    create(
        &client,
        id,
        spec(id, &rootfs, process_json(&["sleep", "1000"], "")),
        stdio(false, false, false, false),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.stderr()));
    let init_pid = start(&client, id).await.unwrap();
    assert!(init_pid > 0);

    // exec `cat` with stdin piped: streams connect while ExecProcess runs.
    let streams = {
        let dir = agent.dir.path().to_path_buf();
        std::thread::spawn(move || {
            let a = AgentStreams { dir };
            (
                a.stream("sig", "cat", StreamKind::Stdin),
                a.stream("sig", "cat", StreamKind::Stdout),
            )
        })
    };
    let cat_pid = exec(
        &client,
        id,
        "cat",
        process_json(&["cat"], ""),
        stdio(true, true, false, false),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.stderr()));
    let (stdin, stdout) = streams.join().unwrap();
    let (mut stdin, stdout) = (stdin.unwrap(), stdout.unwrap());
    stdin.write_all(b"ping\n").unwrap();
    stdin.shutdown(std::net::Shutdown::Write).unwrap();
    assert_eq!(read_all(stdout), "ping\n");
    assert_eq!(wait(&client, id, "cat").await.unwrap().exit_status, 0);

    // A second exec that stays, listed with its exec id.
    let sleeper = exec(
        &client,
        id,
        "sleeper",
        process_json(&["sleep", "1000"], ""),
        stdio(false, false, false, false),
    )
    .await
    .unwrap();
    let list = client
        .list_processes(
            ctx(),
            &ListProcessesRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let pids: Vec<(u32, String)> = list
        .processes
        .iter()
        .map(|p| (p.pid, p.exec_id.clone()))
        .collect();
    assert!(pids.contains(&(init_pid, String::new())), "{pids:?}");
    assert!(pids.contains(&(sleeper, "sleeper".to_string())), "{pids:?}");
    assert!(!pids.iter().any(|(p, _)| *p == cat_pid), "{pids:?}");

    let stats = client
        .stats_container(
            ctx(),
            &StatsContainerRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(stats.pids.current, 2, "{stats:?}");
    assert!(stats.memory.usage > 0, "{stats:?}");
    assert!(stats.cpu.usage_usec > 0, "{stats:?}");

    let update = UpdateContainerRequest {
        container_id: id.into(),
        resources_json: br#"{"pids": {"limit": 50}}"#.to_vec(),
        ..Default::default()
    };
    client.update_container(ctx(), &update).await.unwrap();
    let stats = client
        .stats_container(
            ctx(),
            &StatsContainerRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(stats.pids.limit, 50, "{stats:?}");

    // Pause: no exec; resume: exec works again.
    client
        .pause_container(
            ctx(),
            &PauseContainerRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let state = std::fs::read_to_string(format!("/proc/{init_pid}/status")).unwrap();
    assert!(state.lines().any(|l| l.starts_with("State:")), "{state}");
    let (code, msg) = status(
        exec(
            &client,
            id,
            "p",
            process_json(&["true"], ""),
            StdioConfig::new(),
        )
        .await,
    );
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("paused"), "{msg}");
    let (code, _) = status(
        client
            .pause_container(
                ctx(),
                &PauseContainerRequest {
                    container_id: id.into(),
                    ..Default::default()
                },
            )
            .await,
    );
    assert_eq!(code, Code::FAILED_PRECONDITION);
    client
        .resume_container(
            ctx(),
            &ResumeContainerRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    exec(
        &client,
        id,
        "after",
        process_json(&["true"], ""),
        StdioConfig::new(),
    )
    .await
    .unwrap();
    assert_eq!(wait(&client, id, "after").await.unwrap().exit_status, 0);

    // SIGKILL to the init alone, then WaitProcess says 128 + 9.
    signal(&client, id, "", 9, false).await.unwrap();
    assert_eq!(wait(&client, id, "").await.unwrap().exit_status, 137);
    // The pid namespace died with its init: the sleeper went too.
    assert_eq!(wait(&client, id, "sleeper").await.unwrap().exit_status, 137);
    let (code, msg) = status(signal(&client, id, "", 15, false).await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    assert!(msg.contains("already exited"), "{msg}");
    let (code, msg) = status(
        exec(
            &client,
            id,
            "late",
            process_json(&["true"], ""),
            StdioConfig::new(),
        )
        .await,
    );
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    remove(&client, id).await;
    let (code, _) = status(wait(&client, id, "").await);
    assert_eq!(code, Code::NOT_FOUND);
}

/// Stream opener usable from a thread.
struct AgentStreams {
    dir: PathBuf,
}

impl AgentStreams {
    fn stream(&self, id: &str, exec: &str, kind: StreamKind) -> Result<UnixStream, String> {
        let mut s = UnixStream::connect(self.dir.join("stdio.sock")).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let header = StreamHeader {
            stream: kind,
            container_id: id.into(),
            exec_id: exec.into(),
        };
        s.write_all(&header.encode().unwrap()).unwrap();
        read_ack(&mut s).map_err(|e| e.to_string())?;
        Ok(s)
    }
}

#[tokio::test]
#[ignore = "needs root"]
async fn terminal_with_resize() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let id = "tty";
    let rootfs = agent.rootfs(id);
    let process = process_json(&["sh", "-c", "stty size; tty"], r#"{"terminal": true}"#);
    create(
        &client,
        id,
        spec(id, &rootfs, process),
        stdio(false, true, false, true),
    )
    .await
    .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.stderr()));
    let resize = ResizePtyRequest {
        container_id: id.into(),
        rows: 40,
        columns: 100,
        ..Default::default()
    };
    client.resize_pty(ctx(), &resize).await.unwrap();
    let out = agent.stream(id, "", StreamKind::Stdout).unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = out;
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        String::from_utf8_lossy(&v).into_owned()
    });
    start(&client, id).await.unwrap();
    assert_eq!(wait(&client, id, "").await.unwrap().exit_status, 0);
    let out = reader.join().unwrap();
    assert!(out.contains("40 100"), "{out:?}");
    assert!(out.contains("/dev/pts/"), "{out:?}");
    remove(&client, id).await;
}

#[tokio::test]
#[ignore = "needs root"]
async fn bad_input_on_live_containers_is_a_clear_error() {
    let agent = Agent::start();
    let (health, client) = agent.connect().await;
    let id = "bad";
    let rootfs = agent.rootfs(id);
    create(
        &client,
        id,
        spec(id, &rootfs, process_json(&["cat"], "")),
        stdio(true, false, false, false),
    )
    .await
    .unwrap();
    // Duplicate id.
    let (code, _) = status(
        create(
            &client,
            id,
            spec(id, &rootfs, process_json(&["true"], "")),
            StdioConfig::new(),
        )
        .await,
    );
    assert_eq!(code, Code::ALREADY_EXISTS);
    // Start waits for the declared stdin; it arrives late but in time.
    let stdin = {
        let dir = agent.dir.path().to_path_buf();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            AgentStreams { dir }.stream("bad", "", StreamKind::Stdin)
        })
    };
    start(&client, id).await.unwrap();
    let mut stdin = stdin.join().unwrap().unwrap();
    let (code, _) = status(start(&client, id).await);
    assert_eq!(code, Code::FAILED_PRECONDITION);
    // A second stdin stream and an undeclared stdout are refused.
    let e = agent.stream(id, "", StreamKind::Stdin).unwrap_err();
    assert!(e.contains("already connected"), "{e}");
    let e = agent.stream(id, "", StreamKind::Stdout).unwrap_err();
    assert!(e.contains("no Stdout stream"), "{e}");
    // Unknown exec.
    let (code, msg) = status(wait(&client, id, "nope").await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    // CloseStdin: cat sees EOF and exits 0; stdin after close is refused.
    stdin.write_all(b"x").unwrap();
    client
        .close_stdin(
            ctx(),
            &CloseStdinRequest {
                container_id: id.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // cat writes to a stdout nobody declared: that output is dropped, and
    // the write succeeds.
    assert_eq!(wait(&client, id, "").await.unwrap().exit_status, 0);
    let e = agent.stream(id, "", StreamKind::Stdin).unwrap_err();
    assert!(e.contains("exited") || e.contains("closed"), "{e}");
    // Bad signal number.
    let (code, _) = status(signal(&client, id, "", 9999, false).await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    remove(&client, id).await;
    assert!(health.check(ctx(), &CheckRequest::new()).await.is_ok());
}

/// Seccomp with an argument filter, errnoRet and capabilities dropped:
/// kill(pid, 0) is refused with EPERM, kill(pid, SIGCONT) is allowed.
#[tokio::test]
#[ignore = "needs root"]
async fn seccomp_argument_filter_and_capabilities() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let id = "seccomp";
    let rootfs = agent.rootfs(id);
    let mut spec: serde_json::Value = serde_json::from_slice(&spec(
        id,
        &rootfs,
        process_json(
            &[
                "sh",
                "-c",
                "kill -0 $$; echo zero=$?; kill -CONT $$; echo cont=$?; \
                 grep -E '^(Seccomp|CapEff|NoNewPrivs):' /proc/self/status",
            ],
            r#"{"noNewPrivileges": true,
                "capabilities": {"bounding": ["CAP_KILL"], "effective": ["CAP_KILL"],
                                 "permitted": ["CAP_KILL"]}}"#,
        ),
    ))
    .unwrap();
    spec["linux"]["seccomp"] = serde_json::json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": [{
            "names": ["kill"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": 1,
            "args": [{"index": 1, "value": 0, "op": "SCMP_CMP_EQ"}]
        }]
    });
    let json = serde_json::to_vec(&spec).unwrap();
    create(&client, id, json, stdio(false, true, true, false))
        .await
        .unwrap_or_else(|e| panic!("{e:?}\n{}", agent.stderr()));
    let out = agent.stream(id, "", StreamKind::Stdout).unwrap();
    let err = agent.stream(id, "", StreamKind::Stderr).unwrap();
    let readers = (
        std::thread::spawn(move || read_all(out)),
        std::thread::spawn(move || read_all(err)),
    );
    start(&client, id).await.unwrap();
    assert_eq!(wait(&client, id, "").await.unwrap().exit_status, 0);
    let (out, err) = (readers.0.join().unwrap(), readers.1.join().unwrap());
    assert!(out.contains("zero=1\n"), "{out}\n{err}");
    assert!(out.contains("cont=0\n"), "{out}");
    assert!(out.contains("Seccomp:\t2"), "{out}");
    assert!(out.contains("NoNewPrivs:\t1"), "{out}");
    // CAP_KILL is bit 5.
    assert!(out.contains("CapEff:\t0000000000000020"), "{out}");
    assert!(err.contains("Operation not permitted"), "{err}");
    remove(&client, id).await;
}

/// These never reach the container helper, so they need no root.
#[tokio::test]
async fn bad_specs_and_unknown_ids_are_refused_without_root() {
    let agent = Agent::start();
    let (health, client) = agent.connect().await;
    let rootfs = "/rootfs/none";
    std::fs::create_dir_all(agent.root().join("rootfs/none")).unwrap();
    let cases: Vec<(&str, Vec<u8>, Code, &str)> = vec![
        (
            "c1",
            b"{ not json".to_vec(),
            Code::INVALID_ARGUMENT,
            "does not parse",
        ),
        (
            "c1",
            spec("c1", "/no/such/rootfs", process_json(&["true"], "")),
            Code::INVALID_ARGUMENT,
            "rootfs /no/such/rootfs does not exist",
        ),
        (
            "c1",
            spec("c1", "relative", process_json(&["true"], "")),
            Code::INVALID_ARGUMENT,
            "not an absolute path",
        ),
        (
            "c1",
            spec("c1", rootfs, process_json(&[], "")),
            Code::INVALID_ARGUMENT,
            "process.args is empty",
        ),
        (
            "a/b",
            spec("c1", rootfs, process_json(&["true"], "")),
            Code::INVALID_ARGUMENT,
            "container_id",
        ),
    ];
    for (id, json, want, text) in cases {
        let (code, msg) = status(create(&client, id, json, StdioConfig::new()).await);
        assert_eq!(code, want, "{msg}");
        assert!(msg.contains(text), "{text}: {msg}");
    }
    let (code, msg) = status(start(&client, "ghost").await);
    assert_eq!(code, Code::NOT_FOUND);
    assert_eq!(msg, "container \"ghost\" not found");
    let (code, _) = status(signal(&client, "ghost", "", 9, true).await);
    assert_eq!(code, Code::NOT_FOUND);
    let (code, _) = status(
        exec(
            &client,
            "ghost",
            "e",
            process_json(&["true"], ""),
            StdioConfig::new(),
        )
        .await,
    );
    assert_eq!(code, Code::NOT_FOUND);
    let (code, _) = status(
        exec(
            &client,
            "ghost",
            "e",
            serde_json::json!({"args": []}),
            StdioConfig::new(),
        )
        .await,
    );
    assert_eq!(code, Code::INVALID_ARGUMENT);
    assert!(agent
        .stream("ghost", "", StreamKind::Stdout)
        .unwrap_err()
        .contains("not found"));
    assert!(health.check(ctx(), &CheckRequest::new()).await.is_ok());
    assert!(Path::new(BUSYBOX).exists() || cfg!(not(target_os = "linux")));
}
