//! The nested test host (docs/testing-nested.md; layer 2 of the test layers
//! in docs/architecture.md): Debian's cloud kernel, which QEMU TCG boots
//! with an emulated SVM CPU so that its `kvm_amd` gives a real `/dev/kvm`,
//! and an initramfs whose stage 1 loads KVM and hands over to the nested
//! test driver, which runs the static `boxlite-vmm` on the guest kernel and
//! initramfs and prints verdicts.
//!
//! [`build`] puts together, in `build/testhost/`:
//! - `vmlinuz`: Debian's `linux-image-cloud-amd64` kernel, fetched and
//!   cached by [`crate::debian_kernel`] (a Debian server's own kernel, and
//!   no kernel build in CI);
//! - `initramfs.cpio.gz`: [`crate::stage1`] loading `kvm_amd` and `tun`
//!   (with their dependencies), then `/sbin/boxlite-nested-driver`;
//!   `/usr/bin/boxlite-vmm`, `/usr/bin/virtiofsd`, `/guest/vmlinux`,
//!   `/guest/initramfs.cpio.gz` and the mount points the driver uses;
//! - `node-initramfs.cpio.gz`: the nested node's stage 1, which loads
//!   virtio-mmio and virtio-blk and switches to the node's root disk
//!   ([`crate::node_image`] carries the rest of the kernel's modules).
//!
//! The two binaries are built like the agent ([`crate::agent`]): release,
//! `--target x86_64-unknown-linux-gnu`, `+crt-static`, checked static. So is
//! virtiofsd (for the `fs` scenario): `cargo install virtiofsd` with the same
//! flags against Debian's static libseccomp and libcap-ng, cached under the
//! cache root by version.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::agent::{self, AgentError, AGENT_TARGET, STATIC_RUSTFLAGS};
use crate::debian_kernel::{self, DebianKernel, DebianKernelError};
use crate::guest;
use crate::initramfs::{Initramfs, InitramfsError};
use crate::kernel::{KernelBuild, KernelError};
use crate::stage1::{self, Handover};

/// Output directory, relative to the workspace root (git-ignored `build/`).
pub const OUT_DIR: &str = "build/testhost";
pub const KERNEL_NAME: &str = "vmlinuz";
pub const INITRAMFS_NAME: &str = "initramfs.cpio.gz";
pub const NODE_INITRAMFS_NAME: &str = "node-initramfs.cpio.gz";
/// The modules the test host loads before the driver starts: KVM for the
/// VMM, tun for the `net` scenario's tap.
pub const TESTHOST_MODULES: &[&str] = &["kvm_amd", "tun"];
/// The modules the node needs to reach its root disk: QEMU's microvm
/// describes its virtio-mmio devices in ACPI, which `virtio_mmio` reads.
pub const NODE_STAGE1_MODULES: &[&str] = &["virtio_mmio", "virtio_blk"];
/// The host's static busybox (Debian's busybox-static), stage 1's shell.
pub const HOST_BUSYBOX: &str = "/bin/busybox";
/// Where the driver sits in the test host; stage 1 execs it as PID 1.
pub const DRIVER_PATH: &str = "/sbin/boxlite-nested-driver";
/// Where the VMM, the guest kernel and the guest initramfs sit in the test host.
pub const VMM_PATH: &str = "/usr/bin/boxlite-vmm";
pub const GUEST_KERNEL_PATH: &str = "/guest/vmlinux";
pub const GUEST_INITRAMFS_PATH: &str = "/guest/initramfs.cpio.gz";
pub const VIRTIOFSD_PATH: &str = "/usr/bin/virtiofsd";
/// The virtiofsd release built static for the test host (the one
/// scripts/common.sh installs for the qemu backend).
pub const VIRTIOFSD_VERSION: &str = "1.14.0";
/// Where Debian's libseccomp-dev and libcap-ng-dev put their static archives.
const DEBIAN_LIB_DIR: &str = "/usr/lib/x86_64-linux-gnu";

