//! The runtime config, `/etc/boxlite/boxlite.toml`.
//!
//! Every key has a default, so an empty (or absent, see
//! [`Config::load_or_default`]) file works. Unknown keys are refused, and
//! [`Config::validate`] runs at load time: its errors name the key, the value
//! and the limit. `configs/boxlite.toml` lists every key with its default and
//! `docs/configuration.md` explains them.
//!
//! Some choices are made at resolution time rather than at parse time, because
//! they depend on the host: [`Config::resolve_hypervisor`] turns
//! `backend = "auto"` and `accel = "auto"` into concrete choices and finds the
//! helper binaries.
//!
//! * `schema`: the keys, their types and defaults ([`Config`]).
//! * `validate`: the limits every value is checked against.
//! * `host`: what depends on this host — KVM detection
//!   ([`HostAccelProbe`]), backend and accelerator choice, binary lookup.
//! * `error`: [`ConfigError`].
//! * here: reading and parsing the file.

mod error;
mod host;
mod schema;
mod validate;

use std::path::{Path, PathBuf};

pub use error::ConfigError;
pub use host::{
    cpuinfo_has_virt_flags, decide_accel, extra_search_dirs, find_binary, resolve_backend,
    HostAccelProbe, ResolvedAccel, ResolvedBackend, ResolvedHypervisor,
};
pub use schema::{
    Accel, Backend, Config, GuestConfig, HypervisorConfig, RuntimeConfig, TemplatesConfig,
    TimeoutsConfig,
};
pub use validate::{
    MAX_AGENT_CALL_SECS, MAX_AGENT_READY_SECS, MAX_KERNEL_CMDLINE_EXTRA_LEN, MAX_MEMORY_MIB,
    MAX_SHUTDOWN_SECS, MAX_VCPUS, MIN_AGENT_CALL_SECS, MIN_AGENT_READY_SECS, MIN_MEMORY_MIB,
    MIN_SHUTDOWN_SECS, MIN_VCPUS,
};

/// Where the shim reads its config from.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/boxlite/boxlite.toml";

impl Config {
    /// Reads, parses and validates `path`. Every error names the file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::from_toml_str(&text, path)
    }

    /// Like [`Config::load`], but a file that does not exist gives the
    /// defaults. Any other read error (permissions, a directory...) is an
    /// error.
    pub fn load_or_default(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(path = %path.display(), "no config file, using defaults");
                Ok(Self::default())
            }
            _ => Self::load(path),
        }
    }

    /// Parses and validates TOML text; `path` is only used in messages.
    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: one_line_parse_error(text, &e),
        })?;
        config.validate().map_err(|error| ConfigError::Invalid {
            path: path.to_owned(),
            error: Box::new(error),
        })?;
        Ok(config)
    }

    /// The directory of one sandbox: `<state_dir>/<id>`.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.runtime.state_dir.join(id)
    }
}

/// `line 2, column 1: unknown field ...`: toml's own rendering spans several
/// lines, which reads badly in a shim log.
fn one_line_parse_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {column}: {message}")
        }
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use std::time::Duration;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("/etc/boxlite/boxlite.toml"))
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.hypervisor.backend, Backend::Auto);
        assert_eq!(c.hypervisor.accel, Accel::Auto);
        assert_eq!(c.guest.kernel, Path::new("/usr/share/boxlite/vmlinux"));
        assert_eq!(c.guest.initramfs, Path::new("/usr/share/boxlite/initramfs"));
        assert_eq!(c.timeouts.agent_ready_secs, 30);
        assert_eq!(c.timeouts.shutdown_secs, 10);
        assert_eq!(c.runtime.state_dir, Path::new("/run/boxlite"));
        assert_eq!(c.sandbox_dir("3f2a"), Path::new("/run/boxlite/3f2a"));
        c.validate().unwrap();
    }

    #[test]
    fn shipped_config_parses_to_defaults() {
        let text = include_str!("../../../configs/boxlite.toml");
        assert_eq!(parse(text).unwrap(), Config::default());
        // Every key is present (commented out) in the shipped file.
        let mut keys = 0;
        let uncommented: String = text
            .lines()
            .filter_map(|l| {
                let key_line = l.strip_prefix("# ").filter(|rest| {
                    rest.split_once(" = ")
                        .is_some_and(|(k, _)| k.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
                });
                match key_line {
                    Some(rest) => {
                        keys += 1;
                        Some(rest)
                    }
                    None if l.starts_with('[') => Some(l),
                    None => None,
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        let full = parse(&uncommented).unwrap();
        assert_eq!(full, Config::default());
        assert_eq!(keys, 29, "{uncommented}");
    }

    #[test]
    fn full_file_parses() {
        let c = parse(
            r#"
            [hypervisor]
            backend = "qemu"
            accel = "tcg"
            qemu_binary = "/opt/qemu/bin/qemu-system-x86_64"
            [guest]
            vcpus = 2
            memory_mib = 1024
            kernel_cmdline_extra = "quiet"
            [timeouts]
            agent_ready_secs = 60
            [runtime]
            log_level = "warn,boxlite_runtime=debug"
            "#,
        )
        .unwrap();
        assert_eq!(c.hypervisor.backend, Backend::Qemu);
        assert_eq!(c.hypervisor.accel, Accel::Tcg);
        assert_eq!(c.guest.vcpus, 2);
        assert_eq!(c.timeouts.agent_ready(), Duration::from_secs(60));
        assert_eq!(c.timeouts.shutdown_secs, 10);
    }

    #[test]
    fn unknown_keys_are_refused_with_the_path() {
        let err = boxlite_protocol::error_chain::chain(&parse("[guest]\nvcpu = 2\n").unwrap_err());
        assert_eq!(
            err,
            "/etc/boxlite/boxlite.toml: line 2, column 1: unknown field `vcpu`, expected one of \
             `kernel`, `initramfs`, `vcpus`, `memory_mib`, `max_vcpus`, `max_memory_mib`, \
             `reserved_memory_mib`, `memory_headroom_mib`, `free_page_reporting`, \
             `kernel_cmdline_extra`"
        );
        let err =
            boxlite_protocol::error_chain::chain(&parse("[guest]\nvcpus = \"two\"\n").unwrap_err());
        assert!(err.contains("line 2, column 9: invalid type"), "{err}");
        let err = boxlite_protocol::error_chain::chain(&parse("[gust]\n").unwrap_err());
        assert!(err.contains("unknown field `gust`"), "{err}");
    }

    #[test]
    fn bad_enum_value_is_refused() {
        let err = boxlite_protocol::error_chain::chain(
            &parse("[hypervisor]\nbackend = \"firecracker\"\n").unwrap_err(),
        );
        assert!(err.contains("firecracker"), "{err}");
        assert!(err.contains("auto"), "{err}");
    }

    #[test]
    fn read_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("boxlite.toml");
        let err = boxlite_protocol::error_chain::chain(&Config::load(&missing).unwrap_err());
        assert!(
            err.starts_with(&format!("{}: cannot read: ", missing.display())),
            "{err}"
        );
        assert!(err.contains("No such file"), "{err}");
        // load_or_default: absent → defaults; a directory → error.
        assert_eq!(
            Config::load_or_default(&missing).unwrap(),
            Config::default()
        );
        let err =
            boxlite_protocol::error_chain::chain(&Config::load_or_default(dir.path()).unwrap_err());
        assert!(err.contains("cannot read"), "{err}");
        std::fs::write(&missing, "[guest]\nvcpus = 4\n").unwrap();
        assert_eq!(Config::load(&missing).unwrap().guest.vcpus, 4);
    }
}
