//! The client side of the operator commands: a minimal HTTP client for the
//! control socket ([`crate::control`]) and the tables `status` and `models`
//! print.
//!
//! The client speaks HTTP/1.0 with blocking std I/O: one request per
//! connection, a body that ends at EOF, no chunked encoding, no runtime.
//! That is all a local status command needs, and it cannot get stuck on
//! half-read keep-alive connections.

use std::fmt::Write as _;
use std::io::{Read as _, Write as _};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::control::{ModelLine, SlotStatus, Status};

/// How long a control request may take before the client gives up (an
/// operator rollback waits for the rollout to stop, which is quick).
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// Why a control request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "the agent is not running: nothing answers on its control socket {path} (start it with `sentinel-agent run`, or pass the --config it runs with)"
    )]
    NotRunning {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the agent on {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the agent's answer is not HTTP: {0}")]
    Protocol(String),
    /// The agent answered with an error status and this message.
    #[error("{0}")]
    Refused(String),
}

impl ClientError {
    /// The documented exit code: 69 (EX_UNAVAILABLE) when no agent answers,
    /// 1 when it refused the request, 70 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::NotRunning { .. } => 69,
            ClientError::Refused(_) => 1,
            ClientError::Io { .. } | ClientError::Protocol(_) => 70,
        }
    }
}

/// Sends one request on the control socket and returns the JSON body of a
/// 2xx answer; an error answer's `{"error"}` becomes [`ClientError::Refused`].
pub fn request(socket: &Path, method: &str, path: &str) -> Result<serde_json::Value, ClientError> {
    let io = |source| ClientError::Io { path: socket.to_path_buf(), source };
    let mut stream = UnixStream::connect(socket).map_err(|source| {
        use std::io::ErrorKind::{ConnectionRefused, NotFound};
        if matches!(source.kind(), NotFound | ConnectionRefused) {
            ClientError::NotRunning { path: socket.to_path_buf(), source }
        } else {
            ClientError::Io { path: socket.to_path_buf(), source }
        }
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let head = format!("{method} {path} HTTP/1.0\r\nHost: sentinel-agent\r\nContent-Length: 0\r\n\r\n");
    stream.write_all(head.as_bytes()).map_err(io)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(io)?;
    let split = answer
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| ClientError::Protocol("no end of headers".to_owned()))?;
    let head = String::from_utf8_lossy(&answer[..split]);
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| ClientError::Protocol(format!("bad status line {:?}", head.lines().next())))?;
    let body = &answer[split + 4..];
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| ClientError::Protocol(format!("HTTP {code} with a body that is not JSON: {e}")))?;
    if (200..300).contains(&code) {
        Ok(value)
    } else {
        let message = value["error"].as_str().map_or_else(|| format!("HTTP {code}: {value}"), str::to_owned);
        Err(ClientError::Refused(message))
    }
}

/// Fetches and decodes the agent's status.
pub fn fetch_status(socket: &Path) -> Result<Status, ClientError> {
    serde_json::from_value(request(socket, "GET", "/status")?)
        .map_err(|e| ClientError::Protocol(format!("the status does not parse: {e}")))
}

/// Fetches the model list.
pub fn fetch_models(socket: &Path) -> Result<Vec<ModelLine>, ClientError> {
    serde_json::from_value(request(socket, "GET", "/models")?)
        .map_err(|e| ClientError::Protocol(format!("the model list does not parse: {e}")))
}

/// Asks for an operator rollback of `model`; returns what the agent did.
pub fn rollback(socket: &Path, model: &str) -> Result<String, ClientError> {
    if model.is_empty() || !model.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b)) {
        return Err(ClientError::Refused(format!("{model:?} is not a model name")));
    }
    let v = request(socket, "POST", &format!("/rollback/{model}"))?;
    Ok(v["message"].as_str().unwrap_or("rolled back").to_owned())
}

