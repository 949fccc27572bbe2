//! The `/metrics` listener: reads the scrape-time figures from the agent's
//! state and serves the registry's text exposition.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::sync::watch;

use super::WorkerMemory;
use crate::state::{AgentError, Shared};

/// Binds the metrics listener, if configured.
pub async fn bind(addr: Option<&str>) -> Result<Option<tokio::net::TcpListener>, AgentError> {
    match addr {
        Some(a) => tokio::net::TcpListener::bind(a)
            .await
            .map(Some)
            .map_err(|source| AgentError::Listen { addr: a.to_owned(), source }),
        None => Ok(None),
    }
}

/// Serves `GET /metrics` on `listener`, under `connections`' limits, until
/// `stop` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    shared: Arc<Shared>,
    connections: sentinel_net::Connections,
    mut stop: watch::Receiver<bool>,
) {
    let app = Router::new().route("/metrics", get(metrics)).with_state(shared);
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    connections.serve("metrics", listener, None, app, stopped).await;
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    match render(&shared).await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "encoding metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n").into_response()
        }
    }
}

/// The exposition, with each running worker's resident memory and the hub
/// link read from `shared` first.
pub async fn render(shared: &Shared) -> Result<String, prometheus::Error> {
    // Workers are looked up with an async lock; collect them before the
    // registry takes its scrape lock, which must not be held across an await.
    let mut resident = Vec::new();
    for ms in shared.serving.models() {
        let route = ms.route();
        for slot in [&route.active, &route.standby, &route.candidate].into_iter().flatten() {
            for (index, worker) in slot.worker.workers().await.into_iter().enumerate() {
                if let Some(rss) = worker.rss_bytes {
                    resident.push(WorkerMemory {
                        model: slot.model.clone(),
                        slot: slot.color.as_str(),
                        version: slot.version.clone(),
                        worker: index,
                        rss_bytes: rss,
                    });
                }
            }
        }
    }
    shared.serving.metrics().render(shared.view().connected, resident)
}
