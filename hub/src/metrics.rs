//! The `/metrics` endpoint, and the middleware that counts REST requests.
//!
//! `/metrics` is served on its own listener (`--metrics-listen`), in plain
//! text: the figures carry no tokens and no model bytes, and keeping them off
//! the REST port keeps them out of the API's authentication and audit log.
//! The registry and its figures are [`HubMetrics`]'s.

use std::time::Instant;

use axum::Router;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::service::SharedState;
pub use crate::service::metrics::{DEPLOYMENT_STATES, HubMetrics};

/// The method label: the standard methods by name, anything else `other`,
/// so a client inventing methods cannot create series.
fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Middleware counting and timing every REST request. The route label is the
/// matched route template; requests no route matched count as `unmatched`.
/// The time is to the response headers: a streamed body (an artifact
/// download) is not included.
pub async fn track_http(State(state): State<SharedState>, req: Request, next: Next) -> Response {
    let route = req.extensions().get::<MatchedPath>().map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let start = Instant::now();
    let resp = next.run(req).await;
    state.metrics().observe_http(&route, method, resp.status().as_str(), start.elapsed());
    resp
}

/// The metrics listener's router: `GET /metrics`, nothing else.
pub fn router(state: SharedState) -> Router {
    Router::new().route("/metrics", get(scrape)).with_state(state)
}

async fn scrape(State(state): State<SharedState>) -> Response {
    let st = state.clone();
    match tokio::task::spawn_blocking(move || st.metrics().render(&st)).await {
        Ok(Ok(text)) => ([(header::CONTENT_TYPE, prometheus::TEXT_FORMAT)], text).into_response(),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "encoding metrics failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics failed\n").into_response()
        }
        Err(e) => {
            tracing::error!(error = %e, "the metrics task failed");
            (StatusCode::INTERNAL_SERVER_ERROR, "the metrics task failed\n").into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invented_method_is_counted_as_other() {
        assert_eq!(method_label(&Method::from_bytes(b"BREW").expect("a method")), "other");
    }
}
