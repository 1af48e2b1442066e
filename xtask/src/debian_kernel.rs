//! The nested test host's kernel: Debian's own cloud kernel package
//! (`linux-image-cloud-amd64`), fetched with apt and unpacked, not built.
//!
//! The test host and the nested node stand for a Debian 12 server, so they
//! boot the kernel such a server runs. Debian builds what the nested tests
//! need as modules (KVM and `kvm_amd`, tun, virtio-mmio and virtio-blk, the
//! tc actions, overlayfs, netfilter); [`module_load_order`] finds a module
//! and everything it depends on in the unpacked tree, in load order, from
//! each module's own `.modinfo` (no `depmod` needed on the build machine).
//! [`crate::stage1`] loads them at boot.
//!
//! Fetching costs a ~27 MB download where building a kernel cost ten
//! minutes of CI. The unpacked package is cached under
//! `<cache root>/debian-kernel/<package>_<version>/`, built in a temporary
//! directory beside it under a lock and renamed into place when complete.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The metapackage whose candidate names the kernel package to use.
pub const META_PACKAGE: &str = "linux-image-cloud-amd64";
const PACKAGE_PREFIX: &str = "linux-image-";
/// Where the unpacked kernels live below the cache root.
const CACHE_SUBDIR: &str = "debian-kernel";

#[derive(Debug, thiserror::Error)]
pub enum DebianKernelError {
    #[error("cannot run {program} (is apt installed? this needs a Debian machine)")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{step} failed ({status}): {stderr}")]
    Step {
        step: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error(
        "apt knows no installable {META_PACKAGE}, even after apt-get update \
         (`apt-cache show {META_PACKAGE}` printed no `Depends: {PACKAGE_PREFIX}…` line)"
    )]
    NoCandidate,
    #[error("cannot prepare {path}")]
    Cache {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the unpacked {package} has no {missing}")]
    Incomplete { package: String, missing: PathBuf },
    #[error("no kernel module {name} under {dir} (needed by {needed_by})")]
    NoModule {
        name: String,
        dir: PathBuf,
        needed_by: String,
    },
    #[error("kernel module {path} is compressed; only plain .ko files are supported")]
    Compressed { path: PathBuf },
    #[error("cannot read the .modinfo of kernel module {path}")]
    ModInfo {
        path: PathBuf,
        #[source]
        source: crate::elf::ElfError,
    },
    #[error("kernel modules depend on each other in a cycle through {0}")]
    Cycle(String),
}

/// An unpacked Debian kernel package.
#[derive(Debug, Clone)]
pub struct DebianKernel {
    /// e.g. `linux-image-6.1.0-57-cloud-amd64`.
    pub package: String,
    /// e.g. `6.1.192-3`.
    pub version: String,
    /// The kernel release (`uname -r`), e.g. `6.1.0-57-cloud-amd64`.
    pub release: String,
    /// The package's files, as they would be installed below `/`.
    pub root: PathBuf,
    pub cached: bool,
}

impl DebianKernel {
    /// The bzImage QEMU boots with `-kernel`.
    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join(format!("boot/vmlinuz-{}", self.release))
    }

    /// `lib/modules/<release>` of the package.
    pub fn modules_dir(&self) -> PathBuf {
        self.root.join(format!("lib/modules/{}", self.release))
    }

    /// `package=version`: what a cache key that depends on it includes.
    pub fn identity(&self) -> String {
        format!("{}={}", self.package, self.version)
    }
}

/// A kernel module to load: its name (as `insmod` and the command line's
/// `name.param=` know it) and its file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    pub name: String,
    pub path: PathBuf,
}

/// The kernel package `apt-cache show` gives as the candidate of
/// [`META_PACKAGE`]'s dependency: (package, version).
pub fn parse_candidate(show: &str) -> Option<(String, String)> {
    let depends = show.lines().find_map(|l| l.strip_prefix("Depends:"))?;
    depends.split(',').find_map(|dep| {
        let dep = dep.trim();
        let (name, rest) = dep.split_once(' ').unwrap_or((dep, ""));
        if !name.starts_with(PACKAGE_PREFIX) {
            return None;
        }
        let version = rest
            .trim()
            .strip_prefix("(=")?
            .strip_suffix(')')?
            .trim()
            .to_owned();
        Some((name.to_owned(), version))
    })
}

