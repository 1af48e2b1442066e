//! The capability sets a container process gets, made explicit the way
//! runc reads a spec before libcontainer sees it.

use oci_spec::runtime::LinuxCapabilities;

/// A process's capabilities as runc reads them. libcontainer 0.7 reads
/// them differently, and the difference only ever grants more:
/// - no `capabilities` object: runc gives a container's init none at all
///   and an exec the init's; libcontainer drops nothing, so the process
///   kept every capability of the agent (root).
/// - a set left out (`"capabilities": {"bounding": […]}`): runc makes it
///   empty; libcontainer leaves effective, permitted, inheritable and
///   ambient as the agent had them.
///
/// So every set is made explicit before libcontainer sees the spec:
/// `inherit` for a missing object (the init's capabilities for an exec,
/// none for an init), empty for a missing set.
pub fn runc_capabilities(
    caps: Option<&LinuxCapabilities>,
    inherit: Option<&LinuxCapabilities>,
) -> LinuxCapabilities {
    let none = || Some(Default::default());
    let empty = LinuxCapabilities::default()
        .set_bounding(none())
        .set_effective(none())
        .set_inheritable(none())
        .set_permitted(none())
        .set_ambient(none())
        .clone();
    let Some(caps) = caps.or(inherit) else {
        return empty;
    };
    let mut c = caps.clone();
    let or_empty = |set: &Option<oci_spec::runtime::Capabilities>| set.clone().or(none());
    c.set_bounding(or_empty(caps.bounding()))
        .set_effective(or_empty(caps.effective()))
        .set_inheritable(or_empty(caps.inheritable()))
        .set_permitted(or_empty(caps.permitted()))
        .set_ambient(or_empty(caps.ambient()));
    c
}
