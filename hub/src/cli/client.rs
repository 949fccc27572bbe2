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

/// The hub's base URL from `--hub`: as given when it has a scheme;
/// `http://` added to a loopback `HOST:PORT` (plain text never leaves the
/// machine); anything else is refused saying what to write.
pub fn hub_base_url(given: &str) -> Result<String, CliError> {
    let given = given.trim();
    let url = if given.contains("://") {
        given.trim_end_matches('/').to_owned()
    } else {
        let given = given.trim_end_matches('/');
        let host = given.split([':', '/']).next().unwrap_or_default();
        let bracketed = given.starts_with("[::1]");
        if bracketed || host == "localhost" || host.starts_with("127.") {
            format!("http://{given}")
        } else {
            return Err(CliError::Usage(format!(
                "--hub {given:?} has no scheme: write https://{given} (http:// only on loopback)"
            )));
        }
    };
    match reqwest::Url::parse(&url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(url),
        Ok(u) => Err(CliError::Usage(format!("--hub {given:?}: the scheme must be http or https, not {}", u.scheme()))),
        Err(e) => Err(CliError::Usage(format!("--hub {given:?} is not a URL: {e}"))),
    }
}

impl HubClient {
    /// A client of the hub at `base` (see [`hub_base_url`]).
    pub fn new(base: &str, token: Option<String>) -> Result<Self, CliError> {
        let base = hub_base_url(base)?;
        let base = base.as_str();
        crate::install_crypto_provider();
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .user_agent(concat!("sentinel-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| CliError::Unreachable { url: base.to_owned(), source })?;
        Ok(Self { base: base.trim_end_matches('/').to_owned(), token, http })
    }

    /// The hub's base URL, as this client reaches it.
    pub fn base(&self) -> &str {
        &self.base
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hub_url_without_a_scheme_is_http_on_loopback_and_refused_elsewhere() {
        let ok = |s: &str| hub_base_url(s).unwrap_or_else(|e| panic!("{s}: {e}"));
        assert_eq!(ok("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(ok("localhost:8080/"), "http://localhost:8080");
        assert_eq!(ok("[::1]:8080"), "http://[::1]:8080");
        assert_eq!(ok("https://hub.example:8443"), "https://hub.example:8443");
        for (bad, why) in [
            ("hub.example:8080", "has no scheme: write https://hub.example:8080"),
            ("ftp://hub.example", "the scheme must be http or https, not ftp"),
            ("http://", "is not a URL"),
        ] {
            let err = hub_base_url(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }
}
