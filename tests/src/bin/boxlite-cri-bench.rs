//! Benchmark (not a test): BoxLite pods against runc pods on the same host,
//! driven through containerd's CRI plugin as the kubelet drives it
//! (boxlite_tests::cri: a private containerd, a CNI bridge network):
//!
//! - RunPodSandbox → CreateContainer → StartContainer latency;
//! - TCP round trip host → pod (HTTP GET of a tiny page, new connection
//!   each time), median and 90th percentile;
//! - TCP throughput pod → host (reading what `nc` sends from /dev/zero).
//!
//! Root, after `cargo build --release -p containerd-shim-boxlite-v2
//! -p boxlite-tests` and `cargo xtask guest`:
//!
//! ```text
//! target/release/boxlite-cri-bench [--runs N] [--requests N] [--mib N]
//! ```
//!
//! docs/benchmarks.md records the results.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use boxlite_tests::cri::{http_get, pod_config, Cri, GREETING, HANDLER};
use boxlite_tests::percentile;
use k8s_cri::v1::NamespaceMode;

struct Args {
    runs: usize,
    requests: usize,
    mib: usize,
}

fn parse_args() -> Args {
    let mut args = Args {
        runs: 5,
        requests: 200,
        mib: 256,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || -> usize {
            it.next()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{flag} needs a number"))
        };
        match flag.as_str() {
            "--runs" => args.runs = value(),
            "--requests" => args.requests = value(),
            "--mib" => args.mib = value(),
            other => panic!("unknown argument {other:?} (--runs N, --requests N, --mib N)"),
        }
    }
    args
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// One sequential HTTP GET on a new connection; the time to the full answer.
fn one_request(ip: &str) -> Duration {
    let started = Instant::now();
    let mut s = TcpStream::connect((ip, 8080)).expect("connect to the pod");
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut body = Vec::new();
    s.read_to_end(&mut body).unwrap();
    assert!(!body.is_empty(), "empty answer");
    started.elapsed()
}

/// Reads `mib` MiB from the pod's `nc` on port 9001; MB/s.
fn throughput(ip: &str, mib: usize) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut s = loop {
        match TcpStream::connect((ip, 9001)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("no data server in the pod: {e}"),
        }
    };
    let want = mib * 1024 * 1024;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    let started = Instant::now();
    while got < want {
        let n = s.read(&mut buf).expect("read from the pod");
        assert!(n > 0, "the pod closed after {got} bytes");
        got += n;
    }
    got as f64 / started.elapsed().as_secs_f64() / 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args = parse_args();
    if std::env::var_os("BOXLITE_SHIM").is_none() {
        let exe = std::env::current_exe().expect("own path");
        let shim = exe.with_file_name("containerd-shim-boxlite-v2");
        std::env::set_var("BOXLITE_SHIM", shim);
    }
    let mut cri = Cri::start("bridge").await;
    let logs = cri.c.dir.path().join("pod-logs");
    let serve = format!(
        "mkdir -p /www && echo {GREETING} > /www/index.html && \
         (while :; do nc -l -p 9001 < /dev/zero; done &) && \
         exec httpd -f -p 8080 -h /www"
    );
    println!("| runtime | RunPodSandbox → container started (median of {}) | HTTP round trip host → pod (median / p90 of {}) | pod → host TCP ({} MiB) |", args.runs, args.requests, args.mib);
    println!("|---|---|---|---|");
    for (name, handler) in [("runc", ""), ("boxlite", HANDLER)] {
        let mut starts = Vec::new();
        let mut last = None;
        for i in 0..args.runs {
            let config = pod_config(&format!("bench-{name}-{i}"), NamespaceMode::Pod, &[], &logs);
            let started = Instant::now();
            let pod = cri.run_pod(&config, handler).await.expect("RunPodSandbox");
            let container = cri
                .start_container(&pod, &config, "server", &["sh", "-c", &serve])
                .await;
            starts.push(started.elapsed());
            if let Some((pod, container)) = last.replace((pod, container)) {
                cri.remove_pod(&pod, &[container]).await;
            }
        }
        let (pod, container) = last.expect("at least one run");
        let ip = cri.pod_ip(&pod).await;
        http_get(&ip, 8080, Instant::now() + Duration::from_secs(60));
        let mut rtts: Vec<Duration> = (0..args.requests).map(|_| one_request(&ip)).collect();
        let mbps = throughput(&ip, args.mib);
        starts.sort();
        rtts.sort();
        println!(
            "| {name} | {} | {} / {} | {mbps:.0} MB/s |",
            ms(percentile(&starts, 0.5)),
            ms(percentile(&rtts, 0.5)),
            ms(percentile(&rtts, 0.9)),
        );
        cri.remove_pod(&pod, &[container]).await;
    }
    cri.c.assert_nothing_left();
}
