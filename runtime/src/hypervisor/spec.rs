//! What a VM is made of before it starts: the [`VmSpec`] the config
//! describes, its virtio-fs [`Share`]s and [`NetDevice`]s, and the checks
//! each gets before a backend accepts it.

use std::path::PathBuf;
use std::time::Duration;

use super::jail_ids::JailIds;
use super::{HypervisorError, CONSOLE_LOG, MAX_SHARE_TAG_LEN, VSOCK_SOCKET};
use crate::cgroup;
use crate::config::Config;
use crate::network::{MacAddr, TapDevice};

/// The guest kernel's console log level, passed before the config's
/// extras: warnings and worse reach `console.log` (an oops, a panic, a
/// `WARNING:` splat, an RCU stall), the kernel's boot-time information
/// lines do not. Every console byte costs the VMM an exit (the 8250 UART
/// is emulated a register access at a time); at the default level a boot
/// wrote ~9 KB to it. `kernel_cmdline_extra = "loglevel=8"` brings the
/// full log back: the last `loglevel=` on the command line wins.
pub const GUEST_CONSOLE_LOGLEVEL: &str = "loglevel=5";

/// A host directory shared with the guest over virtio-fs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// virtio-fs tag; the guest mounts it by this name.
    pub tag: String,
    pub host_dir: PathBuf,
    pub read_only: bool,
}

/// A guest network interface.
#[derive(Debug)]
pub struct NetDevice {
    pub tap: TapDevice,
    pub mac: MacAddr,
}

/// Everything a backend needs to know to boot one sandbox VM.
#[derive(Debug)]
pub struct VmSpec {
    pub id: String,
    /// `<state_dir>/<id>`: console log, sockets, helper logs and pid files.
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub vcpus: u32,
    /// The memory the VM is built with, `balloon_mib` included.
    pub memory_mib: u32,
    /// Of `memory_mib`, what the balloon holds from boot: the VM's room to
    /// grow into when an update asks for more memory (0: none).
    pub balloon_mib: u32,
    /// `guest.free_page_reporting`: the balloon hands the pages the guest
    /// frees back to the host.
    pub free_page_reporting: bool,
    /// Appended to the backend's own kernel command line, in order:
    /// [`GUEST_CONSOLE_LOGLEVEL`], then the config's `kernel_cmdline_extra`.
    pub cmdline_extra: Vec<String>,
    /// virtio-fs shares (more can be added with [`super::Hypervisor::add_share`]).
    pub shares: Vec<Share>,
    /// Network devices (more can be added with [`super::Hypervisor::add_net`]).
    pub nets: Vec<NetDevice>,
    /// From [`super::Hypervisor::start`] until the agent must answer.
    pub agent_ready_timeout: Duration,
    /// How long [`super::Hypervisor::stop`] waits for the VM to exit before killing it.
    pub shutdown_timeout: Duration,
    /// The cap of each log in the sandbox directory (console and process
    /// output), in bytes: `runtime.sandbox_log_max_kib`.
    pub log_max_bytes: u64,
    /// Where the uid (= gid) the jailed `boxlite-vmm` runs as comes from:
    /// the builtin backend leases one at start ([`super::jail_ids`]).
    pub jail_ids: JailIds,
    /// The cgroup every process of the VM runs in, below each hierarchy's
    /// root ([`crate::cgroup::resolve`]); None: the caller's own (tests).
    pub cgroup: Option<PathBuf>,
}

