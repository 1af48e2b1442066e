//! The shim binary's life cycle on `containerd-shim` 0.11 (async): `start`
//! (grouping, spawning the daemon, printing its address), the daemon
//! (task service), and `delete` (cleanup after a crashed shim).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use boxlite_runtime::config::DEFAULT_CONFIG_PATH;
use boxlite_runtime::Config;
use containerd_shim::api::DeleteResponse;
use containerd_shim::publisher::RemotePublisher;
use containerd_shim::{Config as ShimConfig, Error, ExitSignal, Flags, Shim, StartOpts};
use containerd_shim_protos::protobuf::MessageField;

use crate::events::{ChannelSink, Publisher, TaskEvent, PUBLISH_TIMEOUT};
use crate::grouping::sandbox_id_of;
use crate::sandbox::{cleanup_sandbox_dir, ConfigVmFactory, Sandbox, SandboxState, MOUNTS_DIR};
use crate::task_service::TaskService;
use crate::{convert, logging, rootfs};

/// The runtime type containerd knows us by.
pub const RUNTIME_ID: &str = "io.containerd.boxlite.v2";
/// Overrides the config path (tests, non-standard installs).
pub const CONFIG_ENV: &str = "BOXLITE_CONFIG";
/// How long `start` tries to reach an existing sandbox shim.
const GROUP_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// containerd-shim's bootstrap settings; they must be passed to `run`
/// (signals and the subreaper are set up before `Shim::new`). Logging is
/// ours (tracing into containerd's log fifo), and there is no reaper: the
/// shim's children are the VM, its helpers and logging binaries, each
/// reaped through its own handle — containerd-shim's `waitpid(-1)` reaper
/// would steal their exit statuses.
pub fn shim_config() -> ShimConfig {
    ShimConfig {
        no_setup_logger: true,
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    }
}

pub fn config_path() -> PathBuf {
    std::env::var_os(CONFIG_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

pub fn load_config() -> Result<Config, String> {
    // The whole chain: the shim keeps only this text for every Create.
    Config::load_or_default(&config_path()).map_err(|e| boxlite_protocol::error_chain::chain(&e))
}

/// The annotations of the bundle's config.json (empty when unreadable).
pub fn bundle_annotations(bundle: &Path) -> HashMap<String, String> {
    oci_spec::runtime::Spec::load(bundle.join("config.json"))
        .ok()
        .and_then(|s| s.annotations().clone())
        .unwrap_or_default()
}

pub struct BoxliteShim {
    id: String,
    namespace: String,
    /// containerd's address (for the socket name in `delete`).
    address: String,
    /// The daemon's own socket (`-socket`), removed when it exits.
    socket: String,
    debug: bool,
    exit: Arc<ExitSignal>,
}

#[async_trait]
impl Shim for BoxliteShim {
    type T = TaskService;

    async fn new(_runtime_id: &str, args: &Flags, _config: &mut ShimConfig) -> Self {
        BoxliteShim {
            id: args.id.clone(),
            namespace: args.namespace.clone(),
            address: args.address.clone(),
            socket: args.socket.clone(),
            debug: args.debug,
            exit: Arc::new(ExitSignal::default()),
        }
    }

    async fn start_shim(&mut self, opts: StartOpts) -> Result<String, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(format!("cwd: {e}")))?;
        let sandbox = sandbox_id_of(&opts.id, &bundle_annotations(&bundle));
        if sandbox != opts.id {
            let address = containerd_shim::socket_address(&opts.address, &opts.namespace, &sandbox);
            if socket_answers(&address).await {
                write_address(&bundle, &address)?;
                return Ok(address);
            }
            eprintln!(
                "{RUNTIME_ID}: container {} names sandbox {sandbox}, whose shim does not answer at {address}; it gets its own VM",
                opts.id
            );
        }
        let id = opts.id.clone();
        let address = containerd_shim::spawn(opts, &id, Vec::new()).await?;
        write_address(&bundle, &address)?;
        Ok(address)
    }

    async fn delete_shim(&mut self) -> Result<DeleteResponse, Error> {
        let bundle = std::env::current_dir().map_err(|e| Error::Other(format!("cwd: {e}")))?;
        delete_after_crash(&self.id, &bundle)
            .await
            .map_err(Error::Other)?;
        // The dead daemon's socket, when nothing listens on it any more.
        let sandbox = sandbox_id_of(&self.id, &bundle_annotations(&bundle));
        if !self.address.is_empty() {
            let socket = containerd_shim::socket_address(&self.address, &self.namespace, &sandbox);
            if !socket_answers(&socket).await {
                remove_socket(&socket);
            }
        }
        Ok(DeleteResponse {
            pid: 0,
            // 128 + SIGKILL: what runc's shim reports for a forced delete.
            exit_status: 137,
            exited_at: MessageField::some(convert::timestamp(SystemTime::now())),
            ..Default::default()
        })
    }

    async fn wait(&mut self) {
        self.exit.wait().await;
        // containerd-shim removes the socket only if the bundle's `address`
        // file still exists; containerd may have removed the bundle by now.
        remove_socket(&self.socket);
    }

    async fn create_task_service(&self, publisher: RemotePublisher) -> TaskService {
        let config = load_config();
        let level = config
            .as_ref()
            .map(|c| c.runtime.log_level.clone())
            .unwrap_or_else(|_| "info".into());
        logging::init(&level, self.debug);
        tracing::info!(sandbox_id = %self.id, namespace = %self.namespace, config = %config_path().display(), "shim started");
        if let Err(e) = &config {
            tracing::error!("config error (every Create will fail with it): {e}");
        }
        let publisher = Arc::new(ContainerdPublisher {
            publisher,
            namespace: self.namespace.clone(),
        });
        let events = Arc::new(ChannelSink::spawn(publisher, PUBLISH_TIMEOUT));
        let sandbox = Sandbox::new(
            &self.id,
            &self.namespace,
            Arc::new(ConfigVmFactory::new(config)),
            events,
            self.exit.clone(),
        );
        TaskService::new(sandbox)
    }
}

