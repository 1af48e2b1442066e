//! The contract between the BoxLite runtime and `boxlite-vmm`.
//!
//! One definition of what crosses the process boundary, used by both sides
//! (and by the tests that drive the VMM directly):
//! - [`config`]: the VM config file (`vm.json`) the VMM is started with;
//! - [`control`]: the requests and replies of the VMM's control socket;
//! - [`process`]: which process runs the VM once the jail has forked.
//!
//! Besides that one helper, this crate holds the schema only (field names, types, defaults, the
//! JSON shape). What a value may be — ranges, files that must exist, paths
//! that must fit `sun_path` — is checked by the VMM (`boxlite_vmm::config`),
//! which knows its devices' limits; the runtime's contract test feeds its
//! generated configs through that validation.
//!
//! Every struct refuses unknown fields, so a field one side writes and the
//! other does not know is an error, not silently dropped.

pub mod config;
pub mod control;
pub mod process;
