//! The static guest agent: built for the gnu target with `+crt-static` and
//! checked to have no program interpreter, because the initramfs holds no
//! dynamic loader or libraries.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::elf::{self, ElfError, Linkage};

pub const AGENT_PACKAGE: &str = "boxlite-agent";
pub const AGENT_BINARY: &str = "boxlite-agent";
pub const AGENT_TARGET: &str = "x86_64-unknown-linux-gnu";
pub const STATIC_RUSTFLAGS: &str = "-C target-feature=+crt-static";

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot run {cargo}")]
    Spawn {
        cargo: String,
        #[source]
        source: io::Error,
    },
    #[error("cargo build of {AGENT_PACKAGE} failed ({0}); see the compiler output above")]
    Build(std::process::ExitStatus),
    #[error("agent binary {0} was not produced by the build")]
    Missing(PathBuf),
    #[error("cannot inspect agent binary")]
    Inspect(#[source] ElfError),
    #[error(
        "agent binary {path} is dynamically linked (program interpreter {interpreter}); \
         /init must be static: build with RUSTFLAGS=\"{STATIC_RUSTFLAGS}\" and link C \
         libraries statically (e.g. LIBSECCOMP_LINK_TYPE=static)"
    )]
    Dynamic { path: PathBuf, interpreter: String },
    #[error(
        "agent binary {path} has no interpreter but needs shared libraries ({}); \
         /init must be static: link C libraries statically (LIBSECCOMP_LINK_TYPE=static)",
        libraries.join(", ")
    )]
    NeedsLibraries {
        path: PathBuf,
        libraries: Vec<String>,
    },
}

/// Environment that makes C dependencies link statically: libcontainer's
/// seccomp support links libseccomp, dynamically unless told otherwise
/// (Debian's libseccomp-dev ships the static archive here).
pub const STATIC_C_LIBS_ENV: &[(&str, &str)] = &[
    ("LIBSECCOMP_LINK_TYPE", "static"),
    ("LIBSECCOMP_LIB_PATH", "/usr/lib/x86_64-linux-gnu"),
];

/// The cargo that runs xtask (`$CARGO`), else `cargo` from PATH.
pub fn cargo_program() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}

/// Builds the agent with `cargo build --release --target x86_64-unknown-linux-gnu`
/// and `+crt-static` into `<workspace>/target`, and returns the checked binary.
/// Cargo's output goes to this process's stderr.
pub fn build(workspace: &Path) -> Result<PathBuf, AgentError> {
    let cargo = cargo_program();
    let target_dir = workspace.join("target");
    // RUSTFLAGS with --target applies to the agent only, not to build scripts
    // and proc macros, which stay dynamic host binaries.
    let rustflags = match std::env::var("RUSTFLAGS") {
        Ok(extra) if !extra.trim().is_empty() => format!("{STATIC_RUSTFLAGS} {extra}"),
        _ => STATIC_RUSTFLAGS.to_owned(),
    };
    eprintln!("agent: cargo build --release -p {AGENT_PACKAGE} --target {AGENT_TARGET} (RUSTFLAGS=\"{rustflags}\")");
    let status = Command::new(&cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            AGENT_PACKAGE,
            "--target",
            AGENT_TARGET,
        ])
        .env("RUSTFLAGS", &rustflags)
        .envs(STATIC_C_LIBS_ENV.iter().copied())
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env("CARGO_TARGET_DIR", &target_dir)
        .status()
        .map_err(|source| AgentError::Spawn {
            cargo: cargo.clone(),
            source,
        })?;
    if !status.success() {
        return Err(AgentError::Build(status));
    }
    let binary = target_dir
        .join(AGENT_TARGET)
        .join("release")
        .join(AGENT_BINARY);
    if !binary.is_file() {
        return Err(AgentError::Missing(binary));
    }
    check_static(&binary)?;
    Ok(binary)
}

/// Fails unless `path` is an ELF executable without a program interpreter
/// and without shared-library dependencies.
pub fn check_static(path: &Path) -> Result<(), AgentError> {
    match elf::linkage(path).map_err(AgentError::Inspect)? {
        Linkage::Static => Ok(()),
        Linkage::Dynamic { interpreter } => Err(AgentError::Dynamic {
            path: path.to_owned(),
            interpreter,
        }),
        Linkage::NeedsLibraries { libraries } => Err(AgentError::NeedsLibraries {
            path: path.to_owned(),
            libraries,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_binary_is_refused_with_its_interpreter() {
        let exe = std::env::current_exe().expect("current_exe");
        let err = check_static(&exe).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, AgentError::Dynamic { .. }), "{msg}");
        assert!(msg.contains(&exe.display().to_string()), "{msg}");
        assert!(msg.contains("ld-linux"), "{msg}");
    }
}