fn write_address(bundle: &Path, address: &str) -> Result<(), Error> {
    std::fs::write(bundle.join("address"), address)
        .map_err(|e| Error::Other(format!("cannot write {}/address: {e}", bundle.display())))
}

/// Removes a unix socket file (`unix://path` or a path); only sockets.
fn remove_socket(address: &str) {
    use std::os::unix::fs::FileTypeExt;
    let path = Path::new(address.strip_prefix("unix://").unwrap_or(address));
    if path.as_os_str().is_empty() {
        return;
    }
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
        let _ = std::fs::remove_file(path);
    }
}

/// True when a shim serves `address` (unix://path).
async fn socket_answers(address: &str) -> bool {
    let path = address.strip_prefix("unix://").unwrap_or(address);
    matches!(
        tokio::time::timeout(GROUP_PROBE_TIMEOUT, tokio::net::UnixStream::connect(path)).await,
        Ok(Ok(_))
    )
}

/// `delete` after a crash: for the sandbox itself, let a live shim of this
/// sandbox finish (or kill it when it hangs), kill the VM and its helpers
/// (pid files), unmount everything
/// and remove the sandbox directory; for a member container, unmount and
/// remove its part of the share.
pub async fn delete_after_crash(container_id: &str, bundle: &Path) -> Result<(), String> {
    let config = load_config()?;
    let sandbox = sandbox_id_of(container_id, &bundle_annotations(bundle));
    boxlite_protocol::ids::validate("sandbox", &sandbox).map_err(|e| e.to_string())?;
    let dir = config.sandbox_dir(&sandbox);
    if sandbox == container_id {
        if let Ok(state) = SandboxState::load(&dir) {
            stop_stale_shim(state.shim_pid, STALE_SHIM_GRACE);
        }
        cleanup_sandbox_dir(&dir).await;
    } else {
        let part = dir.join(MOUNTS_DIR).join(container_id);
        rootfs::teardown(&part).map_err(|e| boxlite_protocol::error_chain::chain(&e))?;
    }
    Ok(())
}

/// How long `delete` lets a live shim of the sandbox finish its own
/// teardown (containerd also runs `delete` right after a normal Shutdown).
pub const STALE_SHIM_GRACE: Duration = Duration::from_secs(10);

/// True while `pid` runs this binary (not a zombie, not a recycled pid).
fn is_our_shim(pid: u32) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let zombie = stat
        .rsplit_once(')')
        .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
    !zombie && String::from_utf8_lossy(&cmdline).contains("containerd-shim-boxlite-v2")
}

/// Waits up to `grace` for another shim of this sandbox to exit, then
/// kills it (a shim that hangs).
fn stop_stale_shim(pid: u32, grace: Duration) {
    if pid == std::process::id() || pid <= 1 {
        return;
    }
    let deadline = std::time::Instant::now() + grace;
    while is_our_shim(pid) {
        if std::time::Instant::now() >= deadline {
            if let Ok(raw) = i32::try_from(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(raw),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Publishes through containerd's event service.
struct ContainerdPublisher {
    publisher: RemotePublisher,
    namespace: String,
}

#[async_trait]
impl Publisher for ContainerdPublisher {
    async fn publish(&self, event: TaskEvent) -> Result<(), String> {
        let topic = event.topic();
        self.publisher
            .publish(
                ttrpc::context::with_duration(PUBLISH_TIMEOUT),
                topic,
                &self.namespace,
                convert::event(event),
            )
            .await
            .map_err(|e| e.to_string())
    }
}
