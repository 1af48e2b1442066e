//! Virtqueue + virtio-blk request parsing on guest-controlled descriptors.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_vmm::devices::virtio::test_utils::fuzz_virtqueue(data);
});
