//! How the agent runs: guest mode (PID 1 in the VM) or host mode (tests),
//! and the host-mode command line.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use boxlite_protocol::{AGENT_VSOCK_PORT, LOG_VSOCK_PORT, READY_VSOCK_PORT, STDIO_VSOCK_PORT};
use tokio_vsock::VMADDR_CID_HOST;

use crate::listener::{ListenAddr, ListenerError};

/// Log filter used when neither the command line nor `RUST_LOG` sets one.
pub const DEFAULT_LOG_FILTER: &str = "info";

pub const USAGE: &str = "\
boxlite-agent: the BoxLite guest agent.

As PID 1 (the initramfs /init) it runs in guest mode and takes its settings
from the kernel command line (boxlite.hostname=, boxlite.log=). Otherwise it
runs in host mode, for tests:

  boxlite-agent --listen unix:///path/agent.sock [--log-listen unix:///path/log.sock]
                [--stdio-listen unix:///path/stdio.sock] [--announce unix:///path/ready.sock]
                [--root DIR] [--log FILTER]

  --listen ADDR        ttrpc address (unix:///path or vsock://<cid>:<port>)
  --log-listen ADDR    serve the agent log stream here
  --stdio-listen ADDR  serve the stdio stream port here
  --announce ADDR      once serving, connect here and write the readiness line
                       (in the guest: host vsock port 1027)
  --root DIR           directory standing in for the guest's / (default: a new
                       directory under $TMPDIR)
  --log FILTER         log filter (default: $RUST_LOG, else info)
  --help, --version
";

/// Which of the two modes the agent runs in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// PID 1 inside the VM: mounts, vsock, reboot on DestroySandbox.
    Guest,
    /// A normal host process: unix sockets, files under `--root`, exit on
    /// DestroySandbox.
    Host,
}

/// Everything the servers need to start.
#[derive(Debug, Clone)]
pub struct Config {
    pub mode: Mode,
    /// The directory that stands for the guest's `/` (`/` in guest mode).
    pub root: PathBuf,
    pub listen: ListenAddr,
    pub log_listen: Option<ListenAddr>,
    pub stdio_listen: Option<ListenAddr>,
    /// Where to announce readiness once serving (see
    /// [`boxlite_protocol::ready`]): host vsock port 1027 in the guest.
    pub announce: Option<ListenAddr>,
    pub log_filter: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} needs a value")]
    MissingValue(String),
    #[error("unknown argument {0:?} (see --help)")]
    UnknownArgument(String),
    #[error("argument {0:?} is not valid UTF-8")]
    NotUtf8(OsString),
    #[error("--listen is required in host mode (see --help)")]
    NoListen,
    #[error("Bad address for {flag}")]
    Address {
        flag: &'static str,
        #[source]
        source: ListenerError,
    },
    #[error("--root {0} is not an absolute path")]
    RootNotAbsolute(PathBuf),
    #[error("Failed to create root directory {path}")]
    CreateRoot {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What the host-mode command line asks for.
#[derive(Debug)]
pub enum HostCommand {
    Run(Config),
    Help,
    Version,
}

impl Config {
    /// Guest mode: vsock ports from the protocol, files at `/`.
    pub fn guest(log_filter: Option<String>) -> Self {
        Config {
            mode: Mode::Guest,
            root: PathBuf::from("/"),
            listen: ListenAddr::vsock_any(AGENT_VSOCK_PORT),
            log_listen: Some(ListenAddr::vsock_any(LOG_VSOCK_PORT)),
            stdio_listen: Some(ListenAddr::vsock_any(STDIO_VSOCK_PORT)),
            announce: Some(ListenAddr::Vsock {
                cid: VMADDR_CID_HOST,
                port: READY_VSOCK_PORT,
            }),
            log_filter: log_filter.unwrap_or_else(|| DEFAULT_LOG_FILTER.to_string()),
        }
    }

    /// Parses the host-mode arguments (without argv\[0\]). `env_filter` is
    /// `RUST_LOG`, used when `--log` is absent. Creates `--root` if needed.
    pub fn from_host_args(
        args: impl IntoIterator<Item = OsString>,
        env_filter: Option<String>,
    ) -> Result<HostCommand, ConfigError> {
        let mut listen = None;
        let mut log_listen = None;
        let mut stdio_listen = None;
        let mut announce = None;
        let mut root = None;
        let mut log_filter = None;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let arg = arg.into_string().map_err(ConfigError::NotUtf8)?;
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            let mut value = || -> Result<String, ConfigError> {
                match &inline {
                    Some(v) => Ok(v.clone()),
                    None => args
                        .next()
                        .ok_or_else(|| ConfigError::MissingValue(flag.clone()))?
                        .into_string()
                        .map_err(ConfigError::NotUtf8),
                }
            };
            match flag.as_str() {
                "--help" | "-h" => return Ok(HostCommand::Help),
                "--version" | "-V" => return Ok(HostCommand::Version),
                "--listen" => listen = Some(parse_addr("--listen", &value()?)?),
                "--log-listen" => log_listen = Some(parse_addr("--log-listen", &value()?)?),
                "--stdio-listen" => stdio_listen = Some(parse_addr("--stdio-listen", &value()?)?),
                "--announce" => announce = Some(parse_addr("--announce", &value()?)?),
                "--root" => root = Some(PathBuf::from(value()?)),
                "--log" => log_filter = Some(value()?),
                _ => return Err(ConfigError::UnknownArgument(arg)),
            }
        }
        let listen = listen.ok_or(ConfigError::NoListen)?;
        let root = match root {
            Some(r) if !r.is_absolute() => return Err(ConfigError::RootNotAbsolute(r)),
            Some(r) => r,
            None => std::env::temp_dir().join(format!("boxlite-agent-root-{}", std::process::id())),
        };
        std::fs::create_dir_all(&root).map_err(|source| ConfigError::CreateRoot {
            path: root.clone(),
            source,
        })?;
        Ok(HostCommand::Run(Config {
            mode: Mode::Host,
            root,
            listen,
            log_listen,
            stdio_listen,
            announce,
            log_filter: log_filter
                .or(env_filter)
                .unwrap_or_else(|| DEFAULT_LOG_FILTER.to_string()),
        }))
    }

    /// Where the guest path `guest` (absolute, already validated) lives:
    /// itself in guest mode, under `--root` in host mode.
    pub fn resolve(&self, guest: &Path) -> PathBuf {
        match self.mode {
            Mode::Guest => guest.to_path_buf(),
            Mode::Host => self.root.join(guest.strip_prefix("/").unwrap_or(guest)),
        }
    }
}

