//! Node labelling against a fake Kubernetes API server: TLS on 127.0.0.1
//! with a CA made in the test, handed to the client as the service
//! account's CA file, as in a pod.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use boxlite_node_installer::node_label::{ApiConfig, NodeClient};
use boxlite_node_installer::Log;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

const TOKEN: &str = "test-token-123";

#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    /// Lower-cased names.
    headers: Vec<(String, String)>,
    body: String,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

type Handler = dyn Fn(&Request) -> (u16, String) + Send + Sync;

struct FakeApi {
    _dir: tempfile::TempDir,
    config: ApiConfig,
    requests: Arc<Mutex<Vec<Request>>>,
}

/// A CA and a server certificate for 127.0.0.1 signed by it.
fn certificates() -> (String, CertificateDer<'static>, PrivateKeyDer<'static>) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &ca_cert, &ca_key)
        .unwrap();
    (
        ca_cert.pem(),
        cert.der().clone(),
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
    )
}

/// Serves HTTPS on 127.0.0.1, one request per connection, answering with
/// `handler` and recording every request.
fn fake_api(handler: Box<Handler>) -> FakeApi {
    let (ca_pem, cert, key) = certificates();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = Arc::new(
        rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert], key)
            .unwrap(),
    );
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let requests = Arc::new(Mutex::new(Vec::new()));
    let recorded = requests.clone();
    std::thread::spawn(move || {
        for tcp in listener.incoming() {
            let Ok(tcp) = tcp else { return };
            let conn = rustls::ServerConnection::new(tls.clone()).unwrap();
            let mut stream = rustls::StreamOwned::new(conn, tcp);
            // A client that rejects our certificate closes the connection.
            let Some(request) = read_request(&mut stream) else {
                continue;
            };
            recorded.lock().unwrap().push(request.clone());
            let (status, body) = handler(&request);
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.flush();
            stream.conn.send_close_notify();
            let _ = stream.flush();
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    // Written with a newline, as some token projections do.
    std::fs::write(&token_file, format!("{TOKEN}\n")).unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, ca_pem).unwrap();
    FakeApi {
        _dir: dir,
        config: ApiConfig {
            server: format!("https://127.0.0.1:{port}"),
            token_file,
            ca_file,
        },
        requests,
    }
}

fn read_request(stream: &mut impl Read) -> Option<Request> {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).ok()?;
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).ok()?;
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let length: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; length];
    reader.read_exact(&mut body).ok()?;
    Some(Request {
        method,
        path,
        headers,
        body: String::from_utf8(body).ok()?,
    })
}

fn node_json(labels: serde_json::Value) -> String {
    serde_json::json!({"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n1", "labels": labels}})
        .to_string()
}

fn requests(api: &FakeApi) -> Vec<Request> {
    api.requests.lock().unwrap().clone()
}

/// Sets (or with `None` removes) node n1's label through `api`, which must
/// succeed; returns what it logged.
fn set_label(api: &FakeApi, value: Option<&str>) -> Log {
    let mut log = Log::default();
    NodeClient::new(&api.config)
        .unwrap()
        .set_label("n1", value, &mut log)
        .unwrap();
    log
}

/// A GET of the node, then a PATCH when the label differs; both
/// authenticated with the token.
fn check_get_then_patch(api: &FakeApi, want_body: serde_json::Value) {
    let reqs = requests(api);
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    for r in &reqs {
        assert_eq!(r.path, "/api/v1/nodes/n1", "{r:?}");
        assert_eq!(
            r.header("authorization"),
            Some(&*format!("Bearer {TOKEN}")),
            "{r:?}"
        );
    }
    assert_eq!(reqs[0].method, "GET");
    let patch = &reqs[1];
    assert_eq!(patch.method, "PATCH");
    assert_eq!(
        patch.header("content-type"),
        Some("application/merge-patch+json")
    );
    let body: serde_json::Value = serde_json::from_str(&patch.body).unwrap();
    assert_eq!(body, want_body);
}

