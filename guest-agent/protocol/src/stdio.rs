//! The header that opens a process stdio stream.
//!
//! Each stdio stream of a container or exec process is its own vsock
//! connection from the host to [`crate::STDIO_VSOCK_PORT`]. Its first bytes
//! name the process and the stream; the agent answers with an ack and from
//! then on the connection carries the raw bytes of that one stream (stdin:
//! host → guest, stdout/stderr: guest → host). Dedicated streams rather than
//! polling RPCs keep throughput at socket speed.
//!
//! Wire format (integers big-endian):
//!
//! ```text
//! header: magic "BXIO" | version u8 | stream u8 | cid_len u16 | eid_len u16
//!         | container id (cid_len bytes, UTF-8) | exec id (eid_len bytes, UTF-8)
//! ack:    status u8 (0 = ok) | msg_len u16 | message (msg_len bytes, UTF-8)
//! ```
//!
//! An empty exec id names the container's init process. Both ids follow
//! [`crate::ids`]: encoding refuses others, and so does decoding, so the
//! agent never looks up (or logs) a malformed id.

use std::io::Read;

use crate::ids::{self, InvalidId};

/// First four bytes of every stdio header.
pub const MAGIC: [u8; 4] = *b"BXIO";
/// Version of the header layout.
pub const HEADER_VERSION: u8 = 1;
/// Length of the fixed part of the header, before the two ids.
pub const FIXED_LEN: usize = 10;
/// Longest container or exec id: the id rule's limit, which also bounds
/// what a peer's length fields can make the reader allocate.
pub use crate::ids::MAX_ID_LEN;
/// Length of the fixed part of the ack, before the message.
pub const ACK_FIXED_LEN: usize = 3;
/// Longest ack message; longer ones are cut at encode time.
pub const MAX_ACK_MSG_LEN: usize = 1024;

/// Which stream of the process a connection carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamKind {
    Stdin,
    Stdout,
    Stderr,
}

impl StreamKind {
    fn to_byte(self) -> u8 {
        match self {
            StreamKind::Stdin => 0,
            StreamKind::Stdout => 1,
            StreamKind::Stderr => 2,
        }
    }

