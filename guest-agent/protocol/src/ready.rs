//! The agent's "I am ready" announcement: once every listener of the agent
//! is up, the guest connects to host port [`READY_VSOCK_PORT`] (the hybrid
//! socket's `<uds>_1027` listener), writes one line and closes.
//!
//! Why the guest speaks first: a host connection that reaches
//! vhost-device-vsock between QEMU handing it the guest memory and the
//! guest driver enabling the RX queue makes its worker thread fail and stop
//! for good (every later `CONNECT` is accepted by the kernel and never
//! answered). A guest connection can only exist once the queues run, so the
//! host makes its first `CONNECT` after the announcement and never hits
//! that window. It also spares the host from polling a booting guest.
//!
//! The line is `BOXLITE-READY <protocol version> <agent version>\n`.

/// Host vsock port the agent announces itself on.
pub const READY_VSOCK_PORT: u32 = 1027;

/// First word of the announcement line.
const MAGIC: &str = "BOXLITE-READY";

/// Longest announcement line a host accepts (the newline included).
pub const MAX_LINE_LEN: usize = 128;

/// What the agent announced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    pub protocol_version: u32,
    pub agent_version: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnnouncementError {
    #[error("the announcement does not end with a newline within {MAX_LINE_LEN} bytes")]
    NoNewline,
    #[error("the announcement is not UTF-8")]
    NotUtf8,
    #[error(
        "the announcement {0:?} does not have the form \"BOXLITE-READY <protocol> <version>\""
    )]
    Malformed(String),
}

impl Announcement {
    /// The line the agent writes.
    pub fn encode(&self) -> String {
        format!("{MAGIC} {} {}\n", self.protocol_version, self.agent_version)
    }

    /// Parses what the host read: one line ending in `\n`.
    pub fn parse(bytes: &[u8]) -> Result<Self, AnnouncementError> {
        let line = match bytes.iter().position(|b| *b == b'\n') {
            Some(end) if end < MAX_LINE_LEN => &bytes[..end],
            _ => return Err(AnnouncementError::NoNewline),
        };
        let line = std::str::from_utf8(line).map_err(|_| AnnouncementError::NotUtf8)?;
        let malformed = || AnnouncementError::Malformed(line.to_owned());
        let mut words = line.split(' ');
        if words.next() != Some(MAGIC) {
            return Err(malformed());
        }
        let protocol_version = words
            .next()
            .and_then(|w| w.parse().ok())
            .ok_or_else(malformed)?;
        let agent_version = words
            .next()
            .filter(|w| !w.is_empty())
            .ok_or_else(malformed)?;
        if words.next().is_some() {
            return Err(malformed());
        }
        Ok(Announcement {
            protocol_version,
            agent_version: agent_version.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let a = Announcement {
            protocol_version: 1,
            agent_version: "0.1.0".into(),
        };
        assert_eq!(a.encode(), "BOXLITE-READY 1 0.1.0\n");
        assert_eq!(Announcement::parse(a.encode().as_bytes()), Ok(a));
    }

    #[test]
    fn refuses_what_is_not_an_announcement() {
        for (input, want) in [
            (&b"BOXLITE-READY 1 0.1.0"[..], AnnouncementError::NoNewline),
            (&[b'x'; 200][..], AnnouncementError::NoNewline),
            (&b"\xff\xfe\n"[..], AnnouncementError::NotUtf8),
            (
                &b"HELLO 1 0.1.0\n"[..],
                AnnouncementError::Malformed("HELLO 1 0.1.0".into()),
            ),
            (
                &b"BOXLITE-READY one 0.1.0\n"[..],
                AnnouncementError::Malformed("BOXLITE-READY one 0.1.0".into()),
            ),
            (
                &b"BOXLITE-READY 1\n"[..],
                AnnouncementError::Malformed("BOXLITE-READY 1".into()),
            ),
            (
                &b"BOXLITE-READY 1 0.1.0 extra\n"[..],
                AnnouncementError::Malformed("BOXLITE-READY 1 0.1.0 extra".into()),
            ),
        ] {
            assert_eq!(Announcement::parse(input), Err(want), "{input:?}");
        }
    }
}
