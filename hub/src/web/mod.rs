//! The web interface: a single page the hub serves itself, and the few API
//! endpoints it needs beyond the REST API.
//!
//! The page is plain HTML, CSS and one JavaScript file, embedded in the
//! binary: nothing is fetched from elsewhere at run time, and a strict
//! Content-Security-Policy (no inline script, `'self'` only) keeps it that
//! way. The page talks to the same `/api/v1` as the CLI with the bearer
//! token the person signed in with; every role check stays in the API.
//!
//! # Layout
//! - [`assets`]: the embedded files, with content types, CSP, `Cache-Control` and ETag.
//! - [`session`]: `GET /api/v1/whoami` and the short-lived tickets that
//!   authenticate the event stream.
//! - [`events`]: [`Live`], the change feed, and `GET /api/v1/events/stream`
//!   (server-sent events).

pub mod assets;
pub mod events;
pub mod session;

use axum::Router;
use axum::routing::{get, post};

pub use events::{ChangeKind, Live};

use crate::api::SharedState;

/// Routes nested under `/api/v1`.
pub fn api_routes() -> Router<SharedState> {
    Router::new()
        .route("/whoami", get(session::whoami))
        .route("/events/ticket", post(session::ticket))
        .route("/events/stream", get(events::stream))
}

/// The page and its assets: `/` redirects to `/ui/`.
pub fn ui_routes() -> Router<SharedState> {
    Router::new()
        .route("/", get(assets::to_ui))
        .route("/ui", get(assets::to_ui))
        .route("/ui/", get(assets::index))
        .route("/ui/{file}", get(assets::file))
}
