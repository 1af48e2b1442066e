//! The `vsock` device entry of the VM config: its validation (the schema
//! is `boxlite_vmm_api::config::VsockConfig`).

use super::{check_socket_path, ConfigError, Validate, VsockConfig};
use crate::devices::virtio::vsock::{MAX_GUEST_CID, MAX_UDS_PATH_LEN, MIN_GUEST_CID};

impl Validate for VsockConfig {
    type Error = ConfigError;

    /// Checks the CID range, the path length and the directory.
    fn validate(&self) -> Result<(), ConfigError> {
        if !(MIN_GUEST_CID..=MAX_GUEST_CID).contains(&self.guest_cid) {
            return Err(ConfigError::VsockCid {
                got: self.guest_cid,
                min: MIN_GUEST_CID,
                max: MAX_GUEST_CID,
            });
        }
        check_socket_path("vsock uds_path", &self.uds_path, MAX_UDS_PATH_LEN)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::config::test_json::{only_device, refused};
    use crate::config::DeviceConfig;

    #[test]
    fn parses_and_validates() {
        let dir = tempfile::tempdir().expect("tempdir");
        let device = only_device(&format!(
            r#"{{"kind": "vsock", "guest_cid": 3, "uds_path": "{}"}}"#,
            dir.path().join("vsock.sock").display()
        ));
        let DeviceConfig::Vsock(v) = &device else {
            panic!("not vsock: {device:?}");
        };
        v.validate().expect("valid");

        refused(
            r#"{"kind": "vsock", "guest_cid": 3, "uds_path": "/x", "port": 1}"#,
            "unknown field",
        );
        refused(r#"{"kind": "vsock", "guest_cid": 3}"#, "uds_path");

        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let c = VsockConfig {
                guest_cid: cid,
                uds_path: v.uds_path.clone(),
                host_ports: Vec::new(),
            };
            let e = c.validate().expect_err("cid").to_string();
            assert_eq!(
                e,
                format!("vsock guest_cid = {cid} is out of range 3..=4294967294")
            );
        }
        let long = VsockConfig {
            guest_cid: 3,
            uds_path: PathBuf::from(format!("/{}", "a".repeat(MAX_UDS_PATH_LEN))),
            host_ports: Vec::new(),
        };
        let e = long.validate().expect_err("long").to_string();
        assert!(e.contains("it must be 1..=96 bytes"), "{e}");
        let fits = VsockConfig {
            guest_cid: 3,
            uds_path: PathBuf::from(format!("/run/boxlite/{}/vsock.sock", "f".repeat(64))),
            host_ports: Vec::new(),
        };
        assert!(fits.uds_path.as_os_str().len() <= MAX_UDS_PATH_LEN);
        let nodir = VsockConfig {
            guest_cid: 3,
            uds_path: "/nonexistent-dir/vsock.sock".into(),
            host_ports: Vec::new(),
        };
        assert_eq!(
            nodir.validate().unwrap_err().to_string(),
            format!(
                "vsock uds_path = {} has no parent directory that exists",
                nodir.uds_path.display()
            )
        );
    }
}
