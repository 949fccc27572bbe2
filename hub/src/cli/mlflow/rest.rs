//! MLflow's REST API as the import reads it (`/api/2.0/mlflow/...`: registered
//! models, model versions, runs, logged models) and the artifact proxy
//! (`/api/2.0/mlflow-artifacts/artifacts/...`). Every body read is bounded.

use std::path::Path;

use ring::digest;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

use crate::cli::commands::q;

/// Largest JSON answer read (a page of 1,000 versions is well under 2 MiB).
const MAX_JSON_BYTES: usize = 16 * 1024 * 1024;
/// Versions asked for per search page, and the most an import reads.
const PAGE: u32 = 1_000;
pub const MAX_VERSIONS: usize = 10_000;

/// A failure to read from the tracking server.
#[derive(Debug, thiserror::Error)]
pub enum MlflowError {
    #[error("cannot reach the MLflow tracking server at {url}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("MLflow answered {status} to {what}: {message}")]
    Answered { what: String, status: u16, message: String },
    #[error("MLflow sent {what} this CLI does not understand")]
    Protocol {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("MLflow model {model} has no version {what}")]
    NoSuchVersion { model: String, what: String },
    #[error("the artifact {path} is larger than {cap} bytes, the hub's default upload limit")]
    TooLarge { path: String, cap: u64 },
    #[error("writing the download to {path}")]
    LocalFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl MlflowError {
    /// True when the server answered that the thing asked for does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self, MlflowError::Answered { status: 404, .. } | MlflowError::NoSuchVersion { .. })
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct Tag {
    pub key: String,
    #[serde(default)]
    pub value: String,
}

/// A registered model version (`ModelVersion` in MLflow's protocol).
#[derive(Debug, Clone, Deserialize)]
pub struct ModelVersion {
    pub version: String,
    #[serde(default)]
    pub current_stage: String,
    #[serde(default)]
    pub source: String,
    #[serde(default)]
    pub run_id: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub tags: Vec<Tag>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RegisteredModel {
    pub name: String,
    #[serde(default)]
    pub description: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Metric {
    pub key: String,
    pub value: f64,
    #[serde(default)]
    pub timestamp: i64,
    #[serde(default)]
    pub step: i64,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Run {
    pub info: RunInfo,
    #[serde(default)]
    pub data: RunData,
}

#[derive(Debug, Clone, Deserialize)]
pub struct RunInfo {
    #[serde(default)]
    pub artifact_uri: String,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct RunData {
    #[serde(default)]
    pub metrics: Vec<Metric>,
}

/// One entry of an artifact directory listing.
#[derive(Debug, Clone, Deserialize)]
pub struct FileInfo {
    pub path: String,
    #[serde(default)]
    pub is_dir: bool,
    /// A number, or a string in some protobuf-to-JSON renderings.
    #[serde(default)]
    file_size: Option<Value>,
}

impl FileInfo {
    pub fn size(&self) -> Option<u64> {
        match &self.file_size {
            Some(Value::Number(n)) => n.as_u64(),
            Some(Value::String(s)) => s.parse().ok(),
            _ => None,
        }
    }
}

/// One tracking server.
#[derive(Debug, Clone)]
pub struct MlflowClient {
    base: String,
    http: reqwest::Client,
}

impl MlflowClient {
    pub fn new(tracking_uri: &str) -> Result<Self, MlflowError> {
        crate::install_crypto_provider();
        let base = tracking_uri.trim_end_matches('/').to_owned();
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .user_agent(concat!("sentinel-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| MlflowError::Unreachable { url: base.clone(), source })?;
        Ok(Self { base, http })
    }

    /// `host:port` of the tracking URI, to compare with an artifact URI's.
    pub fn authority(&self) -> &str {
        let rest = self.base.split_once("://").map_or(self.base.as_str(), |(_, r)| r);
        rest.split('/').next().unwrap_or_default()
    }

    async fn send(&self, what: &str, req: reqwest::RequestBuilder) -> Result<reqwest::Response, MlflowError> {
        let resp = req.send().await.map_err(|source| MlflowError::Unreachable { url: self.base.clone(), source })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let body = read_capped(resp, 64 * 1024).await.unwrap_or_default();
        let text = String::from_utf8_lossy(&body).into_owned();
        // MLflow's errors: {"error_code": "...", "message": "..."}.
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| if text.trim().is_empty() { format!("HTTP {status}") } else { text });
        Err(MlflowError::Answered { what: what.to_owned(), status, message })
    }

    async fn get<T: DeserializeOwned>(&self, what: &str, path_and_query: &str) -> Result<T, MlflowError> {
        let resp = self.send(what, self.http.get(format!("{}{path_and_query}", self.base))).await?;
        parse(what, resp).await
    }

    pub async fn registered_model(&self, name: &str) -> Result<RegisteredModel, MlflowError> {
        #[derive(Deserialize)]
        struct R {
            registered_model: RegisteredModel,
        }
        let what = format!("registered model {name}");
        let r: R = self.get(&what, &format!("/api/2.0/mlflow/registered-models/get?name={}", q(name))).await?;
        Ok(r.registered_model)
    }

    pub async fn version(&self, name: &str, version: &str) -> Result<ModelVersion, MlflowError> {
        let what = format!("model {name} version {version}");
        let path = format!("/api/2.0/mlflow/model-versions/get?name={}&version={}", q(name), q(version));
        Ok(self.get::<VersionEnvelope>(&what, &path).await?.model_version)
    }

    pub async fn version_by_alias(&self, name: &str, alias: &str) -> Result<ModelVersion, MlflowError> {
        let what = format!("model {name} alias {alias}");
        let path = format!("/api/2.0/mlflow/registered-models/alias?name={}&alias={}", q(name), q(alias));
        match self.get::<VersionEnvelope>(&what, &path).await {
            Ok(v) => Ok(v.model_version),
            // MLflow answers an unknown alias with 400 INVALID_PARAMETER_VALUE.
            Err(MlflowError::Answered { status: 400 | 404, message, .. }) => Err(MlflowError::NoSuchVersion {
                model: name.to_owned(),
                what: format!("with alias {alias} ({message})"),
            }),
            Err(e) => Err(e),
        }
    }

    /// The latest version in a legacy stage (`Staging`, `Production`...).
    pub async fn latest_in_stage(&self, name: &str, stage: &str) -> Result<ModelVersion, MlflowError> {
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            model_versions: Vec<ModelVersion>,
        }
        let what = format!("model {name} stage {stage}");
        let url = format!("{}/api/2.0/mlflow/registered-models/get-latest-versions", self.base);
        let resp = self.send(&what, self.http.post(url).json(&json!({"name": name, "stages": [stage]}))).await?;
        let r: R = parse(&what, resp).await?;
        r.model_versions
            .into_iter()
            .next()
            .ok_or_else(|| MlflowError::NoSuchVersion { model: name.to_owned(), what: format!("in stage {stage}") })
    }

    /// Every version of a model, at most [`MAX_VERSIONS`].
    pub async fn versions(&self, name: &str) -> Result<Vec<ModelVersion>, MlflowError> {
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            model_versions: Vec<ModelVersion>,
            #[serde(default)]
            next_page_token: String,
        }
        let quote = if name.contains('\'') { '"' } else { '\'' };
        let filter = format!("name={quote}{name}{quote}");
        let what = format!("the versions of model {name}");
        let (mut all, mut token) = (Vec::new(), String::new());
        loop {
            let mut path = format!("/api/2.0/mlflow/model-versions/search?filter={}&max_results={PAGE}", q(&filter));
            if !token.is_empty() {
                path.push_str(&format!("&page_token={}", q(&token)));
            }
            let r: R = self.get(&what, &path).await?;
            all.extend(r.model_versions);
            if all.len() > MAX_VERSIONS {
                return Err(MlflowError::Protocol {
                    what: what.clone(),
                    source: format!("more than {MAX_VERSIONS} versions; import them one at a time with --version")
                        .into(),
                });
            }
            if r.next_page_token.is_empty() {
                return Ok(all);
            }
            token = r.next_page_token;
        }
    }

    /// Where a version's files are: the server's own resolution of its source.
    pub async fn download_uri(&self, name: &str, version: &str) -> Result<String, MlflowError> {
        #[derive(Deserialize)]
        struct R {
            artifact_uri: String,
        }
        let what = format!("the download URI of model {name} version {version}");
        let path = format!("/api/2.0/mlflow/model-versions/get-download-uri?name={}&version={}", q(name), q(version));
        Ok(self.get::<R>(&what, &path).await?.artifact_uri)
    }

    pub async fn run(&self, run_id: &str) -> Result<Run, MlflowError> {
        #[derive(Deserialize)]
        struct R {
            run: Run,
        }
        let what = format!("run {run_id}");
        Ok(self.get::<R>(&what, &format!("/api/2.0/mlflow/runs/get?run_id={}", q(run_id))).await?.run)
    }

    /// The artifact URI of an MLflow 3 logged model (`models:/m-ID`).
    pub async fn logged_model_uri(&self, id: &str) -> Result<String, MlflowError> {
        let what = format!("logged model {id}");
        let v: Value = self.get(&what, &format!("/api/2.0/mlflow/logged-models/{}", q(id))).await?;
        v["model"]["info"]["artifact_uri"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| MlflowError::Protocol { what, source: "no model.info.artifact_uri".into() })
    }

    /// One directory of the artifact proxy, at `path` under its root.
    pub async fn list(&self, path: &str) -> Result<Vec<FileInfo>, MlflowError> {
        #[derive(Deserialize)]
        struct R {
            #[serde(default)]
            files: Vec<FileInfo>,
        }
        let what = format!("the artifact listing of {path}");
        Ok(self.get::<R>(&what, &format!("/api/2.0/mlflow-artifacts/artifacts?path={}", q(path))).await?.files)
    }

    fn artifact_url(&self, path: &str) -> String {
        let segments: Vec<String> = path.split('/').map(q).collect();
        format!("{}/api/2.0/mlflow-artifacts/artifacts/{}", self.base, segments.join("/"))
    }

    /// A small artifact (an `MLmodel` file), whole, at most `cap` bytes.
    pub async fn read(&self, path: &str, cap: usize) -> Result<Vec<u8>, MlflowError> {
        let what = format!("artifact {path}");
        let resp = self.send(&what, self.http.get(self.artifact_url(path))).await?;
        read_capped(resp, cap).await.map_err(|source| MlflowError::Protocol { what, source })
    }

    /// Streams an artifact into `dest`, at most `cap` bytes, and returns its
    /// sha256 (hex) and size. Nothing is held in memory but one chunk.
    pub async fn download(&self, path: &str, dest: &Path, cap: u64) -> Result<(String, u64), MlflowError> {
        let what = format!("artifact {path}");
        let mut resp = self.send(&what, self.http.get(self.artifact_url(path))).await?;
        let too_large = || MlflowError::TooLarge { path: path.to_owned(), cap };
        if resp.content_length().is_some_and(|n| n > cap) {
            return Err(too_large());
        }
        let local = |source| MlflowError::LocalFile { path: dest.display().to_string(), source };
        let mut file = tokio::fs::File::create(dest).await.map_err(local)?;
        let mut sha = digest::Context::new(&digest::SHA256);
        let mut size = 0u64;
        while let Some(chunk) =
            resp.chunk().await.map_err(|e| MlflowError::Protocol { what: what.clone(), source: e.into() })?
        {
            size = size.checked_add(chunk.len() as u64).filter(|n| *n <= cap).ok_or_else(too_large)?;
            sha.update(&chunk);
            file.write_all(&chunk).await.map_err(local)?;
        }
        file.flush().await.map_err(local)?;
        Ok((hex::encode(sha.finish()), size))
    }
}

#[derive(Deserialize)]
struct VersionEnvelope {
    model_version: ModelVersion,
}

async fn parse<T: DeserializeOwned>(what: &str, resp: reqwest::Response) -> Result<T, MlflowError> {
    let body = read_capped(resp, MAX_JSON_BYTES)
        .await
        .map_err(|source| MlflowError::Protocol { what: what.to_owned(), source })?;
    serde_json::from_slice(&body).map_err(|e| MlflowError::Protocol { what: what.to_owned(), source: e.into() })
}

/// A response body, refused past `cap` bytes.
async fn read_capped(
    mut resp: reqwest::Response,
    cap: usize,
) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync>> {
    let mut out = Vec::new();
    while let Some(chunk) = resp.chunk().await? {
        if out.len().saturating_add(chunk.len()) > cap {
            return Err(format!("an answer larger than {cap} bytes").into());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}
