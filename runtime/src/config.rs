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

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Where the shim reads its config from.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/boxlite/boxlite.toml";

/// Limits checked by [`Config::validate`].
pub const MIN_VCPUS: u32 = 1;
/// The guest kernel is built with `NR_CPUS=16`.
pub const MAX_VCPUS: u32 = 16;
pub const MIN_MEMORY_MIB: u32 = 128;
pub const MAX_MEMORY_MIB: u32 = 65536;
pub const MIN_AGENT_READY_SECS: u64 = 1;
pub const MAX_AGENT_READY_SECS: u64 = 600;
pub const MIN_SHUTDOWN_SECS: u64 = 1;
pub const MAX_SHUTDOWN_SECS: u64 = 300;
/// x86 `COMMAND_LINE_SIZE` is 2048 including what the backend adds itself;
/// this leaves room for that.
pub const MAX_KERNEL_CMDLINE_EXTRA_LEN: usize = 1024;

/// Errors from loading, validating and resolving the config.
///
/// Messages are self-contained (they include the cause), so callers can print
/// them with `{}` alone.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read: {error}", path.display())]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}: {error}", path.display())]
    Invalid {
        path: PathBuf,
        error: Box<ConfigError>,
    },
    #[error("{key} = {value} is out of range {min}..={max}")]
    OutOfRange {
        key: &'static str,
        value: u64,
        min: u64,
        max: u64,
    },
    #[error("{key} must not be empty")]
    Empty { key: &'static str },
    #[error("runtime.allowed_annotations lists {value:?}, which is not an overridable setting (known: {known})")]
    UnknownAnnotation { value: String, known: String },
    #[error("{key} = {value:?} must be an absolute path")]
    NotAbsolute { key: &'static str, value: PathBuf },
    #[error("{key} is {len} bytes long, more than the limit of {max}")]
    TooLong {
        key: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{key} = {value:?} contains a control character (newline, tab, NUL...)")]
    ControlCharacter { key: &'static str, value: String },
    #[error(
        "runtime.log_level = {value:?}: {directive:?} is not a level \
         (expected off, error, warn, info, debug or trace, optionally as target=level)"
    )]
    LogLevel { value: String, directive: String },
    #[error(
        "hypervisor.backend = \"builtin\" needs KVM: {reason}; use backend = \"qemu\" or \"auto\""
    )]
    BuiltinUnavailable { reason: String },
    #[error("hypervisor.accel = \"kvm\" but KVM is not usable: {reason}; use accel = \"tcg\" or \"auto\"")]
    KvmUnavailable { reason: String },
    #[error("{what} {name:?} (config key {key}) not found in {searched}; {install}")]
    BinaryNotFound {
        what: &'static str,
        name: String,
        key: &'static str,
        searched: String,
        install: &'static str,
    },
}

/// The whole `boxlite.toml`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub hypervisor: HypervisorConfig,
    pub guest: GuestConfig,
    pub timeouts: TimeoutsConfig,
    pub runtime: RuntimeConfig,
}

/// `[hypervisor]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HypervisorConfig {
    pub backend: Backend,
    pub accel: Accel,
    /// Name (looked up, see [`find_binary`]) or absolute path.
    pub qemu_binary: String,
    pub virtiofsd_binary: String,
    pub vhost_vsock_binary: String,
    /// The built-in VMM, for backend `builtin`.
    pub vmm_binary: String,
}

impl Default for HypervisorConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            accel: Accel::Auto,
            qemu_binary: "qemu-system-x86_64".into(),
            virtiofsd_binary: "virtiofsd".into(),
            vhost_vsock_binary: "boxlite-vsock".into(),
            vmm_binary: "boxlite-vmm".into(),
        }
    }
}

/// `hypervisor.backend`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `builtin` where KVM can boot Linux (VMX/SVM, `/dev/kvm`, no `kvm_pvm`), else `qemu`.
    Auto,
    /// `boxlite-vmm`, the built-in VMM.
    Builtin,
    /// QEMU's microvm machine with vhost-user helper daemons.
    Qemu,
}

