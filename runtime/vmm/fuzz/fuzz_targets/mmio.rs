//! The virtio-mmio register state machine under any sequence of guest
//! reads and writes (`test_utils::fuzz_mmio`).
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_vmm::devices::virtio::test_utils::fuzz_mmio(data);
});