#[test]
fn the_label_is_set_with_a_merge_patch() {
    let api = fake_api(Box::new(|r| match r.method.as_str() {
        "GET" => (
            200,
            node_json(serde_json::json!({"kubernetes.io/hostname": "n1"})),
        ),
        _ => (
            200,
            node_json(serde_json::json!({"boxlite.io/runtime": "true"})),
        ),
    }));
    let log = set_label(&api, Some("true"));
    check_get_then_patch(
        &api,
        serde_json::json!({"metadata": {"labels": {"boxlite.io/runtime": "true"}}}),
    );
    assert_eq!(log.lines, ["node n1: label boxlite.io/runtime=true"]);
}

#[test]
fn a_label_already_set_is_not_patched() {
    let api = fake_api(Box::new(|_| {
        (
            200,
            node_json(serde_json::json!({"boxlite.io/runtime": "true"})),
        )
    }));
    let log = set_label(&api, Some("true"));
    let reqs = requests(&api);
    assert_eq!(reqs.len(), 1, "{reqs:?}");
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(
        log.lines,
        ["node n1: label boxlite.io/runtime=true: unchanged"]
    );
}

#[test]
fn the_label_is_removed_with_null() {
    let api = fake_api(Box::new(|r| match r.method.as_str() {
        "GET" => (
            200,
            node_json(serde_json::json!({"boxlite.io/runtime": "true"})),
        ),
        _ => (200, node_json(serde_json::json!({}))),
    }));
    let log = set_label(&api, None);
    check_get_then_patch(
        &api,
        serde_json::json!({"metadata": {"labels": {"boxlite.io/runtime": null}}}),
    );
    assert_eq!(log.lines, ["node n1: label boxlite.io/runtime removed"]);
}

#[test]
fn forbidden_becomes_an_error_naming_the_node_and_the_role() {
    let message = "nodes \"n1\" is forbidden: User \"system:serviceaccount:boxlite-system:boxlite-node-installer\" \
                   cannot patch resource \"nodes\" in API group \"\" at the cluster scope";
    let status = serde_json::json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                    "message": message, "reason": "Forbidden", "code": 403})
    .to_string();
    let api = fake_api(Box::new(move |r| match r.method.as_str() {
        "GET" => (200, node_json(serde_json::json!({}))),
        _ => (403, status.clone()),
    }));
    let err = NodeClient::new(&api.config)
        .unwrap()
        .set_label("n1", Some("true"), &mut Log::default())
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        format!(
            "node n1: PATCH {}/api/v1/nodes/n1 answered 403: {message} \
             (the installer's ClusterRole needs nodes: get, patch; see k8s/installer.yaml)",
            api.config.server
        )
    );
}

#[test]
fn a_server_outside_the_ca_is_refused() {
    let api = fake_api(Box::new(|_| (200, node_json(serde_json::json!({})))));
    // Another CA than the one that signed the server's certificate.
    let other = fake_api(Box::new(|_| (500, String::new())));
    let config = ApiConfig {
        ca_file: other.config.ca_file.clone(),
        ..api.config.clone()
    };
    let err = NodeClient::new(&config)
        .unwrap()
        .set_label("n1", Some("true"), &mut Log::default())
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with(&format!(
            "node n1: GET {}/api/v1/nodes/n1 failed: ",
            api.config.server
        )),
        "{err}"
    );
    assert!(err.to_lowercase().contains("certificate"), "{err}");
    assert!(requests(&api).is_empty());
}

#[test]
fn missing_service_account_files_are_named() {
    let config = ApiConfig {
        server: "https://127.0.0.1:1".to_owned(),
        token_file: PathBuf::from("/nonexistent/token"),
        ca_file: PathBuf::from("/nonexistent/ca.crt"),
    };
    let err = NodeClient::new(&config).err().unwrap().to_string();
    assert!(
        err.starts_with("service account token /nonexistent/token: "),
        "{err}"
    );

    let api = fake_api(Box::new(|_| (200, String::new())));
    std::fs::write(&api.config.ca_file, "not a certificate\n").unwrap();
    let err = NodeClient::new(&api.config).err().unwrap().to_string();
    assert_eq!(
        err,
        format!(
            "service account CA {}: no PEM certificate in it",
            api.config.ca_file.display()
        )
    );
}
