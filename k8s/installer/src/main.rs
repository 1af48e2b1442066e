//! `boxlite-node-installer install|uninstall`: the DaemonSet's entry point.
//! Arguments are parsed by hand: a dozen flags do not justify an argument
//! parser in a binary that ships in every node's image.

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use boxlite_node_installer::host_ns::{HOST_INIT, RESTART_CONTAINERD};
use boxlite_node_installer::install::{self, Options, Restart};
use boxlite_node_installer::node_label::ApiConfig;
use boxlite_node_installer::Log;
use nix::sys::signal::{SigSet, Signal};

const USAGE: &str = "\
usage:
  boxlite-node-installer install   --host-root DIR --payload DIR [common flags]
  boxlite-node-installer uninstall --host-root DIR [common flags]

common flags:
  --node NAME          node to label (default: $NODE_NAME, set by the DaemonSet)
  --no-restart         do not restart containerd after a config change
  --restart-command C  how to restart containerd, run in the host's namespaces
                       (default: `systemctl restart containerd`; split on spaces)
  --no-label           do not touch the node's boxlite.io/runtime label
  --wait               when done, stay running until SIGTERM (a DaemonSet's
                       pod must not exit, or it is restarted)
  --api-server URL     Kubernetes API (default: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT,
                       or $BOXLITE_API_SERVER)
  --token-file FILE    bearer token (default: the service account's, or $BOXLITE_TOKEN_FILE)
  --ca-file FILE       CA bundle of the API server (default: the service account's, or $BOXLITE_CA_FILE)
";

#[derive(Debug, PartialEq)]
enum Mode {
    Install,
    Uninstall,
}

#[derive(Debug)]
struct Args {
    mode: Mode,
    host_root: PathBuf,
    payload: Option<PathBuf>,
    node: Option<String>,
    no_restart: bool,
    restart_command: Option<String>,
    no_label: bool,
    wait: bool,
    api_server: Option<String>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

fn parse(mut argv: impl Iterator<Item = OsString>) -> Result<Args, String> {
    let mode = match argv.next().and_then(|a| a.into_string().ok()).as_deref() {
        Some("install") => Mode::Install,
        Some("uninstall") => Mode::Uninstall,
        Some("-h" | "--help" | "help") => return Err(String::new()),
        Some(other) => return Err(format!("unknown subcommand {other:?}")),
        None => return Err("a subcommand is needed".to_owned()),
    };
    let env = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let mut args = Args {
        mode,
        host_root: PathBuf::new(),
        payload: None,
        node: env("NODE_NAME").and_then(|v| v.into_string().ok()),
        no_restart: false,
        restart_command: None,
        no_label: false,
        wait: false,
        api_server: env("BOXLITE_API_SERVER").and_then(|v| v.into_string().ok()),
        token_file: env("BOXLITE_TOKEN_FILE").map(PathBuf::from),
        ca_file: env("BOXLITE_CA_FILE").map(PathBuf::from),
    };
    let mut host_root = None;
    while let Some(flag) = argv.next() {
        let flag = flag
            .into_string()
            .map_err(|f| format!("unknown argument {f:?}"))?;
        let mut value = || argv.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--host-root" => host_root = Some(PathBuf::from(value()?)),
            "--payload" => args.payload = Some(PathBuf::from(value()?)),
            "--node" => args.node = Some(string(value()?, "--node")?),
            "--api-server" => args.api_server = Some(string(value()?, "--api-server")?),
            "--token-file" => args.token_file = Some(PathBuf::from(value()?)),
            "--ca-file" => args.ca_file = Some(PathBuf::from(value()?)),
            "--restart-command" => {
                args.restart_command = Some(string(value()?, "--restart-command")?)
            }
            "--no-restart" => args.no_restart = true,
            "--no-label" => args.no_label = true,
            "--wait" => args.wait = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    args.host_root =
        host_root.ok_or("--host-root is required (the DaemonSet mounts the host's / at /host)")?;
    if args.mode == Mode::Install && args.payload.is_none() {
        return Err("install needs --payload (the image carries it at /payload)".to_owned());
    }
    Ok(args)
}

fn string(value: OsString, flag: &str) -> Result<String, String> {
    value
        .into_string()
        .map_err(|v| format!("{flag} {v:?} is not UTF-8"))
}

fn options(args: &Args) -> Result<Options, String> {
    let label = if args.no_label {
        None
    } else {
        let node = args.node.clone().ok_or(
            "node name unknown: pass --node or set NODE_NAME (the DaemonSet sets it from \
             spec.nodeName), or --no-label",
        )?;
        let api = ApiConfig::in_cluster(
            args.api_server.clone(),
            args.token_file.clone(),
            args.ca_file.clone(),
        )
        .map_err(|e| e.to_string())?;
        Some((node, api))
    };
    Ok(Options {
        host_root: args.host_root.clone(),
        restart: if args.no_restart {
            Restart::Skip
        } else {
            let command = args
                .restart_command
                .as_deref()
                .unwrap_or(RESTART_CONTAINERD);
            let argv: Vec<String> = command.split_whitespace().map(str::to_owned).collect();
            if argv.is_empty() {
                return Err("--restart-command is empty (use --no-restart)".to_owned());
            }
            Restart::OnHost {
                argv,
                pid: HOST_INIT,
            }
        },
        label,
    })
}

/// Blocks until SIGTERM or SIGINT. The signals are blocked first, so they
/// queue for sigwait instead of being ignored: as a container's PID 1 this
/// process has no default action for them.
fn wait_for_termination(log: &mut Log) -> Result<(), String> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.thread_block()
        .map_err(|e| format!("cannot block SIGTERM: {e}"))?;
    log.action("done; waiting for SIGTERM");
    let signal = set.wait().map_err(|e| format!("sigwait: {e}"))?;
    log.action(format!("{signal}: exiting"));
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(args) => args,
        Err(message) if message.is_empty() => {
            print!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("boxlite-node-installer: {message}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let mut log = Log::printing();
    let result = options(&args).and_then(|opts| {
        match args.mode {
            Mode::Install => {
                let payload = args.payload.as_deref().expect("checked in parse");
                install::install(&opts, payload, &mut log)
            }
            Mode::Uninstall => install::uninstall(&opts, &mut log),
        }
        .map_err(|e| e.to_string())
    });
    if let Err(message) = result {
        eprintln!("boxlite-node-installer: error: {message}");
        return ExitCode::FAILURE;
    }
    log.action(match args.mode {
        Mode::Install => "install complete",
        Mode::Uninstall => "uninstall complete",
    });
    if args.wait {
        if let Err(message) = wait_for_termination(&mut log) {
            eprintln!("boxlite-node-installer: error: {message}");
            return ExitCode::FAILURE;
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Result<Args, String> {
        parse(list.iter().map(OsString::from))
    }

    #[test]
    fn install_needs_host_root_and_payload() {
        let a = args(&[
            "install",
            "--host-root",
            "/host",
            "--payload",
            "/payload",
            "--node",
            "n1",
            "--wait",
        ])
        .unwrap();
        assert_eq!(a.mode, Mode::Install);
        assert_eq!(a.host_root, PathBuf::from("/host"));
        assert_eq!(a.node.as_deref(), Some("n1"));
        assert!(a.wait && !a.no_restart && !a.no_label);
        assert!(args(&["install", "--host-root", "/host"])
            .unwrap_err()
            .contains("--payload"));
        assert!(args(&["uninstall"])
            .unwrap_err()
            .contains("--host-root is required"));
        assert!(args(&[
            "uninstall",
            "--host-root",
            "/h",
            "--no-label",
            "--no-restart"
        ])
        .is_ok());
    }

    #[test]
    fn bad_arguments_are_named() {
        assert!(args(&["upgrade"]).unwrap_err().contains("\"upgrade\""));
        assert!(args(&["install", "--hostroot", "/h"])
            .unwrap_err()
            .contains("\"--hostroot\""));
        assert!(args(&["install", "--node"])
            .unwrap_err()
            .contains("--node needs a value"));
        assert!(args(&[]).unwrap_err().contains("subcommand"));
        // Help is an empty "error": main prints the usage and succeeds.
        assert_eq!(args(&["--help"]).unwrap_err(), "");
        assert_eq!(args(&["install", "-h"]).unwrap_err(), "");
    }
}
