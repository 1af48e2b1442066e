//! A CRI client (generated from the CRI proto by `k8s-cri`) against a
//! private containerd whose CRI plugin has the runtime handler `boxlite`
//! and a CNI bridge network from Debian's containernetworking-plugins
//! (bridge + host-local + loopback): what tests/cri_pod.rs and the CRI
//! benchmark (`boxlite-cri-bench`) drive, the way the kubelet does.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, CreateContainerRequest, DnsConfig, ExecSyncRequest,
    ImageSpec, LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, NamespaceMode, NamespaceOption, PodSandboxConfig,
    PodSandboxMetadata, PodSandboxStatusRequest, RemoveContainerRequest, RemovePodSandboxRequest,
    RunPodSandboxRequest, StartContainerRequest, StopContainerRequest, StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::containerd::{text, Containerd, IMAGE};
use crate::oci_image::busybox_image;

/// The sandbox ("pause") image: busybox sleeping, built here.
pub const PAUSE_IMAGE: &str = "boxlite.local/pause:1";
pub const HANDLER: &str = "boxlite";
/// host-local hands out addresses from here; the bridge is the gateway.
pub const SUBNET: &str = "10.123.0.0/24";
pub const GATEWAY: &str = "10.123.0.1";
pub const BRIDGE: &str = "bxcri0";
pub const DNS_SERVER: &str = "10.123.0.53";
/// The web server's answer, checked byte for byte from outside the pod.
pub const GREETING: &str = "hello-from-boxlite-pod";

/// A private containerd with the CRI plugin on, and clients for it.
pub struct Cri {
    pub c: Containerd,
    pub rt: RuntimeServiceClient<Channel>,
    pub img: ImageServiceClient<Channel>,
    /// What existed before, so Drop removes only what this run made.
    netns_before: Vec<String>,
    bridge_before: bool,
}

/// Whether a network link named `name` exists in this netns.
fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

impl Drop for Cri {
    /// After a failure midway, pods are left: runc pods' processes live in
    /// their own netns on the host, and CNI's namespaces, veths and bridge
    /// stay. Kill what runs in the namespaces this run made, delete them
    /// and the bridge, so the next run (same subnet) starts clean.
    fn drop(&mut self) {
        for ns in cri_netns() {
            if self.netns_before.contains(&ns) {
                continue;
            }
            let pids = std::process::Command::new("ip")
                .args(["netns", "pids", &ns])
                .output()
                .map(|o| text(&o.stdout))
                .unwrap_or_default();
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) with a pid read from `ip netns pids`.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", &ns])
                .status();
        }
        if !self.bridge_before && link_exists(BRIDGE) {
            let _ = std::process::Command::new("ip")
                .args(["link", "del", BRIDGE])
                .status();
        }
    }
}

/// The CNI network list: a bridge with host-local IPAM, and loopback.
pub fn cni_conflist(ipam_dir: &Path, bridge_plugin: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.0.0",
        "name": "boxlite-test",
        "plugins": [
            {
                "type": bridge_plugin,
                "bridge": BRIDGE,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": ipam_dir,
                }
            },
            {"type": "loopback"}
        ]
    })
    .to_string()
}

