//! vsock packets over descriptor chains, through the `virtio-vsock` crate.
//!
//! TX (guest → device): the crate copies the header out of guest memory
//! once, checks `len` against [`MAX_PKT_BUF_SIZE`] and the real buffer, and
//! refuses write-only descriptors; [`parse_tx`] then copies the header into
//! our own [`Header`] so no field is read from the guest twice.
//! RX (device → guest): [`RxPacket`] wraps the guest's write-only buffers;
//! the header is written once, after the payload.

use virtio_queue::DescriptorChain;
use virtio_vsock::packet::{Error as PacketError, VsockPacket, PKT_HEADER_SIZE};
use vm_memory::{GuestMemoryMmap, VolatileSlice};

use super::{VsockError, MAX_PKT_BUF_SIZE};

/// Size of the packet header in bytes.
pub const HEADER_SIZE: usize = PKT_HEADER_SIZE;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type we offer.
pub const TYPE_STREAM: u16 = 1;

/// Packet operations (virtio 1.2 §5.10.6).
pub mod op {
    pub const INVALID: u16 = 0;
    pub const REQUEST: u16 = 1;
    pub const RESPONSE: u16 = 2;
    pub const RST: u16 = 3;
    pub const SHUTDOWN: u16 = 4;
    pub const RW: u16 = 5;
    pub const CREDIT_UPDATE: u16 = 6;
    pub const CREDIT_REQUEST: u16 = 7;
}

/// `VIRTIO_VSOCK_SHUTDOWN_*` flags of OP_SHUTDOWN.
pub mod shutdown {
    /// The sender will receive no more data.
    pub const RCV: u32 = 1;
    /// The sender will send no more data.
    pub const SEND: u32 = 2;
    /// Both directions.
    pub const BOTH: u32 = RCV | SEND;
}

/// A vsock packet header, held in VMM memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    /// The little-endian wire layout.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the wire layout.
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> Self {
        let u64_at = |o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |o: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[o..o + 4]);
            u32::from_le_bytes(a)
        };
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    fn from_packet(p: &VsockPacket<'_, ()>) -> Self {
        Header {
            src_cid: p.src_cid(),
            dst_cid: p.dst_cid(),
            src_port: p.src_port(),
            dst_port: p.dst_port(),
            len: p.len(),
            type_: p.type_(),
            op: p.op(),
            flags: p.flags(),
            buf_alloc: p.buf_alloc(),
            fwd_cnt: p.fwd_cnt(),
        }
    }

    /// An RST answering `to` (addresses swapped, no credit).
    pub fn rst_for(to: &Header) -> Self {
        Header {
            src_cid: to.dst_cid,
            dst_cid: to.src_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            type_: TYPE_STREAM,
            op: op::RST,
            ..Header::default()
        }
    }
}

/// A parsed TX packet: the header copy and, for `len > 0`, exactly `len`
/// bytes of guest memory.
pub struct TxPacket<'a> {
    pub hdr: Header,
    pub data: Option<VolatileSlice<'a, ()>>,
}

/// Parses a TX chain. Errors fail only this chain.
pub fn parse_tx<'a>(
    mem: &'a GuestMemoryMmap,
    chain: &mut DescriptorChain<&'a GuestMemoryMmap>,
) -> Result<TxPacket<'a>, VsockError> {
    let pkt =
        VsockPacket::from_tx_virtq_chain(mem, chain, MAX_PKT_BUF_SIZE).map_err(|e| match e {
            PacketError::InvalidHeaderLen(len) => VsockError::PacketTooLong(len),
            e => VsockError::Packet(e),
        })?;
    let hdr = Header::from_packet(&pkt);
    let data = if hdr.len == 0 {
        None
    } else {
        match pkt.data_slice() {
            Some(s) if s.len() == hdr.len as usize => Some(*s),
            // The crate guarantees this; refuse rather than trust it blindly.
            _ => return Err(VsockError::PacketTooLong(hdr.len)),
        }
    };
    Ok(TxPacket { hdr, data })
}

/// The guest's RX buffers for one packet.
pub struct RxPacket<'a> {
    pkt: VsockPacket<'a, ()>,
}

impl<'a> RxPacket<'a> {
    /// Wraps an RX chain (header buffer plus data buffer, all write-only).
    pub fn parse(
        mem: &'a GuestMemoryMmap,
        chain: &mut DescriptorChain<&'a GuestMemoryMmap>,
    ) -> Result<Self, VsockError> {
        let pkt = VsockPacket::from_rx_virtq_chain(mem, chain, MAX_PKT_BUF_SIZE)
            .map_err(VsockError::Packet)?;
        Ok(RxPacket { pkt })
    }

