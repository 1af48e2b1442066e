//! virtio-net TX and RX on guest-controlled queues (`net::fuzz::fuzz_net`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_vmm::devices::virtio::net::fuzz::fuzz_net(data);
});
