//! `boxlite_shim::fuzzing::vmm_control`: see that module.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_shim::fuzzing::vmm_control(data);
});
