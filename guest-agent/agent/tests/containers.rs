//! The container service in host mode: the real agent binary on unix
//! sockets with a temporary root, running containers from a busybox rootfs
//! the test builds from Debian's busybox-static (`/bin/busybox`).
//!
//! Tests that create containers need root (namespaces, cgroups, mounts) and
//! are `#[ignore = "needs root"]`; CI runs them as root with `--ignored`.
//! The bad-input tests that never reach the helper run everywhere.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use boxlite_protocol::agent::{
    CloseStdinRequest, Empty, ListProcessesRequest, PauseContainerRequest, RemoveProcessRequest,
    ResizePtyRequest, ResumeContainerRequest, StatsContainerRequest, StatsContainerResponse,
    StdioConfig, UpdateContainerRequest,
};
use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::health::CheckRequest;
use boxlite_protocol::stdio::StreamKind;
use ttrpc::Code;

use common::*;

/// StatsContainer for container `id`.
async fn container_stats(client: &AgentClient, id: &str) -> StatsContainerResponse {
    let req = StatsContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    client.stats_container(ctx(), &req).await.unwrap()
}

/// ExecProcess of `true` without stdio as `exec_id` in container `id`.
async fn exec_true(client: &AgentClient, id: &str, exec_id: &str) -> ttrpc::Result<u32> {
    exec(
        client,
        id,
        exec_id,
        process_json(&["true"], ""),
        StdioConfig::new(),
    )
    .await
}

/// PauseContainer for container `id`.
async fn pause(client: &AgentClient, id: &str) -> ttrpc::Result<Empty> {
    let req = PauseContainerRequest {
        container_id: id.into(),
        ..Default::default()
    };
    client.pause_container(ctx(), &req).await
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

    let stats = container_stats(&client, id).await;
    assert_eq!(stats.pids.current, 2, "{stats:?}");
    assert!(stats.memory.usage > 0, "{stats:?}");
    assert!(stats.cpu.usage_usec > 0, "{stats:?}");

    let update = UpdateContainerRequest {
        container_id: id.into(),
        resources_json: br#"{"pids": {"limit": 50}}"#.to_vec(),
        ..Default::default()
    };
    client.update_container(ctx(), &update).await.unwrap();
    let stats = container_stats(&client, id).await;
    assert_eq!(stats.pids.limit, 50, "{stats:?}");

    // Pause: no exec; resume: exec works again.
    pause(&client, id).await.unwrap();
    let state = std::fs::read_to_string(format!("/proc/{init_pid}/status")).unwrap();
    assert!(state.lines().any(|l| l.starts_with("State:")), "{state}");
    let (code, msg) = status(exec_true(&client, id, "p").await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("paused"), "{msg}");
    let (code, _) = status(pause(&client, id).await);
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
    exec_true(&client, id, "after").await.unwrap();
    assert_eq!(wait(&client, id, "after").await.unwrap().exit_status, 0);

    // SIGKILL to the init alone, then WaitProcess says 128 + 9.
    signal(&client, id, "", 9, false).await.unwrap();
    assert_eq!(wait(&client, id, "").await.unwrap().exit_status, 137);
    // The pid namespace died with its init: the sleeper went too.
    assert_eq!(wait(&client, id, "sleeper").await.unwrap().exit_status, 137);
    let (code, msg) = status(signal(&client, id, "", 15, false).await);
    assert_eq!(code, Code::NOT_FOUND, "{msg}");
    assert!(msg.contains("already exited"), "{msg}");
    let (code, msg) = status(exec_true(&client, id, "late").await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    remove(&client, id).await;
    let (code, _) = status(wait(&client, id, "").await);
    assert_eq!(code, Code::NOT_FOUND);
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

/// RemoveProcess forgets an exited exec, so its id can be used again (runc
/// allows that after `ctr task delete --exec-id`); a running exec stays
/// (FAILED_PRECONDITION), an unknown one is NOT_FOUND, and the init is not
/// an exec (INVALID_ARGUMENT). Before it existed exec records were kept
/// until the container went, so a probe that execs every few seconds grew
/// the agent without bound and a reused id was ALREADY_EXISTS.
#[tokio::test]
#[ignore = "needs root"]
async fn exited_execs_are_removed_and_their_ids_reused() {
    let agent = Agent::start();
    let (_, client) = agent.connect().await;
    let id = "execs";
    let rootfs = agent.rootfs(id);
    let spec = spec(id, &rootfs, process_json(&["sleep", "1000"], ""));
    create(&client, id, spec, StdioConfig::new()).await.unwrap();
    start(&client, id).await.unwrap();
    let remove_exec = |exec_id: &'static str| {
        let client = client.clone();
        async move {
            let req = RemoveProcessRequest {
                container_id: id.into(),
                exec_id: exec_id.into(),
                ..Default::default()
            };
            client.remove_process(ctx(), &req).await
        }
    };

    for round in 0..3 {
        exec_true(&client, id, "probe")
            .await
            .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
        assert_eq!(wait(&client, id, "probe").await.unwrap().exit_status, 0);
        remove_exec("probe").await.unwrap();
        let (code, _) = status(wait(&client, id, "probe").await);
        assert_eq!(code, Code::NOT_FOUND, "round {round}");
    }

    exec(
        &client,
        id,
        "long",
        process_json(&["sleep", "1000"], ""),
        StdioConfig::new(),
    )
    .await
    .unwrap();
    let (code, msg) = status(remove_exec("long").await);
    assert_eq!(code, Code::FAILED_PRECONDITION, "{msg}");
    assert!(msg.contains("it is running"), "{msg}");
    let (code, _) = status(remove_exec("nope").await);
    assert_eq!(code, Code::NOT_FOUND);
    let (code, _) = status(remove_exec("").await);
    assert_eq!(code, Code::INVALID_ARGUMENT);
    remove(&client, id).await;
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
    let (code, _) = status(exec_true(&client, "ghost", "e").await);
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
