//! `GET /api/v1/whoami` and `POST /api/v1/events/ticket`: who the caller
//! is, and tickets for the event stream (issued by
//! [`Tickets`](crate::service::events::Tickets)).
//!
//! A browser's `EventSource` cannot send an `Authorization` header, and the
//! API token must not travel in a URL (URLs end up in logs and history) nor
//! in a cookie (an ambient credential invites cross-site requests). So the
//! page first asks `POST /api/v1/events/ticket` with its bearer token for a
//! ticket: random, usable once, valid for [`TICKET_TTL`], and good for
//! nothing but opening `GET /api/v1/events/stream?ticket=…`, which carries
//! no data beyond "something changed". A leaked ticket is spent or expired.

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ErrorBody;
use super::{ApiError, Caller, SharedState};
use crate::auth::{Role, hash_token};
use crate::service::events::{Holder, TicketError};
pub use crate::service::events::{MAX_TICKETS_PER_TOKEN, TICKET_TTL};

/// `GET /api/v1/whoami`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct WhoAmI {
    /// The token's name, as the audit log records it.
    pub name: String,
    pub role: Role,
}

/// `POST /api/v1/events/ticket`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TicketOut {
    /// Pass as `?ticket=` to `GET /api/v1/events/stream`; it works once.
    pub ticket: String,
    /// How long the ticket may wait before it opens a stream.
    pub expires_in_ms: u64,
}

/// Who the caller is: the token's name and role.
///
/// The page uses it to offer only what the role may do; the API still
/// checks every call. Any API token may ask (viewer and up); a device token
/// may not.
#[utoipa::path(get, path = "/api/v1/whoami", security(("bearer" = [])),
    responses((status = 200, description = "the token's name and role", body = WhoAmI),
        (status = 401, description = "no token, or one this hub does not know or has revoked", body = ErrorBody),
        (status = 403, description = "a device token", body = ErrorBody)))]
pub async fn whoami(caller: Caller) -> Result<Json<WhoAmI>, ApiError> {
    caller.require(Role::Viewer, "asking who you are")?;
    Ok(Json(WhoAmI { name: caller.name, role: caller.role }))
}

/// Issue a one-time ticket for `GET /api/v1/events/stream`.
///
/// Viewer and up; a device token may not. The ticket is valid for
/// `expires_in_ms` and stands for the token that asked: once that token is
/// revoked, the stream ends at its next heartbeat.
#[utoipa::path(post, path = "/api/v1/events/ticket", security(("bearer" = [])),
    responses((status = 200, description = "a ticket for one stream", body = TicketOut),
        (status = 401, description = "no token, or one this hub does not know or has revoked", body = ErrorBody),
        (status = 403, description = "a device token", body = ErrorBody),
        (status = 429, description = "this token holds 16 unused tickets, or the hub 4096", body = ErrorBody)))]
pub async fn ticket(
    State(state): State<SharedState>,
    caller: Caller,
    headers: HeaderMap,
) -> Result<Json<TicketOut>, ApiError> {
    caller.require(Role::Viewer, "watching live changes")?;
    // The middleware accepted this header already; only its hash is kept.
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .map(|(_, t)| t.trim())
        .ok_or_else(|| ApiError::unauthorized("this endpoint needs `Authorization: Bearer <token>`"))?;
    let holder = Holder { caller, token_sha256: hash_token(token) };
    let ticket = state.events().tickets.issue(holder).map_err(|e| {
        let message = match e {
            TicketError::TooManyForToken => format!(
                "this token holds {MAX_TICKETS_PER_TOKEN} unused event-stream tickets; open the stream with one \
                 of them, or wait for them to expire"
            ),
            TicketError::TooMany => {
                "too many unused event-stream tickets; open the stream with the ones you have".to_owned()
            }
        };
        ApiError::new(StatusCode::TOO_MANY_REQUESTS, "too_many_tickets", message)
    })?;
    let expires_in_ms = u64::try_from(TICKET_TTL.as_millis()).unwrap_or(u64::MAX);
    Ok(Json(TicketOut { ticket, expires_in_ms }))
}