    fn from_byte(byte: u8) -> Result<Self, StdioHeaderError> {
        match byte {
            0 => Ok(StreamKind::Stdin),
            1 => Ok(StreamKind::Stdout),
            2 => Ok(StreamKind::Stderr),
            other => Err(StdioHeaderError::UnknownStream(other)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StdioHeaderError {
    #[error("stdio header magic is {0:02x?}, expected \"BXIO\"")]
    BadMagic([u8; 4]),
    #[error("stdio header version {0} is not supported (this side speaks {HEADER_VERSION})")]
    UnsupportedVersion(u8),
    #[error("stdio header names unknown stream kind {0}")]
    UnknownStream(u8),
    #[error("stdio header id length {0} exceeds the limit of {MAX_ID_LEN} bytes")]
    IdTooLong(usize),
    #[error("stdio header container id is empty")]
    EmptyContainerId,
    #[error("stdio header id is not valid UTF-8")]
    IdNotUtf8,
    #[error("stdio header names an invalid id")]
    InvalidId(#[source] InvalidId),
    #[error("stdio header is truncated: expected {expected} bytes, got {got}")]
    Truncated { expected: usize, got: usize },
    #[error("stdio stream was refused by the agent: {0}")]
    Refused(String),
    #[error("stdio header I/O failed")]
    Io(#[source] std::sync::Arc<std::io::Error>),
}

impl From<std::io::Error> for StdioHeaderError {
    fn from(e: std::io::Error) -> Self {
        StdioHeaderError::Io(std::sync::Arc::new(e))
    }
}

/// Errors compare by what they say; I/O errors never compare equal.
impl PartialEq for StdioHeaderError {
    fn eq(&self, other: &Self) -> bool {
        !matches!(self, StdioHeaderError::Io(_)) && self.to_string() == other.to_string()
    }
}

/// The fixed part of a header, parsed: tells how many id bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FixedPart {
    pub stream: StreamKind,
    pub container_id_len: usize,
    pub exec_id_len: usize,
}

impl FixedPart {
    /// Number of id bytes that follow the fixed part.
    pub fn ids_len(&self) -> usize {
        self.container_id_len + self.exec_id_len
    }
}

/// A decoded stdio header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamHeader {
    pub stream: StreamKind,
    pub container_id: String,
    /// Empty for the container's init process.
    pub exec_id: String,
}

impl StreamHeader {
    /// Encodes the header; fails on ids the peer would refuse.
    pub fn encode(&self) -> Result<Vec<u8>, StdioHeaderError> {
        check_id_len(self.container_id.len())?;
        check_id_len(self.exec_id.len())?;
        if self.container_id.is_empty() {
            return Err(StdioHeaderError::EmptyContainerId);
        }
        check_ids(&self.container_id, &self.exec_id)?;
        let mut out = Vec::with_capacity(FIXED_LEN + self.container_id.len() + self.exec_id.len());
        out.extend_from_slice(&MAGIC);
        out.push(HEADER_VERSION);
        out.push(self.stream.to_byte());
        // Both lengths were checked against MAX_ID_LEN (< u16::MAX) above.
        out.extend_from_slice(&(self.container_id.len() as u16).to_be_bytes());
        out.extend_from_slice(&(self.exec_id.len() as u16).to_be_bytes());
        out.extend_from_slice(self.container_id.as_bytes());
        out.extend_from_slice(self.exec_id.as_bytes());
        Ok(out)
    }

    /// Parses the fixed part of a header.
    pub fn parse_fixed(bytes: &[u8; FIXED_LEN]) -> Result<FixedPart, StdioHeaderError> {
        let magic = [bytes[0], bytes[1], bytes[2], bytes[3]];
        if magic != MAGIC {
            return Err(StdioHeaderError::BadMagic(magic));
        }
        if bytes[4] != HEADER_VERSION {
            return Err(StdioHeaderError::UnsupportedVersion(bytes[4]));
        }
        let stream = StreamKind::from_byte(bytes[5])?;
        let container_id_len = usize::from(u16::from_be_bytes([bytes[6], bytes[7]]));
        let exec_id_len = usize::from(u16::from_be_bytes([bytes[8], bytes[9]]));
        check_id_len(container_id_len)?;
        check_id_len(exec_id_len)?;
        if container_id_len == 0 {
            return Err(StdioHeaderError::EmptyContainerId);
        }
        Ok(FixedPart {
            stream,
            container_id_len,
            exec_id_len,
        })
    }

    /// Completes a header from its fixed part and the `ids_len()` bytes that
    /// followed it.
    pub fn from_parts(fixed: FixedPart, ids: &[u8]) -> Result<Self, StdioHeaderError> {
        if ids.len() != fixed.ids_len() {
            return Err(StdioHeaderError::Truncated {
                expected: FIXED_LEN + fixed.ids_len(),
                got: FIXED_LEN + ids.len(),
            });
        }
        let (cid, eid) = ids.split_at(fixed.container_id_len);
        let as_string =
            |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| StdioHeaderError::IdNotUtf8);
        let header = StreamHeader {
            stream: fixed.stream,
            container_id: as_string(cid)?,
            exec_id: as_string(eid)?,
        };
        check_ids(&header.container_id, &header.exec_id)?;
        Ok(header)
    }

    /// Decodes a whole header from a byte slice (tests, fuzzing).
    pub fn decode(bytes: &[u8]) -> Result<Self, StdioHeaderError> {
        let fixed_bytes: &[u8; FIXED_LEN] = bytes
            .get(..FIXED_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(StdioHeaderError::Truncated {
                expected: FIXED_LEN,
                got: bytes.len(),
            })?;
        let fixed = Self::parse_fixed(fixed_bytes)?;
        let ids = &bytes[FIXED_LEN..];
        Self::from_parts(fixed, ids)
    }

    /// Reads one header from a blocking reader.
    pub fn read_from(reader: &mut impl Read) -> Result<Self, StdioHeaderError> {
        let mut fixed_bytes = [0u8; FIXED_LEN];
        read_exact_counted(reader, &mut fixed_bytes)?;
        let fixed = Self::parse_fixed(&fixed_bytes)?;
        let mut ids = vec![0u8; fixed.ids_len()];
        read_exact_counted(reader, &mut ids).map_err(|e| match e {
            StdioHeaderError::Truncated { expected, got } => StdioHeaderError::Truncated {
                expected: FIXED_LEN + expected,
                got: FIXED_LEN + got,
            },
            other => other,
        })?;
        Self::from_parts(fixed, &ids)
    }
}

fn check_id_len(len: usize) -> Result<(), StdioHeaderError> {
    if len > MAX_ID_LEN {
        return Err(StdioHeaderError::IdTooLong(len));
    }
    Ok(())
}

/// The container id and, unless it is empty (the init process), the exec
/// id against [`ids::validate`].
fn check_ids(container_id: &str, exec_id: &str) -> Result<(), StdioHeaderError> {
    ids::validate("container", container_id).map_err(StdioHeaderError::InvalidId)?;
    if !exec_id.is_empty() {
        ids::validate("exec", exec_id).map_err(StdioHeaderError::InvalidId)?;
    }
    Ok(())
}

/// Like `read_exact`, but an early end of stream reports how much arrived.
fn read_exact_counted(reader: &mut impl Read, buf: &mut [u8]) -> Result<(), StdioHeaderError> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => {
                return Err(StdioHeaderError::Truncated {
                    expected: buf.len(),
                    got: filled,
                })
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Encodes the agent's answer to a header: `Ok(())` accepts the stream,
/// `Err(message)` refuses it and says why.
pub fn encode_ack(result: Result<(), &str>) -> Vec<u8> {
    let (status, message) = match result {
        Ok(()) => (0u8, ""),
        Err(msg) => (1u8, msg),
    };
    let mut cut = message.len().min(MAX_ACK_MSG_LEN);
    while !message.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &message[..cut];
    let mut out = Vec::with_capacity(ACK_FIXED_LEN + message.len());
    out.push(status);
    // cut ≤ MAX_ACK_MSG_LEN < u16::MAX.
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message.as_bytes());
    out
}

/// Parses the fixed part of an ack: returns the status byte and how many
/// message bytes follow.
pub fn parse_ack_fixed(bytes: &[u8; ACK_FIXED_LEN]) -> Result<(u8, usize), StdioHeaderError> {
    let len = usize::from(u16::from_be_bytes([bytes[1], bytes[2]]));
    if len > MAX_ACK_MSG_LEN {
        return Err(StdioHeaderError::Refused(format!(
            "ack message length {len} exceeds {MAX_ACK_MSG_LEN}"
        )));
    }
    Ok((bytes[0], len))
}

/// Reads an ack from a blocking reader; a refusal becomes
/// [`StdioHeaderError::Refused`] with the agent's reason.
pub fn read_ack(reader: &mut impl Read) -> Result<(), StdioHeaderError> {
    let mut fixed = [0u8; ACK_FIXED_LEN];
    read_exact_counted(reader, &mut fixed)?;
    let (status, len) = parse_ack_fixed(&fixed)?;
    let mut message = vec![0u8; len];
    read_exact_counted(reader, &mut message)?;
    if status == 0 {
        Ok(())
    } else {
        Err(StdioHeaderError::Refused(
            String::from_utf8_lossy(&message).into_owned(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(stream: StreamKind, cid: &str, eid: &str) -> StreamHeader {
        StreamHeader {
            stream,
            container_id: cid.to_string(),
            exec_id: eid.to_string(),
        }
    }

    #[test]
    fn round_trip_every_stream_kind() {
        for kind in [StreamKind::Stdin, StreamKind::Stdout, StreamKind::Stderr] {
            let h = header(kind, "c1", "exec-7");
            let bytes = h.encode().unwrap();
            assert_eq!(bytes.len(), FIXED_LEN + 2 + 6);
            assert_eq!(StreamHeader::decode(&bytes).unwrap(), h);
            assert_eq!(StreamHeader::read_from(&mut bytes.as_slice()).unwrap(), h);
        }
    }

    #[test]
    fn init_process_has_empty_exec_id() {
        let h = header(StreamKind::Stdout, "c1", "");
        let bytes = h.encode().unwrap();
        assert_eq!(StreamHeader::decode(&bytes).unwrap().exec_id, "");
    }

    #[test]
    fn rejects_bad_magic_version_and_stream() {
        let good = header(StreamKind::Stdin, "c", "e").encode().unwrap();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert!(matches!(
            StreamHeader::decode(&bad),
            Err(StdioHeaderError::BadMagic(_))
        ));
        let mut bad = good.clone();
        bad[4] = 9;
        assert_eq!(
            StreamHeader::decode(&bad),
            Err(StdioHeaderError::UnsupportedVersion(9))
        );
        let mut bad = good;
        bad[5] = 3;
        assert_eq!(
            StreamHeader::decode(&bad),
            Err(StdioHeaderError::UnknownStream(3))
        );
    }

    #[test]
    fn rejects_oversized_and_empty_ids() {
        let long = "x".repeat(MAX_ID_LEN + 1);
        assert_eq!(
            header(StreamKind::Stdin, &long, "").encode(),
            Err(StdioHeaderError::IdTooLong(MAX_ID_LEN + 1))
        );
        assert_eq!(
            header(StreamKind::Stdin, "", "").encode(),
            Err(StdioHeaderError::EmptyContainerId)
        );
        // A peer claiming a huge id length is refused before anything is allocated.
        let mut raw = header(StreamKind::Stdin, "c", "").encode().unwrap();
        raw[6..8].copy_from_slice(&u16::MAX.to_be_bytes());
        assert_eq!(
            StreamHeader::decode(&raw),
            Err(StdioHeaderError::IdTooLong(usize::from(u16::MAX)))
        );
    }

    #[test]
    fn ids_outside_the_id_rule_are_refused_both_ways() {
        for (cid, eid) in [("a/b", ""), ("c1", "../x"), (".c", "e"), ("c1", "a+b")] {
            let e = header(StreamKind::Stdout, cid, eid).encode().unwrap_err();
            assert!(
                matches!(e, StdioHeaderError::InvalidId(_)),
                "{cid} {eid}: {e}"
            );
            // The same bytes from a peer that does not check.
            let mut raw = header(StreamKind::Stdout, "c", "").encode().unwrap();
            raw.truncate(6);
            raw.extend_from_slice(&(cid.len() as u16).to_be_bytes());
            raw.extend_from_slice(&(eid.len() as u16).to_be_bytes());
            raw.extend_from_slice(cid.as_bytes());
            raw.extend_from_slice(eid.as_bytes());
            assert!(matches!(
                StreamHeader::decode(&raw),
                Err(StdioHeaderError::InvalidId(_))
            ));
        }
    }

    #[test]
    fn truncated_input_says_how_much_arrived() {
        let bytes = header(StreamKind::Stderr, "abc", "de").encode().unwrap();
        assert_eq!(
            StreamHeader::decode(&bytes[..4]),
            Err(StdioHeaderError::Truncated {
                expected: FIXED_LEN,
                got: 4
            })
        );
        assert_eq!(
            StreamHeader::read_from(&mut &bytes[..12]),
            Err(StdioHeaderError::Truncated {
                expected: FIXED_LEN + 5,
                got: 12
            })
        );
    }

    #[test]
    fn rejects_non_utf8_ids() {
        let mut bytes = header(StreamKind::Stdin, "ab", "").encode().unwrap();
        bytes[FIXED_LEN] = 0xff;
        assert_eq!(
            StreamHeader::decode(&bytes),
            Err(StdioHeaderError::IdNotUtf8)
        );
    }

    #[test]
    fn ack_round_trip_and_refusal() {
        assert_eq!(read_ack(&mut encode_ack(Ok(())).as_slice()), Ok(()));
        let refused = encode_ack(Err("container c1 not found"));
        assert_eq!(
            read_ack(&mut refused.as_slice()),
            Err(StdioHeaderError::Refused("container c1 not found".into()))
        );
        // Long messages are cut on a char boundary, never split mid-character.
        let long = "é".repeat(MAX_ACK_MSG_LEN);
        let encoded = encode_ack(Err(&long));
        assert!(encoded.len() <= ACK_FIXED_LEN + MAX_ACK_MSG_LEN);
        assert!(matches!(
            read_ack(&mut encoded.as_slice()),
            Err(StdioHeaderError::Refused(m)) if m.chars().all(|c| c == 'é')
        ));
    }

    #[test]
    fn ack_from_closed_peer_is_truncated() {
        assert_eq!(
            read_ack(&mut &[][..]),
            Err(StdioHeaderError::Truncated {
                expected: ACK_FIXED_LEN,
                got: 0
            })
        );
    }
}
