//! The lock files the runtime's shared state on the host is changed
//! under (the jail uid leases, each template's capture): opened here,
//! `flock`ed by their users, never removed (removing one would race with
//! a process about to lock it).

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Opens (creating, 0600) the lock file `path`; a symlink there is refused.
pub fn open_lock_file(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}
