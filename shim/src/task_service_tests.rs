//! Every Task call and state transition, over real ttrpc, against the fake
//! guest of `test_utils` (fake agent, fake stdio streams, fake VM).
//!
//! Create bind-mounts the bundle's rootfs, so the tests that create a
//! container need root: they are `#[ignore = "needs root …"]`, run as root
//! with `--ignored --test-threads=1` (the second phase of scripts/test.sh).

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use containerd_shim::api::*;
use containerd_shim_protos::protobuf::well_known_types::any::Any;
use containerd_shim_protos::protobuf::{Message, MessageField};
use containerd_shim_protos::shim_async::{create_task, TaskClient};
use ttrpc::Code;

use crate::events::RecordingSink;
use crate::sandbox::Sandbox;
use crate::task_service::TaskService;
use crate::test_utils::{FakeAgent, FakeFactory, FakeGuest, StallProxy, VmLog};
use boxlite_test_support::fake_bin::script;

const SANDBOX: &str = "sb1";
/// `timeouts.agent_call_secs`'s default.
const DEFAULT_CALL_BUDGET: Duration = Duration::from_secs(30);

struct Harness {
    tmp: tempfile::TempDir,
    client: TaskClient,
    agent: Arc<FakeAgent>,
    events: Arc<RecordingSink>,
    vms: Arc<VmLog>,
    exit: Arc<containerd_shim::ExitSignal>,
    _guest: FakeGuest,
    _server: ttrpc::r#async::Server,
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_duration(Duration::from_secs(20))
}

fn code_of<T: std::fmt::Debug>(r: ttrpc::Result<T>) -> (Code, String) {
    match r {
        Err(ttrpc::Error::RpcStatus(s)) => (s.code(), s.message().to_owned()),
        other => panic!("expected a status, got {other:?}"),
    }
}

impl Harness {
    async fn new() -> Self {
        Self::build(tempfile::tempdir().unwrap(), None).await
    }

    /// With `real`, the agent is a real one at (ttrpc socket, stdio socket).
    async fn build(tmp: tempfile::TempDir, real: Option<(PathBuf, PathBuf)>) -> Self {
        let guest = FakeGuest::start(tmp.path()).await;
        let (agent_sock, stdio_proxy) = match real {
            Some((agent, stdio)) => (agent, Some(stdio)),
            None => (guest.agent_sock.clone(), None),
        };
        Self::serve(tmp, guest, agent_sock, stdio_proxy, DEFAULT_CALL_BUDGET).await
    }

    /// The fake agent behind a [`StallProxy`], each call bounded by
    /// `call_budget`.
    async fn stallable(call_budget: Duration) -> (Self, StallProxy) {
        let tmp = tempfile::tempdir().unwrap();
        let guest = FakeGuest::start(tmp.path()).await;
        let proxy = StallProxy::start(tmp.path().join("proxy.sock"), guest.agent_sock.clone());
        let agent_sock = proxy.socket.clone();
        (
            Self::serve(tmp, guest, agent_sock, None, call_budget).await,
            proxy,
        )
    }

    async fn serve(
        tmp: tempfile::TempDir,
        guest: FakeGuest,
        agent_sock: PathBuf,
        stdio_proxy: Option<PathBuf>,
        agent_call_timeout: Duration,
    ) -> Self {
        let vms = Arc::new(VmLog::default());
        let factory = Arc::new(FakeFactory {
            root: tmp.path().join("run"),
            guest: guest.agent.clone(),
            agent_sock,
            stdio_proxy,
            log: vms.clone(),
            agent_call_timeout,
        });
        let events = Arc::new(RecordingSink::default());
        let exit = Arc::new(containerd_shim::ExitSignal::default());
        let sandbox = Sandbox::new(SANDBOX, "default", factory, events.clone(), exit.clone());
        let service = create_task(Arc::new(TaskService::new(sandbox)));
        let sock = tmp.path().join("shim.sock");
        let mut server = ttrpc::r#async::Server::new()
            .bind(&format!("unix://{}", sock.display()))
            .unwrap()
            .register_service(service);
        server.start().await.unwrap();
        let client = ttrpc::r#async::Client::connect(&format!("unix://{}", sock.display()))
            .await
            .unwrap();
        Harness {
            client: TaskClient::new(client),
            agent: guest.agent.clone(),
            events,
            vms,
            exit,
            tmp,
            _guest: guest,
            _server: server,
        }
    }

    fn sandbox_dir(&self) -> PathBuf {
        self.tmp.path().join("run").join(SANDBOX)
    }

    /// A bundle with a rootfs directory and a default spec.
    fn bundle(&self, id: &str, annotate: impl FnOnce(&mut oci_spec::runtime::Spec)) -> PathBuf {
        let bundle = self.tmp.path().join("bundles").join(id);
        std::fs::create_dir_all(bundle.join("rootfs/bin")).unwrap();
        std::fs::write(bundle.join("rootfs/bin/sh"), "").unwrap();
        let mut spec = oci_spec::runtime::Spec::default();
        annotate(&mut spec);
        spec.save(bundle.join("config.json")).unwrap();
        bundle
    }

    fn create_req(&self, id: &str, stdout: &str) -> CreateTaskRequest {
        CreateTaskRequest {
            id: id.into(),
            bundle: self.bundle(id, |_| {}).display().to_string(),
            stdout: stdout.into(),
            ..Default::default()
        }
    }

