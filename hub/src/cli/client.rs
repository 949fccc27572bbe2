//! A small client of the hub's `/api/v1`, used by the CLI (and the demo).

use std::path::Path;

use futures_util::StreamExt as _;
use indicatif::{ProgressBar, ProgressStyle};
use reqwest::{Body, Method, RequestBuilder, Response};
use serde_json::Value;
use tokio_util::io::ReaderStream;

use super::CliError;

/// Talks to one hub with one token.
#[derive(Debug, Clone)]
pub struct HubClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl HubClient {
    pub fn new(base: &str, token: Option<String>) -> Result<Self, CliError> {
        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .user_agent(concat!("sentinel-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| CliError::Unreachable { url: base.to_owned(), source })?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), token, http })
    }

    fn request(&self, method: Method, path: &str) -> RequestBuilder {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    async fn send(&self, req: RequestBuilder) -> Result<Response, CliError> {
        let resp = req.send().await.map_err(|source| CliError::Unreachable { url: self.base.clone(), source })?;
        if resp.status().is_success() {
            return Ok(resp);
        }
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        let message = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_owned))
            .unwrap_or_else(|| if text.is_empty() { format!("HTTP {status}") } else { text });
        Err(CliError::Hub { status, message })
    }

    async fn json(resp: Response) -> Result<Value, CliError> {
        if resp.status() == reqwest::StatusCode::NO_CONTENT {
            return Ok(Value::Null);
        }
        resp.json().await.map_err(CliError::Protocol)
    }

    pub async fn get(&self, path: &str) -> Result<Value, CliError> {
        Self::json(self.send(self.request(Method::GET, path)).await?).await
    }

    pub async fn send_json(&self, method: Method, path: &str, body: &Value) -> Result<Value, CliError> {
        Self::json(self.send(self.request(method, path).json(body)).await?).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, CliError> {
        Self::json(self.send(self.request(Method::DELETE, path)).await?).await
    }

    /// Streams `file` to `path` as the request body, showing a progress bar
    /// on a terminal.
    pub async fn upload_file(&self, path: &str, file: &Path, show_progress: bool) -> Result<Value, CliError> {
        let (body, bar) = file_body(file, show_progress).await?;
        let resp = self
            .send(self.request(Method::POST, path).header("content-type", "application/octet-stream").body(body))
            .await;
        bar.finish_and_clear();
        Self::json(resp?).await
    }

    /// Uploads a model with other parts as multipart/form-data, streaming
    /// each: a validation set (inputs, labels) and a signature bundle.
    pub async fn upload_multipart(
        &self,
        path: &str,
        model: &Path,
        validation: Option<(&Path, &Path)>,
        signature: Option<&Path>,
        show_progress: bool,
    ) -> Result<Value, CliError> {
        let (model_body, bar) = file_body(model, show_progress).await?;
        let mut form = reqwest::multipart::Form::new().part("model", stream_part(model, model_body).await?);
        let mut parts = Vec::new();
        if let Some((inputs, labels)) = validation {
            parts.extend([("validation_inputs", inputs), ("validation_labels", labels)]);
        }
        parts.extend(signature.map(|p| ("signature", p)));
        for (name, p) in parts {
            let (body, _) = file_body(p, false).await?;
            form = form.part(name, stream_part(p, body).await?);
        }
        let resp = self.send(self.request(Method::POST, path).multipart(form)).await;
        bar.finish_and_clear();
        Self::json(resp?).await
    }
}

fn local(path: &Path) -> impl FnOnce(std::io::Error) -> CliError {
    let path = path.display().to_string();
    move |source| CliError::LocalFile { path, source }
}

async fn stream_part(path: &Path, body: Body) -> Result<reqwest::multipart::Part, CliError> {
    let len = tokio::fs::metadata(path).await.map_err(local(path))?.len();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(reqwest::multipart::Part::stream_with_length(body, len).file_name(name))
}

/// A streaming body over `path` that advances a progress bar.
async fn file_body(path: &Path, show_progress: bool) -> Result<(Body, ProgressBar), CliError> {
    let file = tokio::fs::File::open(path).await.map_err(local(path))?;
    let len = file.metadata().await.map_err(local(path))?.len();
    let bar = if show_progress { ProgressBar::new(len) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.set_message(format!("uploading {}", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    let ticker = bar.clone();
    let stream = ReaderStream::with_capacity(file, 256 * 1024).inspect(move |chunk| {
        if let Ok(c) = chunk {
            ticker.inc(c.len() as u64);
        }
    });
    Ok((Body::wrap_stream(stream), bar))
}
