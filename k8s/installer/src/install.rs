//! The install and uninstall sequences: payload, containerd registration,
//! containerd restart, node label; each step idempotent, so the DaemonSet can
//! run them on every pod start.

use std::path::{Path, PathBuf};

use crate::containerd_config::{self, ConfigError};
use crate::host_ns::{self, HostError};
use crate::node_label::{ApiConfig, LabelError, NodeClient, VALUE};
use crate::payload::{self, PayloadError, OPT_DIR};
use crate::Log;

/// containerd's config, relative to the host root.
pub const CONTAINERD_CONFIG: &str = "etc/containerd/config.toml";
/// Present while containerd still has to be restarted for a config change:
/// if the restart fails, the pod restarts and the next run finds the config
/// unchanged, yet containerd has not read it. This file remembers.
const RESTART_PENDING: &str = "opt/boxlite/.containerd-restart-pending";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("containerd restart: {0}")]
    Restart(#[from] HostError),
    #[error(transparent)]
    Label(#[from] LabelError),
    #[error("{path}: cannot {what}: {source}")]
    Marker {
        path: PathBuf,
        what: &'static str,
        source: std::io::Error,
    },
}

/// How containerd gets restarted after a config change.
pub enum Restart {
    /// This command in the host's namespaces: `systemctl restart containerd`
    /// ([`host_ns::RESTART_CONTAINERD`]) unless `--restart-command` says
    /// otherwise (e.g. `systemctl restart k3s`).
    OnHost {
        argv: Vec<String>,
        /// Whose namespaces to enter: [`host_ns::HOST_INIT`] but in tests.
        pid: u32,
    },
    /// Not at all (`--no-restart`): the admin restarts it.
    Skip,
}

/// What both sequences need besides the payload.
pub struct Options {
    /// Where the host's `/` is mounted (`/host` in the DaemonSet).
    pub host_root: PathBuf,
    pub restart: Restart,
    /// The node to label and how to reach the API server; `None` with
    /// `--no-label`.
    pub label: Option<(String, ApiConfig)>,
}

pub fn install(opts: &Options, payload_dir: &Path, log: &mut Log) -> Result<(), InstallError> {
    payload::install(&opts.host_root, payload_dir, log)?;
    let config = opts.host_root.join(CONTAINERD_CONFIG);
    let changed = containerd_config::register_file(&config)?;
    log.action(format!(
        "{}: {}",
        config.display(),
        if changed {
            "runtime boxlite registered (previous file kept as config.toml.before-boxlite)"
        } else {
            "runtime boxlite already registered, unchanged"
        }
    ));
    restart_if_needed(opts, changed, log)?;
    label(opts, Some(VALUE), log)
}

pub fn uninstall(opts: &Options, log: &mut Log) -> Result<(), InstallError> {
    // The label first: the scheduler stops placing BoxLite pods here before
    // the runtime goes away.
    label(opts, None, log)?;
    let config = opts.host_root.join(CONTAINERD_CONFIG);
    let changed = containerd_config::unregister_file(&config)?;
    log.action(format!(
        "{}: {}",
        config.display(),
        if changed {
            "runtime boxlite removed"
        } else {
            "runtime boxlite not registered, unchanged"
        }
    ));
    restart_if_needed(opts, changed, log)?;
    payload::uninstall(&opts.host_root, log)?;
    Ok(())
}

fn restart_if_needed(opts: &Options, changed: bool, log: &mut Log) -> Result<(), InstallError> {
    let marker = opts.host_root.join(RESTART_PENDING);
    let pending = marker.exists();
    if !changed && !pending {
        log.action("containerd: config unchanged, not restarted");
        return Ok(());
    }
    match &opts.restart {
        Restart::Skip => {
            log.action("containerd: not restarted (--no-restart); restart it for the change to take effect");
            Ok(())
        }
        Restart::OnHost { argv, pid } => {
            let marker_err = |what, source| InstallError::Marker {
                path: marker.clone(),
                what,
                source,
            };
            if !pending {
                std::fs::create_dir_all(opts.host_root.join(OPT_DIR))
                    .and_then(|()| std::fs::write(&marker, b""))
                    .map_err(|e| marker_err("record the pending restart", e))?;
            }
            host_ns::run_on_host(*pid, argv)?;
            std::fs::remove_file(&marker).map_err(|e| marker_err("remove it", e))?;
            log.action(format!(
                "containerd: restarted with `{}` ({})",
                argv.join(" "),
                if changed {
                    "config changed"
                } else {
                    "a previous restart had failed"
                }
            ));
            Ok(())
        }
    }
}

fn label(opts: &Options, value: Option<&str>, log: &mut Log) -> Result<(), InstallError> {
    let Some((node, api)) = &opts.label else {
        log.action("node label: skipped (--no-label)");
        return Ok(());
    };
    NodeClient::new(api)?.set_label(node, value, log)?;
    Ok(())
}