impl fmt::Display for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Backend::Auto => "auto",
            Backend::Builtin => "builtin",
            Backend::Qemu => "qemu",
        })
    }
}

/// `hypervisor.accel`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// KVM when the host can run a standard Linux guest on it, else TCG
    /// (see [`decide_accel`]).
    Auto,
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// `[guest]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GuestConfig {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Appended to the backend's own command line (`console=ttyS0 reboot=t
    /// panic=-1`).
    pub kernel_cmdline_extra: String,
}

impl Default for GuestConfig {
    fn default() -> Self {
        Self {
            kernel: "/usr/share/boxlite/vmlinux".into(),
            initramfs: "/usr/share/boxlite/initramfs".into(),
            vcpus: 1,
            memory_mib: 512,
            kernel_cmdline_extra: String::new(),
        }
    }
}

/// `[timeouts]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TimeoutsConfig {
    /// From VM start until the agent answers Health.Check. TCG boots are slow.
    pub agent_ready_secs: u64,
    /// From DestroySandbox until the VM process must have exited.
    pub shutdown_secs: u64,
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        Self {
            agent_ready_secs: 30,
            shutdown_secs: 10,
        }
    }
}

impl TimeoutsConfig {
    pub fn agent_ready(&self) -> Duration {
        Duration::from_secs(self.agent_ready_secs)
    }
    pub fn shutdown(&self) -> Duration {
        Duration::from_secs(self.shutdown_secs)
    }
}

