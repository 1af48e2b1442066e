//! Entering the cgroup the shim names: write our pid to `cgroup.procs`.
//!
//! The shim creates the cgroup (cgroup v2 directory, limits set) and passes
//! its path as `cgroup` in the VM config; the VMM moves itself in before any
//! other thread exists, so every vCPU and the event loop are accounted there.

use std::io::Write;
use std::path::Path;

use super::JailError;

/// Moves the calling process into the cgroup at `dir`.
pub fn enter(dir: &Path) -> Result<(), JailError> {
    let procs = dir.join("cgroup.procs");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&procs)
        .map_err(|e| JailError::Cgroup(dir.to_path_buf(), e))?;
    // One write(2), as the cgroup interface wants; "0" is the writer.
    f.write_all(b"0\n")
        .map_err(|e| JailError::Cgroup(dir.to_path_buf(), e))?;
    tracing::info!(cgroup = %dir.display(), "entered cgroup");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_cgroup_is_an_error_naming_it() {
        let err = enter(Path::new("/nonexistent/boxlite-cg")).expect_err("missing");
        assert!(err.to_string().contains("/nonexistent/boxlite-cg"), "{err}");
    }
}
