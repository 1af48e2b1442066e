//! Benchmark (not a test): the guest agent's container service as its
//! client sees it (issue 5):
//!
//! - exec round trip: ExecProcess of `true` into a running container until
//!   its WaitProcess answers; and a whole container: CreateContainer +
//!   StartContainer + WaitProcess + RemoveContainer of `true`; median and
//!   90th percentile of `--runs`;
//! - stdout throughput over the stdio stream: an exec writing `--mib` MiB of
//!   zeros, read to EOF by the bench, first byte → EOF, median of 3; written
//!   by busybox `head -c` (4 KiB writes) and by `dd bs=1M` (1 MiB writes).
//!
//! `host`: the agent binary in host mode on unix sockets (docs/agent.md).
//! `guest`: the agent as PID 1 of a sandbox VM started through
//! boxlite_runtime's `Hypervisor` trait (QEMU; TCG where there is no
//! VMX/SVM), stdio through the hybrid vsock socket, the busybox rootfs
//! through virtio-fs, as tests/guest_containers.rs does.
//!
//! Root, with busybox-static, after `cargo xtask guest` and
//! `cargo build --release -p boxlite-agent -p boxlite-tests --bin boxlite-agent-bench`
//! (the host-mode agent is the `boxlite-agent` beside the bench, or
//! `$BOXLITE_AGENT`):
//!
//! ```text
//! target/release/boxlite-agent-bench [--mode host|guest|both] [--runs N] [--mib N]
//! ```
//!
//! docs/benchmarks.md records the results.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use boxlite_protocol::agent::{
    CreateContainerRequest, ExecProcessRequest, RemoveContainerRequest, SignalProcessRequest,
    StartContainerRequest, StdioConfig, WaitProcessRequest,
};
use boxlite_protocol::agent_ttrpc::AgentClient;
use boxlite_protocol::stdio::{read_ack, StreamHeader, StreamKind};
use boxlite_protocol::STDIO_VSOCK_PORT;
use boxlite_runtime::hypervisor::AgentConnection;
use boxlite_runtime::HybridVsock;
use boxlite_tests::sandbox_vm::{FileOnPanic, SandboxVm};

const THROUGHPUT_RUNS: usize = 3;
const SHARE_TAG: &str = "bench";
const APPLETS: &[&str] = &["sh", "true", "sleep", "head", "dd"];
const MIB: usize = 1024 * 1024;

struct Args {
    host: bool,
    guest: bool,
    runs: usize,
    mib: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        host: true,
        guest: true,
        runs: 20,
        mib: 256,
    };
    let usage = "--mode host|guest|both, --runs N, --mib N";
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| panic!("{flag} needs a value ({usage})"));
        let number = || -> usize {
            value
                .parse()
                .unwrap_or_else(|_| panic!("{flag} needs a number, not {value:?}"))
        };
        match flag.as_str() {
            "--mode" => {
                (args.host, args.guest) = match value.as_str() {
                    "host" => (true, false),
                    "guest" => (false, true),
                    "both" => (true, true),
                    other => panic!("unknown mode {other:?} ({usage})"),
                }
            }
            "--runs" => args.runs = number(),
            "--mib" => args.mib = number(),
            other => panic!("unknown argument {other:?} ({usage})"),
        }
    }
    assert!(
        args.runs > 0 && args.mib > 0,
        "--runs and --mib must be > 0"
    );
    args
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(300).as_nanos() as i64)
}

/// Where stdio streams are connected.
enum Streams {
    Unix(PathBuf),
    Vsock(HybridVsock),
}

/// One agent to measure: its RPC client, its stdio port, and where a
/// container rootfs goes (`rootfs_host` on the host is `rootfs_agent` for
/// the agent).
struct Target {
    agent: AgentClient,
    streams: Streams,
    rootfs_host: PathBuf,
    rootfs_agent: String,
}

impl Target {
    /// Writes a busybox rootfs; returns its path as the agent sees it.
    fn rootfs(&self, name: &str) -> String {
        let root = self.rootfs_host.join(name);
        for d in ["bin", "proc", "dev", "tmp", "etc", "sys"] {
            std::fs::create_dir_all(root.join(d)).expect("create the rootfs");
        }
        std::fs::copy("/bin/busybox", root.join("bin/busybox"))
            .expect("copy /bin/busybox (install busybox-static)");
        for applet in APPLETS {
            std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
        }
        format!("{}/{name}", self.rootfs_agent)
    }

