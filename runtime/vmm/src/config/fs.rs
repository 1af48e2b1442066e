//! The `fs` device entry of the VM config: its validation (the schema is
//! `boxlite_vmm_api::config::FsConfig`).

use super::{check_socket_path, ConfigError, FsConfig, Validate};
use crate::devices::virtio::fs::{MAX_SOCKET_PATH_LEN, TAG_LEN};

impl Validate for FsConfig {
    type Error = ConfigError;

    /// Checks the tag and the socket path.
    fn validate(&self) -> Result<(), ConfigError> {
        let got = self.tag.len();
        if got == 0 || got > TAG_LEN || self.tag.contains('\0') {
            return Err(ConfigError::FsTag {
                tag: self.tag.clone(),
                got,
                max: TAG_LEN,
            });
        }
        check_socket_path("fs socket_path", &self.socket_path, MAX_SOCKET_PATH_LEN)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::test_json::{only_device, refused};
    use crate::config::{DeviceConfig, VmConfig};

    #[test]
    fn parses_and_validates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("fs-share0.sock");
        let device = only_device(&format!(
            r#"{{"kind": "fs", "tag": "share0", "socket_path": "{}"}}"#,
            sock.display()
        ));
        let DeviceConfig::Fs(f) = &device else {
            panic!("not fs: {device:?}");
        };
        f.validate().expect("valid");

        refused(
            r#"{"kind": "fs", "tag": "a", "socket_path": "/x", "cache": "auto"}"#,
            "unknown field",
        );
        refused(r#"{"kind": "fs", "tag": "a"}"#, "socket_path");

        let with_tag = |tag: &str| FsConfig {
            tag: tag.to_string(),
            socket_path: sock.clone(),
        };
        with_tag(&"t".repeat(TAG_LEN)).validate().expect("36 bytes");
        assert_eq!(
            with_tag("").validate().expect_err("empty").to_string(),
            "fs tag = \"\" is 0 bytes long, it must be 1..=36 bytes without NUL"
        );
        let e = with_tag(&"t".repeat(37)).validate().expect_err("37");
        assert!(e.to_string().contains("is 37 bytes long"), "{e}");
        // 36 bytes, but 12 three-byte characters = 36; 13 would be 39.
        let e = with_tag(&"€".repeat(13))
            .validate()
            .expect_err("utf-8 bytes");
        assert!(e.to_string().contains("39 bytes"), "{e}");
        assert!(matches!(
            with_tag("a\0b").validate(),
            Err(ConfigError::FsTag { .. })
        ));

        let long = FsConfig {
            tag: "share0".into(),
            socket_path: PathBuf::from(format!("/{}", "s".repeat(MAX_SOCKET_PATH_LEN))),
        };
        let e = long.validate().expect_err("long").to_string();
        assert!(e.contains("it must be 1..=107 bytes"), "{e}");
        let nodir = FsConfig {
            tag: "share0".into(),
            socket_path: "/nonexistent-dir/fs.sock".into(),
        };
        assert_eq!(
            nodir.validate().unwrap_err().to_string(),
            "fs socket_path = /nonexistent-dir/fs.sock has no parent directory that exists"
        );
    }

    #[test]
    fn duplicate_tags_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("guest.bin");
        std::fs::write(&img, [0xf4u8]).expect("image");
        let json = format!(
            r#"{{"irqchip": false, "sandbox_dir": "{d}",
                "raw_image": {{"path": "{img}", "load_addr": 4096}},
                "devices": [
                  {{"kind": "fs", "tag": "share0", "socket_path": "{d}/a.sock"}},
                  {{"kind": "fs", "tag": "share1", "socket_path": "{d}/b.sock"}},
                  {{"kind": "fs", "tag": "share0", "socket_path": "{d}/c.sock"}}]}}"#,
            img = img.display(),
            d = dir.path().display()
        );
        let mut cfg: VmConfig = serde_json::from_str(&json).expect("parse");
        assert_eq!(
            cfg.validate().expect_err("duplicate").to_string(),
            "fs tag = \"share0\" is used by more than one fs device"
        );
        cfg.devices.pop();
        cfg.validate().expect("two distinct tags");
    }
}