/// `[runtime]`
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Each sandbox gets `<state_dir>/<sandbox id>/`.
    pub state_dir: PathBuf,
    /// `RUST_LOG`-style filter: `info` or `warn,boxlite_runtime=debug`.
    pub log_level: String,
    /// `io.boxlite.*` annotations a pod may use to override settings (see
    /// [`crate::annotations`]). Empty: none.
    pub allowed_annotations: Vec<String>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            state_dir: "/run/boxlite".into(),
            log_level: "info".into(),
            allowed_annotations: Vec::new(),
        }
    }
}

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

    /// Checks every value against its limit. Host-dependent checks (does the
    /// kernel exist, is KVM usable) happen later, when the VM is started or
    /// the hypervisor resolved.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.hypervisor;
        non_empty("hypervisor.qemu_binary", &h.qemu_binary)?;
        non_empty("hypervisor.virtiofsd_binary", &h.virtiofsd_binary)?;
        non_empty("hypervisor.vhost_vsock_binary", &h.vhost_vsock_binary)?;
        non_empty("hypervisor.vmm_binary", &h.vmm_binary)?;

        let g = &self.guest;
        absolute("guest.kernel", &g.kernel)?;
        absolute("guest.initramfs", &g.initramfs)?;
        in_range(
            "guest.vcpus",
            g.vcpus.into(),
            MIN_VCPUS.into(),
            MAX_VCPUS.into(),
        )?;
        in_range(
            "guest.memory_mib",
            g.memory_mib.into(),
            MIN_MEMORY_MIB.into(),
            MAX_MEMORY_MIB.into(),
        )?;
        if g.kernel_cmdline_extra.len() > MAX_KERNEL_CMDLINE_EXTRA_LEN {
            return Err(ConfigError::TooLong {
                key: "guest.kernel_cmdline_extra",
                len: g.kernel_cmdline_extra.len(),
                max: MAX_KERNEL_CMDLINE_EXTRA_LEN,
            });
        }
        if g.kernel_cmdline_extra.chars().any(|c| c.is_control()) {
            return Err(ConfigError::ControlCharacter {
                key: "guest.kernel_cmdline_extra",
                value: g.kernel_cmdline_extra.clone(),
            });
        }

        let t = &self.timeouts;
        in_range(
            "timeouts.agent_ready_secs",
            t.agent_ready_secs,
            MIN_AGENT_READY_SECS,
            MAX_AGENT_READY_SECS,
        )?;
        in_range(
            "timeouts.shutdown_secs",
            t.shutdown_secs,
            MIN_SHUTDOWN_SECS,
            MAX_SHUTDOWN_SECS,
        )?;

        absolute("runtime.state_dir", &self.runtime.state_dir)?;
        validate_log_level(&self.runtime.log_level)?;
        if let Some(key) = self
            .runtime
            .allowed_annotations
            .iter()
            .find(|k| !crate::annotations::is_known(k))
        {
            return Err(ConfigError::UnknownAnnotation {
                value: key.clone(),
                known: crate::annotations::OVERRIDABLE
                    .iter()
                    .map(|(a, _)| *a)
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        Ok(())
    }

    /// The directory of one sandbox: `<state_dir>/<id>`.
    pub fn sandbox_dir(&self, id: &str) -> PathBuf {
        self.runtime.state_dir.join(id)
    }

    /// Resolves `backend`, `accel` and the helper binaries on this host.
    pub fn resolve_hypervisor(&self) -> Result<ResolvedHypervisor, ConfigError> {
        let probe = HostAccelProbe::probe();
        let backend = resolve_backend(self.hypervisor.backend, &probe)?;
        let (accel, accel_reason) = decide_accel(self.hypervisor.accel, &probe)?;
        let path_env = std::env::var_os("PATH");
        let home = std::env::var_os("HOME").map(PathBuf::from);
        let find = |what, name: &str, key, install| {
            find_binary(name, path_env.as_deref(), home.as_deref()).ok_or_else(|| {
                ConfigError::BinaryNotFound {
                    what,
                    name: name.to_owned(),
                    key,
                    searched: describe_search(name),
                    install,
                }
            })
        };
        let h = &self.hypervisor;
        let qemu = backend == ResolvedBackend::Qemu;
        // Binaries the other backend needs are not looked up.
        let unused = |name: &str| PathBuf::from(name);
        let resolved = ResolvedHypervisor {
            backend,
            accel,
            accel_reason,
            qemu_binary: if qemu {
                find(
                    "QEMU",
                    &h.qemu_binary,
                    "hypervisor.qemu_binary",
                    "install it with `apt-get install qemu-system-x86` or set the key to its path",
                )?
            } else {
                unused(&h.qemu_binary)
            },
            vmm_binary: if qemu {
                unused(&h.vmm_binary)
            } else {
                find(
                    "boxlite-vmm",
                    &h.vmm_binary,
                    "hypervisor.vmm_binary",
                    "install it with `cargo install --path runtime/vmm` (or scripts/setup.sh) or set the key to its path",
                )?
            },
            virtiofsd_binary: find(
                "virtiofsd",
                &h.virtiofsd_binary,
                "hypervisor.virtiofsd_binary",
                "install it with `cargo install --locked virtiofsd@1.14.0` or set the key to its path",
            )?,
            vhost_vsock_binary: if qemu {
                find(
                    "boxlite-vsock",
                    &h.vhost_vsock_binary,
                    "hypervisor.vhost_vsock_binary",
                    "install it with `bash scripts/setup.sh` (built from runtime/vmm) or set the key to its path",
                )?
            } else {
                unused(&h.vhost_vsock_binary)
            },
        };
        tracing::debug!(?resolved, "hypervisor resolved");
        Ok(resolved)
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

fn non_empty(key: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::Empty { key });
    }
    Ok(())
}

fn absolute(key: &'static str, value: &Path) -> Result<(), ConfigError> {
    if value.as_os_str().is_empty() {
        return Err(ConfigError::Empty { key });
    }
    if !value.is_absolute() {
        return Err(ConfigError::NotAbsolute {
            key,
            value: value.to_owned(),
        });
    }
    Ok(())
}

fn in_range(key: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(ConfigError::OutOfRange {
            key,
            value,
            min,
            max,
        });
    }
    Ok(())
}

/// Accepts `RUST_LOG`-style filters whose levels are known: `info`,
/// `warn,boxlite_runtime=debug`, `boxlite=trace`.
fn validate_log_level(value: &str) -> Result<(), ConfigError> {
    const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];
    if value.trim().is_empty() {
        return Err(ConfigError::Empty {
            key: "runtime.log_level",
        });
    }
    for directive in value.split(',').map(str::trim) {
        let level = directive.rsplit_once('=').map_or(directive, |(_, l)| l);
        let target_ok = directive
            .rsplit_once('=')
            .is_none_or(|(t, _)| !t.is_empty());
        if !target_ok || !LEVELS.contains(&level.to_ascii_lowercase().as_str()) {
            return Err(ConfigError::LogLevel {
                value: value.to_owned(),
                directive: directive.to_owned(),
            });
        }
    }
    Ok(())
}

