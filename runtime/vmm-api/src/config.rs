//! The VM config: one JSON object (`boxlite-vmm --config vm.json`), read
//! once at start. `docs/vmm.md` ("Config format") documents every field.
//!
//! Every struct denies unknown fields. Optional fields left unset are not
//! written, so a generated `vm.json` lists only what was chosen; reading
//! accepts them absent or `null`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The whole VM description.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Number of vCPUs (the VMM allows 1..=16).
    #[serde(default = "default_vcpus")]
    pub vcpus: u8,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u32,
    /// Linux kernel: an uncompressed ELF `vmlinux` (PVH entry used if present).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    /// initramfs (any format the kernel unpacks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initramfs: Option<PathBuf>,
    /// Extra kernel command-line arguments, appended to the VMM's defaults.
    #[serde(default)]
    pub cmdline: String,
    /// File the serial console is written to (created or truncated). None
    /// (and no `console_fd`): discard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_log: Option<PathBuf>,
    /// An inherited fd (>= 3) the serial console is written to instead of
    /// `console_log`: the runtime hands the VMM a pipe whose other end it
    /// copies into a size-capped log, so the guest cannot fill the host's
    /// disk and the VMM needs no write access to a log file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub console_fd: Option<i32>,
    /// Raw guest code instead of a kernel; for smoke tests and benchmarks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub raw_image: Option<RawImageConfig>,
    /// Create the in-kernel irqchip (IOAPIC/PIC/LAPIC) and PIT. Default true.
    /// Some nested KVMs (kvm_pvm) run tiny guests without it.
    #[serde(default = "default_true")]
    pub irqchip: bool,
    /// Virtio devices, in the order they appear on the MMIO bus.
    #[serde(default)]
    pub devices: Vec<DeviceConfig>,
    /// virtio-balloon, in the MMIO slot after `devices`. None: no balloon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<BalloonConfig>,
    /// Unix socket for the control API ([`crate::control`]); created (a
    /// stale socket replaced) at start, removed at exit unless jailed (the
    /// jail sees its directory read-only; whoever started it removes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub control_socket: Option<PathBuf>,
    /// Apply the jail (cgroup, rlimits, no_new_privs, landlock, seccomp)
    /// before the guest runs. Default true; `false` is for debugging only
    /// and is logged loudly (same as `--no-jail`).
    #[serde(default = "default_true")]
    pub jail: bool,
    /// The sandbox directory (`/run/boxlite/<id>`): read-write in the jail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_dir: Option<PathBuf>,
    /// cgroup v2 directory (created by the shim) the VMM moves itself into.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<PathBuf>,
    /// The unprivileged user and group the jailed VMM runs as once the VM
    /// is built. None: 65534:65534 (`nobody`), logged. The runtime gives
    /// each sandbox its own pair from a dedicated range.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_user: Option<JailUser>,
    /// The directory the `snapshot` control op writes its state and memory
    /// files in. Opened at start, before the jail, which allows creating
    /// files there and nowhere else; it must be writable by `jail_user`.
    /// None: `snapshot` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_dir: Option<PathBuf>,
    /// Start from a snapshot instead of booting: the VM is rebuilt from the
    /// two files a `snapshot` op wrote and comes up `restored` (paused);
    /// the `restore` control op runs it. Excludes `kernel` and
    /// `raw_image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreConfig>,
    /// Hooks for the jail's own tests; never set in production.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_hooks: Option<TestHooks>,
}

/// A uid and gid (numbers; they need no entry in `/etc/passwd`).
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JailUser {
    pub uid: u32,
    pub gid: u32,
}

impl JailUser {
    /// `nobody`: what the VMM runs as when the config names no user.
    pub const NOBODY: JailUser = JailUser {
        uid: 65534,
        gid: 65534,
    };
}

/// An escape a test hook attempts from inside the jail.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "try", rename_all = "snake_case", deny_unknown_fields)]
pub enum EscapeProbe {
    /// `connect` to a unix socket at this host path.
    ConnectUnix { path: PathBuf },
    /// `open` this host file for reading.
    OpenFile { path: PathBuf },
    /// Create (and write) a file at this host path.
    CreateFile { path: PathBuf },
    /// Send SIGTERM to this host pid (with `kill` and with `tgkill`).
    Signal { pid: i32 },
    /// Create an AF_INET socket.
    InetSocket,
}

