//! The nested test host (docs/testing-nested.md; layer 2 of the test layers
//! in docs/architecture.md): a
//! kernel with KVM_AMD that QEMU TCG boots with an emulated SVM CPU, and an
//! initramfs whose `/init` is the nested test driver, which runs the static
//! `boxlite-vmm` on the guest kernel and initramfs and prints verdicts.
//!
//! [`build`] puts together, in `build/testhost/`:
//! - `vmlinux`: the guest fragment + `configs/test-host-kernel.fragment`,
//!   built and cached like the guest kernel ([`crate::kernel`]);
//! - `initramfs.cpio.gz`: `/init` = `boxlite-nested-driver`,
//!   `/usr/bin/boxlite-vmm`, `/usr/bin/virtiofsd`, `/guest/vmlinux`,
//!   `/guest/initramfs.cpio.gz`, `/dev/console` and the mount points the
//!   driver uses.
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
use crate::guest;
use crate::initramfs::{Initramfs, InitramfsError};
use crate::kernel::{KernelArtefact, KernelBuild, KernelError};

/// The test host's config fragment, applied after the guest fragment.
pub const TESTHOST_FRAGMENT: &str = "configs/test-host-kernel.fragment";
/// Output directory, relative to the workspace root (git-ignored `build/`).
pub const OUT_DIR: &str = "build/testhost";
pub const VMLINUX_NAME: &str = "vmlinux";
pub const INITRAMFS_NAME: &str = "initramfs.cpio.gz";
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
    #[error("cannot build the {what} kernel")]
    Kernel {
        what: &'static str,
        #[source]
        source: KernelError,
    },
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
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_cached: bool,
    /// The static release boxlite-vmm and virtiofsd it carries (the nested
    /// node installs the same binaries).
    pub vmm: PathBuf,
    pub virtiofsd: PathBuf,
}

pub fn default_out_dir() -> PathBuf {
    guest::workspace_root().join(OUT_DIR)
}

pub fn default_fragments() -> Vec<PathBuf> {
    let root = guest::workspace_root();
    vec![
        root.join(guest::GUEST_FRAGMENT),
        root.join(TESTHOST_FRAGMENT),
    ]
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

/// The test host's initramfs: the driver as `/init`, the VMM, virtiofsd, the
/// guest kernel and initramfs, and the directories the driver mounts on.
pub fn initramfs(
    driver: &Path,
    vmm: &Path,
    virtiofsd: &Path,
    guest_kernel: &Path,
    guest_initramfs: &Path,
) -> Initramfs {
    Initramfs::new()
        .file("/init", driver, 0o755)
        .file(VMM_PATH, vmm, 0o755)
        .file(VIRTIOFSD_PATH, virtiofsd, 0o755)
        .file(GUEST_KERNEL_PATH, guest_kernel, 0o644)
        .file(GUEST_INITRAMFS_PATH, guest_initramfs, 0o644)
        .dir("/dev", 0o755)
        .char_device("/dev/console", 0o600, 5, 1)
        .dir("/proc", 0o555)
        .dir("/sys", 0o555)
        .dir("/tmp", 0o1777)
        .dir("/run", 0o755)
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
    let host_kernel: KernelArtefact = KernelBuild::new(default_fragments())
        .cache_root(cache_root)
        .build()
        .map_err(|source| TesthostError::Kernel {
            what: "test-host",
            source,
        })?;
    let guest_kernel = KernelBuild::new(vec![guest::default_fragment()])
        .cache_root(cache_root)
        .build()
        .map_err(|source| TesthostError::Kernel {
            what: "guest",
            source,
        })?;
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

    let kernel = out_dir.join(VMLINUX_NAME);
    crate::artefact::copy_atomic(&host_kernel.vmlinux, &kernel, 0o644)
        .map_err(TesthostError::Copy)?;
    let initramfs = out_dir.join(INITRAMFS_NAME);
    let mut contents = self::initramfs(
        &driver,
        &vmm,
        &virtiofsd,
        &guest_kernel.vmlinux,
        &guest_initramfs,
    );
    if with_qemu {
        let qemu = crate::testhost_qemu::find_qemu()?;
        eprintln!("testhost: adding {} and its libraries", qemu.display());
        contents = crate::testhost_qemu::add_qemu(contents, &qemu)?;
    }
    contents
        .write_to(&initramfs)
        .map_err(|e| TesthostError::Initramfs(initramfs.clone(), e))?;
    Ok(Testhost {
        kernel,
        initramfs,
        kernel_cached: host_kernel.cached,
        vmm,
        virtiofsd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::{parse_config, ConfigValue};

    #[test]
    fn the_testhost_fragment_asks_for_kvm_amd() {
        let path = guest::workspace_root().join(TESTHOST_FRAGMENT);
        let text = std::fs::read_to_string(&path).expect("read fragment");
        let map = parse_config(&text, &path).expect("parse fragment");
        for sym in [
            "CONFIG_VIRTUALIZATION",
            "CONFIG_KVM",
            "CONFIG_KVM_AMD",
            "CONFIG_CPU_SUP_AMD",
        ] {
            assert_eq!(map.get(sym), Some(&ConfigValue::Set("y".into())), "{sym}");
        }
    }

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
            "init",
            "usr/bin/boxlite-vmm",
            "usr/bin/virtiofsd",
            "guest/vmlinux",
            "guest/initramfs.cpio.gz",
            "dev/console",
        ] {
            assert!(text.contains(name), "{name} missing");
        }
    }
}