    /// Connects to the stdio port; the header is not sent yet.
    async fn connect_stdio(&self) -> UnixStream {
        let conn = match &self.streams {
            Streams::Unix(path) => tokio::net::UnixStream::connect(path)
                .await
                .unwrap_or_else(|e| panic!("connect {}: {e}", path.display())),
            Streams::Vsock(vsock) => vsock
                .connect(STDIO_VSOCK_PORT, Duration::from_secs(10))
                .await
                .unwrap_or_else(|e| panic!("connect the stdio port: {e}")),
        };
        let conn = conn.into_std().unwrap();
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(300)))
            .unwrap();
        conn
    }

    async fn create_start(&self, id: &str, rootfs: &str, args: &[&str]) {
        let create = CreateContainerRequest {
            container_id: id.into(),
            oci_spec_json: spec(id, rootfs, args),
            stdio: Some(StdioConfig::default()).into(),
            ..Default::default()
        };
        let start = StartContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.agent
            .create_container(ctx(), &create)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {id}: {e:?}"));
        self.agent
            .start_container(ctx(), &start)
            .await
            .unwrap_or_else(|e| panic!("StartContainer {id}: {e:?}"));
    }

    async fn exec(&self, id: &str, exec_id: &str, args: &[&str], stdout: bool) {
        let req = ExecProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            process_json: serde_json::to_vec(&boxlite_tests::root_process(args)).unwrap(),
            stdio: Some(StdioConfig {
                stdout,
                ..Default::default()
            })
            .into(),
            ..Default::default()
        };
        self.agent
            .exec_process(ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("ExecProcess {args:?} in {id}: {e:?}"));
    }

    /// WaitProcess; panics unless the process exited 0.
    async fn wait_ok(&self, id: &str, exec_id: &str) {
        let req = WaitProcessRequest {
            container_id: id.into(),
            exec_id: exec_id.into(),
            ..Default::default()
        };
        let status = self
            .agent
            .wait_process(ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("WaitProcess {id}/{exec_id}: {e:?}"))
            .exit_status;
        assert_eq!(status, 0, "{id}/{exec_id} exited {status}");
    }

    async fn remove(&self, id: &str) {
        let req = RemoveContainerRequest {
            container_id: id.into(),
            ..Default::default()
        };
        self.agent
            .remove_container(ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e:?}"));
    }

    /// Kills the long-running container's `sleep` (SIGKILL) and removes it.
    async fn remove_long(&self) {
        let req = SignalProcessRequest {
            container_id: "long".into(),
            signal: 9,
            ..Default::default()
        };
        self.agent
            .signal_process(ctx(), &req)
            .await
            .unwrap_or_else(|e| panic!("SignalProcess long: {e:?}"));
        let req = WaitProcessRequest {
            container_id: "long".into(),
            ..Default::default()
        };
        self.agent.wait_process(ctx(), &req).await.unwrap();
        self.remove("long").await;
    }
}

/// A runc-like spec, as containerd's CRI plugin would ask for.
fn spec(id: &str, rootfs: &str, args: &[&str]) -> Vec<u8> {
    boxlite_tests::runc_like_spec("bench", rootfs, &format!("{}/{id}", cgroup_parent()), args)
}

fn cgroup_parent() -> String {
    format!("/boxlite-bench-{}", std::process::id())
}

/// Sends the stream header for `exec_id`'s stdout, then reads to EOF.
/// Returns the bytes and the time from the first byte to EOF.
fn read_stdout(mut conn: UnixStream, id: &str, exec_id: &str) -> (usize, Duration) {
    let header = StreamHeader {
        stream: StreamKind::Stdout,
        container_id: id.into(),
        exec_id: exec_id.into(),
    };
    conn.write_all(&header.encode().unwrap()).unwrap();
    read_ack(&mut conn).unwrap_or_else(|e| panic!("stdout stream of {exec_id} refused: {e}"));
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = conn.read(&mut buf).expect("read stdout");
    let first = Instant::now();
    loop {
        match conn.read(&mut buf).expect("read stdout") {
            0 => return (total, first.elapsed()),
            n => total += n,
        }
    }
}

fn median_p90(mut times: Vec<Duration>) -> String {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "{:.1} / {:.1} ms",
        ms(boxlite_tests::percentile(&times, 0.5)),
        ms(boxlite_tests::percentile(&times, 0.9))
    )
}

