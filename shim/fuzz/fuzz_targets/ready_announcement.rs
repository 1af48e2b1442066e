//! `boxlite_shim::fuzzing::ready_announcement`: see that module.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_shim::fuzzing::ready_announcement(data);
});