/// The concrete backend behind `hypervisor.backend`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedBackend {
    Qemu,
    /// `boxlite-vmm`.
    Builtin,
}

/// `auto` → `builtin` where the CPU shows VMX/SVM, `/dev/kvm` exists and
/// `kvm_pvm` is absent, else `qemu`. An explicit `builtin` needs `/dev/kvm`.
pub fn resolve_backend(
    backend: Backend,
    probe: &HostAccelProbe,
) -> Result<ResolvedBackend, ConfigError> {
    match backend {
        Backend::Qemu => Ok(ResolvedBackend::Qemu),
        Backend::Builtin if probe.dev_kvm => Ok(ResolvedBackend::Builtin),
        Backend::Builtin => Err(ConfigError::BuiltinUnavailable {
            reason: "/dev/kvm does not exist".into(),
        }),
        Backend::Auto if probe.cpu_virt_flags && probe.dev_kvm && !probe.kvm_pvm => {
            Ok(ResolvedBackend::Builtin)
        }
        Backend::Auto => Ok(ResolvedBackend::Qemu),
    }
}

/// A concrete accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResolvedAccel {
    Kvm,
    Tcg,
}

impl fmt::Display for ResolvedAccel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ResolvedAccel::Kvm => "kvm",
            ResolvedAccel::Tcg => "tcg",
        })
    }
}

/// What [`decide_accel`] looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostAccelProbe {
    /// `/proc/cpuinfo` flags contain `vmx` or `svm`.
    pub cpu_virt_flags: bool,
    /// `/dev/kvm` exists.
    pub dev_kvm: bool,
    /// `/sys/module/kvm_pvm` exists: a software-paged nested KVM that cannot
    /// boot a standard Linux guest (DESIGN.md §4).
    pub kvm_pvm: bool,
}

impl HostAccelProbe {
    /// Looks at this host.
    pub fn probe() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        Self {
            cpu_virt_flags: cpuinfo_has_virt_flags(&cpuinfo),
            dev_kvm: Path::new("/dev/kvm").exists(),
            kvm_pvm: Path::new("/sys/module/kvm_pvm").exists(),
        }
    }
}

