//! The embedded page. Every response carries the same strict
//! Content-Security-Policy: scripts, styles, images and API calls come only
//! from this hub, nothing may frame the page, and there is no inline script
//! for an injected string to become. Assets revalidate on every load
//! (`no-cache` plus a strong ETag), so a hub upgrade is seen at once and an
//! unchanged file costs a 304.

use std::sync::LazyLock;

use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use crate::api::{ApiError, ApiPath};

/// What the page may load and where it may connect.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
    connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; \
    frame-ancestors 'none'";

/// One embedded file.
#[derive(Debug)]
struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const FILES: [Asset; 4] = [
    Asset { name: "index.html", content_type: "text/html; charset=utf-8", bytes: include_bytes!("assets/index.html") },
    Asset { name: "app.js", content_type: "text/javascript; charset=utf-8", bytes: include_bytes!("assets/app.js") },
    Asset { name: "style.css", content_type: "text/css; charset=utf-8", bytes: include_bytes!("assets/style.css") },
    Asset { name: "favicon.svg", content_type: "image/svg+xml", bytes: include_bytes!("assets/favicon.svg") },
];

/// Strong ETags, computed once: a quoted prefix of each file's SHA-256.
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    FILES
        .iter()
        .map(|f| {
            let digest = ring::digest::digest(&ring::digest::SHA256, f.bytes);
            format!("\"{}\"", hex::encode(&digest.as_ref()[..16]))
        })
        .collect()
});

/// `/` and `/ui` lead to the page.
pub async fn to_ui() -> Redirect {
    Redirect::to("/ui/")
}

/// `GET /ui/`: the page.
pub async fn index(headers: HeaderMap) -> Response {
    serve(0, &headers)
}

/// `GET /ui/{file}`: one of the page's assets.
pub async fn file(ApiPath(name): ApiPath<String>, headers: HeaderMap) -> Response {
    match FILES.iter().position(|f| f.name == name) {
        Some(i) => serve(i, &headers),
        None => {
            ApiError::not_found(format!("the web interface has no file {}; open /ui/", sentinel_proto::quote(&name)))
                .into_response()
        }
    }
}

fn serve(i: usize, headers: &HeaderMap) -> Response {
    let (asset, etag) = (&FILES[i], &ETAGS[i]);
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    let mut resp = if fresh { StatusCode::NOT_MODIFIED.into_response() } else { asset.bytes.into_response() };
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    resp
}
