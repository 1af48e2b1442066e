//! The guest image: where its inputs live in the workspace, where its
//! artefacts go, and what the initramfs holds.

use std::path::{Path, PathBuf};

use crate::initramfs::Initramfs;

/// The guest kernel's config fragment, relative to the workspace root.
pub const GUEST_FRAGMENT: &str = "configs/guest-kernel.fragment";
/// Where `cargo xtask guest` and `initramfs` put their output, relative to
/// the workspace root (git-ignored).
pub const OUT_DIR: &str = "build/guest";
pub const VMLINUX_NAME: &str = "vmlinux";
pub const INITRAMFS_NAME: &str = "initramfs.cpio.gz";

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_owned()
}

pub fn default_fragment() -> PathBuf {
    workspace_root().join(GUEST_FRAGMENT)
}

pub fn default_out_dir() -> PathBuf {
    workspace_root().join(OUT_DIR)
}

/// The guest initramfs: the static agent as `/init` and the directories it
/// mounts on or writes to. `/dev/console` is there because the kernel opens
/// it for PID 1's stdin/stdout/stderr before anything is mounted; the agent
/// mounts devtmpfs over `/dev` and creates what it needs under `/run` itself.
pub fn initramfs(agent: &Path) -> Initramfs {
    Initramfs::new()
        .file("/init", agent, 0o755)
        .dir("/dev", 0o755)
        .char_device("/dev/console", 0o600, 5, 1)
        .dir("/proc", 0o555)
        .dir("/sys", 0o555)
        .dir("/run", 0o755)
        .dir("/tmp", 0o1777)
        .dir("/etc", 0o755)
        .dir("/root", 0o700)
        .dir("/mnt", 0o755)
}
