//! Who the caller is, and tickets for the event stream.
//!
//! A browser's `EventSource` cannot send an `Authorization` header, and the
//! API token must not travel in a URL (URLs end up in logs and history) nor
//! in a cookie (an ambient credential invites cross-site requests). So the
//! page first asks `POST /api/v1/events/ticket` with its bearer token for a
//! ticket: random, usable once, valid for [`TICKET_TTL`], and good for
//! nothing but opening `GET /api/v1/events/stream?ticket=…`, which carries
//! no data beyond "something changed". A leaked ticket is spent or expired.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::error::ErrorBody;
use crate::api::{ApiError, Caller, SharedState};
use crate::auth::{Role, generate_token, hash_token};

/// How long a ticket may wait before it opens a stream.
pub const TICKET_TTL: Duration = Duration::from_secs(30);

/// Outstanding tickets at most; more means a client asks without using them.
const MAX_TICKETS: usize = 4096;

/// Outstanding tickets per token at most, so one caller cannot use up
/// [`MAX_TICKETS`] and shut everyone else out of the live view.
pub const MAX_TICKETS_PER_TOKEN: usize = 16;

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

/// What a redeemed ticket stands for: the caller, and the hash of the token
/// it signed in with, so the stream can notice when the token is revoked.
#[derive(Debug, Clone)]
pub struct Holder {
    pub caller: Caller,
    pub token_sha256: String,
}

#[derive(Debug)]
struct Ticket {
    holder: Holder,
    expires: Instant,
}

/// Outstanding tickets, by ticket.
#[derive(Debug, Default)]
pub struct Tickets {
    open: Mutex<HashMap<String, Ticket>>,
}

impl Tickets {
    fn issue(&self, holder: Holder) -> Result<String, ApiError> {
        let now = Instant::now();
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.retain(|_, t| t.expires > now);
        if open.values().filter(|t| t.holder.token_sha256 == holder.token_sha256).count() >= MAX_TICKETS_PER_TOKEN {
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_tickets",
                format!(
                    "this token holds {MAX_TICKETS_PER_TOKEN} unused event-stream tickets; open the stream with one \
                     of them, or wait for them to expire"
                ),
            ));
        }
        if open.len() >= MAX_TICKETS {
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                "too_many_tickets",
                "too many unused event-stream tickets; open the stream with the ones you have",
            ));
        }
        let ticket = generate_token();
        open.insert(ticket.clone(), Ticket { holder, expires: now + TICKET_TTL });
        Ok(ticket)
    }

    /// Takes a ticket: it works once, and only before it expires.
    pub fn redeem(&self, ticket: &str) -> Option<Holder> {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.remove(ticket).filter(|t| t.expires > Instant::now()).map(|t| t.holder)
    }
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
    let ticket = state.live.tickets.issue(holder)?;
    let expires_in_ms = u64::try_from(TICKET_TTL.as_millis()).unwrap_or(u64::MAX);
    Ok(Json(TicketOut { ticket, expires_in_ms }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder() -> Holder {
        let caller = Caller { token_id: 1, name: "t".into(), role: Role::Viewer, device_id: None };
        Holder { caller, token_sha256: "h".into() }
    }

    #[test]
    fn a_ticket_works_once() {
        let tickets = Tickets::default();
        let t = tickets.issue(holder()).expect("issue");
        assert!(tickets.redeem("snt_wrong").is_none());
        assert_eq!(tickets.redeem(&t).map(|h| h.caller.name), Some("t".to_owned()));
        assert!(tickets.redeem(&t).is_none(), "a spent ticket is refused");
    }

    #[test]
    fn an_expired_ticket_is_refused() {
        let tickets = Tickets::default();
        let t = tickets.issue(holder()).expect("issue");
        if let Some(open) = tickets.open.lock().expect("lock").get_mut(&t) {
            open.expires = Instant::now();
        }
        assert!(tickets.redeem(&t).is_none());
    }
}
