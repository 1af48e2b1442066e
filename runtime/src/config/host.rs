//! What the config resolves to on this host: KVM detection
//! ([`HostAccelProbe`]), the backend and accelerator choice
//! ([`resolve_backend`], [`decide_accel`]) and the helper binaries
//! ([`find_binary`]). The deciding functions are pure — the host facts
//! come in a [`HostAccelProbe`] — so tests can play any host.

use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};

use super::{Accel, Backend, Config, ConfigError};

impl Config {
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
    /// boot a standard Linux guest (docs/architecture.md, "The machines we build and test on").
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
}