/// Left-aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> =
        (0..cols).map(|c| rows.iter().filter_map(|r| r.get(c)).map(|s| s.chars().count()).max().unwrap_or(0)).collect();
    let mut out = String::new();
    for r in rows {
        let mut line = String::new();
        for (i, cell) in r.iter().enumerate() {
            let _ = write!(line, "{cell:<w$}  ", w = widths[i]);
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `1.5 MiB` style sizes.
pub fn bytes(n: u64) -> String {
    #[allow(clippy::cast_precision_loss)] // display only
    let f = n as f64;
    match n {
        0..1024 => format!("{n} B"),
        1024..1_048_576 => format!("{:.1} KiB", f / 1024.0),
        1_048_576..1_073_741_824 => format!("{:.1} MiB", f / 1_048_576.0),
        _ => format!("{:.2} GiB", f / 1_073_741_824.0),
    }
}

/// `2026-11-27 15:03:21 UTC (3m12s ago)`.
fn when(at_ms: i64, now_ms: i64) -> String {
    if at_ms <= 0 {
        return "never".to_owned();
    }
    let ago = (now_ms - at_ms).max(0) / 1000;
    let ago = match ago {
        0..60 => format!("{ago}s"),
        60..3600 => format!("{}m{:02}s", ago / 60, ago % 60),
        3600..86_400 => format!("{}h{:02}m", ago / 3600, ago % 3600 / 60),
        _ => format!("{}d{:02}h", ago / 86_400, ago % 86_400 / 3600),
    };
    format!("{} UTC ({ago} ago)", sentinel_proto::time::utc_datetime(at_ms))
}

fn figure(m: Option<&serde_json::Value>, key: &str) -> Option<f64> {
    m.and_then(|m| m.get(key)).and_then(serde_json::Value::as_f64)
}

fn ms(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}ms"))
}

/// `val 95.0% fb 97.1%/120 agree 99.0%/300`: each accuracy the slot has.
fn accuracy(m: Option<&serde_json::Value>) -> String {
    let pct = |v: f64| format!("{:.1}%", v * 100.0);
    let mut parts = Vec::new();
    if let Some(v) = figure(m, "validation_accuracy") {
        parts.push(format!("val {}", pct(v)));
    }
    if let Some(v) = figure(m, "feedback_accuracy") {
        parts.push(format!("fb {}/{}", pct(v), figure(m, "feedback_total").unwrap_or(0.0)));
    }
    if let Some(v) = figure(m, "agreement_rate") {
        parts.push(format!("agree {}/{}", pct(v), figure(m, "agreement_total").unwrap_or(0.0)));
    }
    if parts.is_empty() { "-".to_owned() } else { parts.join(" ") }
}

fn slot_row(model: &str, s: &SlotStatus) -> Vec<String> {
    let m = s.metrics.as_ref();
    let errors = match (figure(m, "requests"), figure(m, "error_rate")) {
        (Some(n), Some(rate)) if n > 0.0 => format!("{:.2}%/{n}", rate * 100.0),
        (Some(n), _) if n > 0.0 => format!("0.00%/{n}"),
        _ => "-".to_owned(),
    };
    let (engine, pid, rss, sandbox) = match &s.worker {
        Some(w) => (
            if w.engine.is_empty() { "-".to_owned() } else { w.engine.clone() },
            // The first worker's pid, and how many more the pool has.
            match (w.pid, w.workers.len()) {
                (None, _) => w.state.clone(),
                (Some(p), 0 | 1) => p.to_string(),
                (Some(p), n) => format!("{p} +{}", n - 1),
            },
            w.rss_bytes.map_or_else(|| "-".to_owned(), bytes),
            if w.state != "running" {
                w.state.clone()
            } else if w.confined {
                "seccomp".to_owned()
            } else {
                "UNCONFINED".to_owned()
            },
        ),
        None => ("-".to_owned(), "-".to_owned(), "-".to_owned(), "-".to_owned()),
    };
    vec![
        model.to_owned(),
        s.color.clone(),
        s.version.clone().unwrap_or_else(|| "-".to_owned()),
        s.state.clone(),
        s.traffic(),
        ms(figure(m, "p50_ms")),
        ms(figure(m, "p95_ms")),
        ms(figure(m, "p99_ms")),
        errors,
        accuracy(m),
        engine,
        pid,
        rss,
        sandbox,
    ]
}

/// Where the labels come from, when not from the hub.
fn labels_note(s: &Status) -> &'static str {
    match s.labels_from.as_str() {
        "config" => " (from the config file: no desired state from the hub yet)",
        _ => "",
    }
}

