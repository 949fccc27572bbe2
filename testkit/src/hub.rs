//! A real hub in the test's process: REST, gRPC and metrics on free loopback
//! ports, its own data dir, and a real `sentinel-worker` checking uploads.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use reqwest::{Client, Method, RequestBuilder, Response};
use sentinel_hub::{Hub, HubConfig};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::models::{V1, model_bytes};
use crate::wait::{WAIT, eventually};

/// A running hub. Dropping it stops the server; [`TestHub::stop`] also
/// waits until the ports are free.
#[derive(Debug)]
pub struct TestHub {
    pub url: String,
    pub grpc_url: String,
    /// Base URL of the plain-HTTP metrics listener (`{metrics_url}/metrics`).
    pub metrics_url: String,
    pub admin: String,
    pub dir: PathBuf,
    pub client: Client,
    pub rest_addr: std::net::SocketAddr,
    pub grpc_addr: std::net::SocketAddr,
    /// The running hub's state: its stores, for what the API does not show.
    pub state: sentinel_hub::service::SharedState,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    tmp: Option<tempfile::TempDir>,
}

impl TestHub {
    /// A hub on a fresh temporary data dir.
    pub async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let mut hub = Self::start_with(HubConfig::new(tmp.path())).await;
        hub.tmp = Some(tmp);
        hub
    }

    /// A hub on `dir` (new, or kept from an earlier hub for a restart) with
    /// a 2 s device heartbeat, after `tweak` has had its say on the config.
    /// `tweak` may set the listen addresses (a restart on the same ports).
    pub async fn start_at(dir: &Path, tweak: impl FnOnce(&mut HubConfig)) -> Self {
        let mut config = HubConfig::new(dir);
        free_ports(&mut config);
        config.heartbeat = std::time::Duration::from_secs(2);
        tweak(&mut config);
        Self::start_on(config).await
    }

    /// A hub on an existing data dir (for restarts), with an upload cap.
    pub async fn start_in(dir: &Path, max_upload: Option<u64>) -> Self {
        let mut config = HubConfig::new(dir);
        if let Some(m) = max_upload {
            config.max_upload_bytes = m;
        }
        Self::start_with(config).await
    }

    /// A hub with `config`, on free loopback ports whatever it says.
    pub async fn start_with(mut config: HubConfig) -> Self {
        free_ports(&mut config);
        Self::start_on(config).await
    }

    /// A hub with `config` as it is.
    async fn start_on(mut config: HubConfig) -> Self {
        sentinel_hub::install_crypto_provider();
        crate::backend::apply(&mut config).await;
        // Every upload is checked by a real sentinel-worker of this build.
        if config.inspect.worker.is_none() {
            config.inspect.worker = Some(crate::bins::worker());
        }
        let dir = config.data_dir.clone();
        // On a blocking thread, so hubs started together really start at once.
        let hub = tokio::task::spawn_blocking(move || Hub::open(config)).await.unwrap().unwrap();
        let listeners = hub.bind().await.unwrap();
        let state = hub.state().clone();
        let rest_addr = listeners.rest_addr().unwrap();
        let grpc_addr = listeners.grpc_addr().unwrap();
        let metrics_addr = listeners.metrics_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            hub.serve(listeners, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        // Of replicas on one database, only the one that made the first
        // admin token has the file; the test hands the token to the others.
        let admin = std::fs::read_to_string(dir.join("admin.token")).map(|t| t.trim().to_owned()).unwrap_or_default();
        Self {
            url: format!("http://{rest_addr}"),
            grpc_url: format!("http://{grpc_addr}"),
            metrics_url: format!("http://{metrics_addr}"),
            admin,
            dir,
            client: Client::builder().tcp_nodelay(true).build().unwrap(),
            rest_addr,
            grpc_addr,
            state,
            stop: Some(stop),
            task: Some(task),
            tmp: None,
        }
    }

    /// Stops the server and waits (bounded) until it has let go of its ports.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            tokio::time::timeout(WAIT, t).await.expect("the hub did not stop").unwrap();
        }
    }

    /// Takes ownership of the temp dir so it outlives a restart.
    pub fn keep_dir(&mut self) -> Option<tempfile::TempDir> {
        self.tmp.take()
    }

    /// A request to `path` on the REST API, as `token` if given.
    pub fn req(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let mut r = self.client.request(method, format!("{}{}", self.url, path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// `GET path` as `token`.
    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.req(Method::GET, path, Some(token)).send().await.unwrap()
    }

    /// `POST path` with a JSON body as `token`.
    pub async fn post_json(&self, path: &str, token: &str, body: Value) -> Response {
        self.req(Method::POST, path, Some(token)).json(&body).send().await.unwrap()
    }

    /// `GET path` as the admin, asserting success; the JSON answer.
    pub async fn admin_get(&self, path: &str) -> Value {
        let r = self.get(path, &self.admin).await;
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// `POST path` as the admin, asserting success; the JSON answer.
    pub async fn admin_post(&self, path: &str, body: Value) -> Value {
        let r = self.post_json(path, &self.admin, body).await;
        let status = r.status();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        assert!(status.is_success(), "POST {path}: {status} {v}");
        v
    }

    /// A new API token with `role`.
    pub async fn token(&self, role: &str) -> String {
        let r =
            self.post_json("/api/v1/tokens", &self.admin, json!({"role": role, "name": format!("test-{role}")})).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned()
    }

    /// Registers the model `name`, asserting it is new.
    pub async fn register(&self, name: &str) {
        let r = self.post_json("/api/v1/models", &self.admin, json!({"name": name, "description": "test"})).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    /// Uploads `bytes` as `name` `version` with extra query parameters.
    pub async fn upload(&self, name: &str, version: &str, bytes: Vec<u8>, query: &str) -> Response {
        let path = format!("/api/v1/models/{name}/versions?version={version}{query}");
        self.req(Method::POST, &path, Some(&self.admin))
            .header("content-type", "application/octet-stream")
            .body(bytes)
            .send()
            .await
            .unwrap()
    }

    /// Uploads `model` as `version` of `name` with a publisher's signature
    /// bundle (multipart), as `sentinel model push --signature` does.
    pub async fn upload_signed(&self, name: &str, version: &str, model: Vec<u8>, bundle: Vec<u8>) -> Response {
        let form = reqwest::multipart::Form::new()
            .part("model", reqwest::multipart::Part::bytes(model).file_name("model.onnx"))
            .part("signature", reqwest::multipart::Part::bytes(bundle).file_name("model.sig"));
        let path = format!("/api/v1/models/{name}/versions?version={version}");
        self.req(Method::POST, &path, Some(&self.admin)).multipart(form).send().await.unwrap()
    }

    /// Registers `name` and uploads digits v1 as `version`, asserting success.
    pub async fn push_v1(&self, name: &str, version: &str) -> Value {
        let query = "&stage=staging&accuracy=0.9694&metric=top1&hardware=x86_64,aarch64";
        let r = self.upload(name, version, model_bytes(V1), query).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        r.json().await.unwrap()
    }

    /// Registers `name` if it is new and uploads the model file `rel` as
    /// `version`, asserting success.
    pub async fn push(&self, name: &str, version: &str, rel: &str, query: &str) {
        // 201, or 409 when the model exists: either way it is there.
        let _ = self.post_json("/api/v1/models", &self.admin, json!({"name": name})).await;
        let r = self.upload(name, version, model_bytes(rel), query).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    }

    /// Deploys `name` `version` to the devices `target` selects.
    pub async fn deploy(&self, name: &str, version: &str, target: &str) -> Value {
        self.admin_post(&format!("/api/v1/models/{name}/deploy"), json!({"version": version, "target": target})).await
    }

    /// Enrols a device and returns its token.
    pub async fn enroll(&self, id: &str, labels: &[(&str, &str)]) -> String {
        let labels: BTreeMap<&str, &str> = labels.iter().copied().collect();
        let v = self.admin_post("/api/v1/devices", json!({"id": id, "labels": labels})).await;
        v["token"].as_str().unwrap().to_owned()
    }

    /// The hub's current signing key, as a device pins it.
    pub async fn public_key(&self) -> String {
        let v: Value = self.client.get(format!("{}/api/v1/keys", self.url)).send().await.unwrap().json().await.unwrap();
        v["keys"][0]["public_key"].as_str().unwrap().to_owned()
    }

    /// What the blob store holds: every committed blob's digest, and the
    /// name of every staging file an upload left (local disk: `.upload-*`
    /// beside the blobs; S3: the files in `DATA_DIR/staging`), sorted.
    pub async fn stored_blobs(&self) -> Vec<String> {
        let mut v = self.state.blobs(|b| b.list()).await.unwrap();
        for dir in [self.dir.join("blobs/sha256"), self.dir.join("staging")] {
            if let Ok(entries) = std::fs::read_dir(dir) {
                v.extend(
                    entries
                        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with(".upload-")),
                );
            }
        }
        v.sort();
        v
    }

    /// Path of a blob in the hub's store.
    pub fn blob_path(&self, sha: &str) -> PathBuf {
        self.dir.join("blobs/sha256").join(sha)
    }

    /// Polls the hub's device API until `pred` holds (the hub only shows
    /// what devices report, so there is nothing to subscribe to).
    pub async fn wait_device(&self, id: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let what = format!("device {id} reaching the expected state");
        eventually(&what, WAIT, async || {
            Some(self.admin_get(&format!("/api/v1/devices/{id}")).await).filter(|v| pred(v))
        })
        .await
    }
}

/// REST, gRPC and metrics on free loopback ports.
fn free_ports(config: &mut HubConfig) {
    config.listen = "127.0.0.1:0".parse().unwrap();
    config.grpc_listen = Some("127.0.0.1:0".parse().unwrap());
    config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}