/// The static binaries of the test host: (cargo package, binary).
pub const VMM_BINARY: (&str, &str) = ("boxlite-vmm", "boxlite-vmm");
pub const DRIVER_BINARY: (&str, &str) = ("boxlite-tests", "boxlite-nested-driver");

#[derive(Debug, thiserror::Error)]
pub enum TesthostError {
    #[error("cannot build the guest kernel")]
    Kernel(#[source] KernelError),
    #[error("cannot fetch the test host's kernel")]
    DebianKernel(#[from] DebianKernelError),
    #[error("cannot build the guest agent")]
    Agent(#[source] AgentError),
    #[error("cannot run {cargo}")]
    Spawn {
        cargo: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "cargo build of {package} (bin {binary}) failed ({status}); see the compiler output above"
    )]
    Build {
        package: String,
        binary: String,
        status: std::process::ExitStatus,
    },
    #[error("{0} was not produced by the build")]
    Missing(PathBuf),
    #[error("{0} must be static")]
    NotStatic(String, #[source] AgentError),
    #[error("cannot write {0}")]
    Initramfs(PathBuf, #[source] InitramfsError),
    #[error("cannot put QEMU into the test host")]
    Qemu(#[from] crate::testhost_qemu::QemuPayloadError),
    #[error("cannot copy the test-host kernel")]
    Copy(#[source] crate::artefact::ArtefactError),
}

/// What [`build`] produced.
#[derive(Debug, Clone)]
pub struct Testhost {
    /// The test host's and the node's kernel (a bzImage).
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The nested node's stage 1 ([`NODE_INITRAMFS_NAME`]).
    pub node_initramfs: PathBuf,
    /// The Debian package the kernel comes from, whose modules the node
    /// image carries.
    pub debian_kernel: DebianKernel,
    /// The static release boxlite-vmm and virtiofsd it carries (the nested
    /// node installs the same binaries).
    pub vmm: PathBuf,
    pub virtiofsd: PathBuf,
}

pub fn default_out_dir() -> PathBuf {
    guest::workspace_root().join(OUT_DIR)
}

/// The target directory for the static builds: `$CARGO_TARGET_DIR` if set,
/// else `<workspace>/target`.
fn target_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
}

/// `cargo build --release -p <package> --bin <binary>` for the static gnu
/// target (the agent's recipe), returning the checked binary.
pub fn build_static(
    workspace: &Path,
    package: &str,
    binary: &str,
) -> Result<PathBuf, TesthostError> {
    let cargo = agent::cargo_program();
    let target_dir = target_dir(workspace);
    let rustflags = match std::env::var("RUSTFLAGS") {
        Ok(extra) if !extra.trim().is_empty() => format!("{STATIC_RUSTFLAGS} {extra}"),
        _ => STATIC_RUSTFLAGS.to_owned(),
    };
    eprintln!(
        "testhost: cargo build --release -p {package} --bin {binary} --target {AGENT_TARGET} \
         (RUSTFLAGS=\"{rustflags}\", target dir {})",
        target_dir.display()
    );
    run_cargo(
        Command::new(&cargo)
            .current_dir(workspace)
            .args(["build", "--release", "-p", package, "--bin", binary])
            .args(["--target", AGENT_TARGET])
            .env("RUSTFLAGS", &rustflags)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env("CARGO_TARGET_DIR", &target_dir),
        package,
        binary,
    )?;
    let path = target_dir.join(AGENT_TARGET).join("release").join(binary);
    if !path.is_file() {
        return Err(TesthostError::Missing(path));
    }
    agent::check_static(&path).map_err(|e| TesthostError::NotStatic(binary.to_owned(), e))?;
    Ok(path)
}

/// Runs a cargo build or install of `package`'s `binary`: not starting and
/// not succeeding are errors naming the cargo, the package and the binary.
fn run_cargo(cmd: &mut Command, package: &str, binary: &str) -> Result<(), TesthostError> {
    let status = cmd.status().map_err(|source| TesthostError::Spawn {
        cargo: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })?;
    if !status.success() {
        return Err(TesthostError::Build {
            package: package.to_owned(),
            binary: binary.to_owned(),
            status,
        });
    }
    Ok(())
}

/// A static virtiofsd for the test host: `cargo install` into
/// `<cache_root>/virtiofsd-static/<version>/` (beside the cached kernels)
/// once, then reused.
pub fn static_virtiofsd(workspace: &Path, cache_root: &Path) -> Result<PathBuf, TesthostError> {
    let dir = cache_root.join("virtiofsd-static").join(VIRTIOFSD_VERSION);
    let bin = dir.join("bin/virtiofsd");
    if bin.is_file() && agent::check_static(&bin).is_ok() {
        eprintln!(
            "testhost: static virtiofsd {VIRTIOFSD_VERSION}: cached, {}",
            bin.display()
        );
        return Ok(bin);
    }
    let cargo = agent::cargo_program();
    let staging = dir.with_file_name(format!("{VIRTIOFSD_VERSION}.partial"));
    let _ = std::fs::remove_dir_all(&staging);
    eprintln!(
        "testhost: cargo install virtiofsd@{VIRTIOFSD_VERSION} (static, into {})",
        dir.display()
    );
    run_cargo(
        Command::new(&cargo)
            .args(["install", "--locked", "--force"])
            .arg(format!("virtiofsd@{VIRTIOFSD_VERSION}"))
            .arg("--root")
            .arg(&staging)
            .args(["--target", AGENT_TARGET])
            .env("RUSTFLAGS", STATIC_RUSTFLAGS)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            // Without these, libseccomp-sys and capng link the shared libraries
            // into a static-glibc binary, which crashes at start.
            .env("LIBSECCOMP_LINK_TYPE", "static")
            .env("LIBSECCOMP_LIB_PATH", DEBIAN_LIB_DIR)
            .env("LIBCAPNG_LINK_TYPE", "static")
            .env("LIBCAPNG_LIB_PATH", DEBIAN_LIB_DIR)
            .env(
                "CARGO_TARGET_DIR",
                target_dir(workspace).join("virtiofsd-static"),
            ),
        &format!("virtiofsd@{VIRTIOFSD_VERSION}"),
        "virtiofsd",
    )?;
    let built = staging.join("bin/virtiofsd");
    if !built.is_file() {
        return Err(TesthostError::Missing(built));
    }
    agent::check_static(&built).map_err(|e| TesthostError::NotStatic("virtiofsd".into(), e))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&staging, &dir).map_err(|source| TesthostError::Spawn {
        cargo: format!("rename {} to {}", staging.display(), dir.display()),
        source,
    })?;
    Ok(bin)
}

/// The test host's initramfs without its stage 1: the driver, the VMM,
/// virtiofsd, the guest kernel and initramfs, and the directories the
/// driver mounts on.
pub fn initramfs(
    driver: &Path,
    vmm: &Path,
    virtiofsd: &Path,
    guest_kernel: &Path,
    guest_initramfs: &Path,
) -> Initramfs {
    Initramfs::new()
        .file(DRIVER_PATH, driver, 0o755)
        .file(VMM_PATH, vmm, 0o755)
        .file(VIRTIOFSD_PATH, virtiofsd, 0o755)
        .file(GUEST_KERNEL_PATH, guest_kernel, 0o644)
        .file(GUEST_INITRAMFS_PATH, guest_initramfs, 0o644)
        .dir("/tmp", 0o1777)
        .dir("/run", 0o755)
}

/// The static busybox stage 1 runs on, checked static.
fn busybox() -> Result<PathBuf, TesthostError> {
    let path = PathBuf::from(HOST_BUSYBOX);
    agent::check_static(&path).map_err(|e| TesthostError::NotStatic(HOST_BUSYBOX.into(), e))?;
    Ok(path)
}

/// Builds everything (kernels cached) into `out_dir`; see the module docs.
/// `guest_initramfs`: use this guest initramfs instead of building the agent
/// and writing one (e.g. `build/guest/initramfs.cpio.gz` from `cargo xtask guest`).
/// `with_qemu`: also carry the machine's QEMU ([`crate::testhost_qemu`]),
/// for the benchmark's QEMU rows.
pub fn build(
    out_dir: &Path,
    cache_root: &Path,
    guest_initramfs: Option<&Path>,
    with_qemu: bool,
) -> Result<Testhost, TesthostError> {
    let workspace = guest::workspace_root();
    let host_kernel = debian_kernel::fetch(cache_root)?;
    let guest_kernel = KernelBuild::new(vec![guest::default_fragment()])
        .cache_root(cache_root)
        .build()
        .map_err(TesthostError::Kernel)?;
    let guest_initramfs = match guest_initramfs {
        Some(p) => p.to_owned(),
        None => {
            let agent_bin = agent::build(&workspace).map_err(TesthostError::Agent)?;
            let p = out_dir.join("guest-initramfs.cpio.gz");
            guest::initramfs(&agent_bin)
                .write_to(&p)
                .map_err(|e| TesthostError::Initramfs(p.clone(), e))?;
            p
        }
    };
    let vmm = build_static(&workspace, VMM_BINARY.0, VMM_BINARY.1)?;
    let driver = build_static(&workspace, DRIVER_BINARY.0, DRIVER_BINARY.1)?;
    let virtiofsd = static_virtiofsd(&workspace, cache_root)?;

    let busybox = busybox()?;

    let kernel = out_dir.join(KERNEL_NAME);
    crate::artefact::copy_atomic(&host_kernel.vmlinuz(), &kernel, 0o644)
        .map_err(TesthostError::Copy)?;
    let modules_dir = host_kernel.modules_dir();
    let initramfs = out_dir.join(INITRAMFS_NAME);
    let mut contents = stage1::add(
        self::initramfs(
            &driver,
            &vmm,
            &virtiofsd,
            &guest_kernel.vmlinux,
            &guest_initramfs,
        ),
        &busybox,
        &debian_kernel::module_load_order(&modules_dir, TESTHOST_MODULES)?,
        Handover::Exec(DRIVER_PATH),
    );
    if with_qemu {
        let qemu = crate::testhost_qemu::find_qemu()?;
        eprintln!("testhost: adding {} and its libraries", qemu.display());
        contents = crate::testhost_qemu::add_qemu(contents, &qemu)?;
    }
    contents
        .write_to(&initramfs)
        .map_err(|e| TesthostError::Initramfs(initramfs.clone(), e))?;
    let node_initramfs = out_dir.join(NODE_INITRAMFS_NAME);
    stage1::add(
        Initramfs::new(),
        &busybox,
        &debian_kernel::module_load_order(&modules_dir, NODE_STAGE1_MODULES)?,
        Handover::SwitchRoot,
    )
    .write_to(&node_initramfs)
    .map_err(|e| TesthostError::Initramfs(node_initramfs.clone(), e))?;
    Ok(Testhost {
        kernel,
        initramfs,
        node_initramfs,
        debian_kernel: host_kernel,
        vmm,
        virtiofsd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn initramfs_has_driver_vmm_virtiofsd_and_guest() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = |name: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, name).expect("write");
            p
        };
        let bytes = initramfs(
            &f("driver"),
            &f("vmm"),
            &f("virtiofsd"),
            &f("vmlinux"),
            &f("initrd"),
        )
        .to_bytes()
        .expect("archive");
        let mut gz = flate2::read::GzDecoder::new(&bytes[..]);
        let mut cpio = Vec::new();
        io::Read::read_to_end(&mut gz, &mut cpio).expect("gunzip");
        let text = String::from_utf8_lossy(&cpio);
        for name in [
            "sbin/boxlite-nested-driver",
            "usr/bin/boxlite-vmm",
            "usr/bin/virtiofsd",
            "guest/vmlinux",
            "guest/initramfs.cpio.gz",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
