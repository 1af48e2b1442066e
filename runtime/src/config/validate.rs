//! [`Config::validate`]: the limit of every value, checked at load time.
//! Host-dependent checks (does the kernel exist, is KVM usable) are not
//! here: they happen when the VM starts or the hypervisor is resolved.

use std::path::Path;

use super::{Config, ConfigError};

/// Limits checked by [`Config::validate`].
pub const MIN_VCPUS: u32 = 1;
/// The guest kernel is built with `NR_CPUS=16`.
pub const MAX_VCPUS: u32 = 16;
pub const MIN_MEMORY_MIB: u32 = 128;
pub const MAX_MEMORY_MIB: u32 = 65536;
pub const MAX_RESERVED_MEMORY_MIB: u32 = 4096;
/// 1 TiB: a floor above any host's memory is a typo.
pub const MAX_HOST_MEMORY_FLOOR_MIB: u64 = 1 << 20;
pub const MIN_AGENT_READY_SECS: u64 = 1;
pub const MAX_AGENT_READY_SECS: u64 = 600;
pub const MIN_SHUTDOWN_SECS: u64 = 1;
pub const MAX_SHUTDOWN_SECS: u64 = 300;
pub const MIN_AGENT_CALL_SECS: u64 = 1;
pub const MAX_AGENT_CALL_SECS: u64 = 300;
/// A sandbox log cap (KiB): room for a marker line and some output, up to 1 GiB.
pub const MIN_SANDBOX_LOG_KIB: u64 = 16;
pub const MAX_SANDBOX_LOG_KIB: u64 = 1024 * 1024;
/// x86 `COMMAND_LINE_SIZE` is 2048 including what the backend adds itself;
/// this leaves room for that.
pub const MAX_KERNEL_CMDLINE_EXTRA_LEN: usize = 1024;

impl Config {
    /// Checks every value against its limit. Host-dependent checks (does the
    /// kernel exist, is KVM usable) happen later, when the VM is started or
    /// the hypervisor resolved.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let h = &self.hypervisor;
        non_empty("hypervisor.qemu_binary", &h.qemu_binary)?;
        non_empty("hypervisor.virtiofsd_binary", &h.virtiofsd_binary)?;
        non_empty("hypervisor.vhost_vsock_binary", &h.vhost_vsock_binary)?;
        non_empty("hypervisor.vmm_binary", &h.vmm_binary)?;
        // Not root's group or user; the whole range a valid id (-1 is not).
        in_range(
            "hypervisor.jail_id_base",
            h.jail_id_base.into(),
            1,
            (u32::MAX - 1).into(),
        )?;
        in_range(
            "hypervisor.jail_id_count",
            h.jail_id_count.into(),
            1,
            u64::from(u32::MAX - h.jail_id_base),
        )?;

