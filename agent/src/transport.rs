//! Transport to the hub: the gRPC endpoint, the HTTP client for downloads,
//! and how a failed call is told. Only the configuration is read here, so
//! the loops above (sync, report, apply) get their channel and client from
//! the composition root and can be given others in tests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use crate::config::AgentConfig;

/// Why a connection to the hub could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("grpc_url {url:?}: {reason}")]
    GrpcUrl { url: String, reason: String },
    #[error("{0}")]
    Tls(String),
    #[error("ca_file: {0}")]
    CaFile(String),
    #[error("{0}")]
    HttpClient(String),
}

/// The hub's gRPC endpoint at `url`, with the configured keep-alive and CA.
pub fn endpoint(config: &AgentConfig, url: &str) -> Result<Endpoint, TransportError> {
    let mut ep = Endpoint::from_shared(url.to_owned())
        .map_err(|e| TransportError::GrpcUrl { url: url.to_owned(), reason: e.to_string() })?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(config.heartbeat)
        .keep_alive_timeout(config.heartbeat * 2);
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new();
        tls = match &config.ca_pem {
            Some(pem) => tls.ca_certificate(tonic::transport::Certificate::from_pem(pem)),
            None => tls.with_native_roots(),
        };
        ep = ep.tls_config(tls).map_err(|e| TransportError::Tls(e.to_string()))?;
    }
    Ok(ep)
}

/// An HTTP client for downloads that trusts the configured CA.
pub fn http_client(config: &AgentConfig) -> Result<reqwest::Client, TransportError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(30))
        .user_agent(concat!("sentinel-agent/", env!("CARGO_PKG_VERSION")));
    if let Some(pem) = &config.ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| TransportError::CaFile(e.to_string()))?;
        b = b.tls_certs_only(certs);
    }
    b.build().map_err(|e| TransportError::HttpClient(e.to_string()))
}

/// A status's message and, for a transport failure, its cause (tonic's
/// message alone says only "tcp connect error").
pub(crate) fn status_text(s: &tonic::Status) -> String {
    let mut text = s.message().to_owned();
    let mut source = std::error::Error::source(s);
    while let Some(e) = source {
        let more = e.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = e.source();
    }
    text
}

/// The hub replicas this agent may talk to, in the configured order, and
/// the one it talks to now. The stream, reports and downloads all go to the
/// current one; when its stream fails, the sync loop moves to the next
/// (wrapping), after its jittered backoff. Revision and replay checks are the
/// agent's own, so they hold whichever replica answers.
#[derive(Debug)]
pub struct Hubs {
    /// (REST URL, gRPC URL, lazily connected channel), one per replica.
    replicas: Vec<(String, String, Channel)>,
    current: AtomicUsize,
}

impl Hubs {
    /// A lazily connected channel to each configured replica.
    pub fn new(config: &AgentConfig) -> Result<Self, TransportError> {
        let mut replicas = Vec::with_capacity(config.grpc_urls.len());
        for (rest, grpc) in config.hub_urls.iter().zip(&config.grpc_urls) {
            replicas.push((rest.clone(), grpc.clone(), endpoint(config, grpc)?.connect_lazy()));
        }
        Ok(Self { replicas, current: AtomicUsize::new(0) })
    }

    fn now(&self) -> &(String, String, Channel) {
        &self.replicas[self.current.load(Ordering::Relaxed) % self.replicas.len()]
    }

    /// The channel to the current replica.
    pub fn channel(&self) -> Channel {
        self.now().2.clone()
    }

    /// The current replica's gRPC URL.
    pub fn grpc_url(&self) -> &str {
        &self.now().1
    }

    /// The current replica's REST URL.
    pub fn rest_url(&self) -> &str {
        &self.now().0
    }

    /// How many replicas are configured.
    pub fn len(&self) -> usize {
        self.replicas.len()
    }

    /// Whether none is (never: a config lists at least one).
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Moves to the next replica in order (wrapping); returns its gRPC URL.
    pub fn fail_over(&self) -> &str {
        self.current.fetch_add(1, Ordering::Relaxed);
        self.grpc_url()
    }

    /// `url` (an artifact URL a state names) on the current replica, when it
    /// points at one of the configured replicas; else as it is (a load
    /// balancer's URL, or a bucket's). So a download follows the failover
    /// too. Only whole origins match: `http://hub:80` never rewrites
    /// `http://hub:8080/...`.
    pub fn on_current(&self, url: &str) -> String {
        for (rest, _, _) in &self.replicas {
            if let Some(path) = url.strip_prefix(rest.as_str())
                && (path.is_empty() || path.starts_with('/'))
            {
                return format!("{}{path}", self.rest_url());
            }
        }
        url.to_owned()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[tokio::test]
    async fn downloads_follow_the_failover_and_only_whole_origins_are_rewritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let text = crate::config::testing::base(dir.path())
            .replace("grpc_url = \"http://127.0.0.1:8081\"\n", "")
            .replace("\"http://127.0.0.1:8080\"", "[\"http://127.0.0.1:80\", \"http://127.0.0.1:81\"]");
        let config = AgentConfig::parse(&text, &BTreeMap::new(), dir.path()).expect("config");
        let hubs = Hubs::new(&config).expect("hubs");
        let url = "http://127.0.0.1:80/api/v1/models/m/versions/1.0.0/artifact";
        assert_eq!(hubs.on_current(url), url);
        assert_eq!(hubs.fail_over(), "http://127.0.0.1:81");
        assert_eq!(hubs.on_current(url), "http://127.0.0.1:81/api/v1/models/m/versions/1.0.0/artifact");
        // Not a configured origin: a longer port, a load balancer, a bucket.
        for other in ["http://127.0.0.1:8080/api/v1/x", "https://lb.example/api/v1/x", "https://bucket.s3/x?sig=1"] {
            assert_eq!(hubs.on_current(other), other);
        }
        assert_eq!(hubs.fail_over(), "http://127.0.0.1:80", "wraps to the first");
    }
}
