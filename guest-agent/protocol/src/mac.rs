//! MAC addresses as the host and the guest write them (`02:42:0a:00:00:02`).

use std::fmt;
use std::str::FromStr;

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

/// A string that is not six colon-separated two-digit hex bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "MAC address {0:?} is invalid: expected six colon-separated hex bytes like 02:42:0a:00:00:02"
)]
pub struct InvalidMac(pub String);

impl MacAddr {
    pub fn octets(&self) -> [u8; 6] {
        self.0
    }

    /// A group address (bit 0 of the first byte): never an interface's.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 != 0
    }

    /// 00:00:00:00:00:00, which no interface may have either.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl FromStr for MacAddr {
    type Err = InvalidMac;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = || InvalidMac(s.escape_debug().to_string());
        let mut bytes = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut bytes {
            let part = parts.next().ok_or_else(invalid)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(invalid());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
        }
        if parts.next().is_some() {
            return Err(invalid());
        }
        Ok(MacAddr(bytes))
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_lower_case() {
        let mac: MacAddr = "02:42:0A:7c:00:02".parse().unwrap();
        assert_eq!(mac.octets(), [0x02, 0x42, 0x0a, 0x7c, 0x00, 0x02]);
        assert_eq!(mac.to_string(), "02:42:0a:7c:00:02");
        assert!(!mac.is_multicast() && !mac.is_zero());
        assert!("01:00:5e:00:00:01"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        assert!("00:00:00:00:00:00".parse::<MacAddr>().unwrap().is_zero());
    }

    #[test]
    fn refuses_anything_but_six_hex_pairs() {
        for s in [
            "",
            "02:42:0a:7c:00",
            "02:42:0a:7c:00:02:03",
            "2:42:0a:7c:00:02",
            "002:42:0a:7c:00:2",
            "02-42-0a-7c-00-02",
            "02:42:0a:7c:00:0g",
            "+2:42:0a:7c:00:02",
            "02:42:0a:7c:00:02:",
        ] {
            let e = s.parse::<MacAddr>().unwrap_err();
            assert_eq!(e, InvalidMac(s.to_string()), "{s:?}");
        }
    }
}
