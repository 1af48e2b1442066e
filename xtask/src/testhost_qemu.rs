//! QEMU for the nested test host (`cargo xtask testhost --with-qemu`): the
//! Debian `qemu-system-x86_64` of the outer machine with every shared
//! library `ldd` lists, the dynamic loader, and the firmware `-M microvm`
//! opens to boot a PVH kernel. Only the benchmark's test host carries it
//! (docs/benchmarks.md, "Boot → agent ready inside the nested test host"):
//! it adds ~50 MB that the test suite's host would unpack for nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::initramfs::Initramfs;

/// Where QEMU sits in the test host. QEMU finds its firmware relative to
/// its own binary (`<bindir>/../share/qemu`), so the two must agree.
pub const QEMU_PATH: &str = "/usr/bin/qemu-system-x86_64";
/// What `-M microvm` with `-kernel <PVH vmlinux>` opens (seen with
/// `strace -e openat`): the qboot firmware and the PVH option ROM.
const FIRMWARE: [&str; 2] = ["/usr/share/qemu/qboot.rom", "/usr/share/qemu/pvh.bin"];

#[derive(Debug, thiserror::Error)]
pub enum QemuPayloadError {
    #[error("qemu-system-x86_64 is not in PATH (apt-get install qemu-system-x86)")]
    NotFound,
    #[error("cannot run ldd on {0}")]
    Ldd(PathBuf, #[source] std::io::Error),
    #[error("ldd {0} failed: {1}")]
    LddFailed(PathBuf, String),
    #[error("{0} is missing (QEMU's microvm firmware; apt-get install qemu-system-data)")]
    Firmware(PathBuf),
}

/// The first `qemu-system-x86_64` in `PATH`.
pub fn find_qemu() -> Result<PathBuf, QemuPayloadError> {
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|p| p.is_file())
        .ok_or(QemuPayloadError::NotFound)
}

/// The absolute paths in `ldd` output: `name => /path (addr)` lines and the
/// loader's `/lib64/ld-linux-x86-64.so.2 (addr)`; the vDSO has none.
pub fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let resolved = match line.split_once("=>") {
                Some((_, rest)) => rest.split_whitespace().next(),
                None => line.split_whitespace().next(),
            };
            resolved.filter(|p| p.starts_with('/')).map(PathBuf::from)
        })
        .collect()
}

/// Adds QEMU, its libraries (at the paths the loader looks them up by)
/// and its microvm firmware to `initramfs`.
pub fn add_qemu(initramfs: Initramfs, qemu: &Path) -> Result<Initramfs, QemuPayloadError> {
    let out = Command::new("ldd")
        .arg(qemu)
        .output()
        .map_err(|e| QemuPayloadError::Ldd(qemu.to_owned(), e))?;
    if !out.status.success() {
        return Err(QemuPayloadError::LddFailed(
            qemu.to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        ));
    }
    let listing = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = listing.lines().find(|l| l.contains("not found")) {
        return Err(QemuPayloadError::LddFailed(
            qemu.to_owned(),
            line.trim().to_owned(),
        ));
    }
    let mut initramfs = initramfs.file(QEMU_PATH, qemu, 0o755);
    for lib in parse_ldd(&listing) {
        // The host path may be a symlink (libz.so.1 → libz.so.1.2.13): the
        // archive gets the file's bytes under the name the loader asks for.
        let dest = lib.to_string_lossy().into_owned();
        initramfs = initramfs.file(&dest, lib, 0o755);
    }
    for fw in FIRMWARE {
        let path = Path::new(fw);
        if !path.is_file() {
            return Err(QemuPayloadError::Firmware(path.to_owned()));
        }
        initramfs = initramfs.file(fw, path, 0o644);
    }
    Ok(initramfs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_lines() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f01)\n\
                    \tlibmissing.so => not found\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f02)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
    }
}
