//! ReadFile: a bounded read of one guest file, for debugging and for the
//! host to fetch small guest state (logs, /proc files).

use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;

use boxlite_protocol::READ_FILE_MAX_LEN;

use crate::config::Config;
use crate::paths::{guest_path, PathError};

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error("read file {path} failed")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("read file {path} failed: it is a {kind}, not a regular file")]
    NotRegular { path: PathBuf, kind: &'static str },
    #[error("read file {path} failed")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl FileError {
    /// The I/O error behind an open or read failure, if any.
    pub fn io_kind(&self) -> Option<std::io::ErrorKind> {
        match self {
            FileError::Open { source, .. } | FileError::Read { source, .. } => Some(source.kind()),
            _ => None,
        }
    }
}

/// A validated ReadFile request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadFileRequest {
    pub path: PathBuf,
    /// At most this many bytes are returned (1..=READ_FILE_MAX_LEN).
    pub max_len: usize,
}

impl ReadFileRequest {
    /// `max_len` 0 or above the protocol limit means the limit.
    pub fn validate(path: &str, max_len: u32) -> Result<Self, FileError> {
        let path = guest_path("path", path)?;
        let max_len = if max_len == 0 || max_len > READ_FILE_MAX_LEN {
            READ_FILE_MAX_LEN
        } else {
            max_len
        };
        Ok(ReadFileRequest {
            path,
            max_len: usize::try_from(max_len).unwrap_or(usize::MAX),
        })
    }
}

/// Reads up to `max_len` bytes; the flag says whether the file had more.
/// Only regular files are read, so a FIFO or a tty cannot hang the call.
pub fn read_file(config: &Config, req: &ReadFileRequest) -> Result<(Vec<u8>, bool), FileError> {
    let real = config.resolve(&req.path);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(&real)
        .map_err(|source| FileError::Open {
            path: req.path.clone(),
            source,
        })?;
    let read_err = |source| FileError::Read {
        path: req.path.clone(),
        source,
    };
    let ft = file.metadata().map_err(read_err)?.file_type();
    if !ft.is_file() {
        let kind = if ft.is_dir() {
            "directory"
        } else if ft.is_fifo() {
            "FIFO"
        } else if ft.is_socket() {
            "socket"
        } else if ft.is_char_device() {
            "character device"
        } else if ft.is_block_device() {
            "block device"
        } else {
            "special file"
        };
        return Err(FileError::NotRegular {
            path: req.path.clone(),
            kind,
        });
    }
    let mut data = Vec::new();
    // One byte more than asked tells whether the file goes on (the size in
    // the inode is 0 for /proc files, so it cannot be trusted).
    let limit = u64::try_from(req.max_len)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    file.take(limit).read_to_end(&mut data).map_err(read_err)?;
    let truncated = data.len() > req.max_len;
    data.truncate(req.max_len);
    Ok((data, truncated))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::host_config_for_tests as host_config;

    #[test]
    fn limits_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let config = host_config(dir.path());
        std::fs::write(dir.path().join("f"), b"hello").unwrap();
        let read =
            |max| read_file(&config, &ReadFileRequest::validate("/f", max).unwrap()).unwrap();
        assert_eq!(read(0), (b"hello".to_vec(), false));
        assert_eq!(read(5), (b"hello".to_vec(), false));
        assert_eq!(read(3), (b"hel".to_vec(), true));
        assert_eq!(
            ReadFileRequest::validate("/f", u32::MAX).unwrap().max_len,
            READ_FILE_MAX_LEN as usize
        );
    }

    #[test]
    fn errors_name_the_guest_path() {
        let dir = tempfile::tempdir().unwrap();
        let config = host_config(dir.path());
        let e = read_file(&config, &ReadFileRequest::validate("/missing", 0).unwrap()).unwrap_err();
        assert_eq!(e.to_string(), "read file /missing failed");
        assert_eq!(e.io_kind(), Some(std::io::ErrorKind::NotFound));
        let e = read_file(&config, &ReadFileRequest::validate("/", 0).unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "read file / failed: it is a directory, not a regular file"
        );
    }

    #[test]
    fn proc_files_are_read_despite_zero_size() {
        let config = Config::guest(None);
        let (data, truncated) = read_file(
            &config,
            &ReadFileRequest::validate("/proc/self/status", 0).unwrap(),
        )
        .unwrap();
        assert!(!truncated);
        assert!(String::from_utf8_lossy(&data).contains("Pid:"));
    }
}