impl Cri {
    /// `bridge_plugin` is "bridge", or a missing plugin to make CNI fail.
    pub async fn start(bridge_plugin: &str) -> Cri {
        let netns_before = cri_netns();
        let bridge_before = link_exists(BRIDGE);
        let plugin = bridge_plugin.to_owned();
        let c = Containerd::start_with(move |d| {
            let net_d = d.join("net.d");
            std::fs::create_dir_all(&net_d).unwrap();
            std::fs::write(
                net_d.join("10-boxlite-test.conflist"),
                cni_conflist(&d.join("cni-ipam"), &plugin),
            )
            .unwrap();
            // restrict_oom_score_adj: CRI gives sandbox containers
            // oom_score_adj -998, which runc cannot set in this (unprivileged
            // container) environment; restricting keeps it at containerd's.
            format!(
                "[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"{PAUSE_IMAGE}\"\n  \
                 disable_apparmor = true\n  restrict_oom_score_adj = true\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".containerd.runtimes.runc]\n  \
                 runtime_type = \"io.containerd.runc.v2\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\".cni]\n  bin_dir = \"/usr/lib/cni\"\n  \
                 conf_dir = {net_d:?}\n  max_conf_num = 1\n"
            )
        });
        let img_dir = c.dir.path().join("img");
        for (name, cmd) in [
            (IMAGE, vec!["sh"]),
            (PAUSE_IMAGE, vec!["sleep", "2147483647"]),
        ] {
            let dir = img_dir.join(name.replace(['/', ':'], "_"));
            std::fs::create_dir_all(&dir).unwrap();
            let archive = busybox_image(&dir, name, &cmd);
            let out = c.ctr(&["-n", "k8s.io", "image", "import", archive.to_str().unwrap()]);
            assert!(out.status.success(), "import {name}: {}", text(&out.stderr));
        }
        let sock = c.dir.path().join("c.sock");
        let channel = Endpoint::try_from("http://[::]:50051")
            .unwrap()
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let sock = sock.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(
                        tokio::net::UnixStream::connect(sock).await?,
                    ))
                }
            }))
            .await
            .expect("connect to containerd's CRI socket");
        Cri {
            c,
            rt: RuntimeServiceClient::new(channel.clone()),
            img: ImageServiceClient::new(channel),
            netns_before,
            bridge_before,
        }
    }

    pub async fn run_pod(
        &mut self,
        config: &PodSandboxConfig,
        handler: &str,
    ) -> Result<String, tonic::Status> {
        let resp = self
            .rt
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.to_owned(),
            })
            .await?;
        Ok(resp.into_inner().pod_sandbox_id)
    }

    pub async fn pod_ip(&mut self, pod: &str) -> String {
        let status = self
            .rt
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: pod.to_owned(),
                verbose: false,
            })
            .await
            .expect("PodSandboxStatus")
            .into_inner()
            .status
            .expect("a status");
        status.network.expect("a pod network status").ip
    }

    pub async fn start_container(
        &mut self,
        pod: &str,
        pod_config: &PodSandboxConfig,
        name: &str,
        command: &[&str],
    ) -> String {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: IMAGE.to_owned(),
                ..Default::default()
            }),
            command: command.iter().map(|s| s.to_string()).collect(),
            log_path: format!("{name}.log"),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: pod_config
                        .linux
                        .as_ref()
                        .and_then(|l| l.security_context.as_ref())
                        .and_then(|s| s.namespace_options.clone()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let id = self
            .rt
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.to_owned(),
                config: Some(config),
                sandbox_config: Some(pod_config.clone()),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer {name}: {e}"))
            .into_inner()
            .container_id;
        self.rt
            .start_container(StartContainerRequest {
                container_id: id.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer {name}: {e}"));
        id
    }

    /// ExecSync: (exit code, stdout, stderr).
    pub async fn exec(&mut self, container: &str, cmd: &[&str]) -> (i32, String, String) {
        let r = self
            .rt
            .exec_sync(ExecSyncRequest {
                container_id: container.to_owned(),
                cmd: cmd.iter().map(|s| s.to_string()).collect(),
                timeout: 60,
            })
            .await
            .unwrap_or_else(|e| panic!("ExecSync {cmd:?}: {e}"))
            .into_inner();
        (r.exit_code, text(&r.stdout), text(&r.stderr))
    }

    /// Stops and removes the containers, then the pod.
    pub async fn remove_pod(&mut self, pod: &str, containers: &[String]) {
        for id in containers {
            self.rt
                .stop_container(StopContainerRequest {
                    container_id: id.clone(),
                    timeout: 5,
                })
                .await
                .unwrap_or_else(|e| panic!("StopContainer {id}: {e}"));
            self.rt
                .remove_container(RemoveContainerRequest {
                    container_id: id.clone(),
                })
                .await
                .unwrap_or_else(|e| panic!("RemoveContainer {id}: {e}"));
        }
        self.rt
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: pod.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("StopPodSandbox {pod}: {e}"));
        self.rt
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: pod.to_owned(),
            })
            .await
            .unwrap_or_else(|e| panic!("RemovePodSandbox {pod}: {e}"));
    }
}

pub fn pod_config(
    name: &str,
    network: NamespaceMode,
    annotations: &[(&str, &str)],
    log_dir: &Path,
) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_owned(),
            uid: format!("uid-{name}"),
            namespace: "default".to_owned(),
            attempt: 0,
        }),
        hostname: name.to_owned(),
        log_directory: log_dir.join(name).to_string_lossy().into_owned(),
        dns_config: Some(DnsConfig {
            servers: vec![DNS_SERVER.to_owned()],
            searches: vec!["svc.boxlite.test".to_owned()],
            options: vec![],
        }),
        annotations: annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<HashMap<_, _>>(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: network as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// GET / from `ip:port`, retried until `deadline` (the server may still be
/// starting); the whole response.
pub fn http_get(ip: &str, port: u16, deadline: Instant) -> String {
    let mut last = String::new();
    while Instant::now() < deadline {
        let attempt = (|| -> std::io::Result<String> {
            let addr = format!("{ip}:{port}").parse().expect("an address");
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match attempt {
            Ok(body) if body.contains(GREETING) => return body,
            Ok(body) => last = format!("answer without the greeting: {body:?}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!("no answer from {ip}:{port} in time (last: {last})");
}

/// Network namespaces CRI made (it names them cni-<uuid>).
pub fn cri_netns() -> Vec<String> {
    std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("cni-"))
                .collect()
        })
        .unwrap_or_default()
}
