//! vsock TX/RX packet parsing on guest-controlled descriptor chains.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_vmm::devices::virtio::vsock::packet::fuzz_parse_chain(data);
});
