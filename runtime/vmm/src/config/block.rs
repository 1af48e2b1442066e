//! The `block` device entry of the VM config: its validation (the schema
//! is `boxlite_vmm_api::config::BlockConfig`).

use std::path::PathBuf;

use super::{BlockConfig, Validate};
use crate::devices::virtio::block::ID_BYTES;

/// Errors of a `block` entry.
#[derive(Debug, thiserror::Error)]
pub enum BlockConfigError {
    #[error("block path = {0} does not exist or is not a regular file")]
    MissingFile(PathBuf),
    #[error("block id = {id:?} is {got} bytes long, the limit is {max}")]
    IdTooLong { id: String, got: usize, max: usize },
}

impl Validate for BlockConfig {
    type Error = BlockConfigError;

    /// Checks the file and the id length.
    fn validate(&self) -> Result<(), BlockConfigError> {
        if !self.path.is_file() {
            return Err(BlockConfigError::MissingFile(self.path.clone()));
        }
        if self.id.len() > ID_BYTES {
            return Err(BlockConfigError::IdTooLong {
                id: self.id.clone(),
                got: self.id.len(),
                max: ID_BYTES,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_json::{only_device, refused};
    use crate::config::DeviceConfig;

    #[test]
    fn parses_and_validates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("disk.img");
        std::fs::write(&img, vec![0u8; 4096]).expect("write");
        let device = only_device(&format!(
            r#"{{"kind": "block", "path": "{}", "read_only": true, "id": "disk0"}}"#,
            img.display()
        ));
        let DeviceConfig::Block(b) = &device else {
            panic!("not block: {device:?}");
        };
        assert!(b.read_only);
        assert_eq!(b.id, "disk0");
        b.validate().expect("valid");

        assert_eq!(
            only_device(&format!(
                r#"{{"kind": "block", "path": "{}"}}"#,
                img.display()
            )),
            DeviceConfig::Block(BlockConfig {
                path: img.clone(),
                read_only: false,
                id: String::new()
            })
        );
        refused(
            r#"{"kind": "block", "path": "/x", "readonly": true}"#,
            "unknown field",
        );

        let long = BlockConfig {
            path: img.clone(),
            read_only: false,
            id: "x".repeat(21),
        };
        assert_eq!(
            long.validate().expect_err("long id").to_string(),
            format!(
                "block id = {:?} is 21 bytes long, the limit is 20",
                "x".repeat(21)
            )
        );
        let missing = BlockConfig {
            path: dir.path().join("nope.img"),
            read_only: false,
            id: String::new(),
        };
        assert!(matches!(
            missing.validate(),
            Err(BlockConfigError::MissingFile(_))
        ));
        let a_dir = BlockConfig {
            path: dir.path().to_path_buf(),
            read_only: false,
            id: String::new(),
        };
        assert!(matches!(
            a_dir.validate(),
            Err(BlockConfigError::MissingFile(_))
        ));
    }
}
