//! The node label `boxlite.io/runtime=true` that the RuntimeClass's
//! nodeSelector matches, set and removed through the Kubernetes API with the
//! pod's service account (a JSON merge patch on the Node object).

use std::path::{Path, PathBuf};
use std::time::Duration;

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig};

use crate::Log;

pub const LABEL: &str = "boxlite.io/runtime";
pub const VALUE: &str = "true";

/// In-cluster defaults, the files every pod's service account gets.
pub const TOKEN_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";
pub const CA_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum LabelError {
    #[error(
        "Kubernetes API server unknown: KUBERNETES_SERVICE_HOST/KUBERNETES_SERVICE_PORT are not set \
         (not in a pod?); pass --api-server URL or --no-label"
    )]
    NoServer,
    #[error("service account {what} {path}: {source}")]
    ReadFile {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("service account CA {path}: {message}")]
    BadCa { path: PathBuf, message: String },
    #[error("node {node}: {method} {url} failed: {source}")]
    Transport {
        node: String,
        method: &'static str,
        url: String,
        source: Box<ureq::Error>,
    },
    #[error("node {node}: {method} {url} answered {status}: {message}")]
    Status {
        node: String,
        method: &'static str,
        url: String,
        status: u16,
        message: String,
    },
    #[error("node {node}: GET {url} answered something that is not a Node object: {message}")]
    BadNode {
        node: String,
        url: String,
        message: String,
    },
}

/// Where the API server is and how to authenticate to it.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// `https://host:port`, no trailing slash.
    pub server: String,
    pub token_file: PathBuf,
    pub ca_file: PathBuf,
}

impl ApiConfig {
    /// The server from `KUBERNETES_SERVICE_HOST`/`_PORT` (set in every pod),
    /// unless `server` is given.
    pub fn in_cluster(
        server: Option<String>,
        token_file: Option<PathBuf>,
        ca_file: Option<PathBuf>,
    ) -> Result<Self, LabelError> {
        let server = match server {
            Some(s) => s.trim_end_matches('/').to_owned(),
            None => {
                let host =
                    std::env::var("KUBERNETES_SERVICE_HOST").map_err(|_| LabelError::NoServer)?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").map_err(|_| LabelError::NoServer)?;
                // An IPv6 service address needs brackets in a URL.
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
        };
        Ok(Self {
            server,
            token_file: token_file.unwrap_or_else(|| TOKEN_FILE.into()),
            ca_file: ca_file.unwrap_or_else(|| CA_FILE.into()),
        })
    }
}

/// A client for the one object we touch, the node.
pub struct NodeClient {
    agent: ureq::Agent,
    server: String,
    token: String,
}

impl NodeClient {
    pub fn new(config: &ApiConfig) -> Result<Self, LabelError> {
        let token =
            std::fs::read_to_string(&config.token_file).map_err(|source| LabelError::ReadFile {
                what: "token",
                path: config.token_file.clone(),
                source,
            })?;
        let ca = read_ca(&config.ca_file)?;
        let tls = TlsConfig::builder()
            .root_certs(RootCerts::new_with_certs(&ca))
            .build();
        let agent = ureq::Agent::config_builder()
            .tls_config(tls)
            // Statuses are read and turned into errors naming the node.
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Ok(Self {
            agent,
            server: config.server.clone(),
            // Projected tokens end with a newline in some setups.
            token: token.trim().to_owned(),
        })
    }

    /// Sets the label (`Some(value)`) or removes it (`None`), reading the
    /// node first so an unchanged label is reported as such and not patched.
    pub fn set_label(
        &self,
        node: &str,
        value: Option<&str>,
        log: &mut Log,
    ) -> Result<(), LabelError> {
        let url = format!("{}/api/v1/nodes/{node}", self.server);
        let current = self.current_label(node, &url)?;
        let shown = match value {
            Some(v) => format!("{LABEL}={v}"),
            None => format!("{LABEL} removed"),
        };
        if current.as_deref() == value {
            log.action(format!("node {node}: label {shown}: unchanged"));
            return Ok(());
        }
        // Merge patch: only this label changes, whatever else the node has;
        // null deletes the key.
        let body = serde_json::json!({ "metadata": { "labels": { LABEL: value } } }).to_string();
        let response = self
            .agent
            .patch(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", "application/merge-patch+json")
            .header("Accept", "application/json")
            .send(&body)
            .map_err(|source| self.transport(node, "PATCH", &url, source))?;
        check_status(node, "PATCH", &url, response)?;
        log.action(format!("node {node}: label {shown}"));
        Ok(())
    }

    fn current_label(&self, node: &str, url: &str) -> Result<Option<String>, LabelError> {
        let response = self
            .agent
            .get(url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Accept", "application/json")
            .call()
            .map_err(|source| self.transport(node, "GET", url, source))?;
        let body = check_status(node, "GET", url, response)?;
        let bad = |message: String| LabelError::BadNode {
            node: node.to_owned(),
            url: url.to_owned(),
            message,
        };
        let json: serde_json::Value =
            serde_json::from_str(&body).map_err(|e| bad(e.to_string()))?;
        if json.get("kind").and_then(|k| k.as_str()) != Some("Node") {
            return Err(bad(format!(
                "kind is {}",
                json.get("kind").unwrap_or(&serde_json::Value::Null)
            )));
        }
        Ok(json
            .pointer("/metadata/labels")
            .and_then(|labels| labels.get(LABEL))
            .and_then(|v| v.as_str())
            .map(str::to_owned))
    }

    fn transport(
        &self,
        node: &str,
        method: &'static str,
        url: &str,
        source: ureq::Error,
    ) -> LabelError {
        LabelError::Transport {
            node: node.to_owned(),
            method,
            url: url.to_owned(),
            source: Box::new(source),
        }
    }
}

/// The body of a 2xx answer, or an error with the API server's own message
/// (a `Status` object's `message`, e.g. the RBAC denial).
fn check_status(
    node: &str,
    method: &'static str,
    url: &str,
    response: ureq::http::Response<ureq::Body>,
) -> Result<String, LabelError> {
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .read_to_string()
        .unwrap_or_else(|e| format!("(body unreadable: {e})"));
    if (200..300).contains(&status) {
        return Ok(body);
    }
    let message = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("message").and_then(|m| m.as_str()).map(str::to_owned))
        .unwrap_or_else(|| body.chars().take(300).collect());
    let hint = match status {
        401 => " (is the service account token valid?)",
        403 => " (the installer's ClusterRole needs nodes: get, patch; see k8s/installer.yaml)",
        _ => "",
    };
    Err(LabelError::Status {
        node: node.to_owned(),
        method,
        url: url.to_owned(),
        status,
        message: format!("{message}{hint}"),
    })
}

fn read_ca(path: &Path) -> Result<Vec<Certificate<'static>>, LabelError> {
    let pem = std::fs::read(path).map_err(|source| LabelError::ReadFile {
        what: "CA",
        path: path.to_owned(),
        source,
    })?;
    let bad = |message: String| LabelError::BadCa {
        path: path.to_owned(),
        message,
    };
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        if let PemItem::Certificate(cert) = item.map_err(|e| bad(e.to_string()))? {
            certs.push(cert);
        }
    }
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".to_owned()));
    }
    Ok(certs)
}
