//! Transport to the hub: the gRPC endpoint, the HTTP client for downloads,
//! and how a failed call is told. Only the configuration is read here, so
//! the loops above (sync, report, apply) get their channel and client from
//! the composition root and can be given others in tests.

use std::time::Duration;

use tonic::transport::{ClientTlsConfig, Endpoint};

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