/// A host-mode config rooted at `root` (created if needed) whose listen
/// address is never bound: what the unit tests of the RPC handlers that
/// resolve guest paths run against.
#[cfg(test)]
pub(crate) fn host_config_for_tests(root: &Path) -> Config {
    let args = [
        OsString::from("--listen"),
        "unix:///unused".into(),
        "--root".into(),
        root.into(),
    ];
    match Config::from_host_args(args, None).unwrap() {
        HostCommand::Run(c) => c,
        other => panic!("{other:?}"),
    }
}

fn parse_addr(flag: &'static str, s: &str) -> Result<ListenAddr, ConfigError> {
    ListenAddr::parse(s).map_err(|source| ConfigError::Address { flag, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<OsString> {
        list.iter().map(OsString::from).collect()
    }

    fn run(list: &[&str]) -> Result<Config, ConfigError> {
        match Config::from_host_args(args(list), None)? {
            HostCommand::Run(c) => Ok(c),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn parses_host_arguments() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let c = run(&[
            "--listen",
            "unix:///tmp/a.sock",
            "--log-listen=unix:///tmp/l.sock",
            "--root",
            root.to_str().unwrap(),
            "--log",
            "debug",
        ])
        .unwrap();
        assert_eq!(c.mode, Mode::Host);
        assert_eq!(c.listen, ListenAddr::Unix("/tmp/a.sock".into()));
        assert_eq!(c.log_listen, Some(ListenAddr::Unix("/tmp/l.sock".into())));
        assert_eq!(c.stdio_listen, None);
        assert_eq!(c.log_filter, "debug");
        assert!(root.is_dir());
        assert_eq!(c.resolve(Path::new("/etc/hosts")), root.join("etc/hosts"));
    }

    #[test]
    fn rejects_bad_arguments() {
        assert!(matches!(run(&[]), Err(ConfigError::NoListen)));
        assert!(matches!(
            run(&["--listen"]),
            Err(ConfigError::MissingValue(_))
        ));
        assert!(matches!(
            run(&["--bogus"]),
            Err(ConfigError::UnknownArgument(_))
        ));
        assert!(matches!(
            run(&["--listen", "/tmp/x.sock"]),
            Err(ConfigError::Address {
                flag: "--listen",
                ..
            })
        ));
        assert!(matches!(
            run(&["--listen", "unix:///x", "--root", "rel"]),
            Err(ConfigError::RootNotAbsolute(_))
        ));
        assert!(matches!(
            Config::from_host_args(args(&["--help"]), None),
            Ok(HostCommand::Help)
        ));
    }

    #[test]
    fn guest_mode_uses_protocol_ports_and_real_paths() {
        let c = Config::guest(None);
        assert_eq!(c.listen.to_ttrpc(), "vsock://-1:1024");
        assert_eq!(c.log_filter, DEFAULT_LOG_FILTER);
        assert_eq!(
            c.resolve(Path::new("/etc/hosts")),
            PathBuf::from("/etc/hosts")
        );
    }
}
