//! Fuzzing entry point for virtio-net's queue logic (cargo-fuzz target
//! `net`, and the stable smoke test in `test_utils`).

use vm_memory::GuestMemoryMmap;

use super::{device::BASE_FEATURES, features, Net, UnixDgramBackend, VNET_HDR_LEN};
use crate::devices::virtio::test_utils::{
    activate_ctx, fuzz_fill_buffers, fuzz_lay_out_queue, guest_memory, test_interrupt, GuestQueue,
};
use crate::devices::virtio::VirtioDevice;

/// The input's first byte picks the features the driver acks (of what the
/// device offers); then the TX queue and the RX queue are laid out from it
/// as a hostile driver could (`fuzz_lay_out_queue`: avail index, 16
/// descriptors, 16 ring entries each), and the rest is buffer memory. The
/// device sends every TX chain to a datagram backend, then receives a
/// small and a full-size frame into whatever RX chains the guest offers.
/// Must never panic, and never touch memory outside the guest's.
pub fn fuzz_net(input: &[u8]) {
    const QSIZE: u16 = 16;
    let Some((&feature_byte, rest)) = input.split_first() else {
        return;
    };
    let mem: GuestMemoryMmap = guest_memory();
    let rxq = GuestQueue::new(&mem, QSIZE, 0x1000);
    let txq = GuestQueue::new(&mem, QSIZE, 0x8000);
    let Some(rest) = fuzz_lay_out_queue(&txq, rest) else {
        return;
    };
    let Some(rest) = fuzz_lay_out_queue(&rxq, rest) else {
        return;
    };
    if fuzz_fill_buffers(&mem, rest).is_none() {
        return;
    }
    let Ok((backend, peer)) = UnixDgramBackend::pair() else {
        return;
    };
    let Ok(mut dev) = Net::new(Box::new(backend), None) else {
        return;
    };
    // Each bit of the byte drops one group of offered features.
    let mut acked = BASE_FEATURES | features::MAC;
    for (bit, group) in [
        features::CSUM | features::HOST_TSO4 | features::HOST_TSO6,
        features::GUEST_CSUM | features::GUEST_TSO4 | features::GUEST_TSO6,
        features::GUEST_ECN | features::HOST_ECN,
        features::MAC,
    ]
    .into_iter()
    .enumerate()
    {
        if feature_byte & (1 << bit) != 0 {
            acked &= !group;
        }
    }
    let irq = test_interrupt();
    if dev
        .activate(activate_ctx(
            &mem,
            vec![rxq.queue(), txq.queue()],
            &irq,
            acked,
        ))
        .is_err()
    {
        return;
    }
    let _ = dev.process_tx();
    for len in [60, 1514] {
        let mut frame = vec![0u8; VNET_HDR_LEN + len];
        frame[VNET_HDR_LEN..VNET_HDR_LEN + 6].fill(0xff);
        let _ = peer.send(&frame);
    }
    let _ = dev.process_backend_rx();
}
