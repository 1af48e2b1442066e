//! `boxlite_shim::fuzzing::agent_stats_reply`: see that module.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_shim::fuzzing::agent_stats_reply(data);
});
