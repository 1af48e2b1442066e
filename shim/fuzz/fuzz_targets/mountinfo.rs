//! `boxlite_shim::fuzzing::mountinfo`: see that module.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_shim::fuzzing::mountinfo(data);
});
