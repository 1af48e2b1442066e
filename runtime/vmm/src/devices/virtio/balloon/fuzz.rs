//! The balloon's fuzzing entry point (cargo-fuzz target `balloon`, and the
//! stable smoke test in `tests.rs`).
//!
//! A balloon that discards the wrong host memory does not crash: it
//! silently zeroes whatever the host mapped next to guest RAM. So the
//! tests and the fuzz target run it on [`GuardedMemory`] (canary pages
//! before, between and after the guest regions, where a discard that
//! strays past a region's end would land).

use std::cell::OnceCell;

use super::{features, Balloon};
use crate::devices::virtio::test_utils::{
    activate_ctx, fuzz_fill_buffers, fuzz_lay_out_queue, test_interrupt, GuestQueue,
};
pub use crate::devices::virtio::test_utils::{GuardedMemory, CANARY_BYTE, CANARY_LEN, REGIONS};
use crate::devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};

thread_local! {
    /// The fuzz target's memory, made once per thread and reset per input.
    static FUZZ_MEMORY: OnceCell<GuardedMemory> = const { OnceCell::new() };
}

/// Fuzzing entry point. The first byte picks what the driver acks (bit 0:
/// free page reporting, bit 1: deflate on OOM) and the config write (bits
/// 4–7: its offset); then the inflate, deflate and reporting queues are
/// laid out from the input as a hostile driver could (`fuzz_lay_out_queue`:
/// avail index, 16 descriptors, 16 ring entries each), and the rest is
/// buffer memory at 0x10_0000 (so PFN arrays and reported ranges are the
/// input's). Every queue is served. Must never panic, and never discard
/// host memory outside guest RAM: the canaries around the guest regions
/// must come out intact.
pub fn fuzz_balloon(input: &[u8]) {
    FUZZ_MEMORY.with(|cell| {
        let guard = cell.get_or_init(GuardedMemory::new);
        guard.reset();
        run_input(guard, input);
        assert!(
            guard.canaries_intact(),
            "the balloon discarded host memory outside guest RAM"
        );
    });
}

fn run_input(guard: &GuardedMemory, input: &[u8]) {
    const QSIZE: u16 = 16;
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    let mem = guard.mem();
    let inflate = GuestQueue::new(mem, QSIZE, 0x1000);
    let deflate = GuestQueue::new(mem, QSIZE, 0x4000);
    let reporting = GuestQueue::new(mem, QSIZE, 0x8000);
    let Some(rest) = fuzz_lay_out_queue(&inflate, rest) else {
        return;
    };
    let Some(rest) = fuzz_lay_out_queue(&deflate, rest) else {
        return;
    };
    let Some(rest) = fuzz_lay_out_queue(&reporting, rest) else {
        return;
    };
    // The config write's bytes come from the input too (before the
    // buffers, which get the rest).
    let (config, rest) = rest.split_at(rest.len().min(4));
    if fuzz_fill_buffers(mem, rest).is_none() {
        return;
    }
    let mut dev = Balloon::new(flags & 2 != 0, true);
    let mut acked = VIRTIO_F_VERSION_1;
    if flags & 1 != 0 {
        acked |= features::FREE_PAGE_REPORTING;
    }
    if flags & 2 != 0 {
        acked |= features::DEFLATE_ON_OOM;
    }
    let irq = test_interrupt();
    if dev
        .activate(activate_ctx(
            mem,
            vec![inflate.queue(), deflate.queue(), reporting.queue()],
            &irq,
            acked,
        ))
        .is_err()
    {
        return;
    }
    let _ = dev.write_config(u64::from(flags >> 4), config);
    let mut cfg = [0u8; 8];
    dev.read_config(u64::from(flags >> 4), &mut cfg);
    for q in 0..4 {
        let _ = dev.process_queue(q);
    }
}