        absolute("templates.dir", &self.templates.dir)?;

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
        // The ceilings a pod's limits may size a VM to: not below the
        // default size, so a pod without limits always fits.
        in_range(
            "guest.max_vcpus",
            g.max_vcpus.into(),
            g.vcpus.into(),
            MAX_VCPUS.into(),
        )?;
        in_range(
            "guest.max_memory_mib",
            g.max_memory_mib.into(),
            g.memory_mib.into(),
            MAX_MEMORY_MIB.into(),
        )?;
        in_range(
            "guest.reserved_memory_mib",
            g.reserved_memory_mib.into(),
            0,
            MAX_RESERVED_MEMORY_MIB.into(),
        )?;
        // A VM's size with its headroom is clamped to max_memory_mib anyway;
        // more headroom than that could never be used.
        in_range(
            "guest.memory_headroom_mib",
            g.memory_headroom_mib.into(),
            0,
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

        in_range(
            "timeouts.agent_call_secs",
            t.agent_call_secs,
            MIN_AGENT_CALL_SECS,
            MAX_AGENT_CALL_SECS,
        )?;

        absolute("runtime.state_dir", &self.runtime.state_dir)?;
        in_range(
            "runtime.sandbox_log_max_kib",
            self.runtime.sandbox_log_max_kib,
            MIN_SANDBOX_LOG_KIB,
            MAX_SANDBOX_LOG_KIB,
        )?;
        validate_log_level(&self.runtime.log_level)?;
        in_range(
            "runtime.host_memory_floor_mib",
            self.runtime.host_memory_floor_mib,
            0,
            MAX_HOST_MEMORY_FLOOR_MIB,
        )?;
        crate::cgroup::resolve(None, &self.runtime.cgroup_parent, "x")
            .ok()
            .filter(|_| self.runtime.cgroup_parent.starts_with('/'))
            .ok_or_else(|| ConfigError::CgroupParent {
                value: self.runtime.cgroup_parent.clone(),
            })?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, Path::new("/etc/boxlite/boxlite.toml"))
    }

    #[test]
    fn out_of_range_names_key_value_and_limit() {
        let err = boxlite_protocol::error_chain::chain(&parse("[guest]\nvcpus = 0\n").unwrap_err());
        assert_eq!(
            err,
            "/etc/boxlite/boxlite.toml: guest.vcpus = 0 is out of range 1..=16"
        );
        let err =
            boxlite_protocol::error_chain::chain(&parse("[guest]\nvcpus = 17\n").unwrap_err());
        assert!(
            err.ends_with("guest.vcpus = 17 is out of range 1..=16"),
            "{err}"
        );
        let err =
            boxlite_protocol::error_chain::chain(&parse("[guest]\nmemory_mib = 64\n").unwrap_err());
        assert!(
            err.ends_with("guest.memory_mib = 64 is out of range 128..=65536"),
            "{err}"
        );
        let err = boxlite_protocol::error_chain::chain(
            &parse("[timeouts]\nagent_call_secs = 0\n").unwrap_err(),
        );
        assert!(
            err.ends_with("timeouts.agent_call_secs = 0 is out of range 1..=300"),
            "{err}"
        );
        let err = boxlite_protocol::error_chain::chain(
            &parse("[runtime]\nsandbox_log_max_kib = 8\n").unwrap_err(),
        );
        assert!(
            err.ends_with("runtime.sandbox_log_max_kib = 8 is out of range 16..=1048576"),
            "{err}"
        );
        for bad in ["boxlite", "/a/../b"] {
            let err = boxlite_protocol::error_chain::chain(
                &parse(&format!("[runtime]\ncgroup_parent = {bad:?}\n")).unwrap_err(),
            );
            assert!(
                err.ends_with(&format!(
                    "runtime.cgroup_parent = {bad:?} must be an absolute cgroup path without '..' (e.g. \"/boxlite\")"
                )),
                "{err}"
            );
        }
        let err = boxlite_protocol::error_chain::chain(
            &parse("[hypervisor]\njail_id_base = 0\n").unwrap_err(),
        );
        assert!(
            err.ends_with("hypervisor.jail_id_base = 0 is out of range 1..=4294967294"),
            "{err}"
        );
        let err = boxlite_protocol::error_chain::chain(
            &parse("[hypervisor]\njail_id_base = 4294967000\njail_id_count = 1000\n").unwrap_err(),
        );
        assert!(err.contains("hypervisor.jail_id_count = 1000"), "{err}");
        let err = boxlite_protocol::error_chain::chain(
            &parse("[timeouts]\nagent_ready_secs = 0\n").unwrap_err(),
        );
        assert!(
            err.ends_with("timeouts.agent_ready_secs = 0 is out of range 1..=600"),
            "{err}"
        );
        let err = boxlite_protocol::error_chain::chain(
            &parse("[timeouts]\nshutdown_secs = 1000\n").unwrap_err(),
        );
        assert!(err.contains("timeouts.shutdown_secs = 1000"), "{err}");
    }

    #[test]
    fn paths_must_be_absolute_and_names_non_empty() {
        let err = boxlite_protocol::error_chain::chain(
            &parse("[guest]\nkernel = \"vmlinux\"\n").unwrap_err(),
        );
        assert!(
            err.ends_with("guest.kernel = \"vmlinux\" must be an absolute path"),
            "{err}"
        );
        let err = boxlite_protocol::error_chain::chain(
            &parse("[templates]\ndir = \"templates\"\n").unwrap_err(),
        );
        assert!(
            err.ends_with("templates.dir = \"templates\" must be an absolute path"),
            "{err}"
        );
        let err = boxlite_protocol::error_chain::chain(
            &parse("[runtime]\nstate_dir = \"\"\n").unwrap_err(),
        );
        assert!(
            err.ends_with("runtime.state_dir must not be empty"),
            "{err}"
        );
        let err = boxlite_protocol::error_chain::chain(
            &parse("[hypervisor]\nqemu_binary = \" \"\n").unwrap_err(),
        );
        assert!(
            err.ends_with("hypervisor.qemu_binary must not be empty"),
            "{err}"
        );
    }

    #[test]
    fn cmdline_extra_is_bounded() {
        let long = "a".repeat(MAX_KERNEL_CMDLINE_EXTRA_LEN + 1);
        let err = boxlite_protocol::error_chain::chain(
            &parse(&format!("[guest]\nkernel_cmdline_extra = \"{long}\"\n")).unwrap_err(),
        );
        assert!(
            err.contains("guest.kernel_cmdline_extra is 1025 bytes long"),
            "{err}"
        );
        let err = boxlite_protocol::error_chain::chain(
            &parse("[guest]\nkernel_cmdline_extra = \"a\\nb\"\n").unwrap_err(),
        );
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
            let err = boxlite_protocol::error_chain::chain(&validate_log_level(bad).unwrap_err());
            assert!(err.starts_with("runtime.log_level = "), "{err}");
        }
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
            boxlite_protocol::error_chain::chain(&err).starts_with(
                "/etc/boxlite/boxlite.toml: runtime.allowed_annotations lists \"io.boxlite.jail\", \
                 which is not an overridable setting (known: io.boxlite.guest.vcpus, "
            ),
            "{err}"
        );
    }
}