impl VmSpec {
    /// The spec the config describes for sandbox `id`, with no shares or nets.
    pub fn from_config(config: &Config, id: &str) -> Result<Self, HypervisorError> {
        check_sandbox_id(id)?;
        Ok(Self {
            id: id.to_owned(),
            dir: config.sandbox_dir(id),
            kernel: config.guest.kernel.clone(),
            initramfs: config.guest.initramfs.clone(),
            vcpus: config.guest.vcpus,
            memory_mib: config.guest.memory_mib,
            balloon_mib: 0,
            free_page_reporting: config.guest.free_page_reporting,
            cmdline_extra: std::iter::once(GUEST_CONSOLE_LOGLEVEL)
                .chain(config.guest.kernel_cmdline_extra.split_whitespace())
                .map(str::to_owned)
                .collect(),
            shares: Vec::new(),
            nets: Vec::new(),
            agent_ready_timeout: config.timeouts.agent_ready(),
            shutdown_timeout: config.timeouts.shutdown(),
            log_max_bytes: config.runtime.sandbox_log_max_kib * 1024,
            jail_ids: JailIds::from_config(config),
            cgroup: Some(
                cgroup::resolve(None, &config.runtime.cgroup_parent, id).map_err(|e| {
                    HypervisorError::Cgroup {
                        id: id.to_owned(),
                        error: e.into(),
                    }
                })?,
            ),
        })
    }

    /// Places the VM in the cgroup `cgroups_path` names (the OCI spec's,
    /// of the container that boots the VM); with none, under the
    /// configured parent (what [`VmSpec::from_config`] set).
    pub fn in_cgroup(mut self, cgroups_path: Option<&str>) -> Result<Self, HypervisorError> {
        if let Some(path) = cgroups_path.filter(|p| !p.is_empty()) {
            let place = cgroup::resolve(Some(path), "/", &self.id).map_err(|e| {
                HypervisorError::Cgroup {
                    id: self.id.clone(),
                    error: e.into(),
                }
            })?;
            self.cgroup = Some(place);
        }
        Ok(self)
    }

    pub fn console_log_path(&self) -> PathBuf {
        self.dir.join(CONSOLE_LOG)
    }

    pub fn vsock_socket_path(&self) -> PathBuf {
        self.dir.join(VSOCK_SOCKET)
    }
}

/// Sandbox ids become directory names: containerd's rule
/// (`boxlite_protocol::ids`), the same the guest applies.
pub(super) fn check_sandbox_id(id: &str) -> Result<(), HypervisorError> {
    boxlite_protocol::ids::validate("sandbox", id).map_err(HypervisorError::InvalidSandboxId)
}

/// virtio-fs tags: 1..=36 bytes of `[A-Za-z0-9_.-]` (they end up in socket
/// names and QEMU option strings).
pub fn validate_share_tag(id: &str, tag: &str) -> Result<(), HypervisorError> {
    let invalid = |reason: String| HypervisorError::InvalidShare {
        id: id.to_owned(),
        tag: tag.to_owned(),
        reason,
    };
    if tag.is_empty() || tag.len() > MAX_SHARE_TAG_LEN {
        return Err(invalid(format!(
            "a tag must be 1..={MAX_SHARE_TAG_LEN} bytes long"
        )));
    }
    if let Some(c) = tag
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(invalid(format!(
            "character {c:?} is not allowed in a tag (use A-Z a-z 0-9 _ - .)"
        )));
    }
    Ok(())
}

/// A tap the VMM opens by name must be a valid interface name that is safe
/// in a QEMU option string.
pub(super) fn check_tap(tap: &TapDevice) -> Result<(), HypervisorError> {
    if let TapDevice::Name(name) = tap {
        // IFNAMSIZ is 16 with the NUL; the name also goes into a QEMU option.
        let ok = !name.is_empty()
            && name.len() <= 15
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        if !ok {
            return Err(HypervisorError::InvalidTap {
                name: name.clone(),
                reason: "a tap name must be 1..=15 characters of A-Z a-z 0-9 _ - .",
            });
        }
    }
    Ok(())
}

/// A guest NIC's MAC must be an interface address: the parser
/// (`boxlite_protocol::mac`) accepts any, a multicast one is refused here.
pub(super) fn check_mac(mac: &MacAddr) -> Result<(), HypervisorError> {
    if mac.is_multicast() {
        return Err(HypervisorError::InvalidMac {
            value: mac.to_string(),
            reason: "a multicast address cannot be an interface address",
        });
    }
    Ok(())
}

