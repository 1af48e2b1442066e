//! `boxlite-node-installer`: installs BoxLite on a Kubernetes node from a
//! privileged DaemonSet pod (docs/install-kubernetes.md, "Install with the
//! DaemonSet").

pub mod containerd_config;
pub mod fsutil;
