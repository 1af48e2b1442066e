//! The landlock ruleset: read-only boot files and disks, read-write sandbox
//! directory and sockets, nothing else; no TCP; scoped abstract unix
//! sockets and signals.
//!
//! Requested at ABI v6 in best-effort mode, so older kernels enforce what
//! they know (v1: files, v3: truncate, v4: TCP, v6: scopes); a kernel
//! without landlock at all is an error ([`JailError::LandlockNotEnforced`]).

use std::path::Path;

use landlock::{
    path_beneath_rules, Access, AccessFs, AccessNet, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, RulesetStatus, Scope, ABI,
};

use super::{JailError, JailPolicy};

/// The landlock ABI we ask for (best effort below it).
pub const LANDLOCK_ABI: ABI = ABI::V6;

fn check(p: &Path) -> Result<(), JailError> {
    std::fs::metadata(p)
        .map(|_| ())
        .map_err(|e| JailError::LandlockPath(p.to_path_buf(), e))
}

/// Restricts the calling thread (and the threads it spawns later) to
/// `policy`: [`prepare`] then [`enforce`].
pub fn restrict_self(policy: &JailPolicy) -> Result<RulesetStatus, JailError> {
    enforce(prepare(policy)?)
}

/// Builds the ruleset, opening every path of `policy` now: the jail
/// prepares it before `pivot_root`, after which those paths no longer
/// resolve, and enforces it after (a landlocked thread may not pivot).
pub fn prepare(policy: &JailPolicy) -> Result<RulesetCreated, JailError> {
    let abi = LANDLOCK_ABI;
    for p in policy.read_only.iter().chain(&policy.read_write) {
        check(p)?;
    }
    Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .and_then(|r| r.handle_access(AccessNet::from_all(abi)))
        .and_then(|r| r.scope(Scope::from_all(abi)))
        .and_then(|r| r.create())
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                &policy.read_only,
                AccessFs::from_read(abi),
            ))
        })
        .and_then(|r| {
            r.add_rules(path_beneath_rules(
                &policy.read_write,
                AccessFs::from_all(abi),
            ))
        })
        .map_err(JailError::Landlock)
}

/// Applies a prepared ruleset to the calling thread (and the threads it
/// spawns later). Also sets `no_new_privs`.
pub fn enforce(ruleset: RulesetCreated) -> Result<RulesetStatus, JailError> {
    let status = ruleset.restrict_self().map_err(JailError::Landlock)?;
    match status.ruleset {
        RulesetStatus::NotEnforced => Err(JailError::LandlockNotEnforced),
        s => {
            if s == RulesetStatus::PartiallyEnforced {
                tracing::warn!("landlock is only partially enforced by this kernel (older ABI)");
            }
            Ok(s)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    #[test]
    fn only_the_allowed_set_can_be_opened() {
        let outside = tempfile::tempdir().expect("tempdir");
        let secret = outside.path().join("secret");
        std::fs::write(&secret, "no").expect("write");
        let sandbox = tempfile::tempdir().expect("tempdir");
        let kernel = outside.path().join("vmlinux");
        std::fs::write(&kernel, "kernel").expect("write");
        let policy = JailPolicy {
            read_only: vec![kernel.clone()],
            read_write: vec![sandbox.path().to_path_buf()],
            ..Default::default()
        };
        let sb = sandbox.path().to_path_buf();
        // Landlock applies to the calling thread only: use a throwaway one.
        let r = std::thread::spawn(move || {
            restrict_self(&policy).expect("landlock");
            let denied = std::fs::read(&secret).expect_err("outside the ruleset");
            let etc = std::fs::read("/etc/hostname").expect_err("outside the ruleset");
            let kernel_read = std::fs::read(&kernel).expect("kernel is readable");
            let kernel_write = std::fs::OpenOptions::new()
                .write(true)
                .open(&kernel)
                .expect_err("kernel is read-only");
            std::fs::write(sb.join("state.json"), "{}").expect("sandbox dir is writable");
            std::fs::remove_file(sb.join("state.json")).expect("and removable");
            let tcp = std::net::TcpListener::bind("127.0.0.1:0").map(|_| ());
            (
                denied.kind(),
                etc.kind(),
                kernel_read,
                kernel_write.kind(),
                tcp,
            )
        })
        .join()
        .expect("join");
        assert_eq!(r.0, ErrorKind::PermissionDenied);
        assert_eq!(r.1, ErrorKind::PermissionDenied);
        assert_eq!(r.2, b"kernel");
        assert_eq!(r.3, ErrorKind::PermissionDenied);
        assert_eq!(
            r.4.expect_err("no TCP bind").kind(),
            ErrorKind::PermissionDenied
        );
        // This thread is not restricted.
        std::fs::read(outside.path().join("secret")).expect("unrestricted thread");
    }

    #[test]
    fn a_missing_path_is_named() {
        let policy = JailPolicy {
            read_only: vec!["/nonexistent/vmlinux".into()],
            ..Default::default()
        };
        let err = std::thread::spawn(move || restrict_self(&policy).map(|_| ()))
            .join()
            .expect("join")
            .expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/vmlinux"), "{err}");
    }
}
