//! `boxlite-agent`: guest mode as PID 1, host mode otherwise (see
//! docs/agent.md).

use std::path::Path;
use std::sync::Arc;

use boxlite_agent::agent::Agent;
use boxlite_agent::cmdline::{BootParams, PROC_CMDLINE};
use boxlite_agent::config::{Config, HostCommand, USAGE};
use boxlite_agent::guest_info::StartTime;
use boxlite_agent::listener::ListenAddr;
use boxlite_agent::logging::{self, ring::RING_CAPACITY, LogHub};
use boxlite_agent::reaper::Reaper;
use boxlite_agent::server::{self, Ended};
use boxlite_agent::{container, etc, guest_init, network, power, AGENT_VERSION};
use boxlite_protocol::error_chain::chain;

/// Threads for blocking work (mounts, file reads); the async side is a
/// single thread.
const MAX_BLOCKING_THREADS: usize = 8;

fn main() {
    let start = StartTime::now();
    let mut args = std::env::args_os().skip(1);
    if args.next().as_deref() == Some(std::ffi::OsStr::new(container::helper::HELPER_ARG)) {
        let rest: Vec<String> = args.map(|a| a.to_string_lossy().into_owned()).collect();
        std::process::exit(container::helper::helper_main(&rest));
    }
    if nix::unistd::getpid().as_raw() == 1 {
        guest_main(start)
    } else {
        std::process::exit(host_main(start))
    }
}

fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .build()
}

/// Panics are logged (console and log stream). In a request handler the
/// request fails with INTERNAL; anywhere else the caller decides.
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        tracing::error!("agent bug: {info}");
    }));
}

/// PID 1. Never returns: the VM ends with a reboot.
fn guest_main(start: StartTime) -> ! {
    // Before anything else: later steps mount onto the new root.
    let switched = guest_init::switch_root();
    let early_errors = guest_init::early();
    let (params, cmdline_error) = match BootParams::read(Path::new(PROC_CMDLINE)) {
        Ok(p) => (p, None),
        Err(e) => (BootParams::default(), Some(e)),
    };
    let config = Config::guest(params.log.clone());
    let hub = Arc::new(LogHub::new(RING_CAPACITY));
    match logging::init(&config.log_filter, hub.clone()) {
        Ok(None) => {}
        Ok(Some(bad_filter)) => tracing::warn!("{bad_filter}; logging at info"),
        Err(e) => power::console(&format!("boxlite-agent: {}", chain(&e))),
    }
    install_panic_hook();
    tracing::info!(
        version = AGENT_VERSION,
        "boxlite-agent starting as PID 1 (guest mode)"
    );
    match &switched {
        Ok(true) => tracing::info!(
            "root moved off the initramfs onto a tmpfs ({})",
            guest_init::NEW_ROOT
        ),
        Ok(false) => tracing::info!("root is not the initramfs; left as it is"),
        Err(e) => tracing::error!(
            "{}; containers with a mount namespace will fail (pivot_root)",
            chain(e)
        ),
    }
    for e in &early_errors {
        tracing::error!("{}", chain(e));
    }
    if let Some(e) = cmdline_error {
        tracing::error!("{}", chain(&e));
    }
    for w in &params.warnings {
        tracing::warn!("{w}");
    }
    for e in guest_init::filesystems() {
        tracing::error!("{}", chain(&e));
    }
    if let Err(e) = network::bring_up("lo") {
        tracing::error!("{}", chain(&e));
    }
    if let Err(e) = etc::set_hostname(&config, &params.hostname) {
        tracing::error!("{}", chain(&e));
    }
    if !Path::new(etc::HOSTS_PATH).exists() {
        if let Err(e) = etc::write_in_place(
            Path::new(etc::HOSTS_PATH),
            &etc::default_hosts(&params.hostname),
        ) {
            tracing::error!("{}", chain(&e));
        }
    }
    tracing::info!(
        hostname = %params.hostname,
        boot_ms = start.monotonic_ms,
        init_ms = logging::monotonic_ms().saturating_sub(start.monotonic_ms),
        "guest set up"
    );

    let agent = Agent::new(config, Reaper::new(), start);
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let rt = runtime().map_err(|e| format!("cannot start the async runtime: {e}"))?;
        let result = rt.block_on(server::run(agent, hub)).map_err(|e| chain(&e));
        // Dropping the runtime would wait for blocking work (a hung mount).
        rt.shutdown_background();
        result
    }));
    match outcome {
        Ok(Ok(Ended::Destroyed)) => {
            tracing::info!("rebooting to end the VM");
            power::reboot_now()
        }
        Ok(Ok(Ended::Signalled)) => power::fatal("the agent stopped on a signal"),
        Ok(Err(message)) => power::fatal(&message),
        Err(_) => power::fatal("the agent's main loop panicked"),
    }
}

/// Host mode: returns the exit code.
fn host_main(start: StartTime) -> i32 {
    let config =
        match Config::from_host_args(std::env::args_os().skip(1), std::env::var("RUST_LOG").ok()) {
            Ok(HostCommand::Run(c)) => c,
            Ok(HostCommand::Help) => {
                print!("{USAGE}");
                return 0;
            }
            Ok(HostCommand::Version) => {
                println!("boxlite-agent {AGENT_VERSION}");
                return 0;
            }
            Err(e) => {
                eprintln!("boxlite-agent: {}", chain(&e));
                return 2;
            }
        };
    let hub = Arc::new(LogHub::new(RING_CAPACITY));
    match logging::init(&config.log_filter, hub.clone()) {
        Ok(None) => {}
        Ok(Some(bad_filter)) => tracing::warn!("{bad_filter}; logging at info"),
        Err(e) => eprintln!("boxlite-agent: {}", chain(&e)),
    }
    install_panic_hook();
    tracing::info!(
        version = AGENT_VERSION,
        root = %config.root.display(),
        "boxlite-agent starting (host mode)"
    );
    let sockets: Vec<_> = [
        Some(&config.listen),
        config.log_listen.as_ref(),
        config.stdio_listen.as_ref(),
    ]
    .into_iter()
    .flatten()
    .filter_map(|a| match a {
        ListenAddr::Unix(p) => Some(p.clone()),
        ListenAddr::Vsock { .. } => None,
    })
    .collect();
    // Container processes are re-parented when the container helper exits:
    // to PID 1 in the guest, to the agent here.
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        tracing::warn!(error = %e, "cannot become a child subreaper; container exits may be lost");
    }
    let agent = Agent::new(config, Reaper::new(), start);
    let result = runtime()
        .map_err(|e| format!("cannot start the async runtime: {e}"))
        .and_then(|rt| {
            let result = rt.block_on(server::run(agent, hub)).map_err(|e| chain(&e));
            rt.shutdown_background();
            result
        });
    for path in sockets {
        let _ = std::fs::remove_file(path);
    }
    match result {
        Ok(ended) => {
            tracing::info!(?ended, "exiting");
            0
        }
        Err(message) => {
            tracing::error!("{message}");
            1
        }
    }
}