/// The human form of `sentinel-agent status`.
pub fn render_status(s: &Status, now_ms: i64) -> String {
    let mut out = String::new();
    let labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let hub = if s.hub.connected {
        format!("connected since {}", when(s.hub.since_ms, now_ms))
    } else if s.hub.since_ms > 0 {
        format!("DISCONNECTED since {}", when(s.hub.since_ms, now_ms))
    } else {
        "not connected yet".to_owned()
    };
    let mut head = vec![
        vec!["device".to_owned(), format!("{} [{}]{}", s.device_id, labels.join(", "), labels_note(s))],
        vec!["agent".to_owned(), format!("sentinel-agent {}", s.agent_version)],
        vec!["hub".to_owned(), format!("{} ({hub})", s.hub.grpc_url)],
    ];
    if !s.hub.last_error.is_empty() {
        head.push(vec!["last error".to_owned(), s.hub.last_error.clone()]);
    }
    head.push(vec!["revision".to_owned(), format!("{} (applied {})", s.revision, s.applied_revision)]);
    head.push(vec![
        "store".to_owned(),
        format!(
            "{} ({} models + {} database) in {}",
            bytes(s.disk.models_bytes + s.disk.database_bytes),
            bytes(s.disk.models_bytes),
            bytes(s.disk.database_bytes),
            s.disk.state_dir
        ),
    ]);
    let rollback = match &s.last_rollback {
        Some(r) => format!("{} {} at {}: {}", r.model, r.version, when(r.at_ms, now_ms), r.reason),
        None => "none".to_owned(),
    };
    head.push(vec!["last rollback".to_owned(), rollback]);
    out.push_str(&table(&head));
    out.push('\n');
    if s.models.is_empty() {
        out.push_str("no models assigned to this device\n");
        return out;
    }
    let mut rows = vec![
        [
            "MODEL", "SLOT", "VERSION", "STATE", "TRAFFIC", "P50", "P95", "P99", "ERRORS", "ACCURACY", "ENGINE", "PID",
            "RSS", "SANDBOX",
        ]
        .iter()
        .map(|h| (*h).to_owned())
        .collect::<Vec<_>>(),
    ];
    let mut warnings = Vec::new();
    for m in &s.models {
        for slot in &m.slots {
            rows.push(slot_row(&m.name, slot));
            if let Some(w) = slot.worker.as_ref().filter(|w| w.state == "running" && !w.confined) {
                warnings.push(format!(
                    "!!! WARNING: the {} worker of {} {} (pid {}) RUNS WITHOUT ITS SECCOMP SANDBOX: {}",
                    slot.color,
                    m.name,
                    slot.version.as_deref().unwrap_or("?"),
                    w.pid.map_or_else(|| "?".to_owned(), |p| p.to_string()),
                    w.reason.as_deref().unwrap_or("no reason given")
                ));
            }
        }
    }
    out.push_str(&table(&rows));
    out.push('\n');
    let mut statuses = vec![vec!["MODEL".to_owned(), "STATUS".to_owned()]];
    statuses.extend(s.models.iter().map(|m| {
        let detail = if m.detail.is_empty() { String::new() } else { format!(": {}", m.detail) };
        vec![m.name.clone(), format!("{} {}{detail}", m.status, m.status_version)]
    }));
    out.push_str(&table(&statuses));
    for w in warnings {
        out.push('\n');
        out.push_str(&w);
        out.push('\n');
    }
    out
}

/// The human form of `sentinel-agent models`.
pub fn render_models(models: &[ModelLine]) -> String {
    let dash = |v: &Option<String>| v.clone().unwrap_or_else(|| "-".to_owned());
    let mut rows = vec![["MODEL", "ACTIVE", "STANDBY", "STATUS", "DETAIL"].map(str::to_owned).to_vec()];
    for m in models {
        let status = if m.status_version.is_empty() || Some(&m.status_version) == m.active.as_ref() {
            m.status.clone()
        } else {
            format!("{} {}", m.status, m.status_version)
        };
        rows.push(vec![m.name.clone(), dash(&m.active), dash(&m.standby), status, m.detail.clone()]);
    }
    table(&rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_render_in_utc_with_the_age() {
        // 2026-11-27 15:03:21 UTC
        let at = 1_795_791_801_000;
        assert_eq!(when(at, at + 192_000), "2026-11-27 15:03:21 UTC (3m12s ago)");
        assert_eq!(when(0, at), "never");
    }

    #[test]
    fn sizes_use_binary_units() {
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
    }

    #[test]
    fn labels_from_the_config_are_marked_and_the_hubs_are_not() {
        let mut s = Status {
            agent_version: "0.1.0".into(),
            device_id: "edge-1".into(),
            labels: [("site".to_owned(), "a".to_owned())].into(),
            labels_from: "config".into(),
            hub: crate::control::HubLink {
                grpc_url: "http://hub:8080".into(),
                connected: false,
                since_ms: 0,
                last_error: String::new(),
            },
            revision: 0,
            applied_revision: 0,
            models: Vec::new(),
            last_rollback: None,
            disk: crate::control::DiskUse { state_dir: "/s".into(), models_bytes: 0, database_bytes: 0 },
        };
        let text = render_status(&s, 0);
        assert!(text.contains("edge-1 [site=a] (from the config file: no desired state from the hub yet)"), "{text}");
        s.labels_from = "hub".into();
        let text = render_status(&s, 0);
        assert!(text.contains("edge-1 [site=a]\n"), "{text}");
    }

    #[test]
    fn a_missing_socket_means_the_agent_is_not_running() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("control.sock");
        let err = request(&path, "GET", "/status").expect_err("nothing listens");
        assert_eq!(err.exit_code(), 69);
        assert!(err.to_string().contains(&path.display().to_string()), "{err}");
    }
}
