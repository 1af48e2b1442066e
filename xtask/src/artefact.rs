//! Installing build artefacts atomically: written to a temporary file in the
//! destination directory, flushed to disk, then renamed over the destination.
//! An interrupted build leaves at most a stray temporary file, never a
//! half-written artefact under its real name.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum ArtefactError {
    #[error("cannot create directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create a temporary file in {dir}")]
    CreateTemp {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot rename the temporary file to {path}")]
    Rename {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// Creates `dest` with permission bits `mode` from what `fill` writes.
/// The parent directory is created if needed.
pub fn write_atomic(
    dest: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), ArtefactError> {
    let dir = match dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    fs::create_dir_all(dir).map_err(|source| ArtefactError::CreateDir {
        path: dir.to_owned(),
        source,
    })?;
    let mut temp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|source| ArtefactError::CreateTemp {
            dir: dir.to_owned(),
            source,
        })?;
    let write_err = |source| ArtefactError::Write {
        path: dest.to_owned(),
        source,
    };
    fill(temp.as_file_mut()).map_err(write_err)?;
    let file = temp.as_file();
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(write_err)?;
    file.sync_all().map_err(write_err)?;
    temp.persist(dest).map_err(|e| ArtefactError::Rename {
        path: dest.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// Copies `src` to `dest` atomically, with permission bits `mode`.
pub fn copy_atomic(src: &Path, dest: &Path, mode: u32) -> Result<(), ArtefactError> {
    let mut input = File::open(src).map_err(|source| ArtefactError::Read {
        path: src.to_owned(),
        source,
    })?;
    write_atomic(dest, mode, |out| io::copy(&mut input, out).map(|_| ()))
}

/// An exclusive `flock` on `path` (created if missing), held until the
/// returned file is dropped: cache entries are built by one process at a
/// time, and a waiting one says so on stderr.
pub fn lock_exclusive(path: &Path) -> io::Result<File> {
    use std::os::fd::AsRawFd;
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)?;
    // SAFETY: flock on a file descriptor we own and keep open; no memory is shared.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        eprintln!("waiting for another build holding {}", path.display());
        // SAFETY: as above; this call blocks until the other holder is done.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_fill_leaves_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let dest = dir.path().join("sub/artefact");
        let err = write_atomic(&dest, 0o644, |_| Err(io::Error::other("boom"))).unwrap_err();
        assert!(err.to_string().contains("artefact"), "{err}");
        assert!(!dest.exists());
        let left = fs::read_dir(dir.path().join("sub"))
            .expect("read_dir")
            .count();
        assert_eq!(left, 0);
    }

    #[test]
    fn copy_sets_contents_and_mode() {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        fs::write(&src, b"kernel").expect("write src");
        let dest = dir.path().join("dest");
        copy_atomic(&src, &dest, 0o644).expect("copy");
        copy_atomic(&src, &dest, 0o644).expect("copy over an existing file");
        assert_eq!(fs::read(&dest).expect("read"), b"kernel");
        let mode = fs::metadata(&dest).expect("stat").permissions().mode();
        assert_eq!(mode & 0o7777, 0o644);
    }
}
