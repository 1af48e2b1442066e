//! Kernel builds from Debian's `linux-source-6.1`, configured as
//! `make tinyconfig` plus one or more config fragments, and cached by content.
//!
//! The recipe ([`KernelBuild::build`]):
//! 1. key = sha256 of ([`BUILD_RECIPE_VERSION`], the source package's version,
//!    every fragment's content); if `<cache>/<key>/vmlinux` exists, done;
//! 2. unpack the source tarball into `<cache>/<key>/work/linux`;
//! 3. `make tinyconfig`, `merge_config.sh -m` the fragments, `make olddefconfig`;
//! 4. check that every option the fragments set survived (Kconfig silently
//!    drops an option whose dependencies are missing);
//! 5. `make -j<jobs> vmlinux`, then install `config` and `vmlinux` into
//!    `<cache>/<key>/` by rename, `vmlinux` last, and remove the work tree.
//!
//! The guest kernel is `KernelBuild::new(vec![guest fragment])`; a test-host
//! kernel is the same with a second fragment after it (later fragments win).

use std::collections::BTreeMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use sha2::{Digest, Sha256};

use crate::artefact::{self, ArtefactError};

/// Bump when the recipe changes in a way that changes the kernel built from
/// the same fragments and source (make targets, environment, tools).
pub const BUILD_RECIPE_VERSION: &str = "1";
pub const DEFAULT_SOURCE_PACKAGE: &str = "linux-source-6.1";
pub const DEFAULT_SOURCE_TARBALL: &str = "/usr/src/linux-source-6.1.tar.xz";
pub const DEFAULT_CACHE_ROOT: &str = "/var/cache/boxlite/kernel";

/// Fixed build metadata, so the same inputs give the same kernel.
const KBUILD_ENV: [(&str, &str); 3] = [
    ("KBUILD_BUILD_USER", "boxlite"),
    ("KBUILD_BUILD_HOST", "boxlite"),
    ("KBUILD_BUILD_TIMESTAMP", "1970-01-01 00:00:00 UTC"),
];
/// Lines of the build log quoted in an error.
const LOG_TAIL_LINES: usize = 25;

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("config fragment {path} cannot be read")]
    ReadFragment {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path}:{line}: not a Kconfig line (want `CONFIG_X=value` or `# CONFIG_X is not set`): {text:?}")]
    ParseConfig {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("no config fragment given")]
    NoFragment,
    #[error("linux source {path} not found: install the {package} package")]
    SourceMissing { path: PathBuf, package: String },
    #[error("cannot read the version of package {package} with dpkg-query: {reason}; install the {package} package")]
    PackageVersion { package: String, reason: String },
    #[error("cannot use kernel cache directory {path} (pass --cache-dir to use another)")]
    CacheDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot lock {path}")]
    Lock {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot prepare kernel work directory {path}")]
    WorkDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot run {program} (is it installed? the build needs tar, make, gcc, flex, bison, bc, libelf-dev, libssl-dev)")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{step} failed ({status}); full log: {log}\n--- last lines ---\n{tail}")]
    StepFailed {
        step: String,
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
    #[error("{path} does not contain a single top-level source directory")]
    SourceLayout { path: PathBuf },
    #[error(
        "{} option(s) set by the fragment(s) did not survive `make olddefconfig` \
         (unknown symbol, or a dependency that is not enabled); final config: {config}\n{}",
        .dropped.len(),
        list(.dropped)
    )]
    OptionsDropped {
        config: PathBuf,
        dropped: Vec<Mismatch>,
    },
    #[error("cannot install kernel artefact")]
    Install(#[source] ArtefactError),
}

/// The value of one option in a fragment or a `.config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfigValue {
    /// `CONFIG_X=<text>`: `y`, `m`, a number or a quoted string, verbatim.
    Set(String),
    /// `# CONFIG_X is not set`.
    NotSet,
}

impl fmt::Display for ConfigValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigValue::Set(v) => write!(f, "={v}"),
            ConfigValue::NotSet => f.write_str(" is not set"),
        }
    }
}

/// An option whose final value differs from what a fragment asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub symbol: String,
    pub wanted: ConfigValue,
    /// `None`: the symbol is not in the final `.config` at all.
    pub got: Option<ConfigValue>,
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}: ", self.symbol, self.wanted)?;
        match &self.got {
            None => f.write_str("absent from the final config"),
            Some(got) => write!(f, "final config has {}{got}", self.symbol),
        }
    }
}

