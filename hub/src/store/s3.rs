//! [`BlobStore`] on S3 or an S3-compatible server (`--blobs s3://bucket/prefix`),
//! through the `object_store` crate on reqwest and rustls with ring.
//!
//! - **Keys.** A blob is the object `PREFIX/sha256/<hex>`.
//! - **Staging.** An upload is hashed, and inspected by a confined worker,
//!   from a temp file in the hub's own data dir (`DATA_DIR/staging`). The
//!   worker needs a file, and nothing must reach the bucket before the whole
//!   upload is known good. Commit then streams that file to the bucket as a
//!   multipart upload, 8 MiB parts, at most two in flight: memory stays flat
//!   whatever the model's size. An object whose key (its digest) exists is
//!   left alone: content addressing makes it the same bytes.
//! - **Durability.** A completed S3 upload is durable; commit returns after it.
//!   A failed or interrupted one is aborted, so no part is left billed or
//!   visible, and the version row is never written (see `service::registry`).
//! - **Reading.** Downloads are ranged GETs streamed to the client, or, with
//!   `--artifact-redirect`, presigned URLs the device follows straight to
//!   the bucket (its size, hash and signature checks do not trust the store).
//! - **Runtime.** Requests run on a small runtime of the store's own, so the
//!   synchronous interface works from any thread.

use std::fs::File;
use std::io::Read as _;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{GetOptions, GetRange, ObjectStore as _, ObjectStoreExt as _, WriteMultipart};
use sentinel_proto::manifest::is_sha256_hex;

use super::blobs::{Blob, BlobBody, BlobError, BlobStore, StagedBlob};
use crate::config::S3Settings;

/// Bytes per multipart part (S3's minimum is 5 MiB, but for the last part).
const PART_SIZE: usize = 8 * 1024 * 1024;
/// Parts uploading at once.
const PARTS_IN_FLIGHT: usize = 2;