/// Both checks of a network device.
pub(super) fn check_net(net: &NetDevice) -> Result<(), HypervisorError> {
    check_tap(&net.tap)?;
    check_mac(&net.mac)
}

#[cfg(test)]
mod tests {
    use super::*;
    use boxlite_protocol::error_chain::chain;
    use std::path::Path;

    #[test]
    fn sandbox_ids_follow_containerds_rule() {
        let config = Config::default();
        for ok in ["3f2a", "a-b_c.d", &"f".repeat(64)] {
            VmSpec::from_config(&config, ok).unwrap();
        }
        for (bad, why) in [
            ("", "empty"),
            ("..", "starts with '.'"),
            ("a/b", "'/'"),
            ("a b", "' '"),
            ("a,b", "','"),
        ] {
            let err = chain(&VmSpec::from_config(&config, bad).unwrap_err());
            assert!(err.contains(why), "{bad:?}: {err}");
        }
        let err = chain(&VmSpec::from_config(&config, &"x".repeat(77)).unwrap_err());
        assert!(err.contains("77 bytes long"), "{err}");
    }

    #[test]
    fn share_tags() {
        validate_share_tag("s", "rootfs").unwrap();
        validate_share_tag("s", &"t".repeat(36)).unwrap();
        assert!(validate_share_tag("s", "").is_err());
        assert!(validate_share_tag("s", &"t".repeat(37)).is_err());
        let err = validate_share_tag("s", "a,b").unwrap_err().to_string();
        assert_eq!(
            err,
            "sandbox s: share \"a,b\" is invalid: character ',' is not allowed in a tag (use A-Z a-z 0-9 _ - .)"
        );
    }

    #[test]
    fn mac_addresses() {
        let mac: MacAddr = "02:42:AC:11:00:02".parse().unwrap();
        assert_eq!(mac.0, [0x02, 0x42, 0xac, 0x11, 0, 2]);
        assert_eq!(mac.to_string(), "02:42:ac:11:00:02");
        check_mac(&mac).unwrap();
        for bad in [
            "",
            "02:42:ac:11:00",
            "02:42:ac:11:00:02:03",
            "0g:42:ac:11:00:02",
            "2:42:ac:11:00:02",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
        let multicast: MacAddr = "01:00:5e:00:00:01".parse().unwrap();
        let err = check_mac(&multicast).unwrap_err().to_string();
        assert!(err.contains("multicast"), "{err}");
        assert!(err.contains("01:00:5e:00:00:01"), "{err}");
    }

    #[test]
    fn spec_from_config() {
        let mut config = Config::default();
        config.guest.kernel_cmdline_extra = " quiet  loglevel=3 ".into();
        let spec = VmSpec::from_config(&config, "3f2a").unwrap();
        assert_eq!(spec.dir, Path::new("/run/boxlite/3f2a"));
        assert_eq!(
            spec.console_log_path(),
            Path::new("/run/boxlite/3f2a/console.log")
        );
        assert_eq!(
            spec.vsock_socket_path(),
            Path::new("/run/boxlite/3f2a/vsock.sock")
        );
        assert_eq!(spec.cmdline_extra, ["loglevel=5", "quiet", "loglevel=3"]);
        assert_eq!(spec.agent_ready_timeout, Duration::from_secs(30));
        assert_eq!(
            spec.jail_ids,
            JailIds {
                range: crate::hypervisor::JailIdRange {
                    base: 0x7000_0000,
                    count: 65536
                },
                state_dir: "/run/boxlite".into(),
            }
        );
        assert_eq!(
            spec.jail_ids.lease_dir(),
            Path::new("/run/boxlite/.jail-ids")
        );
        assert!(VmSpec::from_config(&config, "../etc").is_err());
    }
}
