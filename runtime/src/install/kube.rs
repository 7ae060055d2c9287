//! Labelling the installer's node through the Kubernetes API with the pod's service account (the
//! chart's ClusterRole allows `get` and `patch` on nodes, nothing else). The RuntimeClass's
//! scheduling.nodeSelector names this label, so Accordion pods land only on installed nodes.
//!
//! One merge-patch request is all it takes; a client library (kube-rs) would bring more code than
//! this whole installer, so the request is made here with ureq.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ureq::tls::{Certificate, RootCerts, TlsConfig};

/// The service account files every pod gets.
const SA_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Errors talking to the API server.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error(
        "Not in a Kubernetes pod (KUBERNETES_SERVICE_HOST is not set): cannot label node {0}; \
         run without --node-label outside the chart"
    )]
    NotInCluster(String),
    #[error("Cannot read the service account's {0}")]
    ServiceAccount(PathBuf, #[source] std::io::Error),
    #[error("The service account's CA certificate {0} holds no certificate")]
    NoCa(PathBuf),
    #[error("Label node {node}: {why}")]
    Request { node: String, why: String },
}

/// How to reach the API server.
pub struct Api {
    base: String,
    token: String,
    agent: ureq::Agent,
}

impl Api {
    /// The in-cluster API server, as client-go's rest.InClusterConfig finds it. For tests,
    /// `ACCORDION_KUBE_API` names another base URL and `ACCORDION_KUBE_SA_DIR` another
    /// service account directory.
    pub fn in_cluster(node: &str) -> Result<Self, KubeError> {
        let sa = std::env::var_os("ACCORDION_KUBE_SA_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(SA_DIR));
        let base = match std::env::var("ACCORDION_KUBE_API") {
            Ok(url) => url,
            Err(_) => {
                let host = std::env::var("KUBERNETES_SERVICE_HOST")
                    .map_err(|_| KubeError::NotInCluster(node.to_string()))?;
                let port =
                    std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
                // An IPv6 service address needs brackets in a URL.
                if host.contains(':') {
                    format!("https://[{host}]:{port}")
                } else {
                    format!("https://{host}:{port}")
                }
            }
        };
        let read = |name: &str| {
            let p = sa.join(name);
            std::fs::read(&p).map_err(|e| KubeError::ServiceAccount(p, e))
        };
        let token = String::from_utf8_lossy(&read("token")?).trim().to_string();
        let mut tls = TlsConfig::builder();
        if base.starts_with("https://") {
            let ca_path = sa.join("ca.crt");
            let pem = read("ca.crt")?;
            let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
                .filter_map(|item| match item {
                    Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect();
            if certs.is_empty() {
                return Err(KubeError::NoCa(ca_path));
            }
            tls = tls.root_certs(RootCerts::Specific(Arc::new(certs)));
        }
        let agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Ok(Self { base, token, agent })
    }

    /// Sets `key` to "true" on `node`, or removes it (`value` None).
    pub fn label(&self, node: &str, key: &str, value: Option<&str>) -> Result<(), KubeError> {
        let body = serde_json::json!({ "metadata": { "labels": { key: value } } }).to_string();
        let url = format!("{}/api/v1/nodes/{node}", self.base.trim_end_matches('/'));
        let fail = |why: String| KubeError::Request {
            node: node.to_string(),
            why,
        };
        let mut resp = self
            .agent
            .patch(&url)
            .header("Authorization", &format!("Bearer {}", self.token))
            .header("Content-Type", "application/merge-patch+json")
            .header("Accept", "application/json")
            .send(body.as_bytes())
            .map_err(|e| fail(e.to_string()))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        // The API server's Status message says what is wrong (RBAC, a missing node).
        let text = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024)
            .read_to_string()
            .unwrap_or_default();
        let message = serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_string))
            .unwrap_or(text);
        Err(fail(format!("HTTP {}: {message}", status.as_u16())))
    }
}

/// Whether `node` is a plausible node name (a DNS subdomain), so it can go in a URL path as is.
pub fn valid_node_name(node: &str) -> bool {
    !node.is_empty()
        && node.len() <= 253
        && node
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
}

/// Whether `key` is a valid label key (optional DNS prefix and "/", then a name of ≤ 63
/// characters of alphanumerics, '-', '_', '.', starting and ending alphanumeric).
pub fn valid_label_key(key: &str) -> bool {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    let name_ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name.as_bytes()[name.len() - 1].is_ascii_alphanumeric();
    name_ok && prefix.is_none_or(valid_node_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpListener;

    #[test]
    fn test_label_keys_and_node_names() {
        assert!(valid_label_key("accordion.dev/installed"));
        assert!(valid_label_key("installed"));
        assert!(!valid_label_key("accordion.dev/"));
        assert!(!valid_label_key("Bad Key"));
        assert!(!valid_label_key("UPPER.dev/x"));
        assert!(valid_node_name("node-1.example"));
        assert!(!valid_node_name("../../secrets"));
        assert!(!valid_node_name(""));
    }

    /// A one-request HTTP server standing in for the API server (no API server can run here):
    /// returns the request line, headers and body it received.
    fn serve_once(
        status: &'static str,
        body: &'static str,
    ) -> (String, std::thread::JoinHandle<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let handle = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut head = String::new();
            let mut len = 0usize;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
                head.push_str(&line);
                if line == "\r\n" {
                    break;
                }
            }
            let mut body_in = vec![0; len];
            reader.read_exact(&mut body_in).unwrap();
            write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            )
            .unwrap();
            head + &String::from_utf8(body_in).unwrap()
        });
        (url, handle)
    }

    fn api(url: String) -> Api {
        Api {
            base: url,
            token: "tok".into(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .new_agent(),
        }
    }

    #[test]
    fn test_label_sends_a_merge_patch_with_the_token() {
        let (url, server) = serve_once("200 OK", "{}");
        api(url)
            .label("node-1", "accordion.dev/installed", Some("true"))
            .unwrap();
        let req = server.join().unwrap();
        assert!(
            req.starts_with("PATCH /api/v1/nodes/node-1 HTTP/1.1\r\n"),
            "{req}"
        );
        assert!(
            req.to_ascii_lowercase()
                .contains("authorization: bearer tok\r\n"),
            "{req}"
        );
        assert!(req.contains("application/merge-patch+json"), "{req}");
        assert!(
            req.ends_with(r#"{"metadata":{"labels":{"accordion.dev/installed":"true"}}}"#),
            "{req}"
        );
    }

    #[test]
    fn test_unlabel_sends_null_and_an_api_error_carries_its_message() {
        let (url, server) = serve_once(
            "403 Forbidden",
            r#"{"kind":"Status","message":"nodes \"node-1\" is forbidden: User cannot patch"}"#,
        );
        let err = api(url)
            .label("node-1", "accordion.dev/installed", None)
            .unwrap_err()
            .to_string();
        let req = server.join().unwrap();
        assert!(
            req.ends_with(r#"{"metadata":{"labels":{"accordion.dev/installed":null}}}"#),
            "{req}"
        );
        assert!(
            err.contains("HTTP 403") && err.contains("forbidden"),
            "{err}"
        );
    }
}
