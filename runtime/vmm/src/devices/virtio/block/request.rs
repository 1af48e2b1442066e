//! Parsing one virtio-blk descriptor chain (virtio 1.2 §5.2.6).
//!
//! Layout we accept (the one Linux uses): the first descriptor is
//! device-readable and holds the 16-byte header; then zero or more data
//! descriptors; the last descriptor is device-writable and its first byte
//! receives the status. The header is copied into VMM memory once and
//! never read from the guest again. Every data buffer is checked in full
//! against guest memory, against [`SIZE_MAX`], and the whole transfer
//! against [`MAX_REQUEST_BYTES`] with checked arithmetic.
//!
//! Two kinds of failure:
//! - the chain has no usable status byte (missing, read-only, outside
//!   guest memory, more than `SEG_MAX + 2` descriptors) or no readable header → [`parse`] returns `Err`, the
//!   chain is returned with used length 0;
//! - the status byte is usable but the request is bad → [`Parsed::request`]
//!   is `Err`, the device answers `IOERR` without any I/O.

use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{
    req_type, BlockError, MAX_REQUEST_BYTES, REQUEST_HEADER_SIZE, SECTOR_SIZE, SEG_MAX, SIZE_MAX,
};

/// `struct virtio_blk_outhdr` as the guest writes it (little endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct RequestHeader {
    /// Request type (`VIRTIO_BLK_T_*`).
    pub req_type: u32,
    /// Reserved (ioprio in legacy drivers).
    pub reserved: u32,
    /// First 512-byte sector.
    pub sector: u64,
}

// SAFETY: plain integers, no padding (4 + 4 + 8 bytes, 8-byte aligned).
unsafe impl ByteValued for RequestHeader {}

/// One guest data buffer, already checked against guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Bytes.
    pub len: u32,
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Request type (`VIRTIO_BLK_T_*`); unknown types are kept and answered UNSUPP.
    pub req_type: u32,
    /// First sector.
    pub sector: u64,
    /// Data buffers, in order.
    pub data: Vec<Segment>,
    /// Sum of the data buffers' lengths.
    pub data_len: u64,
}

/// A chain whose status byte can be written.
#[derive(Debug)]
pub struct Parsed {
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
    /// The request, or why it gets IOERR.
    pub request: Result<Request, BlockError>,
}

/// Descriptors we look at per chain: header + `SEG_MAX` data + status,
/// plus one so that "too many" is detectable.
const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 3;

/// Parses the chain starting at `head`; see the module docs.
pub fn parse<I>(mem: &GuestMemoryMmap, head: u16, chain: I) -> Result<Parsed, BlockError>
where
    I: Iterator<Item = virtio_queue::desc::split::Descriptor>,
{
    let descs: Vec<_> = chain.take(MAX_DESCRIPTORS).collect();
    if descs.len() >= MAX_DESCRIPTORS {
        // The status byte is somewhere past what we read: fail the chain.
        return Err(BlockError::TooManySegments {
            head,
            got: descs.len() - 2,
        });
    }
    let (first, rest) = descs.split_first().ok_or(BlockError::NoHeader { head })?;
    let (last, middle) = rest.split_last().ok_or(BlockError::NoStatus { head })?;

    // The status descriptor first: without it nothing can be reported.
    if !last.is_write_only() {
        return Err(BlockError::StatusReadOnly { head });
    }
    let status_addr = last.addr();
    if last.len() == 0 || mem.get_slice(status_addr, 1).is_err() {
        return Err(BlockError::StatusBuffer {
            head,
            addr: status_addr.0,
            len: last.len(),
        });
    }
    if first.is_write_only() {
        return Err(BlockError::HeaderWriteOnly { head });
    }
    if first.len() < REQUEST_HEADER_SIZE {
        return Err(BlockError::HeaderTooShort {
            head,
            len: first.len(),
        });
    }
    let hdr: RequestHeader = mem
        .read_obj(first.addr())
        .map_err(|source| BlockError::HeaderRead { head, source })?;
    let hdr = RequestHeader {
        req_type: u32::from_le(hdr.req_type),
        reserved: u32::from_le(hdr.reserved),
        sector: u64::from_le(hdr.sector),
    };
    Ok(Parsed {
        status_addr,
        request: parse_data(mem, head, &hdr, middle),
    })
}

fn parse_data(
    mem: &GuestMemoryMmap,
    head: u16,
    hdr: &RequestHeader,
    middle: &[virtio_queue::desc::split::Descriptor],
) -> Result<Request, BlockError> {
    if middle.len() > SEG_MAX as usize {
        return Err(BlockError::TooManySegments {
            head,
            got: middle.len(),
        });
    }
    // Data direction: IN and GET_ID write guest memory, OUT reads it.
    let want_write = match hdr.req_type {
        req_type::IN | req_type::GET_ID => Some(true),
        req_type::OUT => Some(false),
        _ => None,
    };
    let mut data = Vec::with_capacity(middle.len());
    let mut data_len: u64 = 0;
    for d in middle {
        if let Some(w) = want_write {
            if d.is_write_only() != w {
                return Err(BlockError::WrongDirection {
                    head,
                    req_type: hdr.req_type,
                });
            }
        }
        if d.len() > SIZE_MAX {
            return Err(BlockError::SegmentTooLong { head, got: d.len() });
        }
        if d.len() > 0 && mem.get_slice(d.addr(), d.len() as usize).is_err() {
            return Err(BlockError::BadBuffer {
                head,
                addr: d.addr().0,
                len: d.len(),
            });
        }
        data_len = data_len
            .checked_add(u64::from(d.len()))
            .filter(|n| *n <= MAX_REQUEST_BYTES)
            .ok_or(BlockError::RequestTooLong {
                head,
                got: data_len.saturating_add(u64::from(d.len())),
            })?;
        if d.len() > 0 {
            data.push(Segment {
                addr: d.addr(),
                len: d.len(),
            });
        }
    }
    if matches!(hdr.req_type, req_type::IN | req_type::OUT) && data_len % SECTOR_SIZE != 0 {
        return Err(BlockError::Unaligned {
            head,
            got: data_len,
        });
    }
    Ok(Request {
        req_type: hdr.req_type,
        sector: hdr.sector,
        data,
        data_len,
    })
}

/// The byte offset of an IN/OUT request, checked against `capacity`
/// sectors: `sector * 512 + len <= capacity * 512`, all checked.
pub fn checked_offset(head: u16, sector: u64, len: u64, capacity: u64) -> Result<u64, BlockError> {
    let err = || BlockError::OutOfRange {
        head,
        sector,
        len,
        capacity,
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(err)?;
    let end = offset.checked_add(len).ok_or_else(err)?;
    let cap_bytes = capacity.checked_mul(SECTOR_SIZE).ok_or_else(err)?;
    if end > cap_bytes {
        return Err(err());
    }
    Ok(offset)
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn offset_checks() {
        assert_eq!(checked_offset(0, 0, 512, 1).expect("fits"), 0);
        assert_eq!(checked_offset(0, 1, 512, 2).expect("fits"), 512);
        assert!(checked_offset(0, 1, 1024, 2).is_err(), "spans the end");
        assert!(checked_offset(0, 2, 512, 2).is_err(), "beyond");
        assert!(checked_offset(0, u64::MAX, 512, 2).is_err(), "overflow");
        assert!(checked_offset(0, u64::MAX / 512, 1024, u64::MAX).is_err());
        // Zero-length request at the very end is fine, past it is not.
        assert!(checked_offset(0, 2, 0, 2).is_ok());
        assert!(checked_offset(0, 3, 0, 2).is_err());
    }
}
