//! A real hub on 127.0.0.1:0 with its own data dir, and helpers to call it.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use reqwest::{Client, Method, RequestBuilder, Response};
use sentinel_hub::{Hub, HubConfig};
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The repository's `models/` folder.
pub fn models_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("models")
}

pub fn model_path(rel: &str) -> PathBuf {
    models_dir().join(rel)
}

pub fn model_bytes(rel: &str) -> Vec<u8> {
    std::fs::read(model_path(rel)).unwrap()
}

/// `target/<profile>` of this test binary (`target/<profile>/deps/it-…`).
pub fn profile_dir() -> PathBuf {
    sentinel_testkit::bins::profile_dir()
}

/// The `sentinel-agent` and `sentinel-worker` binaries of this build, for
/// tests that need a real device process (built on demand, see
/// [`sentinel_testkit::bins`]).
pub fn agent_binaries() -> (PathBuf, PathBuf) {
    (sentinel_testkit::bins::agent(), sentinel_testkit::bins::worker())
}

pub const V1: &str = "digits/digits_mlp_v1.onnx";
pub const V2: &str = "digits/digits_mlp_v2_degraded.onnx";
pub const V3: &str = "digits/digits_mlp_v3_slow.onnx";
pub const VISION: &str = "vision/ch_ppocr_mobile_v2.0_cls_infer.onnx";

pub struct TestHub {
    pub url: String,
    pub grpc_url: String,
    /// Base URL of the plain-HTTP metrics listener (`{metrics_url}/metrics`).
    pub metrics_url: String,
    pub admin: String,
    pub dir: PathBuf,
    pub client: Client,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _tmp: Option<tempfile::TempDir>,
}

impl TestHub {
    pub async fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut hub = Self::start_in(&dir, None).await;
        hub._tmp = Some(tmp);
        hub
    }

    /// Starts a hub on an existing data dir (for restarts).
    pub async fn start_in(dir: &Path, max_upload: Option<u64>) -> Self {
        let mut config = HubConfig::new(dir);
        if let Some(m) = max_upload {
            config.max_upload_bytes = m;
        }
        Self::start_with(config).await
    }

    /// Starts a hub with `config`, on free loopback ports.
    pub async fn start_with(mut config: HubConfig) -> Self {
        sentinel_hub::install_crypto_provider();
        config.listen = "127.0.0.1:0".parse().unwrap();
        config.grpc_listen = Some("127.0.0.1:0".parse().unwrap());
        config.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
        // Every upload is checked by a real sentinel-worker of this build.
        if config.inspect.worker.is_none() {
            config.inspect.worker = Some(agent_binaries().1);
        }
        let dir = config.data_dir.clone();
        let hub = Hub::open(config).unwrap();
        let listener = hub.bind().await.unwrap();
        let addr = listener.rest_addr().unwrap();
        let grpc_addr = listener.grpc_addr().unwrap();
        let metrics_addr = listener.metrics_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            hub.serve(listener, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        let admin = std::fs::read_to_string(dir.join("admin.token")).unwrap().trim().to_owned();
        Self {
            url: format!("http://{addr}"),
            grpc_url: format!("http://{grpc_addr}"),
            metrics_url: format!("http://{metrics_addr}"),
            admin,
            dir: dir.to_path_buf(),
            client: Client::builder().tcp_nodelay(true).build().unwrap(),
            stop: Some(stop),
            task: Some(task),
            _tmp: None,
        }
    }

    /// Stops the server and waits until it has let go of the port.
    pub async fn stop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap();
        }
    }

    /// Takes ownership of the temp dir so it outlives a restart.
    pub fn keep_dir(&mut self) -> Option<tempfile::TempDir> {
        self._tmp.take()
    }

    pub fn req(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let mut r = self.client.request(method, format!("{}{}", self.url, path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r
    }

    pub async fn get(&self, path: &str, token: &str) -> Response {
        self.req(Method::GET, path, Some(token)).send().await.unwrap()
    }

    pub async fn post_json(&self, path: &str, token: &str, body: Value) -> Response {
        self.req(Method::POST, path, Some(token)).json(&body).send().await.unwrap()
    }

    pub async fn token(&self, role: &str) -> String {
        let r =
            self.post_json("/api/v1/tokens", &self.admin, json!({"role": role, "name": format!("test-{role}")})).await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned()
    }

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

    /// Registers `name` and uploads digits v1 as `version`, asserting success.
    pub async fn push_v1(&self, name: &str, version: &str) -> Value {
        let r = self
            .upload(
                name,
                version,
                model_bytes(V1),
                "&stage=staging&accuracy=0.9694&metric=top1&hardware=x86_64,aarch64",
            )
            .await;
        assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
        r.json().await.unwrap()
    }
}

impl Drop for TestHub {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// Asserts a JSON error response with `status`, returning its message.
pub async fn expect_error(r: Response, status: u16) -> String {
    let got = r.status().as_u16();
    let text = r.text().await.unwrap();
    assert_eq!(got, status, "expected {status}, got {got}: {text}");
    let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("error body is not JSON: {text}"));
    let msg = v["error"]["message"].as_str().unwrap_or_else(|| panic!("no error.message in {text}")).to_owned();
    assert!(!msg.is_empty());
    msg
}

/// What a run of the `sentinel` CLI printed, and its exit code.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// Runs the real `sentinel` binary against `hub` as `token`.
pub async fn sentinel(hub: &TestHub, token: &str, args: &[&str]) -> Run {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sentinel"))
        .args(args)
        .env("SENTINEL_HUB", &hub.url)
        .env("SENTINEL_TOKEN", token)
        .output()
        .await
        .unwrap();
    Run {
        code: out.status.code().unwrap(),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}
