//! The web interface: a single page the hub serves itself.
//!
//! The page is plain HTML, CSS and one JavaScript file, embedded in the
//! binary: nothing is fetched from elsewhere at run time, and a strict
//! Content-Security-Policy (no inline script, `'self'` only) keeps it that
//! way. The page talks to the same `/api/v1` as the CLI with the bearer
//! token the person signed in with; every role check stays in the API. The
//! few endpoints it needs beyond the CLI's (`whoami`, the event-stream
//! ticket and the stream) are part of the REST API ([`crate::api::session`],
//! [`crate::api::events`]).
//!
//! # Layout
//! - [`assets`]: the embedded files, with content types, CSP, `Cache-Control` and ETag.

pub mod assets;

use axum::Router;
use axum::routing::get;

use crate::service::SharedState;

/// The page and its assets: `/` redirects to `/ui/`.
pub fn ui_routes() -> Router<SharedState> {
    Router::new()
        .route("/", get(assets::to_ui))
        .route("/ui", get(assets::to_ui))
        .route("/ui/", get(assets::index))
        .route("/ui/{file}", get(assets::file))
}
