//! `boxlite_shim::fuzzing::stdio_uri`: see that module.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_shim::fuzzing::stdio_uri(data);
});
