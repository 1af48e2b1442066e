//! `boxlite-smoke`: boots a sandbox VM with the configured backend, talks to
//! its agent, shuts it down, and says how long each phase took.
//!
//! Used by scripts/setup.sh to prove an installation works, by
//! docs/benchmarks.md for boot timings (`--runs N`), and by people debugging
//! a host ("does a VM boot here at all, and where are its logs?").
//!
//! ```text
//! boxlite-smoke [--config PATH] [--runs N]
//! ```
//!
//! Phases of one run, all from the moment `start()` is called:
//! * `spawn`: helper daemons up and the VM process spawned (`start()` returns);
//! * `kernel`: the guest's monotonic clock when the agent started — the time
//!   from the kernel's clock start to PID 1, as the guest measured it;
//! * `ready`: the agent answered `Health.Check` through the hybrid socket;
//! * `stop`: DestroySandbox until the VM process and helpers are gone.
//!
//! On success the sandbox directory is removed; on failure it is kept and
//! its path printed, with the console log and helper logs inside.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use boxlite_protocol::agent::GuestInfoRequest;
use boxlite_runtime::config::DEFAULT_CONFIG_PATH;
use boxlite_runtime::hypervisor::{new_hypervisor, VmSpec};
use boxlite_runtime::Config;

struct Args {
    config: Option<PathBuf>,
    runs: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: None,
        runs: 1,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--config" => {
                args.config = Some(it.next().ok_or("--config needs a path")?.into());
            }
            "--runs" => {
                let n = it.next().ok_or("--runs needs a number")?;
                args.runs = n
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or(format!("--runs {n}: expected a number from 1 to 1000"))?;
            }
            "-h" | "--help" => {
                println!("usage: boxlite-smoke [--config PATH] [--runs N]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(args)
}

/// Timings of one boot, in milliseconds.
#[derive(Debug, Clone, Copy)]
struct Timings {
    spawn: f64,
    kernel: f64,
    ready: f64,
    stop: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn one_run(config: &Config, id: &str, verbose: bool) -> Result<Timings, String> {
    let spec = VmSpec::from_config(config, id).map_err(|e| e.to_string())?;
    let dir = spec.dir.clone();
    let vm = new_hypervisor(config, spec).map_err(|e| e.to_string())?;

    let t0 = Instant::now();
    let result = async {
        vm.start().await.map_err(|e| e.to_string())?;
        let spawned = t0.elapsed();
        let conn = vm.wait_ready().await.map_err(|e| e.to_string())?;
        let ready = t0.elapsed();
        let version = conn
            .version(Duration::from_secs(5))
            .await
            .map_err(|e| format!("sandbox {id}: Version failed: {e}"))?;
        let info = conn
            .agent()
            .guest_info(
                ttrpc::context::with_duration(Duration::from_secs(5)),
                &GuestInfoRequest::new(),
            )
            .await
            .map_err(|e| format!("sandbox {id}: GuestInfo failed: {e}"))?;
        if verbose {
            let devices: Vec<String> = info
                .virtio_devices
                .iter()
                .map(|d| format!("{}(id {})", d.name, d.device_id))
                .collect();
            println!(
                "sandbox {id}: agent {} (protocol {}), guest kernel {}, boot id {}, {} vCPU, {} MiB, virtio: {}",
                version.agent_version,
                version.protocol_version,
                info.kernel_release,
                info.boot_id.trim(),
                info.online_cpus,
                info.mem_total_kib / 1024,
                devices.join(" ")
            );
        }
        let stopping = Instant::now();
        vm.stop().await.map_err(|e| e.to_string())?;
        Ok::<_, String>(Timings {
            spawn: ms(spawned),
            kernel: info.agent_started_at_ms as f64,
            ready: ms(ready),
            stop: ms(stopping.elapsed()),
        })
    }
    .await;

    match result {
        Ok(t) => {
            // Logs are only interesting when something went wrong.
            let _ = std::fs::remove_dir_all(&dir);
            Ok(t)
        }
        Err(e) => {
            let _ = vm.kill().await;
            Err(format!("{e}\nlogs kept in {}", dir.display()))
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len() % 2 == 0 {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("boxlite-smoke: {e}");
            return ExitCode::from(2);
        }
    };
    let config = match &args.config {
        Some(path) => Config::load(path),
        None => Config::load_or_default(std::path::Path::new(DEFAULT_CONFIG_PATH)),
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "boxlite-smoke: {}",
                boxlite_protocol::error_chain::chain(&e)
            );
            return ExitCode::from(2);
        }
    };
    let hypervisor = match config.resolve_hypervisor() {
        Ok(h) => h,
        Err(e) => {
            eprintln!(
                "boxlite-smoke: {}",
                boxlite_protocol::error_chain::chain(&e)
            );
            return ExitCode::from(2);
        }
    };
    println!(
        "boxlite-smoke: backend {:?}, accel {:?} ({}), kernel {}, initramfs {}",
        hypervisor.backend,
        hypervisor.accel,
        hypervisor.accel_reason,
        config.guest.kernel.display(),
        config.guest.initramfs.display()
    );

    let mut all = Vec::new();
    for run in 0..args.runs {
        let id = format!("smoke-{}-{run}", std::process::id());
        match one_run(&config, &id, run == 0).await {
            Ok(t) => {
                println!(
                    "run {run}: spawn {:.0} ms, guest kernel to PID 1 {:.0} ms, agent ready {:.0} ms, stop {:.0} ms",
                    t.spawn, t.kernel, t.ready, t.stop
                );
                all.push(t);
            }
            Err(e) => {
                eprintln!("boxlite-smoke: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if all.len() > 1 {
        let pick = |f: fn(&Timings) -> f64| median(all.iter().map(f).collect());
        println!(
            "median of {} runs: spawn {:.0} ms, guest kernel to PID 1 {:.0} ms, agent ready {:.0} ms, stop {:.0} ms",
            all.len(),
            pick(|t| t.spawn),
            pick(|t| t.kernel),
            pick(|t| t.ready),
            pick(|t| t.stop)
        );
    }
    println!("boxlite-smoke: OK");
    ExitCode::SUCCESS
}