fn list(dropped: &[Mismatch]) -> String {
    dropped
        .iter()
        .map(|m| format!("  {m}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Options by symbol (`CONFIG_…`), in file order; a later line wins.
pub type ConfigMap = BTreeMap<String, ConfigValue>;

/// Parses Kconfig lines: `CONFIG_X=value`, `# CONFIG_X is not set`, other
/// comments and blank lines. `path` names the text in errors.
pub fn parse_config(text: &str, path: &Path) -> Result<ConfigMap, KernelError> {
    let mut map = ConfigMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if let Some(comment) = line.strip_prefix('#') {
            if let Some(sym) = comment
                .trim()
                .strip_suffix(" is not set")
                .filter(|s| is_symbol(s))
            {
                map.insert(sym.to_owned(), ConfigValue::NotSet);
            }
            continue;
        }
        if line.is_empty() {
            continue;
        }
        match line.split_once('=') {
            Some((sym, value)) if is_symbol(sym) && !value.is_empty() => {
                map.insert(sym.to_owned(), ConfigValue::Set(value.to_owned()));
            }
            _ => {
                return Err(KernelError::ParseConfig {
                    path: path.to_owned(),
                    line: i + 1,
                    text: raw.to_owned(),
                })
            }
        }
    }
    Ok(map)
}

fn is_symbol(s: &str) -> bool {
    s.strip_prefix("CONFIG_").is_some_and(|rest| {
        !rest.is_empty()
            && rest
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
    })
}

/// Every option of `wanted` whose value did not make it into `actual`.
/// `=value` must match exactly; `is not set` must not have become `y`/`m`.
pub fn verify_config(wanted: &ConfigMap, actual: &ConfigMap) -> Vec<Mismatch> {
    wanted
        .iter()
        .filter(|(sym, want)| {
            let got = actual.get(*sym);
            match want {
                ConfigValue::Set(_) => got != Some(want),
                ConfigValue::NotSet => {
                    matches!(got, Some(ConfigValue::Set(v)) if v == "y" || v == "m")
                }
            }
        })
        .map(|(sym, want)| Mismatch {
            symbol: sym.clone(),
            wanted: want.clone(),
            got: actual.get(sym).cloned(),
        })
        .collect()
}

/// The cache key: sha256 over the recipe version, the source package and its
/// version, and each fragment's content (length-prefixed, in order).
pub fn cache_key(fragments: &[Vec<u8>], package: &str, package_version: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"boxlite-kernel\0recipe=");
    h.update(BUILD_RECIPE_VERSION.as_bytes());
    h.update(b"\0source=");
    h.update(package.as_bytes());
    h.update(b"=");
    h.update(package_version.as_bytes());
    for frag in fragments {
        h.update(b"\0fragment:");
        h.update((frag.len() as u64).to_le_bytes());
        h.update(frag);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// A built (or cached) kernel.
#[derive(Debug, Clone)]
pub struct KernelArtefact {
    pub key: String,
    pub vmlinux: PathBuf,
    /// The final `.config` it was built with.
    pub config: PathBuf,
    /// True if it came from the cache and nothing was built.
    pub cached: bool,
}

/// One kernel build: its fragments, source and cache. See the module docs.
#[derive(Debug, Clone)]
pub struct KernelBuild {
    pub fragments: Vec<PathBuf>,
    pub source_package: String,
    pub source_tarball: PathBuf,
    pub cache_root: PathBuf,
    pub jobs: usize,
    /// Keep `<cache>/<key>/work` (the configured source tree) after success.
    pub keep_work: bool,
}

impl KernelBuild {
    /// A build of Debian's linux-source-6.1 with `fragments` applied in order,
    /// cached under [`DEFAULT_CACHE_ROOT`], with one make job per CPU.
    pub fn new(fragments: Vec<PathBuf>) -> Self {
        Self {
            fragments,
            source_package: DEFAULT_SOURCE_PACKAGE.to_owned(),
            source_tarball: PathBuf::from(DEFAULT_SOURCE_TARBALL),
            cache_root: PathBuf::from(DEFAULT_CACHE_ROOT),
            jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
            keep_work: false,
        }
    }

    pub fn cache_root(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_root = dir.into();
        self
    }

    pub fn keep_work(mut self, keep: bool) -> Self {
        self.keep_work = keep;
        self
    }

    /// The cache key of this build (reads the fragments and asks dpkg for
    /// the source package's version).
    pub fn key(&self) -> Result<String, KernelError> {
        Ok(self.key_of(&self.read_fragments()?)?.0)
    }

    /// The artefact if it is already in the cache; builds nothing.
    pub fn cached(&self) -> Result<Option<KernelArtefact>, KernelError> {
        let key = self.key()?;
        let artefact = self.artefact(&key);
        Ok(artefact.vmlinux.is_file().then_some(artefact))
    }

    /// Builds the kernel, or returns the cached one. Progress goes to stderr.
    pub fn build(&self) -> Result<KernelArtefact, KernelError> {
        let fragments = self.read_fragments()?;
        if !self.source_tarball.is_file() {
            return Err(KernelError::SourceMissing {
                path: self.source_tarball.clone(),
                package: self.source_package.clone(),
            });
        }
        let (key, version) = self.key_of(&fragments)?;
        let artefact = self.artefact(&key);
        if artefact.vmlinux.is_file() {
            eprintln!("kernel {key}: cached, nothing to do");
            return Ok(artefact);
        }

        let key_dir = self.cache_root.join(&key);
        fs::create_dir_all(&key_dir).map_err(|source| KernelError::CacheDir {
            path: key_dir.clone(),
            source,
        })?;
        let _lock = lock(&key_dir.join("lock"))?;
        // Another build of the same key may have finished while we waited.
        if artefact.vmlinux.is_file() {
            eprintln!("kernel {key}: built by a concurrent run, nothing to do");
            return Ok(artefact);
        }

        let started = Instant::now();
        eprintln!(
            "kernel {key}: building {} {version} with {} (work dir {})",
            self.source_package,
            self.fragments
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" + "),
            key_dir.join("work").display()
        );
        let work = Work::new(key_dir.join("work"))?;
        let src = work.unpack(&self.source_tarball)?;
        let checked = self.configure(&work, &src, &fragments)?;
        eprintln!(
            "kernel {key}: config verified ({} options from the fragments); make -j{} vmlinux (log {})",
            checked,
            self.jobs,
            work.log.display()
        );
        work.make(
            &src,
            &[&format!("-j{}", self.jobs), "vmlinux"],
            "make vmlinux",
        )?;

        artefact::copy_atomic(&src.join(".config"), &artefact.config, 0o644)
            .map_err(KernelError::Install)?;
        artefact::copy_atomic(&src.join("vmlinux"), &artefact.vmlinux, 0o644)
            .map_err(KernelError::Install)?;
        eprintln!("kernel {key}: built in {:.0?}", started.elapsed());
        if !self.keep_work {
            fs::remove_dir_all(&work.dir).map_err(|source| KernelError::WorkDir {
                path: work.dir.clone(),
                source,
            })?;
        }
        Ok(KernelArtefact {
            cached: false,
            ..artefact
        })
    }

    fn artefact(&self, key: &str) -> KernelArtefact {
        let dir = self.cache_root.join(key);
        KernelArtefact {
            key: key.to_owned(),
            vmlinux: dir.join("vmlinux"),
            config: dir.join("config"),
            cached: true,
        }
    }

    /// The cache key for these fragment contents, and the package version
    /// that went into it.
    fn key_of(&self, fragments: &[Vec<u8>]) -> Result<(String, String), KernelError> {
        let version = self.package_version()?;
        let key = cache_key(fragments, &self.source_package, &version);
        Ok((key, version))
    }

    fn read_fragments(&self) -> Result<Vec<Vec<u8>>, KernelError> {
        if self.fragments.is_empty() {
            return Err(KernelError::NoFragment);
        }
        self.fragments
            .iter()
            .map(|path| {
                fs::read(path).map_err(|source| KernelError::ReadFragment {
                    path: path.clone(),
                    source,
                })
            })
            .collect()
    }

    fn package_version(&self) -> Result<String, KernelError> {
        let err = |reason: String| KernelError::PackageVersion {
            package: self.source_package.clone(),
            reason,
        };
        let out = Command::new("dpkg-query")
            .args(["-W", "-f=${Version}", &self.source_package])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| err(e.to_string()))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() || version.is_empty() {
            let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
            return Err(err(if stderr.is_empty() {
                format!("{} with no version", out.status)
            } else {
                stderr
            }));
        }
        Ok(version)
    }

    /// tinyconfig + fragments + olddefconfig, then the check. Returns how
    /// many options the fragments set.
    fn configure(
        &self,
        work: &Work,
        src: &Path,
        fragments: &[Vec<u8>],
    ) -> Result<usize, KernelError> {
        work.make(src, &["tinyconfig"], "make tinyconfig")?;
        // Merge copies of exactly the bytes that went into the key.
        let mut wanted = ConfigMap::new();
        let mut merge = Command::new("sh");
        merge
            .current_dir(src)
            .args(["scripts/kconfig/merge_config.sh", "-m", ".config"]);
        for (i, (path, bytes)) in self.fragments.iter().zip(fragments).enumerate() {
            let text = String::from_utf8_lossy(bytes);
            wanted.extend(parse_config(&text, path)?);
            let copy = work.dir.join(format!("fragment-{i}.config"));
            fs::write(&copy, bytes).map_err(|source| KernelError::WorkDir {
                path: copy.clone(),
                source,
            })?;
            merge.arg(&copy);
        }
        work.run(&mut merge, "merge_config.sh")?;
        work.make(src, &["olddefconfig"], "make olddefconfig")?;

        let config_path = src.join(".config");
        let text = fs::read_to_string(&config_path).map_err(|source| KernelError::WorkDir {
            path: config_path.clone(),
            source,
        })?;
        let actual = parse_config(&text, &config_path)?;
        let dropped = verify_config(&wanted, &actual);
        if !dropped.is_empty() {
            return Err(KernelError::OptionsDropped {
                config: config_path,
                dropped,
            });
        }
        Ok(wanted.len())
    }
}

/// `<cache>/<key>/work`: the unpacked source and the build log.
struct Work {
    dir: PathBuf,
    log: PathBuf,
}

impl Work {
    fn new(dir: PathBuf) -> Result<Self, KernelError> {
        fs::create_dir_all(&dir).map_err(|source| KernelError::WorkDir {
            path: dir.clone(),
            source,
        })?;
        let log = dir.join("build.log");
        Ok(Self { dir, log })
    }

    /// `work/linux`, unpacked once: the tarball is extracted into a scratch
    /// directory and its top-level directory renamed into place, so a
    /// half-extracted tree is never taken for a complete one.
    fn unpack(&self, tarball: &Path) -> Result<PathBuf, KernelError> {
        let src = self.dir.join("linux");
        if src.join("Makefile").is_file() {
            eprintln!("reusing unpacked source {}", src.display());
            return Ok(src);
        }
        let scratch = self.dir.join("unpack.tmp");
        let workdir_err = |path: &Path| {
            let path = path.to_owned();
            move |source| KernelError::WorkDir { path, source }
        };
        if scratch.exists() {
            fs::remove_dir_all(&scratch).map_err(workdir_err(&scratch))?;
        }
        fs::create_dir_all(&scratch).map_err(workdir_err(&scratch))?;
        eprintln!("unpacking {}", tarball.display());
        let mut tar = Command::new("tar");
        tar.arg("-xf").arg(tarball).arg("-C").arg(&scratch);
        self.run(&mut tar, "unpacking the linux source")?;
        let tops: Vec<PathBuf> = fs::read_dir(&scratch)
            .map_err(workdir_err(&scratch))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<_, _>>()
            .map_err(workdir_err(&scratch))?;
        let [top] = tops.as_slice() else {
            return Err(KernelError::SourceLayout {
                path: tarball.to_owned(),
            });
        };
        fs::rename(top, &src).map_err(workdir_err(&src))?;
        fs::remove_dir(&scratch).map_err(workdir_err(&scratch))?;
        Ok(src)
    }

    fn make(&self, src: &Path, args: &[&str], step: &str) -> Result<(), KernelError> {
        let mut cmd = Command::new("make");
        cmd.current_dir(src).arg("ARCH=x86").args(args);
        self.run(&mut cmd, step)
    }

    /// Runs `cmd` with stdout and stderr appended to the build log.
    fn run(&self, cmd: &mut Command, step: &str) -> Result<(), KernelError> {
        let log_err = |source| KernelError::WorkDir {
            path: self.log.clone(),
            source,
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .map_err(log_err)?;
        let log2 = log.try_clone().map_err(log_err)?;
        // Not cargo's jobserver or anyone's ARCH/CROSS_COMPILE: the recipe
        // alone decides what is built.
        for var in ["MAKEFLAGS", "MFLAGS", "MAKELEVEL", "ARCH", "CROSS_COMPILE"] {
            cmd.env_remove(var);
        }
        let status = cmd
            .envs(KBUILD_ENV)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .status()
            .map_err(|source| KernelError::Spawn {
                program: cmd.get_program().to_string_lossy().into_owned(),
                source,
            })?;
        if status.success() {
            return Ok(());
        }
        Err(KernelError::StepFailed {
            step: step.to_owned(),
            status,
            log: self.log.clone(),
            tail: tail(&self.log, LOG_TAIL_LINES),
        })
    }
}

/// The last `n` lines of a file (at most its last 64 KiB), for error messages.
/// The last `n` lines of a build log, or why there are none.
fn tail(path: &Path, n: usize) -> String {
    boxlite_protocol::log_tail::log_tail(path, n)
        .unwrap_or_else(|| format!("(nothing to show from {})", path.display()))
}

/// An exclusive `flock` on `path`, held until the file is dropped. Two runs
/// with the same key build one after the other, never in the same tree.
fn lock(path: &Path) -> Result<File, KernelError> {
    crate::artefact::lock_exclusive(path).map_err(|source| KernelError::Lock {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests;