    /// Room for payload, at most [`MAX_PKT_BUF_SIZE`].
    pub fn data_capacity(&self) -> usize {
        self.pkt
            .data_slice()
            .map_or(0, |s| s.len().min(MAX_PKT_BUF_SIZE as usize))
    }

    /// The first `len` bytes of the payload buffer.
    pub fn data(&self, len: usize) -> Result<VolatileSlice<'a, ()>, VsockError> {
        let s = self.pkt.data_slice().ok_or(VsockError::NoDataBuffer)?;
        s.subslice(0, len.min(self.data_capacity()))
            .map_err(|_| VsockError::NoDataBuffer)
    }

    /// Writes the header; returns the used length (header + payload).
    pub fn write_header(&mut self, hdr: &Header) -> Result<u32, VsockError> {
        if hdr.len as usize > self.data_capacity() {
            return Err(VsockError::NoDataBuffer);
        }
        self.pkt
            .set_header_from_raw(&hdr.to_bytes())
            .map_err(VsockError::HeaderWrite)?;
        Ok(HEADER_SIZE as u32 + hdr.len)
    }
}

/// Fuzzing entry point: lays `input` out as a descriptor table plus buffer
/// memory, then parses chain 0 as a TX packet and as an RX packet. Must
/// never panic, whatever the input.
#[cfg(any(test, fuzzing))]
pub fn fuzz_parse_chain(input: &[u8]) {
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    use crate::devices::virtio::test_utils::{guest_memory, GuestQueue};

    const QSIZE: u16 = 8;
    let mem = guest_memory();
    let mut gq = GuestQueue::new(&mem, QSIZE, 0x1000);
    // The first 8 * 16 bytes are the descriptor table, the rest is copied
    // to 0x10_0000, where the descriptors usually point.
    let (table, rest) = input.split_at(input.len().min(16 * usize::from(QSIZE)));
    let (desc, _, _) = gq.addrs();
    if mem.write_slice(table, GuestAddress(desc)).is_err()
        || mem
            .write_slice(&rest[..rest.len().min(0x10_0000)], GuestAddress(0x10_0000))
            .is_err()
    {
        return;
    }
    gq.publish(0);
    gq.publish(0);
    let mut q = gq.queue();
    if let Some(mut chain) = q.pop_descriptor_chain(&mem) {
        let _ = parse_tx(&mem, &mut chain).map(|p| p.hdr);
    }
    if let Some(mut chain) = q.pop_descriptor_chain(&mem) {
        if let Ok(mut rx) = RxPacket::parse(&mem, &mut chain) {
            let _ = rx.data_capacity();
            let _ = rx.write_header(&Header::default());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 1024,
            len: 77,
            type_: TYPE_STREAM,
            op: op::RW,
            flags: shutdown::BOTH,
            buf_alloc: 0x4_0000,
            fwd_cnt: 0xdead_beef,
        };
        let b = h.to_bytes();
        assert_eq!(b.len(), 44);
        assert_eq!(&b[24..28], &77u32.to_le_bytes());
        assert_eq!(Header::from_bytes(&b), h);
        let r = Header::rst_for(&h);
        assert_eq!(
            (r.src_cid, r.dst_cid, r.src_port, r.dst_port),
            (2, 3, 1024, 0x1234_5678)
        );
        assert_eq!(r.op, op::RST);
    }

    #[test]
    fn fuzz_entry_survives_garbage() {
        fuzz_parse_chain(&[]);
        fuzz_parse_chain(&[0xff; 4096]);
        // A well-formed two-descriptor chain: header then data.
        let mut input = Vec::new();
        for (addr, len, flags, next) in [(0x10_0000u64, 44u32, 1u16, 1u16), (0x10_1000, 16, 0, 0)] {
            input.extend_from_slice(&addr.to_le_bytes());
            input.extend_from_slice(&len.to_le_bytes());
            input.extend_from_slice(&flags.to_le_bytes());
            input.extend_from_slice(&next.to_le_bytes());
        }
        input.resize(128, 0);
        let mut x: u32 = 1;
        for _ in 0..2000 {
            // Cheap deterministic mutation of the descriptor table.
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let mut m = input.clone();
            m[(x as usize) % 128] = (x >> 8) as u8;
            m.extend_from_slice(&x.to_le_bytes());
            fuzz_parse_chain(&m);
        }
    }
}
