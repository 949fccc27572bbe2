//! TLS for the hub's REST and gRPC listeners (rustls with ring). The
//! handshakes run in each connection's own task, under the connection cap
//! and header-read timeout of `sentinel_net`, so one slow or hostile client
//! cannot hold up the others. Also the client side the hub uses to reach
//! its PostgreSQL database ([`client_config`]).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject as _;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Failures loading the TLS identity.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("reading PEM from {path}: {reason}")]
    Pem { path: String, reason: String },
    #[error("building the TLS configuration")]
    Config(#[source] tokio_rustls::rustls::Error),
    #[error("{path} holds no usable CA certificate")]
    NoCa { path: String },
}

/// A TLS client configuration that trusts the system's roots and, if given,
/// the CA certificates (PEM) in `ca_file`: a managed database's own CA.
pub fn client_config(ca_file: Option<&Path>) -> Result<tokio_rustls::rustls::ClientConfig, TlsError> {
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    // Unreadable system roots leave the store to the CA file: logged, not fatal.
    let native = rustls_native_certs::load_native_certs();
    for e in &native.errors {
        tracing::debug!(error = %e, "a system root certificate could not be read");
    }
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let pem_err = |reason: String| TlsError::Pem { path: path.display().to_string(), reason };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(|e| pem_err(e.to_string()))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| pem_err(e.to_string()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(TlsError::NoCa { path: path.display().to_string() });
        }
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    Ok(tokio_rustls::rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Reads a certificate chain and private key (PEM).
pub fn load_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let pem_err = |path: &Path, reason: String| TlsError::Pem { path: path.display().to_string(), reason };
    let certs = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(cert, e.to_string()))?;
    if certs.is_empty() {
        return Err(pem_err(cert, "no certificate found".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e.to_string()))?;
    Ok((certs, key_der))
}

/// A rustls server configuration for HTTP/1.1 and HTTP/2.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let (certs, key) = load_identity(cert, key)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
