//! Sequences of guest vsock packets, host connections and RX drains
//! against the vsock device and its hybrid unix-socket muxer
//! (`vsock::fuzz::fuzz_muxer`): what reaches a host socket, what reaches
//! the guest and the connection table are checked after every step.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_vmm::devices::virtio::vsock::fuzz::fuzz_muxer(data);
});