/// Runs every measurement against `target`; returns the table cells.
async fn measure(target: &Target, args: &Args) -> Vec<String> {
    let rootfs = target.rootfs("bench");
    target
        .create_start("long", &rootfs, &["sleep", "3600"])
        .await;
    target.exec("long", "warm-up", &["true"], false).await;
    target.wait_ok("long", "warm-up").await;

    let mut exec_times = Vec::new();
    for i in 0..args.runs {
        let exec_id = format!("true-{i}");
        let started = Instant::now();
        target.exec("long", &exec_id, &["true"], false).await;
        target.wait_ok("long", &exec_id).await;
        exec_times.push(started.elapsed());
    }
    eprintln!("exec round trips: {exec_times:?}");

    let mut container_times = Vec::new();
    for i in 0..args.runs {
        let id = format!("true-{i}");
        let started = Instant::now();
        target.create_start(&id, &rootfs, &["true"]).await;
        target.wait_ok(&id, "").await;
        target.remove(&id).await;
        container_times.push(started.elapsed());
    }
    eprintln!("container lifecycles: {container_times:?}");

    let bytes = args.mib * MIB;
    let (count, size) = (format!("count={}", args.mib), bytes.to_string());
    let writers = [
        ("head", vec!["head", "-c", &size, "/dev/zero"]),
        ("dd", vec!["dd", "if=/dev/zero", "bs=1M", &count]),
    ];
    let mut cells = vec![median_p90(exec_times), median_p90(container_times)];
    for (name, argv) in writers {
        let mut rates = Vec::new();
        for i in 0..THROUGHPUT_RUNS {
            let exec_id = format!("{name}-{i}");
            let conn = target.connect_stdio().await;
            let reader = {
                let exec_id = exec_id.clone();
                std::thread::spawn(move || read_stdout(conn, "long", &exec_id))
            };
            target.exec("long", &exec_id, &argv, true).await;
            target.wait_ok("long", &exec_id).await;
            let (got, elapsed) = reader.join().expect("stdout reader");
            assert_eq!(got, bytes, "{name}: bytes read");
            rates.push(bytes as f64 / elapsed.as_secs_f64() / 1e6);
        }
        eprintln!("{name} stdout MB/s: {rates:?}");
        rates.sort_by(f64::total_cmp);
        cells.push(format!(
            "{:.0} MB/s ({:.0}–{:.0})",
            rates[THROUGHPUT_RUNS / 2],
            rates[0],
            rates[THROUGHPUT_RUNS - 1]
        ));
    }
    target.remove_long().await;
    cells
}

/// The agent binary in host mode; killed when dropped.
struct HostAgent(Child);

impl Drop for HostAgent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn host(args: &Args) -> Vec<String> {
    let binary = std::env::var_os("BOXLITE_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::current_exe()
                .expect("own path")
                .with_file_name("boxlite-agent")
        });
    assert!(
        binary.is_file(),
        "no agent at {} (build it with `cargo build --release -p boxlite-agent` in the bench's target dir, or set BOXLITE_AGENT)",
        binary.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let unix = |name: &str| format!("unix://{}", dir.path().join(name).display());
    let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
    let _agent = HostAgent(
        Command::new(&binary)
            .args(["--listen", &unix("agent.sock"), "--stdio-listen"])
            .arg(unix("stdio.sock"))
            .arg("--root")
            .arg(dir.path().join("root"))
            .args(["--log", "info"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", binary.display())),
    );
    let client = connect_host(&dir.path().join("agent.sock")).await;
    let target = Target {
        agent: client,
        streams: Streams::Unix(dir.path().join("stdio.sock")),
        rootfs_host: dir.path().join("root/rootfs"),
        rootfs_agent: "/rootfs".into(),
    };
    let log_on_panic = FileOnPanic(dir.path().join("agent.log"));
    let cells = measure(&target, args).await;
    drop(log_on_panic);
    let _ = std::fs::remove_dir(Path::new("/sys/fs/cgroup").join(&cgroup_parent()[1..]));
    cells
}

async fn connect_host(sock: &Path) -> AgentClient {
    let addr = format!("unix://{}", sock.display());
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(c) = ttrpc::asynchronous::Client::connect(&addr).await {
            let conn = AgentConnection::new(c);
            if conn.check(Duration::from_secs(5)).await.is_ok() {
                return conn.agent().clone();
            }
        }
        assert!(Instant::now() < deadline, "the agent did not come up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn guest(args: &Args) -> Vec<String> {
    let sandbox = SandboxVm::boot("bench", SHARE_TAG, "").await;
    let target = Target {
        agent: sandbox.conn.agent().clone(),
        streams: Streams::Vsock(sandbox.vm.hybrid_vsock()),
        rootfs_host: sandbox.share.path().to_owned(),
        rootfs_agent: boxlite_protocol::default_share_mount_point(SHARE_TAG),
    };
    let cells = measure(&target, args).await;
    sandbox.stop().await;
    cells
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = parse_args();
    println!(
        "| agent | exec `true` round trip (median / p90 of {runs}) | container `true` create → remove (median / p90 of {runs}) | stdout `head -c` {mib} MiB (median of {t}, min–max) | stdout `dd bs=1M` {mib} MiB (median of {t}, min–max) |",
        runs = args.runs,
        mib = args.mib,
        t = THROUGHPUT_RUNS,
    );
    println!("|---|---|---|---|---|");
    if args.host {
        let cells = host(&args).await;
        println!("| host mode, unix sockets | {} |", cells.join(" | "));
    }
    if args.guest {
        let cells = guest(&args).await;
        println!("| guest (QEMU), hybrid vsock | {} |", cells.join(" | "));
    }
}
