//! virtio-balloon inflate, deflate and free page reporting on
//! guest-controlled queues, over guest regions with canaries around them
//! (`balloon::fuzz::fuzz_balloon`): a discard outside guest RAM fails it.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    boxlite_vmm::devices::virtio::balloon::fuzz::fuzz_balloon(data);
});