/// Test-only hooks that prove the jail works from the outside.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TestHooks {
    /// After the jail is on, a thread of this kind (`"vmm"` or `"vcpu"`)
    /// makes a syscall its profile forbids (`getppid`): the process must die
    /// of SIGSYS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forbidden_syscall: Option<String>,
    /// Like `forbidden_syscall`, but the call is an `ioctl` whose request
    /// number the kind's profile does not list (`TCGETS` on stderr): the
    /// profiles allow `ioctl` only for the requests the VMM makes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forbidden_ioctl: Option<String>,
    /// After landlock is on (before seccomp), try to open this file and log
    /// the outcome (`test hook: open …`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub open_after_landlock: Option<PathBuf>,
    /// After the whole jail is on, a thread of kind `escape_thread`
    /// (`"vmm"` or `"vcpu"`) attempts this escape and logs the outcome
    /// (`test hook: escape … denied: …`); if it succeeds the VMM exits
    /// with an error. A seccomp kill (SIGSYS) also counts as denied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escape: Option<EscapeProbe>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub escape_thread: Option<String>,
}

/// Raw guest code loaded at a fixed guest-physical address.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RawImageConfig {
    /// File with the guest's code bytes.
    pub path: PathBuf,
    /// Guest-physical load address; execution starts here.
    pub load_addr: u64,
    /// CPU mode at the first instruction.
    #[serde(default)]
    pub mode: CpuMode,
}

/// The snapshot a VM starts from (`restore` in [`VmConfig`]).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RestoreConfig {
    /// The state file (vCPUs, VM, devices).
    pub state: PathBuf,
    /// The memory file written with it.
    pub memory: PathBuf,
    /// How guest RAM comes back from the memory file.
    #[serde(default)]
    pub memory_mode: MemoryMode,
}

/// How a restored VM's RAM is made from the memory file.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum MemoryMode {
    /// `copy` if the VM has a vhost-user device (virtio-fs), else `private`.
    #[default]
    Auto,
    /// The file mapped copy-on-write: VMs restored from one file share its
    /// pages until they write them. Not with vhost-user devices, which map
    /// guest memory through a shared file descriptor.
    Private,
    /// The file's data copied into fresh shared guest memory, as at boot.
    Copy,
}

impl MemoryMode {
    /// The name in configs and replies.
    pub fn as_str(&self) -> &'static str {
        match self {
            MemoryMode::Auto => "auto",
            MemoryMode::Private => "private",
            MemoryMode::Copy => "copy",
        }
    }
}

/// The CPU mode a raw image starts in.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CpuMode {
    /// 16-bit real mode, CS = 0: `load_addr` must be below 64 KiB.
    #[default]
    Real,
    /// 64-bit long mode with the low 4 GiB identity-mapped (RAM and the MMIO hole).
    Long,
}

/// One virtio device: `{"kind": "<kind>", …its fields}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum DeviceConfig {
    /// virtio-rng fed from the host's `/dev/urandom`.
    Rng(RngConfig),
    /// virtio-vsock with the hybrid unix-socket host side.
    Vsock(VsockConfig),
    /// virtio-fs, a vhost-user frontend to an external virtiofsd.
    Fs(FsConfig),
    /// virtio-blk over a raw image file.
    Block(BlockConfig),
    /// virtio-net over a tap.
    Net(NetConfig),
}

/// virtio-balloon: `"balloon": {"deflate_on_oom": true, "free_page_reporting": true}`.
/// The host's balloon target starts at `target_mib` (default 0: the guest
/// gives nothing up unless asked); with `free_page_reporting` it reports
/// the pages it frees, and the VMM returns them to the host.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonConfig {
    /// Offer VIRTIO_BALLOON_F_DEFLATE_ON_OOM: the guest takes pages back
    /// out of the balloon when it would otherwise run out of memory.
    #[serde(default)]
    pub deflate_on_oom: bool,
    /// Offer VIRTIO_BALLOON_F_FREE_PAGE_REPORTING: the guest reports
    /// free memory blocks, which the VMM discards.
    #[serde(default)]
    pub free_page_reporting: bool,
    /// The balloon's target from boot, in MiB of guest memory: memory the
    /// VM is built with but the guest does not get until the target is
    /// lowered (the `balloon` control op). Below `memory_mib`.
    #[serde(default)]
    pub target_mib: u32,
}

/// virtio-rng options: `{"kind": "rng"}`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {
    /// Entropy source; default `/dev/urandom`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PathBuf>,
}