fn output(cmd: &mut Command, step: &str) -> Result<String, DebianKernelError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .map_err(|source| DebianKernelError::Spawn { program, source })?;
    if !out.status.success() {
        return Err(DebianKernelError::Step {
            step: step.to_owned(),
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The candidate kernel package; runs `apt-get update` once when apt's
/// lists are missing or know no candidate (a fresh machine).
fn resolve() -> Result<(String, String), DebianKernelError> {
    let show = || {
        output(
            Command::new("apt-cache").args(["show", "--no-all-versions", META_PACKAGE]),
            &format!("apt-cache show {META_PACKAGE}"),
        )
    };
    if let Ok(text) = show() {
        if let Some(found) = parse_candidate(&text) {
            return Ok(found);
        }
    }
    eprintln!("debian-kernel: apt knows no {META_PACKAGE}; running apt-get update");
    output(
        Command::new("apt-get").args(["update", "-qq"]),
        "apt-get update",
    )?;
    parse_candidate(&show()?).ok_or(DebianKernelError::NoCandidate)
}

/// Debian's cloud kernel, unpacked in the cache (downloaded on first use).
pub fn fetch(cache_root: &Path) -> Result<DebianKernel, DebianKernelError> {
    let (package, version) = resolve()?;
    let release = package
        .strip_prefix(PACKAGE_PREFIX)
        .unwrap_or(&package)
        .to_owned();
    let dir = cache_root.join(CACHE_SUBDIR);
    let name = format!("{package}_{version}");
    let mut kernel = DebianKernel {
        package,
        version,
        release,
        root: dir.join(&name),
        cached: true,
    };
    let complete = |k: &DebianKernel| k.vmlinuz().is_file() && k.modules_dir().is_dir();
    if complete(&kernel) {
        return Ok(kernel);
    }
    let cache_err = |path: &Path| {
        let path = path.to_owned();
        move |source| DebianKernelError::Cache { path, source }
    };
    std::fs::create_dir_all(&dir).map_err(cache_err(&dir))?;
    let lock_path = dir.join(format!("{name}.lock"));
    let _lock = crate::artefact::lock_exclusive(&lock_path).map_err(cache_err(&lock_path))?;
    if complete(&kernel) {
        return Ok(kernel);
    }
    // Under the lock, a temporary directory of this name is what a killed
    // fetch left behind; so is a partial entry.
    let tmp = dir.join(format!(".{name}.tmp"));
    for stale in [&tmp, &kernel.root] {
        if stale.exists() {
            std::fs::remove_dir_all(stale).map_err(cache_err(stale))?;
        }
    }
    std::fs::create_dir_all(&tmp).map_err(cache_err(&tmp))?;
    let pinned = format!("{}={}", kernel.package, kernel.version);
    eprintln!("debian-kernel: apt-get download {pinned}");
    output(
        Command::new("apt-get")
            .current_dir(&tmp)
            // As root, apt downloads as `_apt`, which cannot write into a
            // root-owned directory; it would fall back with a warning.
            .args(["-o", "APT::Sandbox::User=root", "download", "-qq", &pinned]),
        &format!("apt-get download {pinned}"),
    )?;
    let deb = tmp.join(format!("{}_{}_amd64.deb", kernel.package, kernel.version));
    let unpacked = tmp.join("root");
    output(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked),
        &format!("dpkg-deb -x {}", deb.display()),
    )?;
    kernel.root = unpacked;
    for wanted in [kernel.vmlinuz(), kernel.modules_dir()] {
        if !wanted.exists() {
            return Err(DebianKernelError::Incomplete {
                package: kernel.package,
                missing: wanted,
            });
        }
    }
    let entry = dir.join(&name);
    std::fs::rename(&kernel.root, &entry).map_err(cache_err(&entry))?;
    std::fs::remove_dir_all(&tmp).map_err(cache_err(&tmp))?;
    kernel.root = entry;
    kernel.cached = false;
    eprintln!(
        "debian-kernel: {} unpacked in {}",
        kernel.identity(),
        kernel.root.display()
    );
    Ok(kernel)
}

/// A module's name from its file name: `kvm-amd.ko` is module `kvm_amd`.
fn module_name(file_name: &str) -> Option<String> {
    file_name
        .strip_suffix(".ko")
        .map(|stem| stem.replace('-', "_"))
}

/// Every `.ko` below `dir`, by module name.
fn index_modules(
    dir: &Path,
    index: &mut BTreeMap<String, PathBuf>,
) -> Result<(), DebianKernelError> {
    let entries = std::fs::read_dir(dir).map_err(|source| DebianKernelError::Cache {
        path: dir.to_owned(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| DebianKernelError::Cache {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        let file_name = entry.file_name().to_string_lossy().into_owned();
        if path.is_dir() {
            index_modules(&path, index)?;
        } else if let Some(name) = module_name(&file_name) {
            index.insert(name, path);
        } else if [".ko.xz", ".ko.zst", ".ko.gz"]
            .iter()
            .any(|ext| file_name.ends_with(ext))
        {
            return Err(DebianKernelError::Compressed { path });
        }
    }
    Ok(())
}

/// The `depends=` list of a module's `.modinfo` (NUL-separated `key=value`).
pub fn depends_of(modinfo: &[u8]) -> Vec<String> {
    modinfo
        .split(|&b| b == 0)
        .filter_map(|field| field.strip_prefix(b"depends="))
        .flat_map(|list| list.split(|&b| b == b','))
        .filter(|name| !name.is_empty())
        .map(|name| String::from_utf8_lossy(name).replace('-', "_"))
        .collect()
}

/// `wanted` and everything they depend on, each once, dependencies first:
/// the order `insmod` needs.
pub fn module_load_order(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<Module>, DebianKernelError> {
    let mut index = BTreeMap::new();
    index_modules(modules_dir, &mut index)?;
    let mut order = Vec::new();
    let mut visiting = Vec::new();
    for name in wanted {
        visit(
            &name.replace('-', "_"),
            "the caller",
            &index,
            modules_dir,
            &mut visiting,
            &mut order,
        )?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    needed_by: &str,
    index: &BTreeMap<String, PathBuf>,
    modules_dir: &Path,
    visiting: &mut Vec<String>,
    order: &mut Vec<Module>,
) -> Result<(), DebianKernelError> {
    if order.iter().any(|m| m.name == name) {
        return Ok(());
    }
    if visiting.iter().any(|v| v == name) {
        return Err(DebianKernelError::Cycle(name.to_owned()));
    }
    let path = index.get(name).ok_or_else(|| DebianKernelError::NoModule {
        name: name.to_owned(),
        dir: modules_dir.to_owned(),
        needed_by: needed_by.to_owned(),
    })?;
    let bytes = std::fs::read(path).map_err(|source| DebianKernelError::Cache {
        path: path.clone(),
        source,
    })?;
    let modinfo = crate::elf::section(&bytes, ".modinfo", path)
        .map_err(|source| DebianKernelError::ModInfo {
            path: path.clone(),
            source,
        })?
        .unwrap_or_default();
    visiting.push(name.to_owned());
    for dep in depends_of(modinfo) {
        visit(&dep, name, index, modules_dir, visiting, order)?;
    }
    visiting.pop();
    order.push(Module {
        name: name.to_owned(),
        path: path.clone(),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_candidate_is_the_pinned_linux_image_dependency() {
        let show = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-3\n\
                    Depends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)\nSize: 1\n";
        assert_eq!(
            parse_candidate(show),
            Some((
                "linux-image-6.1.0-57-cloud-amd64".into(),
                "6.1.192-3".into()
            ))
        );
        assert_eq!(parse_candidate("Package: x\nDepends: libc6 (>= 2)\n"), None);
        assert_eq!(
            parse_candidate("Depends: linux-image-6.1.0-57-cloud-amd64\n"),
            None,
            "an unpinned dependency names no version to download"
        );
    }

    #[test]
    fn depends_are_read_from_modinfo_fields() {
        let modinfo = b"license=GPL\0depends=kvm,irq-bypass\0retpoline=Y\0";
        assert_eq!(depends_of(modinfo), ["kvm", "irq_bypass"]);
        assert!(depends_of(b"depends=\0name=irqbypass\0").is_empty());
    }

    /// A minimal ELF64 file whose only sections are the section-name
    /// table and a `.modinfo` with `depends=<depends>`.
    fn fake_module(depends: &str) -> Vec<u8> {
        let names = b"\0.shstrtab\0.modinfo\0";
        let modinfo = format!("license=GPL\0depends={depends}\0").into_bytes();
        let names_off = 64u64;
        let modinfo_off = names_off + names.len() as u64;
        let shoff = modinfo_off + modinfo.len() as u64;
        let mut elf = vec![0u8; 64];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2; // 64-bit
        elf[5] = 1; // little-endian
        elf[6] = 1;
        elf[0x28..0x30].copy_from_slice(&shoff.to_le_bytes());
        elf[0x3a..0x3c].copy_from_slice(&64u16.to_le_bytes());
        elf[0x3c..0x3e].copy_from_slice(&3u16.to_le_bytes());
        elf[0x3e..0x40].copy_from_slice(&1u16.to_le_bytes());
        elf.extend_from_slice(names);
        elf.extend_from_slice(&modinfo);
        let header = |name: u32, off: u64, len: u64| {
            let mut h = vec![0u8; 64];
            h[..4].copy_from_slice(&name.to_le_bytes());
            h[24..32].copy_from_slice(&off.to_le_bytes());
            h[32..40].copy_from_slice(&len.to_le_bytes());
            h
        };
        elf.extend(header(0, 0, 0));
        elf.extend(header(1, names_off, names.len() as u64));
        elf.extend(header(11, modinfo_off, modinfo.len() as u64));
        elf
    }

    fn tree(modules: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, depends) in modules {
            let path = dir.path().join(path);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, fake_module(depends)).unwrap();
        }
        dir
    }

    #[test]
    fn modules_load_after_their_dependencies_each_once() {
        let dir = tree(&[
            ("kernel/virt/lib/irqbypass.ko", ""),
            ("kernel/arch/x86/kvm/kvm.ko", "irqbypass"),
            ("kernel/arch/x86/kvm/kvm-amd.ko", "kvm"),
            ("kernel/drivers/net/tun.ko", ""),
        ]);
        let order = module_load_order(dir.path(), &["kvm-amd", "tun", "kvm"]).unwrap();
        let names: Vec<_> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["irqbypass", "kvm", "kvm_amd", "tun"]);
        assert!(order[2].path.ends_with("kernel/arch/x86/kvm/kvm-amd.ko"));
    }

    #[test]
    fn a_missing_dependency_names_who_needs_it() {
        let dir = tree(&[("kernel/kvm.ko", "irqbypass")]);
        let err = module_load_order(dir.path(), &["kvm"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no kernel module irqbypass") && err.contains("needed by kvm"),
            "{err}"
        );
    }

    #[test]
    fn cycles_and_compressed_modules_are_refused() {
        let dir = tree(&[("kernel/a.ko", "b"), ("kernel/b.ko", "a")]);
        assert!(matches!(
            module_load_order(dir.path(), &["a"]),
            Err(DebianKernelError::Cycle(_))
        ));
        let dir = tree(&[("kernel/a.ko.xz", "")]);
        assert!(matches!(
            module_load_order(dir.path(), &["a"]),
            Err(DebianKernelError::Compressed { .. })
        ));
    }

    #[test]
    fn module_names_use_underscores() {
        assert_eq!(module_name("kvm-amd.ko").as_deref(), Some("kvm_amd"));
        assert_eq!(module_name("tun.ko").as_deref(), Some("tun"));
        assert_eq!(module_name("modules.dep"), None);
    }
}
