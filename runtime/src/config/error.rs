//! [`ConfigError`]: why the config could not be loaded, validated or
//! resolved on this host.

use std::path::PathBuf;

/// Errors from loading, validating and resolving the config. Each keeps
/// its cause as `source`: print them with `error_chain::chain`.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{}: cannot read", path.display())]
    Read {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    #[error("{}", path.display())]
    Invalid {
        path: PathBuf,
        #[source]
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
    #[error("runtime.cgroup_parent = {value:?} must be an absolute cgroup path without '..' (e.g. \"/boxlite\")")]
    CgroupParent { value: String },
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
