//! Hub settings.

use std::net::SocketAddr;
use std::path::PathBuf;

/// Default cap on one uploaded model file: 2 GiB.
pub const DEFAULT_MAX_UPLOAD_BYTES: u64 = 2 * 1024 * 1024 * 1024;

/// Everything a hub needs to start. Built from flags by `sentinel-hub`, or
/// from values by tests.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Holds `hub.db`, `blobs/`, `keys/` and `admin.token`.
    pub data_dir: PathBuf,
    /// REST listen address; port 0 picks a free port.
    pub listen: SocketAddr,
    /// gRPC listen address for agents (used once the notification stream exists).
    pub grpc_listen: Option<SocketAddr>,
    /// Uploads larger than this are refused with 413 while streaming.
    pub max_upload_bytes: u64,
}

impl HubConfig {
    /// Defaults for a hub on loopback with its data in `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc_listen: None,
            max_upload_bytes: DEFAULT_MAX_UPLOAD_BYTES,
        }
    }
}