/// True when any `flags` line of `/proc/cpuinfo` text lists `vmx` or `svm`.
pub fn cpuinfo_has_virt_flags(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter_map(|line| line.split_once(':'))
        .filter(|(key, _)| key.trim() == "flags")
        .any(|(_, flags)| flags.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

/// Picks the accelerator, with the reason (for logs). Pure: the host facts
/// come in `probe`.
///
/// `auto` picks KVM only when the CPU has VMX/SVM, `/dev/kvm` exists and the
/// `kvm_pvm` module is absent; otherwise TCG. An explicit `kvm` only needs
/// `/dev/kvm` (the operator knows best), an explicit `tcg` always works.
pub fn decide_accel(
    requested: Accel,
    probe: &HostAccelProbe,
) -> Result<(ResolvedAccel, String), ConfigError> {
    match requested {
        Accel::Tcg => Ok((ResolvedAccel::Tcg, "accel = \"tcg\" in the config".into())),
        Accel::Kvm => {
            if probe.dev_kvm {
                Ok((ResolvedAccel::Kvm, "accel = \"kvm\" in the config".into()))
            } else {
                Err(ConfigError::KvmUnavailable {
                    reason: "/dev/kvm does not exist".into(),
                })
            }
        }
        Accel::Auto => {
            let tcg_because = if !probe.cpu_virt_flags {
                Some("the CPU flags in /proc/cpuinfo show neither vmx nor svm")
            } else if !probe.dev_kvm {
                Some("/dev/kvm does not exist")
            } else if probe.kvm_pvm {
                Some("/dev/kvm is the kvm_pvm module, which cannot boot a standard Linux guest")
            } else {
                None
            };
            Ok(match tcg_because {
                Some(why) => (ResolvedAccel::Tcg, format!("auto: TCG because {why}")),
                None => (
                    ResolvedAccel::Kvm,
                    "auto: KVM (vmx/svm present, /dev/kvm exists, no kvm_pvm)".into(),
                ),
            })
        }
    }
}

/// The hypervisor choices for this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedHypervisor {
    pub backend: ResolvedBackend,
    pub accel: ResolvedAccel,
    /// Why `accel` was chosen, for logs.
    pub accel_reason: String,
    pub qemu_binary: PathBuf,
    pub virtiofsd_binary: PathBuf,
    pub vhost_vsock_binary: PathBuf,
    /// `boxlite-vmm` (resolved only for the builtin backend).
    pub vmm_binary: PathBuf,
}

/// Directories searched after `PATH`: containerd often starts shims with a
/// minimal `PATH`, and `cargo install` puts tools in `~/.cargo/bin`.
/// `/usr/libexec` is where Debian's virtiofsd package installs it.
pub fn extra_search_dirs(home: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(home) = home {
        dirs.push(home.join(".cargo/bin"));
    }
    dirs.push("/usr/local/bin".into());
    dirs.push("/usr/bin".into());
    dirs.push("/usr/libexec".into());
    dirs
}

fn describe_search(name: &str) -> String {
    if name.contains('/') {
        "the given path (missing or not executable)".into()
    } else {
        "PATH, ~/.cargo/bin, /usr/local/bin, /usr/bin or /usr/libexec".into()
    }
}

/// Finds an executable: a value containing `/` is taken as a path, a bare name
/// is searched in `path_env` then [`extra_search_dirs`].
pub fn find_binary(name: &str, path_env: Option<&OsStr>, home: Option<&Path>) -> Option<PathBuf> {
    if name.contains('/') {
        let path = PathBuf::from(name);
        return is_executable(&path).then_some(path);
    }
    let mut dirs: Vec<PathBuf> = path_env
        .map(|p| std::env::split_paths(p).collect())
        .unwrap_or_default();
    dirs.extend(extra_search_dirs(home));
    dirs.into_iter()
        .filter(|d| d.is_absolute())
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let text = include_str!("../../configs/boxlite.toml");
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
        assert_eq!(keys, 16, "{uncommented}");
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
        let err = parse("[guest]\nvcpu = 2\n").unwrap_err().to_string();
        assert_eq!(
            err,
            "/etc/boxlite/boxlite.toml: line 2, column 1: unknown field `vcpu`, expected one of \
             `kernel`, `initramfs`, `vcpus`, `memory_mib`, `kernel_cmdline_extra`"
        );
        let err = parse("[guest]\nvcpus = \"two\"\n").unwrap_err().to_string();
        assert!(err.contains("line 2, column 9: invalid type"), "{err}");
        let err = parse("[gust]\n").unwrap_err().to_string();
        assert!(err.contains("unknown field `gust`"), "{err}");
    }

    #[test]
    fn bad_enum_value_is_refused() {
        let err = parse("[hypervisor]\nbackend = \"firecracker\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("firecracker"), "{err}");
        assert!(err.contains("auto"), "{err}");
    }

    #[test]
    fn out_of_range_names_key_value_and_limit() {
        let err = parse("[guest]\nvcpus = 0\n").unwrap_err().to_string();
        assert_eq!(
            err,
            "/etc/boxlite/boxlite.toml: guest.vcpus = 0 is out of range 1..=16"
        );
        let err = parse("[guest]\nvcpus = 17\n").unwrap_err().to_string();
        assert!(
            err.ends_with("guest.vcpus = 17 is out of range 1..=16"),
            "{err}"
        );
        let err = parse("[guest]\nmemory_mib = 64\n").unwrap_err().to_string();
        assert!(
            err.ends_with("guest.memory_mib = 64 is out of range 128..=65536"),
            "{err}"
        );
        let err = parse("[timeouts]\nagent_ready_secs = 0\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("timeouts.agent_ready_secs = 0 is out of range 1..=600"),
            "{err}"
        );
        let err = parse("[timeouts]\nshutdown_secs = 1000\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("timeouts.shutdown_secs = 1000"), "{err}");
    }

    #[test]
    fn paths_must_be_absolute_and_names_non_empty() {
        let err = parse("[guest]\nkernel = \"vmlinux\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("guest.kernel = \"vmlinux\" must be an absolute path"),
            "{err}"
        );
        let err = parse("[runtime]\nstate_dir = \"\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("runtime.state_dir must not be empty"),
            "{err}"
        );
        let err = parse("[hypervisor]\nqemu_binary = \" \"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("hypervisor.qemu_binary must not be empty"),
            "{err}"
        );
    }

    #[test]
    fn cmdline_extra_is_bounded() {
        let long = "a".repeat(MAX_KERNEL_CMDLINE_EXTRA_LEN + 1);
        let err = parse(&format!("[guest]\nkernel_cmdline_extra = \"{long}\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("guest.kernel_cmdline_extra is 1025 bytes long"),
            "{err}"
        );
        let err = parse("[guest]\nkernel_cmdline_extra = \"a\\nb\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("control character"), "{err}");
    }

    #[test]
    fn log_levels() {
        for ok in [
            "info",
            "DEBUG",
            "warn,boxlite_runtime=debug",
            "off",
            "a=trace",
        ] {
            validate_log_level(ok).unwrap();
        }
        for bad in ["verbose", "info,", "=debug", "x=loud"] {
            let err = validate_log_level(bad).unwrap_err().to_string();
            assert!(err.starts_with("runtime.log_level = "), "{err}");
        }
    }

    #[test]
    fn read_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("boxlite.toml");
        let err = Config::load(&missing).unwrap_err().to_string();
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
        let err = Config::load_or_default(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cannot read"), "{err}");
        std::fs::write(&missing, "[guest]\nvcpus = 4\n").unwrap();
        assert_eq!(Config::load(&missing).unwrap().guest.vcpus, 4);
    }

    #[test]
    fn backend_resolution() {
        let host = |cpu_virt_flags, dev_kvm, kvm_pvm| HostAccelProbe {
            cpu_virt_flags,
            dev_kvm,
            kvm_pvm,
        };
        let vmx = host(true, true, false);
        let pvm = host(true, true, true); // this machine
        let no_flags = host(false, true, false);
        let no_kvm = host(true, false, false);
        for (probe, want) in [
            (vmx, ResolvedBackend::Builtin),
            (pvm, ResolvedBackend::Qemu),
            (no_flags, ResolvedBackend::Qemu),
            (no_kvm, ResolvedBackend::Qemu),
        ] {
            assert_eq!(
                resolve_backend(Backend::Auto, &probe).unwrap(),
                want,
                "{probe:?}"
            );
            assert_eq!(
                resolve_backend(Backend::Qemu, &probe).unwrap(),
                ResolvedBackend::Qemu
            );
        }
        assert_eq!(
            resolve_backend(Backend::Builtin, &pvm).unwrap(),
            ResolvedBackend::Builtin
        );
        let err = resolve_backend(Backend::Builtin, &no_kvm)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs KVM"), "{err}");
        assert!(err.contains("hypervisor.backend"), "{err}");
    }

    #[test]
    fn cpuinfo_flags() {
        let intel = "processor\t: 0\nflags\t\t: fpu vme vmx sse\nbugs\t\t: spectre\n";
        let amd = "flags\t\t: fpu svm\n";
        let none = "flags\t\t: fpu sse svmx\nmodel name\t: vmx emulator\n";
        assert!(cpuinfo_has_virt_flags(intel));
        assert!(cpuinfo_has_virt_flags(amd));
        assert!(!cpuinfo_has_virt_flags(none));
        assert!(!cpuinfo_has_virt_flags(""));
    }

    #[test]
    fn accel_decision() {
        let p = |cpu_virt_flags, dev_kvm, kvm_pvm| HostAccelProbe {
            cpu_virt_flags,
            dev_kvm,
            kvm_pvm,
        };
        let auto = |probe| decide_accel(Accel::Auto, &probe).unwrap().0;
        assert_eq!(auto(p(true, true, false)), ResolvedAccel::Kvm);
        // These development machines: vmx + /dev/kvm, but kvm_pvm.
        assert_eq!(auto(p(true, true, true)), ResolvedAccel::Tcg);
        assert_eq!(auto(p(false, true, false)), ResolvedAccel::Tcg);
        assert_eq!(auto(p(true, false, false)), ResolvedAccel::Tcg);
        assert_eq!(auto(p(false, false, false)), ResolvedAccel::Tcg);
        let (_, why) = decide_accel(Accel::Auto, &p(true, true, true)).unwrap();
        assert!(why.contains("kvm_pvm"), "{why}");

        for probe in [p(false, false, false), p(true, true, true)] {
            assert_eq!(
                decide_accel(Accel::Tcg, &probe).unwrap().0,
                ResolvedAccel::Tcg
            );
        }
        assert_eq!(
            decide_accel(Accel::Kvm, &p(true, true, true)).unwrap().0,
            ResolvedAccel::Kvm
        );
        let err = decide_accel(Accel::Kvm, &p(true, false, false))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/dev/kvm does not exist"), "{err}");
    }

    #[test]
    fn binary_lookup() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("bin");
        let home = dir.path().join("home");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::create_dir_all(home.join(".cargo/bin")).unwrap();
        let make = |p: &Path, mode| {
            std::fs::write(p, "#!/bin/sh\n").unwrap();
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        make(&bin.join("tool-a"), 0o755);
        make(&bin.join("not-exec"), 0o644);
        make(&home.join(".cargo/bin/tool-b"), 0o755);
        let path_env = std::env::join_paths([&bin]).unwrap();

        let find = |name| find_binary(name, Some(&path_env), Some(&home));
        assert_eq!(find("tool-a"), Some(bin.join("tool-a")));
        assert_eq!(find("tool-b"), Some(home.join(".cargo/bin/tool-b")));
        assert_eq!(find("not-exec"), None);
        assert_eq!(find("surely-not-a-binary-xyz"), None);
        let abs = bin.join("tool-a");
        assert_eq!(find(abs.to_str().unwrap()), Some(abs.clone()));
        assert_eq!(find(bin.join("missing").to_str().unwrap()), None);
    }

    #[test]
    fn missing_binary_error_names_binary_key_and_fix() {
        let mut c = Config::default();
        c.hypervisor.accel = Accel::Tcg;
        c.hypervisor.qemu_binary = "/nonexistent/qemu-system-x86_64".into();
        let err = c.resolve_hypervisor().unwrap_err().to_string();
        assert!(err.contains("\"/nonexistent/qemu-system-x86_64\""), "{err}");
        assert!(err.contains("hypervisor.qemu_binary"), "{err}");
        assert!(err.contains("apt-get install qemu-system-x86"), "{err}");

        let mut c = Config::default();
        c.hypervisor.accel = Accel::Tcg;
        c.hypervisor.qemu_binary = "sh".into();
        c.hypervisor.virtiofsd_binary = "no-such-virtiofsd-xyz".into();
        let err = c.resolve_hypervisor().unwrap_err().to_string();
        assert!(err.contains("hypervisor.virtiofsd_binary"), "{err}");
        assert!(err.contains("cargo install --locked virtiofsd"), "{err}");
        assert!(err.contains("~/.cargo/bin"), "{err}");
    }

    #[test]
    fn allowed_annotations_must_be_known() {
        let c = parse(
            "[runtime]\nallowed_annotations = [\"io.boxlite.guest.vcpus\", \"io.boxlite.guest.memory_mib\"]\n",
        )
        .unwrap();
        assert_eq!(c.runtime.allowed_annotations.len(), 2);
        let err = parse("[runtime]\nallowed_annotations = [\"io.boxlite.jail\"]\n").unwrap_err();
        assert!(
            err.to_string().starts_with(
                "/etc/boxlite/boxlite.toml: runtime.allowed_annotations lists \"io.boxlite.jail\", \
                 which is not an overridable setting (known: io.boxlite.guest.vcpus, "
            ),
            "{err}"
        );
    }
}
