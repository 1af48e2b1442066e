//! Validation of guest paths that arrive in requests.
//!
//! Every path the host names must be absolute, free of `..` components and
//! NUL bytes, and at most [`MAX_PATH_LEN`] bytes long. In host mode such a
//! path is then resolved under `--root` ([`crate::config::Config::resolve`]);
//! refusing `..` keeps it there.

use std::path::{Component, Path, PathBuf};

/// Longest path accepted in a request (Linux PATH_MAX).
pub const MAX_PATH_LEN: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PathError {
    #[error("{field} is empty")]
    Empty { field: &'static str },
    #[error("{field} {path:?} is not an absolute path")]
    NotAbsolute { field: &'static str, path: String },
    #[error("{field} {path:?} contains a \"..\" component")]
    ParentComponent { field: &'static str, path: String },
    #[error("{field} {path:?} contains a NUL byte")]
    Nul { field: &'static str, path: String },
    #[error("{field} is {len} bytes long, the limit is {MAX_PATH_LEN}")]
    TooLong { field: &'static str, len: usize },
}

/// Checks a guest path from a request; `field` names it in errors.
pub fn guest_path(field: &'static str, path: &str) -> Result<PathBuf, PathError> {
    if path.is_empty() {
        return Err(PathError::Empty { field });
    }
    if path.len() > MAX_PATH_LEN {
        return Err(PathError::TooLong {
            field,
            len: path.len(),
        });
    }
    if path.contains('\0') {
        return Err(PathError::Nul {
            field,
            path: path.escape_debug().to_string(),
        });
    }
    let p = Path::new(path);
    if !p.is_absolute() {
        return Err(PathError::NotAbsolute {
            field,
            path: path.to_string(),
        });
    }
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(PathError::ParentComponent {
            field,
            path: path.to_string(),
        });
    }
    Ok(p.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_absolute_paths() {
        assert_eq!(
            guest_path("path", "/etc/hosts").unwrap(),
            PathBuf::from("/etc/hosts")
        );
        assert_eq!(
            guest_path("path", "/a/./b/").unwrap(),
            PathBuf::from("/a/./b/")
        );
    }

    #[test]
    fn rejects_bad_paths_naming_the_field() {
        let cases = [
            ("", "path is empty"),
            ("etc/hosts", "path \"etc/hosts\" is not an absolute path"),
            ("/a/../etc", "contains a \"..\" component"),
            ("/a\0b", "contains a NUL byte"),
        ];
        for (input, want) in cases {
            let e = guest_path("path", input).unwrap_err().to_string();
            assert!(e.contains(want), "{input:?}: {e}");
        }
        let long = format!("/{}", "a".repeat(MAX_PATH_LEN));
        assert!(matches!(
            guest_path("path", &long),
            Err(PathError::TooLong { .. })
        ));
    }
}