    async fn create(&self, id: &str) -> String {
        let out = self.tmp.path().join(format!("{id}.out"));
        let uri = format!("file://{}", out.display());
        self.client
            .create(ctx(), &self.create_req(id, &uri))
            .await
            .unwrap();
        out.display().to_string()
    }

    async fn state(&self, id: &str, exec_id: &str) -> StateResponse {
        self.try_state(id, exec_id).await.unwrap()
    }

    async fn try_state(&self, id: &str, exec_id: &str) -> ttrpc::Result<StateResponse> {
        self.client
            .state(
                ctx(),
                &StateRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn start(&self, id: &str, exec_id: &str) -> ttrpc::Result<StartResponse> {
        self.client
            .start(
                ctx(),
                &StartRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn wait(&self, id: &str, exec_id: &str) -> WaitResponse {
        self.try_wait(id, exec_id).await.unwrap()
    }

    async fn try_wait(&self, id: &str, exec_id: &str) -> ttrpc::Result<WaitResponse> {
        self.client
            .wait(
                ctx(),
                &WaitRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn pids(&self, id: &str) -> ttrpc::Result<PidsResponse> {
        self.client
            .pids(
                ctx(),
                &PidsRequest {
                    id: id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn stats(&self, id: &str) -> ttrpc::Result<StatsResponse> {
        self.client
            .stats(
                ctx(),
                &StatsRequest {
                    id: id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn kill(&self, id: &str, exec_id: &str, signal: u32, all: bool) -> ttrpc::Result<Empty> {
        self.client
            .kill(
                ctx(),
                &KillRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    signal,
                    all,
                    ..Default::default()
                },
            )
            .await
    }

    async fn delete(&self, id: &str, exec_id: &str) -> ttrpc::Result<DeleteResponse> {
        self.client
            .delete(
                ctx(),
                &DeleteRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    ..Default::default()
                },
            )
            .await
    }

    async fn exec(
        &self,
        id: &str,
        exec_id: &str,
        terminal: bool,
        stdin: &str,
        stdout: &str,
    ) -> ttrpc::Result<Empty> {
        let process = serde_json::json!({"args": ["sh"], "cwd": "/", "terminal": terminal, "user": {"uid": 0, "gid": 0}});
        self.client
            .exec(
                ctx(),
                &ExecProcessRequest {
                    id: id.into(),
                    exec_id: exec_id.into(),
                    terminal,
                    stdin: stdin.into(),
                    stdout: stdout.into(),
                    spec: MessageField::some(Any {
                        type_url: "types.containerd.io/opencontainers/runtime-spec/1/Process"
                            .into(),
                        value: serde_json::to_vec(&process).unwrap(),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
            )
            .await
    }

    async fn shutdown(&self) {
        self.client
            .shutdown(
                ctx(),
                &ShutdownRequest {
                    id: SANDBOX.into(),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
    }

    /// Mounts under the temp dir but the share's own two views (`mounts/`
    /// and `shared/`, there while the sandbox lives): what a container
    /// left behind.
    fn mounts_left(&self) -> Vec<PathBuf> {
        let share = [
            self.sandbox_dir().join(crate::sandbox::MOUNTS_DIR),
            self.sandbox_dir().join(crate::sandbox::SHARED_DIR),
        ];
        crate::rootfs::mounts_under(self.tmp.path())
            .unwrap()
            .into_iter()
            .filter(|m| !share.contains(m))
            .collect()
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        // Tests that end with containers still created leave their mounts:
        // unmount everything under the temp dir before it is removed.
        if let Err(e) = crate::rootfs::teardown(self.tmp.path()) {
            eprintln!("test cleanup: {e}");
        }
    }
}

fn status_of(s: &StateResponse) -> Status {
    s.status.enum_value().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn the_whole_life_of_a_container() {
    let h = Harness::new().await;
    *h.agent.auto_exit.lock().unwrap() = Some(3);
    let out = h.create(SANDBOX).await;

    // One VM, with the shared dir as tag "shared", mounted by CreateSandbox.
    assert_eq!(h.vms.started.load(Ordering::SeqCst), 1);
    let shares = h.vms.shares.lock().unwrap().clone();
    assert_eq!(shares.len(), 1);
    assert_eq!(shares[0].0, "shared");
    assert_eq!(shares[0].1, h.sandbox_dir().join("shared"));
    let sreq = h.agent.sandbox_requests.lock().unwrap()[0].clone();
    assert_eq!(sreq.sandbox_id, SANDBOX);
    assert_eq!(sreq.shares[0].tag, "shared");
    assert_eq!(sreq.shares[0].mount_point, "/run/boxlite/shares/shared");
    // The agent got the spec with the guest rootfs path; the host side has
    // the rootfs mounted on the share.
    let spec = h.agent.specs.lock().unwrap()[SANDBOX].clone();
    assert_eq!(
        spec["root"]["path"],
        "/run/boxlite/shares/shared/sb1/rootfs"
    );
    assert!(h.sandbox_dir().join("shared/sb1/rootfs/bin/sh").exists());
    // state.json names the sandbox and the container.
    let state = crate::sandbox::SandboxState::load(&h.sandbox_dir()).unwrap();
    assert_eq!(state.containers, [SANDBOX]);
    assert_eq!(state.vm_pid, Some(4242));

    assert_eq!(status_of(&h.state(SANDBOX, "").await), Status::CREATED);
    let pid = h.start(SANDBOX, "").await.unwrap().pid;
    assert!(pid >= 100);
    let w = h.wait(SANDBOX, "").await;
    assert_eq!(w.exit_status, 3);
    // Exit is reported only after stdout was drained (the fake sends its
    // last line 200 ms after the exit).
    let text = std::fs::read_to_string(&out).unwrap();
    assert_eq!(text, "hello sb1/\nbye sb1/\n");
    let st = h.state(SANDBOX, "").await;
    assert_eq!(status_of(&st), Status::STOPPED);
    assert_eq!(st.exit_status, 3);
    assert_eq!(st.pid, pid);

    let d = h.delete(SANDBOX, "").await.unwrap();
    assert_eq!((d.pid, d.exit_status), (pid, 3));
    assert!(h.mounts_left().is_empty(), "{:?}", h.mounts_left());
    assert!(!h.sandbox_dir().join("shared/sb1").exists());
    assert_eq!(
        h.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
    match &h.events.events()[2] {
        crate::events::TaskEvent::Exit {
            container_id,
            id,
            pid: p,
            exit_status,
            ..
        } => {
            assert_eq!(
                (container_id.as_str(), id.as_str(), *p, *exit_status),
                (SANDBOX, SANDBOX, pid, 3)
            );
        }
        other => panic!("{other:?}"),
    }
    // The state after delete: gone.
    let r = h
        .client
        .state(
            ctx(),
            &StateRequest {
                id: SANDBOX.into(),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(code_of(r).0, Code::NOT_FOUND);

    // Last container gone: Shutdown stops the VM, removes the directory and
    // lets the shim exit.
    h.shutdown().await;
    tokio::time::timeout(Duration::from_secs(5), h.exit.wait())
        .await
        .expect("shim exit signalled");
    assert_eq!(h.vms.stopped.load(Ordering::SeqCst), 1);
    assert!(!h.sandbox_dir().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn illegal_transitions_are_failed_precondition() {
    let h = Harness::new().await;
    h.create(SANDBOX).await;
    let pause = |id: &str| PauseRequest {
        id: id.into(),
        ..Default::default()
    };
    let resume = |id: &str| ResumeRequest {
        id: id.into(),
        ..Default::default()
    };

    // Created: no pause, no resume, no exec.
    let (code, msg) = code_of(h.client.pause(ctx(), &pause(SANDBOX)).await);
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert_eq!(msg, "cannot pause container \"sb1\": it is created");
    assert_eq!(
        code_of(h.client.resume(ctx(), &resume(SANDBOX)).await).0,
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code_of(h.exec(SANDBOX, "e1", false, "", "").await).0,
        Code::FAILED_PRECONDITION
    );

    h.start(SANDBOX, "").await.unwrap();
    // Running: no second start, no delete, no resume.
    let (code, msg) = code_of(h.start(SANDBOX, "").await);
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert_eq!(msg, "cannot start container \"sb1\": it is running");
    let (code, msg) = code_of(h.delete(SANDBOX, "").await);
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert_eq!(msg, "cannot delete container \"sb1\": it is running");
    assert_eq!(
        code_of(h.client.resume(ctx(), &resume(SANDBOX)).await).0,
        Code::FAILED_PRECONDITION
    );

    // Paused: no second pause, no delete; resume works.
    h.client.pause(ctx(), &pause(SANDBOX)).await.unwrap();
    assert_eq!(status_of(&h.state(SANDBOX, "").await), Status::PAUSED);
    assert_eq!(
        code_of(h.client.pause(ctx(), &pause(SANDBOX)).await).0,
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code_of(h.delete(SANDBOX, "").await).0,
        Code::FAILED_PRECONDITION
    );
    h.client.resume(ctx(), &resume(SANDBOX)).await.unwrap();
    assert_eq!(status_of(&h.state(SANDBOX, "").await), Status::RUNNING);

    // Exited: no start, no pause, a plain kill is NOT_FOUND, delete works.
    h.kill(SANDBOX, "", 9, false).await.unwrap();
    assert_eq!(h.wait(SANDBOX, "").await.exit_status, 137);
    assert_eq!(
        code_of(h.start(SANDBOX, "").await).0,
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code_of(h.client.pause(ctx(), &pause(SANDBOX)).await).0,
        Code::FAILED_PRECONDITION
    );
    assert_eq!(
        code_of(h.kill(SANDBOX, "", 9, false).await).0,
        Code::NOT_FOUND
    );
    h.delete(SANDBOX, "").await.unwrap();
    assert_eq!(code_of(h.delete(SANDBOX, "").await).0, Code::NOT_FOUND);
    assert_eq!(
        h.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/paused",
            "/tasks/resumed",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn exec_with_stdin_tty_resize_and_its_own_exit() {
    let h = Harness::new().await;
    h.create(SANDBOX).await;
    h.start(SANDBOX, "").await.unwrap();

    // A stdin fifo the way containerd makes one; the exec's output to a file.
    let stdin = h.tmp.path().join("e1.stdin");
    nix::unistd::mkfifo(&stdin, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let out = h.tmp.path().join("e1.out");
    let out_uri = format!("file://{}", out.display());
    h.exec(SANDBOX, "e1", true, &stdin.display().to_string(), &out_uri)
        .await
        .unwrap();
    assert_eq!(status_of(&h.state(SANDBOX, "e1").await), Status::CREATED);
    // Same exec id again: ALREADY_EXISTS.
    assert_eq!(
        code_of(h.exec(SANDBOX, "e1", false, "", "").await).0,
        Code::ALREADY_EXISTS
    );
    // Malformed process spec: INVALID_ARGUMENT.
    let bad = h
        .client
        .exec(
            ctx(),
            &ExecProcessRequest {
                id: SANDBOX.into(),
                exec_id: "bad".into(),
                spec: MessageField::some(Any {
                    value: b"{not json".to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(code_of(bad).0, Code::INVALID_ARGUMENT);

    let pid = h.start(SANDBOX, "e1").await.unwrap().pid;
    assert_eq!(status_of(&h.state(SANDBOX, "e1").await), Status::RUNNING);
    // stdin: what containerd writes arrives, CloseIO ends it.
    {
        use std::io::Write;
        let mut w = std::fs::OpenOptions::new()
            .write(true)
            .open(&stdin)
            .unwrap();
        w.write_all(b"typed input\n").unwrap();
    }
    h.client
        .close_io(
            ctx(),
            &CloseIORequest {
                id: SANDBOX.into(),
                exec_id: "e1".into(),
                stdin: true,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let key = (SANDBOX.to_string(), "e1".to_string());
    let mut got = None;
    for _ in 0..200 {
        got = h.agent.stdin.lock().unwrap().get(&key).cloned();
        if got.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(got.as_deref(), Some(&b"typed input\n"[..]));

    // tty resize reaches the agent; a container without a tty refuses it.
    h.client
        .resize_pty(
            ctx(),
            &ResizePtyRequest {
                id: SANDBOX.into(),
                exec_id: "e1".into(),
                width: 120,
                height: 40,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        h.agent.resizes.lock().unwrap()[0],
        ("e1".to_string(), 40, 120)
    );
    let r = h
        .client
        .resize_pty(
            ctx(),
            &ResizePtyRequest {
                id: SANDBOX.into(),
                width: 1,
                height: 1,
                ..Default::default()
            },
        )
        .await;
    assert_eq!(code_of(r).0, Code::FAILED_PRECONDITION);

    // Pids lists init and the exec (with its exec id as runc's ProcessDetails).
    let pids = h.pids(SANDBOX).await.unwrap();
    assert_eq!(pids.processes.len(), 2);
    let exec_info = pids.processes.iter().find(|p| p.pid == pid).unwrap();
    let details =
        containerd_shim_protos::shim::oci::ProcessDetails::parse_from_bytes(&exec_info.info.value)
            .unwrap();
    assert_eq!(details.exec_id, "e1");

    // The exec ends on SIGTERM; its own exit event, the init keeps running.
    h.kill(SANDBOX, "e1", 15, false).await.unwrap();
    let w = h.wait(SANDBOX, "e1").await;
    assert_eq!(w.exit_status, 143);
    assert_eq!(
        std::fs::read_to_string(&out).unwrap(),
        "hello sb1/e1\nbye sb1/e1\n"
    );
    assert_eq!(status_of(&h.state(SANDBOX, "").await), Status::RUNNING);
    let d = h.delete(SANDBOX, "e1").await.unwrap();
    assert_eq!((d.pid, d.exit_status), (pid, 143));
    // The guest forgot it too, so the id can be used again (as under runc).
    assert!(
        h.agent
            .calls()
            .contains(&format!("RemoveProcess {SANDBOX} e1")),
        "{:?}",
        h.agent.calls()
    );
    assert_eq!(code_of(h.try_state(SANDBOX, "e1").await).0, Code::NOT_FOUND);
    let topics = h.events.topics();
    assert_eq!(
        topics,
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit"
        ]
    );
    match &h.events.events()[4] {
        crate::events::TaskEvent::Exit {
            id, exit_status, ..
        } => assert_eq!((id.as_str(), *exit_status), ("e1", 143)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn kill_all_stats_update_connect_checkpoint() {
    let h = Harness::new().await;
    h.create(SANDBOX).await;
    let pid = h.start(SANDBOX, "").await.unwrap().pid;

    // Kill --all passes the flag through.
    h.kill(SANDBOX, "", 10, true).await.unwrap();
    assert_eq!(
        h.agent.signals.lock().unwrap()[0],
        (SANDBOX.to_string(), String::new(), 10, true)
    );

    // Stats: cgroup v2 metrics, as ctr task metrics decodes them.
    let s = h.stats(SANDBOX).await.unwrap();
    assert_eq!(s.stats.type_url, "io.containerd.cgroups.v2.Metrics");
    let m = containerd_shim_protos::cgroups_v2::metrics::Metrics::parse_from_bytes(&s.stats.value)
        .unwrap();
    assert_eq!(
        (m.cpu.usage_usec, m.memory.usage, m.pids.current),
        (1234, 4096, 2)
    );

    // Update: LinuxResources JSON reaches the agent; garbage is refused.
    let resources = serde_json::json!({"memory": {"limit": 67108864}});
    h.client
        .update(
            ctx(),
            &UpdateTaskRequest {
                id: SANDBOX.into(),
                resources: MessageField::some(Any {
                    value: serde_json::to_vec(&resources).unwrap(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        h.agent.updates.lock().unwrap()[0]["memory"]["limit"],
        67108864
    );
    // The fake VM boots with 512 MiB (128 of them the guest's reserve) and
    // is built with 1024: a 700 MiB limit grows the guest to 828 MiB
    // before the agent applies it; a lower one after it grows nothing; one
    // needing more than the VM has is refused and reaches no agent.
    let update = |mib: i64| {
        let resources = serde_json::json!({"memory": {"limit": mib << 20}});
        let req = UpdateTaskRequest {
            id: SANDBOX.into(),
            resources: MessageField::some(Any {
                value: serde_json::to_vec(&resources).unwrap(),
                ..Default::default()
            }),
            ..Default::default()
        };
        let client = h.client.clone();
        async move { client.update(ctx(), &req).await }
    };
    assert!(h.vms.guest_memory.lock().unwrap().is_empty(), "64 MiB fit");
    update(700).await.unwrap();
    assert_eq!(*h.vms.guest_memory.lock().unwrap(), [828]);
    update(300).await.unwrap();
    assert_eq!(*h.vms.guest_memory.lock().unwrap(), [828]);
    let (code, msg) = code_of(update(1000).await);
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert!(
        msg.contains("a 1000 MiB memory limit, which needs 1128 MiB of guest memory")
            && msg.contains("more than the 1024 MiB its sandbox VM was built with"),
        "{msg}"
    );
    assert_eq!(
        h.agent.updates.lock().unwrap().len(),
        3,
        "700 and 300 applied"
    );
    let bad = h
        .client
        .update(
            ctx(),
            &UpdateTaskRequest {
                id: SANDBOX.into(),
                resources: MessageField::some(Any {
                    value: b"[1]".to_vec(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await;
    assert_eq!(code_of(bad).0, Code::INVALID_ARGUMENT);

    // Connect: our pid and the task's.
    let c = h
        .client
        .connect(
            ctx(),
            &ConnectRequest {
                id: SANDBOX.into(),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!((c.shim_pid, c.task_pid), (std::process::id(), pid));
    assert!(!c.version.is_empty());

    // Checkpoint: UNIMPLEMENTED with a reason.
    let (code, msg) = code_of(
        h.client
            .checkpoint(
                ctx(),
                &CheckpointTaskRequest {
                    id: SANDBOX.into(),
                    ..Default::default()
                },
            )
            .await,
    );
    assert_eq!(code, Code::UNIMPLEMENTED);
    assert!(
        msg.contains("not supported") && msg.contains("micro-VM"),
        "{msg}"
    );

    // Shutdown with a container left does nothing.
    h.shutdown().await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(h.vms.stopped.load(Ordering::SeqCst), 0);
    assert_eq!(status_of(&h.state(SANDBOX, "").await), Status::RUNNING);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_are_not_found_and_bad_ids_invalid() {
    let h = Harness::new().await;
    for r in [
        code_of(h.start("nope", "").await),
        code_of(h.kill("nope", "", 9, false).await),
        code_of(h.delete("nope", "").await),
        code_of(h.pids("nope").await),
        code_of(h.stats("nope").await),
        code_of(h.try_wait("nope", "").await),
    ] {
        assert_eq!(
            r,
            (Code::NOT_FOUND, "container \"nope\" not found".to_string())
        );
    }
    let mut req = CreateTaskRequest {
        id: "../x".into(),
        bundle: "/b".into(),
        ..Default::default()
    };
    assert_eq!(
        code_of(h.client.create(ctx(), &req).await).0,
        Code::INVALID_ARGUMENT
    );
    req.id = "ok".into();
    req.bundle = String::new();
    assert_eq!(
        code_of(h.client.create(ctx(), &req).await).0,
        Code::INVALID_ARGUMENT
    );
    // Nothing booted for requests that were refused up front.
    assert_eq!(h.vms.started.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn agent_unimplemented_is_surfaced_and_nothing_is_left() {
    let h = Harness::new().await;
    h.agent.unimplemented.store(true, Ordering::SeqCst);
    let out = h.tmp.path().join("x.out");
    let r = h
        .client
        .create(
            ctx(),
            &h.create_req(SANDBOX, &format!("file://{}", out.display())),
        )
        .await;
    let (code, msg) = code_of(r);
    assert_eq!(code, Code::UNIMPLEMENTED);
    assert_eq!(
        msg,
        "agent CreateContainer for container \"sb1\": container service not implemented yet: CreateContainer"
    );
    assert!(h.mounts_left().is_empty(), "{:?}", h.mounts_left());
    assert!(!h.sandbox_dir().join("shared/sb1").exists());
    assert!(h.events.topics().is_empty());
    // containerd's clean-up after a failed create: Delete (NOT_FOUND), Shutdown.
    assert_eq!(code_of(h.delete(SANDBOX, "").await).0, Code::NOT_FOUND);
    h.shutdown().await;
    tokio::time::timeout(Duration::from_secs(5), h.exit.wait())
        .await
        .unwrap();
    assert_eq!(h.vms.stopped.load(Ordering::SeqCst), 1);
    assert!(!h.sandbox_dir().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn refused_stdio_fails_create_cleanly() {
    let h = Harness::new().await;
    *h.agent.refuse_stdio.lock().unwrap() = Some("no such stream".into());
    let out = h.tmp.path().join("x.out");
    let (code, msg) = code_of(
        h.client
            .create(
                ctx(),
                &h.create_req(SANDBOX, &format!("file://{}", out.display())),
            )
            .await,
    );
    assert_eq!(code, Code::INTERNAL);
    assert!(
        msg.contains("stdio stdout of container \"sb1\"") && msg.contains("no such stream"),
        "{msg}"
    );
    // The agent's container was removed again, the mounts too.
    assert!(h.agent.calls().contains(&"RemoveContainer sb1".to_string()));
    assert!(h.mounts_left().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn vm_that_cannot_start_gives_a_clear_error() {
    let h = Harness::new().await;
    h.vms.fail_start.store(true, Ordering::SeqCst);
    let (code, msg) = code_of(h.client.create(ctx(), &h.create_req(SANDBOX, "")).await);
    assert_eq!(code, Code::INTERNAL);
    assert!(
        msg.contains("guest kernel") && msg.contains("guest.kernel"),
        "{msg}"
    );
    h.shutdown().await;
    tokio::time::timeout(Duration::from_secs(5), h.exit.wait())
        .await
        .unwrap();
    assert!(!h.sandbox_dir().exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn pod_members_share_the_vm_and_oom_is_forwarded() {
    let h = Harness::new().await;
    h.create(SANDBOX).await;
    h.start(SANDBOX, "").await.unwrap();
    // A second container of the pod: same shim, same VM.
    h.create("c2").await;
    assert_eq!(h.vms.started.load(Ordering::SeqCst), 1);
    assert_eq!(h.agent.sandbox_requests.lock().unwrap().len(), 1);
    let state = crate::sandbox::SandboxState::load(&h.sandbox_dir()).unwrap();
    assert_eq!(state.containers, ["c2", SANDBOX]);
    // Create twice: ALREADY_EXISTS.
    assert_eq!(
        code_of(h.client.create(ctx(), &h.create_req("c2", "")).await).0,
        Code::ALREADY_EXISTS
    );

    h.agent.send_oom("c2").await;
    for _ in 0..100 {
        if h.events.topics().contains(&"/tasks/oom") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(h.events.events().contains(&crate::events::TaskEvent::Oom {
        container_id: "c2".into()
    }));

    // A created container that is deleted without ever starting: Wait
    // returns instead of hanging.
    let waiter = {
        let client = h.client.clone();
        tokio::spawn(async move {
            client
                .wait(
                    ctx(),
                    &WaitRequest {
                        id: "c2".into(),
                        ..Default::default()
                    },
                )
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    h.delete("c2", "").await.unwrap();
    let w = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(w.exit_status, 0);
    // The sandbox container is still there; Shutdown keeps the VM.
    h.shutdown().await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(h.vms.stopped.load(Ordering::SeqCst), 0);
    assert!(Path::new(&h.sandbox_dir())
        .join("shared/sb1/rootfs")
        .exists());
}

async fn read_eventually(path: &Path, want: &str) -> String {
    let mut text = String::new();
    for _ in 0..250 {
        text = std::fs::read_to_string(path).unwrap_or_default();
        if text == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn hooks_run_on_the_host_and_binary_loggers_get_the_output() {
    use oci_spec::runtime::{HookBuilder, HooksBuilder};
    let h = Harness::new().await;
    *h.agent.auto_exit.lock().unwrap() = Some(0);
    let hook_log = h.tmp.path().join("hooks.log");
    let hook = script(
        h.tmp.path(),
        "hook",
        &format!(
            // Stage, state JSON, the state pid's netns, the hook's own netns.
            "state=$(cat); pid=$(printf '%s' \"$state\" | sed -n 's/.*\"pid\":\\([0-9]*\\).*/\\1/p'); \
             printf '%s %s %s %s\\n' \"$1\" \"$state\" \"$(readlink /proc/$pid/ns/net)\" \
             \"$(readlink /proc/self/ns/net)\" >> {0}",
            hook_log.display()
        ),
    );
    let hook_for = |stage: &str| {
        vec![HookBuilder::default()
            .path(&hook)
            .args(vec!["hook".to_string(), stage.to_string()])
            .build()
            .unwrap()]
    };
    let bundle = h.bundle(SANDBOX, |spec| {
        spec.set_hooks(Some(
            HooksBuilder::default()
                .create_runtime(hook_for("createRuntime"))
                .poststart(hook_for("poststart"))
                .poststop(hook_for("poststop"))
                .build()
                .unwrap(),
        ));
    });
    // containerd's binary logger protocol: fd 3 stdout, fd 4 stderr, close
    // fd 5 when ready; query pairs become arguments.
    let out = h.tmp.path().join("logged");
    let logger = script(
        h.tmp.path(),
        "logger",
        "exec 5>&-; cat <&4 > \"$2.err\" & cat <&3 > \"$2\"; wait",
    );
    let uri = format!("binary://{}?out={}", logger.display(), out.display());
    h.client
        .create(
            ctx(),
            &CreateTaskRequest {
                id: SANDBOX.into(),
                bundle: bundle.display().to_string(),
                stdout: uri.clone(),
                stderr: uri,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    // The guest's spec has no hooks: they are host paths.
    let spec = h.agent.specs.lock().unwrap()[SANDBOX].clone();
    assert!(spec.get("hooks").is_none(), "{spec}");
    h.start(SANDBOX, "").await.unwrap();
    assert_eq!(h.wait(SANDBOX, "").await.exit_status, 0);
    assert_eq!(
        read_eventually(&out, "hello sb1/\nbye sb1/\n").await,
        "hello sb1/\nbye sb1/\n"
    );
    let err = PathBuf::from(format!("{}.err", out.display()));
    assert_eq!(read_eventually(&err, "err sb1/\n").await, "err sb1/\n");
    h.delete(SANDBOX, "").await.unwrap();

    let log = std::fs::read_to_string(&hook_log).unwrap();
    let lines: Vec<&str> = log.lines().collect();
    assert_eq!(lines.len(), 3, "{log}");
    for (line, (stage, status)) in lines.iter().zip([
        ("createRuntime", "creating"),
        ("poststart", "running"),
        ("poststop", "stopped"),
    ]) {
        let parts: Vec<&str> = line.splitn(4, ' ').collect();
        let (name, json) = (parts[0], parts[1]);
        assert_eq!(name, stage);
        let state: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(state["id"], SANDBOX);
        assert_eq!(state["status"], status);
        assert_eq!(state["bundle"], bundle.display().to_string());
        if stage == "createRuntime" {
            // Before the VM boots: the pid is a holder in the pod's own
            // (new) network namespace, which the hook, running in the
            // runtime's namespace, can reach through /proc/<pid>/ns/net.
            assert_ne!(state["pid"], 4242, "{line}");
            assert!(parts[2].starts_with("net:["), "{line}");
            assert_ne!(parts[2], parts[3], "holder in its own netns: {line}");
        } else {
            assert_eq!(state["pid"], 4242, "the VM's pid");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn a_failing_create_runtime_hook_fails_create_cleanly() {
    use oci_spec::runtime::{HookBuilder, HooksBuilder};
    let h = Harness::new().await;
    let bad = script(h.tmp.path(), "bad", "echo no network >&2; exit 1");
    let bundle = h.bundle(SANDBOX, |spec| {
        spec.set_hooks(Some(
            HooksBuilder::default()
                .create_runtime(vec![HookBuilder::default().path(&bad).build().unwrap()])
                .build()
                .unwrap(),
        ));
    });
    let r = h
        .client
        .create(
            ctx(),
            &CreateTaskRequest {
                id: SANDBOX.into(),
                bundle: bundle.display().to_string(),
                ..Default::default()
            },
        )
        .await;
    let (code, msg) = code_of(r);
    assert_eq!(code, Code::FAILED_PRECONDITION);
    assert!(
        msg.contains("createRuntime hook #0") && msg.contains("no network"),
        "{msg}"
    );
    assert!(h.mounts_left().is_empty());
    assert!(!h
        .agent
        .calls()
        .iter()
        .any(|c| c.starts_with("CreateContainer")));
}

/// The real `boxlite-agent` in host mode, killed on drop.
struct RealAgent(std::process::Child);

impl Drop for RealAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn agent_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("BOXLITE_AGENT_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().unwrap();
    let p = exe
        .parent()
        .and_then(Path::parent)
        .unwrap()
        .join("boxlite-agent");
    assert!(
        p.is_file(),
        "no boxlite-agent: `cargo build -p boxlite-agent` or set BOXLITE_AGENT_BIN"
    );
    p
}

/// The shim against the real agent (host mode: real containers on this
/// host, no VM): the share is the agent's `--root/shares/shared`, the stdio
/// streams go through a hybrid-vsock proxy to its `--stdio-listen` socket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root and a boxlite-agent binary with the container service (BOXLITE_AGENT_BIN)"]
async fn real_agent_in_host_mode_runs_a_container_an_exec_and_a_kill() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("agent-root");
    let shared = tmp.path().join("run").join(SANDBOX).join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    std::fs::create_dir_all(root.join("shares")).unwrap();
    std::os::unix::fs::symlink(&shared, root.join("shares/shared")).unwrap();
    let (agent_sock, stdio_sock) = (
        tmp.path().join("real-agent.sock"),
        tmp.path().join("real-stdio.sock"),
    );
    let stderr = std::fs::File::create(tmp.path().join("agent.stderr")).unwrap();
    let _agent = RealAgent(
        std::process::Command::new(agent_binary())
            .arg("--listen")
            .arg(format!("unix://{}", agent_sock.display()))
            .arg("--stdio-listen")
            .arg(format!("unix://{}", stdio_sock.display()))
            .arg("--root")
            .arg(&root)
            .args(["--log", "debug"])
            .stdin(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    for _ in 0..200 {
        if agent_sock.exists() && stdio_sock.exists() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let agent_log = tmp.path().join("agent.stderr");
    let h = Harness::build(tmp, Some((agent_sock, stdio_sock))).await;
    let bundle = h.bundle(SANDBOX, |spec| {
        let mut process = spec.process().clone().unwrap();
        process.set_args(Some(vec![
            "/bin/sh".into(),
            "-c".into(),
            "echo hello-real; exec sleep 30".into(),
        ]));
        process.set_env(Some(vec!["PATH=/bin".into()]));
        spec.set_process(Some(process));
    });
    std::fs::copy("/bin/busybox", bundle.join("rootfs/bin/busybox")).unwrap();
    std::fs::remove_file(bundle.join("rootfs/bin/sh")).unwrap();
    for applet in ["sh", "echo", "sleep"] {
        std::os::unix::fs::symlink("busybox", bundle.join("rootfs/bin").join(applet)).unwrap();
    }
    let out = h.tmp.path().join("init.out");
    let create = h
        .client
        .create(
            ctx(),
            &CreateTaskRequest {
                id: SANDBOX.into(),
                bundle: bundle.display().to_string(),
                stdout: format!("file://{}", out.display()),
                ..Default::default()
            },
        )
        .await;
    let dump = || std::fs::read_to_string(&agent_log).unwrap_or_default();
    create.unwrap_or_else(|e| panic!("create: {e:?}\nagent log:\n{}", dump()));
    h.start(SANDBOX, "").await.unwrap();
    // An exec with its own output and exit code.
    let exec_out = h.tmp.path().join("exec.out");
    let process = serde_json::json!({
        "args": ["/bin/sh", "-c", "echo from-exec; exit 3"], "cwd": "/",
        "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}
    });
    h.client
        .exec(
            ctx(),
            &ExecProcessRequest {
                id: SANDBOX.into(),
                exec_id: "e1".into(),
                stdout: format!("file://{}", exec_out.display()),
                spec: MessageField::some(Any {
                    value: serde_json::to_vec(&process).unwrap(),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    h.start(SANDBOX, "e1")
        .await
        .unwrap_or_else(|e| panic!("exec start: {e:?}\nagent log:\n{}", dump()));
    assert_eq!(h.wait(SANDBOX, "e1").await.exit_status, 3);
    assert_eq!(std::fs::read_to_string(&exec_out).unwrap(), "from-exec\n");
    h.delete(SANDBOX, "e1").await.unwrap();
    // The init: its output arrived, SIGKILL ends it with 137.
    let pids = h.pids(SANDBOX).await.unwrap();
    assert!(!pids.processes.is_empty());
    h.kill(SANDBOX, "", 9, false).await.unwrap();
    let w = h.wait(SANDBOX, "").await;
    assert_eq!(w.exit_status, 137, "agent log:\n{}", dump());
    assert_eq!(std::fs::read_to_string(&out).unwrap(), "hello-real\n");
    assert_eq!(status_of(&h.state(SANDBOX, "").await), Status::STOPPED);
    let d = h.delete(SANDBOX, "").await.unwrap();
    assert_eq!(d.exit_status, 137);
    assert!(h.mounts_left().is_empty(), "{:?}", h.mounts_left());
    assert_eq!(
        h.events.topics(),
        [
            "/tasks/create",
            "/tasks/start",
            "/tasks/exec-added",
            "/tasks/exec-started",
            "/tasks/exit",
            "/tasks/exit",
            "/tasks/delete"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn killing_a_created_container_reports_its_exit() {
    let h = Harness::new().await;
    h.create(SANDBOX).await;
    h.kill(SANDBOX, "", 9, false).await.unwrap();
    // The fake agent has no process for a container never started, so its
    // WaitProcess fails: the exit is reported as unknown (255), not lost.
    let w = tokio::time::timeout(Duration::from_secs(5), h.wait(SANDBOX, ""))
        .await
        .expect("Wait answers after a kill of a created container");
    assert_eq!(w.exit_status, 255);
    assert_eq!(status_of(&h.state(SANDBOX, "").await), Status::STOPPED);
    assert_eq!(
        code_of(h.start(SANDBOX, "").await).0,
        Code::FAILED_PRECONDITION
    );
    h.delete(SANDBOX, "").await.unwrap();
    assert_eq!(
        h.events.topics(),
        ["/tasks/create", "/tasks/exit", "/tasks/delete"]
    );
}

/// An agent that accepts and then never reads: Kill and a second Create
/// fail with DEADLINE_EXCEEDED, and Delete and Shutdown go on without it,
/// each within the configured call bound (1 s here; CreateContainer gets
/// twice it) plus scheduling slack — never waiting for the guest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs root: Create bind-mounts the rootfs"]
async fn an_agent_that_never_reads_holds_nothing_up() {
    let (h, proxy) = Harness::stallable(Duration::from_secs(1)).await;
    h.create(SANDBOX).await;
    proxy.stall();
    let slack = Duration::from_secs(2);
    let timed = |what: &str, started: std::time::Instant, bound: Duration| {
        let took = started.elapsed();
        assert!(took < bound + slack, "{what} took {took:?}");
    };

    let t = std::time::Instant::now();
    let (code, msg) = code_of(h.kill(SANDBOX, "", libc::SIGKILL as u32, false).await);
    assert_eq!(code, Code::DEADLINE_EXCEEDED, "{msg}");
    assert!(msg.contains("SignalProcess"), "{msg}");
    timed("kill", t, Duration::from_secs(1));

    let t = std::time::Instant::now();
    let (code, msg) = code_of(h.client.create(ctx(), &h.create_req("c2", "")).await);
    assert_eq!(code, Code::DEADLINE_EXCEEDED, "{msg}");
    timed("create", t, Duration::from_secs(2));

    let t = std::time::Instant::now();
    h.delete(SANDBOX, "").await.unwrap();
    timed("delete", t, Duration::from_secs(1));

    let t = std::time::Instant::now();
    h.shutdown().await;
    timed("shutdown", t, Duration::from_secs(1));
    assert_eq!(h.mounts_left(), Vec::<PathBuf>::new());
}
