//! virtio-blk request execution against a small backing file, over guest
//! regions with canaries around them (`block::fuzz::fuzz_block`): each
//! request is checked against a model of the disk and of guest memory.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_vmm::devices::virtio::block::fuzz::fuzz_block(data);
});