/// virtio-vsock with the hybrid unix-socket host side:
/// `{"kind": "vsock", "guest_cid": 3, "uds_path": "/run/boxlite/<id>/vsock.sock"}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's CID, `3..=u32::MAX - 1`.
    pub guest_cid: u64,
    /// Host processes connect here (`CONNECT <port>\n`); guest connections
    /// to host port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
    /// The host ports the guest may connect to. With the jail on, the VMM
    /// connects to each one's listener `<uds_path>_P` at start, before the
    /// jail (which leaves it no `socket` or `connect`), and the guest's
    /// first connection to P gets that connection; any other guest
    /// connection is refused. With the jail off and none listed, guest
    /// connections are connected as they come.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_ports: Vec<u32>,
}

/// virtio-fs served by an external virtiofsd over vhost-user:
/// `{"kind": "fs", "tag": "share0", "socket_path": "/run/boxlite/<id>/fs-share0.sock"}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FsConfig {
    /// The name the guest mounts (`mount -t virtiofs <tag> /mnt`), 1..=36 bytes.
    pub tag: String,
    /// virtiofsd's `--socket-path`; the VMM connects when the guest
    /// driver activates the device.
    pub socket_path: PathBuf,
}

/// virtio-blk over a raw image file:
/// `{"kind": "block", "path": "/var/lib/boxlite/disk.img", "read_only": false, "id": "disk0"}`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// The raw image; must be a regular file (its size rounded down to 512
    /// bytes is the capacity).
    pub path: PathBuf,
    /// Offer VIRTIO_BLK_F_RO and refuse writes; the file is opened read-only.
    #[serde(default)]
    pub read_only: bool,
    /// Serial returned by GET_ID (`/sys/block/vdX/serial`), at most 20 bytes.
    #[serde(default)]
    pub id: String,
}

/// virtio-net over a tap: either an inherited fd
/// `{"kind": "net", "tap_fd": 5, "mac": "02:00:00:00:00:01"}` or a tap
/// the VMM opens by name `{"kind": "net", "tap_name": "tap0"}`.
/// The tap must be (or is opened) with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`.
///
/// Two optional fields rather than an enum: that is the file format, and
/// the VMM's validation reports "both" and "neither" by name.
/// [`NetConfig::with_tap_fd`] and [`NetConfig::with_tap_name`] build the
/// valid shapes.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An open tap fd the VMM inherits and owns (>= 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_fd: Option<i32>,
    /// A tap interface to create or attach to via `/dev/net/tun`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap_name: Option<String>,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`, unicast. None: the
    /// guest picks a random one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
}

impl NetConfig {
    /// A device on a tap fd the VMM inherits.
    pub fn with_tap_fd(fd: i32, mac: Option<String>) -> Self {
        NetConfig {
            tap_fd: Some(fd),
            tap_name: None,
            mac,
        }
    }

    /// A device on a tap the VMM opens by name.
    pub fn with_tap_name(name: impl Into<String>, mac: Option<String>) -> Self {
        NetConfig {
            tap_fd: None,
            tap_name: Some(name.into()),
            mac,
        }
    }
}

fn default_vcpus() -> u8 {
    1
}
fn default_memory_mib() -> u32 {
    128
}
fn default_true() -> bool {
    true
}

impl Default for VmConfig {
    /// What an empty `{}` means.
    fn default() -> Self {
        VmConfig {
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            kernel: None,
            initramfs: None,
            cmdline: String::new(),
            console_log: None,
            console_fd: None,
            raw_image: None,
            irqchip: true,
            devices: Vec::new(),
            balloon: None,
            control_socket: None,
            jail: true,
            sandbox_dir: None,
            cgroup: None,
            jail_user: None,
            snapshot_dir: None,
            restore: None,
            test_hooks: None,
        }
    }
}

impl DeviceConfig {
    /// The device's kind, as `"kind"` names it in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceConfig::Rng(_) => "rng",
            DeviceConfig::Vsock(_) => "vsock",
            DeviceConfig::Fs(_) => "fs",
            DeviceConfig::Block(_) => "block",
            DeviceConfig::Net(_) => "net",
        }
    }
}