/// The blob store on one bucket and prefix.
pub struct S3BlobStore {
    store: Arc<AmazonS3>,
    bucket: String,
    /// Empty, or ending in `/`.
    prefix: String,
    staging: std::path::PathBuf,
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for S3BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3BlobStore")
            .field("bucket", &self.bucket)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for S3BlobStore {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// A blob in the bucket, for streaming or a presigned URL.
#[derive(Debug, Clone)]
pub struct S3Object {
    store: Arc<AmazonS3>,
    path: ObjectPath,
    handle: tokio::runtime::Handle,
    bucket: String,
}

/// What an object-store failure means for an operator. Listing errors
/// arrive as generic ones carrying the server's status and S3 error code.
fn why(e: &object_store::Error) -> &'static str {
    let text = e.to_string();
    let has = |s: &str| text.contains(s);
    match e {
        _ if has("NoSuchBucket") => "the bucket does not exist (does the bucket exist? create it first)",
        object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. } => {
            "access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        }
        _ if has("403 Forbidden") || has("SignatureDoesNotMatch") || has("InvalidAccessKeyId") => {
            "access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
        }
        object_store::Error::NotFound { .. } => "not found (does the bucket exist?)",
        _ if has("error sending request") || has("onnection refused") || has("timed out") => {
            "the object store does not answer"
        }
        _ => "failed",
    }
}

fn s3_err(op: &'static str, bucket: &str, key: &str) -> impl FnOnce(object_store::Error) -> BlobError {
    let (bucket, key) = (bucket.to_owned(), key.to_owned());
    move |source| BlobError::S3 { op, bucket, key, why: why(&source), source: Box::new(source) }
}

impl S3Object {
    /// Streams `count` bytes from `start`. The request runs on the store's
    /// runtime; the stream can be read from any.
    pub fn stream(&self, start: u64, count: u64) -> tokio_stream::wrappers::ReceiverStream<std::io::Result<Bytes>> {
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (store, path) = (self.store.clone(), self.path.clone());
        self.handle.spawn(async move {
            if count == 0 {
                return;
            }
            let opts = GetOptions { range: Some(GetRange::Bounded(start..start + count)), ..GetOptions::default() };
            let mut body = match store.get_opts(&path, opts).await {
                Ok(r) => r.into_stream(),
                Err(e) => {
                    let _ = tx.send(Err(std::io::Error::other(e))).await;
                    return;
                }
            };
            while let Some(chunk) = body.next().await {
                let failed = chunk.is_err();
                if tx.send(chunk.map_err(std::io::Error::other)).await.is_err() || failed {
                    return;
                }
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }

    /// A URL that lets its holder GET this object for `expires_in`.
    pub async fn presigned(&self, expires_in: Duration) -> Result<String, BlobError> {
        use object_store::signer::Signer as _;
        let (store, path) = (self.store.clone(), self.path.clone());
        let key = path.to_string();
        let joined = self
            .handle
            .spawn(async move { store.signed_url(reqwest::Method::GET, &path, expires_in).await })
            .await
            .map_err(|e| BlobError::S3 {
                op: "presign",
                bucket: self.bucket.clone(),
                key: key.clone(),
                why: "failed",
                source: Box::new(e),
            })?;
        joined.map(|u| u.to_string()).map_err(s3_err("presign", &self.bucket, &key))
    }
}

impl S3BlobStore {
    /// Connects to `bucket` with the standard AWS environment, `settings`
    /// overriding it, and checks the bucket answers (missing bucket and
    /// refused credentials are named at start, not at the first upload).
    pub fn open(
        bucket: &str,
        prefix: &str,
        settings: &S3Settings,
        staging: std::path::PathBuf,
    ) -> Result<Self, BlobError> {
        // rustls with ring, before the HTTP client is built (idempotent).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(e) = &settings.endpoint {
            b = b.with_endpoint(e);
        }
        if let Some(r) = &settings.region {
            b = b.with_region(r);
        }
        if let Some(k) = &settings.access_key_id {
            b = b.with_access_key_id(k);
        }
        if let Some(s) = &settings.secret_access_key {
            b = b.with_secret_access_key(s);
        }
        // A plain-HTTP endpoint is allowed when it is the one given: an
        // S3-compatible server on a private network, or a test's.
        let endpoint = settings.endpoint.clone().or_else(|| std::env::var("AWS_ENDPOINT_URL").ok());
        if endpoint.as_deref().is_some_and(|e| e.starts_with("http://")) {
            b = b.with_allow_http(true);
        }
        let store = b.with_retry(object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(30),
            ..object_store::RetryConfig::default()
        });
        let store = Arc::new(store.build().map_err(s3_err("configure", bucket, ""))?);
        sentinel_proto::private::create_dir(&staging).map_err(|source| BlobError::Io {
            op: "create",
            path: staging.clone(),
            source,
        })?;
        // Staging files of a crash: this replica's own.
        if let Ok(entries) = std::fs::read_dir(&staging) {
            for e in entries.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sentinel-s3")
            .enable_all()
            .build()
            .map_err(|source| BlobError::Io { op: "start runtime", path: staging.clone(), source })?;
        let s = Self { store, bucket: bucket.to_owned(), prefix: prefix.to_owned(), staging, runtime: Some(runtime) };
        // One cheap request: the bucket exists and the credentials work.
        let probe = s.key("sentinel-probe");
        let (store, bucket_name) = (s.store.clone(), s.bucket.clone());
        let found = s.run(async move { store.head(&probe).await })?;
        match found {
            Ok(_) => {}
            Err(object_store::Error::NotFound { .. }) => {
                // The probe key is absent; is the bucket? A listing says.
                let (store, prefix) = (s.store.clone(), ObjectPath::from(s.prefix.as_str()));
                let listed = s.run(async move { store.list(Some(&prefix)).next().await.transpose() })?;
                listed.map_err(s3_err("list", &bucket_name, &s.prefix))?;
            }
            Err(e) => return Err(s3_err("check", &bucket_name, "")(e)),
        }
        Ok(s)
    }

    fn key(&self, name: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{name}", self.prefix))
    }

    fn blob_key(&self, sha256: &str) -> Result<ObjectPath, BlobError> {
        if !is_sha256_hex(sha256) {
            return Err(BlobError::BadDigest(sha256.to_owned()));
        }
        Ok(self.key(&format!("sha256/{sha256}")))
    }

    /// Runs `fut` on the store's runtime and waits for it on this thread.
    fn run<T: Send + 'static>(&self, fut: impl Future<Output = T> + Send + 'static) -> Result<T, BlobError> {
        let Some(rt) = &self.runtime else {
            return Err(BlobError::Io {
                op: "run",
                path: self.staging.clone(),
                source: std::io::Error::other("the store is closed"),
            });
        };
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| BlobError::Io {
            op: "run",
            path: self.staging.clone(),
            source: std::io::Error::other("the store's runtime stopped"),
        })
    }
}

/// Streams `file` to `key` as a multipart upload; aborts it on failure.
async fn upload(store: Arc<AmazonS3>, key: ObjectPath, mut file: File) -> Result<(), object_store::Error> {
    let upload = store.put_multipart(&key).await?;
    let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_SIZE);
    let mut buf = vec![0u8; 1024 * 1024];
    loop {
        let n = match tokio::task::block_in_place(|| file.read(&mut buf)) {
            Ok(n) => n,
            Err(e) => {
                let _ = writer.abort().await;
                return Err(object_store::Error::Generic { store: "S3", source: Box::new(e) });
            }
        };
        if n == 0 {
            break;
        }
        if let Err(e) = writer.wait_for_capacity(PARTS_IN_FLIGHT).await {
            let _ = writer.abort().await;
            return Err(e);
        }
        writer.write(&buf[..n]);
    }
    writer.finish().await.map(|_| ())
}

