//! The `net` device entry of the VM config: its validation (the schema is
//! `boxlite_vmm_api::config::NetConfig`).

use boxlite_protocol::mac::MacAddr;

use super::{NetConfig, Validate};
use crate::devices::virtio::net::tap::MAX_TAP_NAME_LEN;

/// Errors of a `net` entry.
#[derive(Debug, thiserror::Error)]
pub enum NetConfigError {
    #[error("Exactly one of net tap_fd and tap_name must be set (tap_fd: {fd}, tap_name: {name})")]
    TapSource { fd: bool, name: bool },
    #[error("net tap_fd = {0} is out of range 3..={max}", max = i32::MAX)]
    TapFd(i32),
    #[error("net tap_name = {name:?} must be 1..={max} bytes without '/', whitespace or NUL")]
    TapName { name: String, max: usize },
    #[error("net mac = {0:?} is not a unicast address of the form xx:xx:xx:xx:xx:xx")]
    Mac(String),
}

/// Parses the MAC with the project's one parser (`boxlite_protocol::mac`)
/// and refuses what no interface may have: multicast and all-zero.
fn unicast_mac(s: &str) -> Result<[u8; 6], NetConfigError> {
    match s.parse::<MacAddr>() {
        Ok(mac) if !mac.is_multicast() && !mac.is_zero() => Ok(mac.octets()),
        _ => Err(NetConfigError::Mac(s.to_string())),
    }
}

impl Validate for NetConfig {
    type Error = NetConfigError;

    /// Checks the tap source and the MAC address.
    fn validate(&self) -> Result<(), NetConfigError> {
        match (&self.tap_fd, &self.tap_name) {
            (Some(fd), None) => {
                if *fd < 3 {
                    return Err(NetConfigError::TapFd(*fd));
                }
            }
            (None, Some(name)) => {
                let ok = !name.is_empty()
                    && name.len() <= MAX_TAP_NAME_LEN
                    && !name
                        .chars()
                        .any(|c| c == '/' || c == '\0' || c.is_whitespace());
                if !ok {
                    return Err(NetConfigError::TapName {
                        name: name.clone(),
                        max: MAX_TAP_NAME_LEN,
                    });
                }
            }
            (fd, name) => {
                return Err(NetConfigError::TapSource {
                    fd: fd.is_some(),
                    name: name.is_some(),
                })
            }
        }
        if let Some(m) = &self.mac {
            unicast_mac(m)?;
        }
        Ok(())
    }
}

/// The parsed MAC address of a net entry (call after validating it).
pub fn mac_bytes(net: &NetConfig) -> Result<Option<[u8; 6]>, NetConfigError> {
    net.mac.as_deref().map(unicast_mac).transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeviceConfig, VmConfig};

    fn net(fd: Option<i32>, name: Option<&str>, mac: Option<&str>) -> NetConfig {
        NetConfig {
            tap_fd: fd,
            tap_name: name.map(str::to_string),
            mac: mac.map(str::to_string),
        }
    }

    #[test]
    fn parses_and_validates() {
        let cfg: VmConfig = serde_json::from_str(
            r#"{"devices": [{"kind": "net", "tap_fd": 5, "mac": "02:AB:cd:00:00:01"}, {"kind": "net", "tap_name": "tap0"}]}"#,
        )
        .expect("parse");
        let DeviceConfig::Net(n) = &cfg.devices[0] else {
            panic!("not net: {:?}", cfg.devices[0]);
        };
        n.validate().expect("valid");
        assert_eq!(
            mac_bytes(n).expect("mac"),
            Some([0x02, 0xab, 0xcd, 0, 0, 1])
        );
        let DeviceConfig::Net(n) = &cfg.devices[1] else {
            panic!("not net");
        };
        n.validate().expect("valid");
        assert_eq!(mac_bytes(n).expect("no mac"), None);

        let err = serde_json::from_str::<VmConfig>(
            r#"{"devices": [{"kind": "net", "tap_fd": 5, "vlan": 1}]}"#,
        )
        .expect_err("unknown field");
        assert!(err.to_string().contains("unknown field"), "{err}");

        assert_eq!(
            net(Some(5), Some("tap0"), None)
                .validate()
                .expect_err("both")
                .to_string(),
            "Exactly one of net tap_fd and tap_name must be set (tap_fd: true, tap_name: true)"
        );
        assert!(matches!(
            net(None, None, None).validate(),
            Err(NetConfigError::TapSource { .. })
        ));
        assert_eq!(
            net(Some(2), None, None)
                .validate()
                .expect_err("fd")
                .to_string(),
            "net tap_fd = 2 is out of range 3..=2147483647"
        );
        for name in ["", "a-very-long-tap-name", "ta/p", "tap 0"] {
            assert!(
                matches!(
                    net(None, Some(name), None).validate(),
                    Err(NetConfigError::TapName { .. })
                ),
                "{name:?}"
            );
        }
        for mac in [
            "02:00:00:00:00",
            "02:00:00:00:00:00:00",
            "0g:00:00:00:00:01",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "2:0:0:0:0:1",
        ] {
            assert!(
                matches!(
                    net(Some(3), None, Some(mac)).validate(),
                    Err(NetConfigError::Mac(_))
                ),
                "{mac}"
            );
        }
    }
}