impl VmConfig {
    /// Guest memory size in bytes.
    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }

    /// Parses a config file's text (no validation: that is the VMM's).
    pub fn from_json(text: &str) -> serde_json::Result<Self> {
        serde_json::from_str(text)
    }

    /// The config as the file the VMM reads (pretty, newline-terminated).
    pub fn to_json_pretty(&self) -> String {
        let mut s = serde_json::to_string_pretty(self)
            .expect("VmConfig has string keys and plain values only");
        s.push('\n');
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_object_is_the_default() {
        assert_eq!(
            VmConfig::from_json("{}").expect("parse"),
            VmConfig::default()
        );
        let d = VmConfig::default();
        assert_eq!(
            (d.vcpus, d.memory_mib, d.irqchip, d.jail),
            (1, 128, true, true)
        );
        assert_eq!(d.memory_bytes(), 128 << 20);
    }

    #[test]
    fn parses_every_field_and_round_trips() {
        let json = r#"{
            "vcpus": 2, "memory_mib": 256, "kernel": "/k", "initramfs": "/i",
            "cmdline": "quiet", "console_log": "/tmp/c.log", "irqchip": true,
            "control_socket": "/run/b/control.sock", "jail": false,
            "sandbox_dir": "/run/b", "cgroup": "/sys/fs/cgroup/b",
            "snapshot_dir": "/var/lib/boxlite/templates/t.partial",
            "restore": {"state": "/t/vm.state", "memory": "/t/vm.mem", "memory_mode": "copy"},
            "test_hooks": {"forbidden_syscall": "vmm", "forbidden_ioctl": "vcpu",
                           "open_after_landlock": "/etc/passwd"},
            "devices": [
                {"kind": "rng"}, {"kind": "rng", "source": "/dev/random"},
                {"kind": "vsock", "guest_cid": 3, "uds_path": "/run/b/vsock.sock"},
                {"kind": "fs", "tag": "share0", "socket_path": "/run/b/fs.sock"},
                {"kind": "block", "path": "/d.img", "read_only": true, "id": "disk0"},
                {"kind": "block", "path": "/e.img"},
                {"kind": "net", "tap_fd": 5, "mac": "02:00:00:00:00:01"},
                {"kind": "net", "tap_name": "tap0"}
            ]
        }"#;
        let cfg = VmConfig::from_json(json).expect("parse");
        assert_eq!(cfg.vcpus, 2);
        assert!(!cfg.jail);
        assert_eq!(
            cfg.snapshot_dir.as_deref(),
            Some(std::path::Path::new("/var/lib/boxlite/templates/t.partial"))
        );
        assert_eq!(
            cfg.restore,
            Some(RestoreConfig {
                state: "/t/vm.state".into(),
                memory: "/t/vm.mem".into(),
                memory_mode: MemoryMode::Copy,
            })
        );
        assert_eq!(
            cfg.devices,
            vec![
                DeviceConfig::Rng(RngConfig::default()),
                DeviceConfig::Rng(RngConfig {
                    source: Some("/dev/random".into())
                }),
                DeviceConfig::Vsock(VsockConfig {
                    guest_cid: 3,
                    uds_path: "/run/b/vsock.sock".into(),
                    host_ports: Vec::new(),
                }),
                DeviceConfig::Fs(FsConfig {
                    tag: "share0".into(),
                    socket_path: "/run/b/fs.sock".into()
                }),
                DeviceConfig::Block(BlockConfig {
                    path: "/d.img".into(),
                    read_only: true,
                    id: "disk0".into()
                }),
                DeviceConfig::Block(BlockConfig {
                    path: "/e.img".into(),
                    read_only: false,
                    id: String::new()
                }),
                DeviceConfig::Net(NetConfig::with_tap_fd(5, Some("02:00:00:00:00:01".into()))),
                DeviceConfig::Net(NetConfig::with_tap_name("tap0", None)),
            ]
        );
        let again = VmConfig::from_json(&cfg.to_json_pretty()).expect("reparse");
        assert_eq!(again, cfg);
    }

    #[test]
    fn balloon_section() {
        let cfg = VmConfig::from_json(
            r#"{"balloon": {"deflate_on_oom": true, "free_page_reporting": true}}"#,
        )
        .expect("parse");
        assert_eq!(
            cfg.balloon,
            Some(BalloonConfig {
                deflate_on_oom: true,
                free_page_reporting: true,
                target_mib: 0,
            })
        );
        let v: serde_json::Value = serde_json::from_str(&cfg.to_json_pretty()).expect("json");
        assert_eq!(
            v["balloon"],
            serde_json::json!({"deflate_on_oom": true, "free_page_reporting": true, "target_mib": 0})
        );
        let cfg = VmConfig::from_json(r#"{"balloon": {"target_mib": 512}}"#).expect("a target");
        assert_eq!(cfg.balloon.map(|b| b.target_mib), Some(512));
        assert_eq!(
            VmConfig::from_json(&cfg.to_json_pretty()).expect("reparse"),
            cfg
        );
        // Both features are opt-in.
        let cfg = VmConfig::from_json(r#"{"balloon": {}}"#).expect("empty balloon");
        assert_eq!(cfg.balloon, Some(BalloonConfig::default()));
        // Absent or null: no device.
        assert_eq!(VmConfig::from_json("{}").expect("absent").balloon, None);
        assert_eq!(
            VmConfig::from_json(r#"{"balloon": null}"#)
                .expect("null")
                .balloon,
            None
        );
    }

    #[test]
    fn unset_options_are_not_written_and_nulls_are_read() {
        let v: serde_json::Value =
            serde_json::from_str(&VmConfig::default().to_json_pretty()).expect("json");
        let keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(|k| k.as_str())
            .collect();
        assert_eq!(
            keys,
            [
                "cmdline",
                "devices",
                "irqchip",
                "jail",
                "memory_mib",
                "vcpus"
            ]
        );
        let cfg = VmConfig::from_json(r#"{"kernel": null, "test_hooks": null}"#).expect("nulls");
        assert_eq!(cfg, VmConfig::default());
    }

    #[test]
    fn raw_image_mode_names() {
        let cfg = VmConfig::from_json(
            r#"{"raw_image": {"path": "/g.bin", "load_addr": 4096, "mode": "long"}}"#,
        )
        .expect("parse");
        assert_eq!(
            cfg.raw_image,
            Some(RawImageConfig {
                path: "/g.bin".into(),
                load_addr: 4096,
                mode: CpuMode::Long
            })
        );
        let err = VmConfig::from_json(
            r#"{"raw_image": {"path": "/g", "load_addr": 0, "mode": "protected"}}"#,
        )
        .expect_err("unknown mode");
        assert!(
            err.to_string().contains("unknown variant `protected`"),
            "{err}"
        );
    }

    #[test]
    fn unknown_fields_and_kinds_are_refused_everywhere() {
        for (json, want) in [
            (r#"{"vcpu": 2}"#, "unknown field `vcpu`"),
            (r#"{"test_hooks": {"x": "vmm"}}"#, "unknown field `x`"),
            (
                r#"{"raw_image": {"path": "/g", "load_addr": 0, "entry": 1}}"#,
                "unknown field `entry`",
            ),
            (r#"{"devices": [{"kind": "gpu"}]}"#, "unknown variant `gpu`"),
            (
                r#"{"restore": {"state": "/s", "memory": "/m", "mode": "copy"}}"#,
                "unknown field `mode`",
            ),
            (
                r#"{"restore": {"state": "/s", "memory": "/m", "memory_mode": "lazy"}}"#,
                "unknown variant `lazy`",
            ),
            (
                r#"{"devices": [{"kind": "rng", "x": 1}]}"#,
                "unknown field `x`",
            ),
            (
                r#"{"devices": [{"kind": "vsock", "guest_cid": 3, "uds_path": "/x", "port": 1}]}"#,
                "unknown field `port`",
            ),
            (
                r#"{"devices": [{"kind": "fs", "tag": "a", "socket_path": "/x", "cache": "auto"}]}"#,
                "unknown field `cache`",
            ),
            (
                r#"{"devices": [{"kind": "block", "path": "/x", "readonly": true}]}"#,
                "unknown field `readonly`",
            ),
            (
                r#"{"devices": [{"kind": "net", "tap_fd": 5, "vlan": 1}]}"#,
                "unknown field `vlan`",
            ),
            (
                r#"{"devices": [{"kind": "vsock", "guest_cid": 3}]}"#,
                "missing field `uds_path`",
            ),
            (
                r#"{"devices": [{"kind": "fs", "tag": "a"}]}"#,
                "missing field `socket_path`",
            ),
            (r#"{"devices": [{"tag": "a"}]}"#, "missing field `kind`"),
            (
                r#"{"balloon": {"deflate_on_oom": true, "stats": true}}"#,
                "unknown field `stats`",
            ),
            (
                r#"{"balloon": {"free_page_reporting": "yes"}}"#,
                "invalid type: string",
            ),
            (
                r#"{"devices": [{"kind": "balloon"}]}"#,
                "unknown variant `balloon`",
            ),
        ] {
            let err = VmConfig::from_json(json).expect_err(json);
            assert!(err.to_string().contains(want), "{json}: {err}");
        }
    }
}