impl BlobStore for S3BlobStore {
    fn stage(&self) -> Result<StagedBlob, BlobError> {
        StagedBlob::in_dir(&self.staging)
    }

    fn commit(&self, staged: StagedBlob, sha256: &str) -> Result<(), BlobError> {
        let key = self.blob_key(sha256)?;
        let name = key.to_string();
        let (store, head_key) = (self.store.clone(), key.clone());
        match self.run(async move { store.head(&head_key).await })? {
            // Same digest, same bytes: the object is already there.
            Ok(_) => return Ok(()),
            Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(s3_err("check", &self.bucket, &name)(e)),
        }
        let file = staged.reopen()?;
        let store = self.store.clone();
        self.run(upload(store, key, file))?.map_err(s3_err("upload", &self.bucket, &name))?;
        drop(staged);
        Ok(())
    }

    fn open(&self, sha256: &str) -> Result<Option<Blob>, BlobError> {
        let key = self.blob_key(sha256)?;
        let name = key.to_string();
        let (store, head_key) = (self.store.clone(), key.clone());
        match self.run(async move { store.head(&head_key).await })? {
            Ok(meta) => Ok(Some(Blob {
                len: meta.size,
                body: BlobBody::Object(S3Object {
                    store: self.store.clone(),
                    path: key,
                    handle: self.runtime.as_ref().map(|r| r.handle().clone()).ok_or(BlobError::Unsupported("s3"))?,
                    bucket: self.bucket.clone(),
                }),
            })),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(s3_err("read", &self.bucket, &name)(e)),
        }
    }

    fn remove(&self, sha256: &str) -> Result<(), BlobError> {
        let key = self.blob_key(sha256)?;
        let name = key.to_string();
        let store = self.store.clone();
        match self.run(async move { store.delete(&key).await })? {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(s3_err("delete", &self.bucket, &name)(e)),
        }
    }

    fn list(&self) -> Result<Vec<String>, BlobError> {
        let prefix = self.key("sha256");
        let store = self.store.clone();
        let listed = self.run(async move { store.list(Some(&prefix)).collect::<Vec<_>>().await })?;
        let mut out = Vec::new();
        for meta in listed {
            let meta = meta.map_err(s3_err("list", &self.bucket, &self.prefix))?;
            if let Some(name) = meta.location.filename()
                && is_sha256_hex(name)
            {
                out.push(name.to_owned());
            }
        }
        Ok(out)
    }
}
