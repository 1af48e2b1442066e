//! Making a sandbox's VM: the [`VmFactory`] seam (production builds VMs
//! from `boxlite.toml`, the tests a fake).

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use boxlite_protocol::error_chain::chain;
use boxlite_runtime::config::TimeoutsConfig;
use boxlite_runtime::sizing::{
    check_host_memory, size_vm, Fixed, HostCapacity, PodResources, VmSize,
};
use boxlite_runtime::{Config, Hypervisor, VmSpec};
use oci_spec::runtime::Spec;

/// The `io.boxlite.*` annotations that set the VM's size outright (where
/// the config allows them): they win over the pod's limits.
const VCPUS_ANNOTATION: &str = "io.boxlite.guest.vcpus";
const MEMORY_ANNOTATION: &str = "io.boxlite.guest.memory_mib";

use crate::error::{Result, ShimError};

/// What the container that boots a sandbox's VM says about it.
#[derive(Debug, Clone, Copy)]
pub struct VmRequest<'a> {
    /// Its annotations: the `io.boxlite.*` overrides among them apply.
    pub annotations: &'a HashMap<String, String>,
    /// Its `linux.cgroupsPath`: the cgroup the VM's processes run in.
    pub cgroups_path: Option<&'a str>,
    /// What the pod asks for ([`pod_resources`]): the VM's size.
    pub resources: PodResources,
}

/// What the pod of the container that boots the VM asks for: the CRI
/// plugin's sandbox annotations (the kubelet's pod-level limits) when it
/// set them, else the container's own resources (`ctr run --cpu-quota …
/// --memory-limit …`, a container that is its own sandbox).
pub fn pod_resources(spec: &Spec) -> PodResources {
    if let Some(r) = spec
        .annotations()
        .as_ref()
        .and_then(PodResources::from_cri_annotations)
    {
        return r;
    }
    let res = spec.linux().as_ref().and_then(|l| l.resources().as_ref());
    let cpu = res.and_then(|r| r.cpu().as_ref());
    PodResources {
        cpu_quota: cpu.and_then(|c| c.quota()),
        cpu_period: cpu.and_then(|c| c.period()),
        memory_limit: res
            .and_then(|r| r.memory().as_ref())
            .and_then(|m| m.limit()),
        source: "the container's resources",
    }
}

/// Makes the VM of a sandbox. Production: [`ConfigVmFactory`]; tests: a fake.
#[async_trait]
pub trait VmFactory: Send + Sync {
    /// `<state_dir>/<id>`.
    fn sandbox_dir(&self, id: &str) -> Result<PathBuf>;
    /// A VM for sandbox `id`, not started, as `req` (from the container
    /// that boots it) asks, and the size it was given.
    fn new_vm(&self, id: &str, req: VmRequest<'_>) -> Result<(Box<dyn Hypervisor>, VmSize)>;
    /// The host-side bound of an agent call (`timeouts.agent_call_secs`).
    fn agent_call_timeout(&self) -> Duration;
}

/// Builds VMs from `boxlite.toml`. A config that failed to load is kept as
/// its error, so every Create reports it clearly.
pub struct ConfigVmFactory {
    config: std::result::Result<Config, String>,
}

impl ConfigVmFactory {
    pub fn new(config: std::result::Result<Config, String>) -> Self {
        Self { config }
    }

    fn config(&self) -> Result<&Config> {
        self.config
            .as_ref()
            .map_err(|e| ShimError::FailedPrecondition(format!("boxlite config: {e}")))
    }
}

impl VmFactory for ConfigVmFactory {
    fn sandbox_dir(&self, id: &str) -> Result<PathBuf> {
        Ok(self.config()?.sandbox_dir(id))
    }

    fn new_vm(&self, id: &str, req: VmRequest<'_>) -> Result<(Box<dyn Hypervisor>, VmSize)> {
        // The runtime's annotation error is rendered into the message: a
        // request the node refuses, INVALID_ARGUMENT like the other refusals.
        let refused = |e: &(dyn std::error::Error + 'static)| {
            ShimError::InvalidArgument(format!("sandbox {id:?}: {}", chain(e)))
        };
        let config = self
            .config()?
            .with_annotations(req.annotations)
            .map_err(|e| refused(&e))?;
        let mut spec = VmSpec::from_config(&config, id)?
            .in_cgroup(req.cgroups_path)
            .map_err(|e| refused(&e))?;
        let fixed = Fixed {
            vcpus: req.annotations.contains_key(VCPUS_ANNOTATION),
            memory: req.annotations.contains_key(MEMORY_ANNOTATION),
        };
        let host = HostCapacity::of_this_host();
        let size = size_vm(&config.guest, host, &req.resources, fixed).map_err(|e| refused(&e))?;
        check_host_memory(&config.guest, host, config.runtime.host_memory_floor_mib).map_err(
            |e| ShimError::Unready {
                what: format!("sandbox {id:?}: not booted"),
                cause: Box::new(e),
            },
        )?;
        if (size.vcpus, size.memory_mib, size.present_memory_mib)
            != (spec.vcpus, spec.memory_mib, spec.memory_mib)
        {
            tracing::info!(
                sandbox_id = %id,
                vcpus = size.vcpus,
                present_vcpus = size.present_vcpus,
                memory_mib = size.memory_mib,
                present_memory_mib = size.present_memory_mib,
                from = req.resources.source,
                "VM sized from the pod"
            );
        }
        // Built with every vCPU and MiB it may grow into, booted with the
        // pod's: the other vCPUs offline, the other memory in the balloon.
        (spec.vcpus, spec.memory_mib) = (size.present_vcpus, size.present_memory_mib);
        spec.balloon_mib = size.present_memory_mib - size.memory_mib;
        if size.present_vcpus > size.vcpus {
            spec.cmdline_extra.push(format!("maxcpus={}", size.vcpus));
        }
        Ok((boxlite_runtime::new_hypervisor(&config, spec)?, size))
    }

    /// With no usable config no VM starts, so no call is made; the default
    /// keeps the signature simple.
    fn agent_call_timeout(&self) -> Duration {
        match &self.config {
            Ok(config) => config.timeouts.agent_call(),
            Err(_) => TimeoutsConfig::default().agent_call(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_factory_refuses_annotations_the_config_does_not_allow() {
        let mut config = Config::default();
        config.runtime.allowed_annotations = vec!["io.boxlite.guest.memory_mib".into()];
        let factory = ConfigVmFactory::new(Ok(config));
        let annotations: HashMap<String, String> =
            [("io.boxlite.guest.vcpus".to_string(), "2".to_string())].into();
        let req = VmRequest {
            annotations: &annotations,
            cgroups_path: None,
            resources: PodResources::default(),
        };
        let err = match factory.new_vm("pod1", req) {
            Ok(_) => panic!("a VM was made"),
            Err(e) => e,
        };
        assert!(matches!(err, ShimError::InvalidArgument(_)), "{err:?}");
        assert_eq!(
            err.to_string(),
            "sandbox \"pod1\": annotation io.boxlite.guest.vcpus is not allowed on this node: \
             the admin can add it to runtime.allowed_annotations in boxlite.toml"
        );
    }
}
