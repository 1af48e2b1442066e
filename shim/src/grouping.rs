//! Pod grouping: which sandbox (and so which shim and VM) a container
//! belongs to, from the annotations CRI implementations put on its spec.
//!
//! containerd's CRI plugin sets `io.kubernetes.cri.container-type`
//! (`sandbox` or `container`) and `io.kubernetes.cri.sandbox-id`; CRI-O sets
//! `io.kubernetes.cri-o.ContainerType` and `io.kubernetes.cri-o.SandboxID`.
//! A container of type `container` that names a sandbox joins it; anything
//! else (a pod sandbox, a plain `ctr run`) is its own sandbox.

use std::collections::HashMap;

pub const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";
pub const CRI_SANDBOX_ID: &str = "io.kubernetes.cri.sandbox-id";
pub const CRIO_CONTAINER_TYPE: &str = "io.kubernetes.cri-o.ContainerType";
pub const CRIO_SANDBOX_ID: &str = "io.kubernetes.cri-o.SandboxID";

/// The container-type value of a pod member.
pub const TYPE_CONTAINER: &str = "container";

/// The sandbox `container_id` belongs to: the sandbox id the annotations
/// name when the container is a pod member, else the container's own id.
pub fn sandbox_id_of(container_id: &str, annotations: &HashMap<String, String>) -> String {
    for (type_key, sandbox_key) in [
        (CRI_CONTAINER_TYPE, CRI_SANDBOX_ID),
        (CRIO_CONTAINER_TYPE, CRIO_SANDBOX_ID),
    ] {
        let is_member = annotations
            .get(type_key)
            .is_some_and(|t| t == TYPE_CONTAINER);
        if let (true, Some(sandbox)) = (is_member, annotations.get(sandbox_key)) {
            if !sandbox.is_empty() {
                return sandbox.clone();
            }
        }
    }
    container_id.to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ann(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn plain_ctr_run_is_its_own_sandbox() {
        assert_eq!(sandbox_id_of("c1", &HashMap::new()), "c1");
    }

    #[test]
    fn cri_sandbox_is_its_own_sandbox() {
        let a = ann(&[(CRI_CONTAINER_TYPE, "sandbox"), (CRI_SANDBOX_ID, "p1")]);
        assert_eq!(sandbox_id_of("p1", &a), "p1");
    }

    #[test]
    fn cri_container_joins_its_sandbox() {
        let a = ann(&[(CRI_CONTAINER_TYPE, "container"), (CRI_SANDBOX_ID, "p1")]);
        assert_eq!(sandbox_id_of("c1", &a), "p1");
    }

    #[test]
    fn crio_container_joins_its_sandbox() {
        let a = ann(&[(CRIO_CONTAINER_TYPE, "container"), (CRIO_SANDBOX_ID, "p2")]);
        assert_eq!(sandbox_id_of("c1", &a), "p2");
    }

    #[test]
    fn a_sandbox_id_without_the_member_type_is_ignored() {
        let a = ann(&[(CRI_SANDBOX_ID, "p1")]);
        assert_eq!(sandbox_id_of("c1", &a), "c1");
        let a = ann(&[(CRI_CONTAINER_TYPE, "container"), (CRI_SANDBOX_ID, "")]);
        assert_eq!(sandbox_id_of("c1", &a), "c1");
    }
}
