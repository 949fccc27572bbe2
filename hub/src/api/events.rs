//! `GET /api/v1/events/stream`: the change feed
//! ([`Live`](crate::service::events::Live)) as server-sent
//! events, opened with a ticket.
//!
//! Each stream sends a `change` event per wake-up of the feed (the page
//! refetches what it shows) and a heartbeat every
//! [`HEARTBEAT`]. Before each change and each heartbeat it re-checks the
//! token it was opened with, ending the stream once that token is revoked;
//! a ticket issued to a since-revoked token opens nothing.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use futures_util::Stream;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::{ApiError, ApiQuery, SharedState};
use crate::auth::Role;
pub use crate::service::events::Change;
use crate::service::events::Holder;

/// Time between heartbeats (and token re-checks) on an idle stream.
pub const HEARTBEAT: Duration = Duration::from_secs(15);

/// The data of the `hello` event, sent as soon as a stream opens.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Hello {
    /// The `seq` of the latest change when the stream opened.
    pub seq: u64,
    /// The name of the token the ticket was issued to.
    pub name: String,
    pub role: Role,
    /// Time between `heartbeat` events.
    pub heartbeat_ms: u64,
}

/// The data of the `heartbeat` event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Heartbeat {
    pub at_ms: i64,
}

/// The data of the `expired` event, the last one a stream sends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Expired {
    pub message: String,
}

/// One server-sent event as it arrives: its name, its JSON `data` line,
/// and the reconnection delay the first one sets.
#[derive(Debug, Serialize, ToSchema)]
pub struct SseEvent {
    /// `hello`, `change`, `heartbeat` or `expired`.
    pub event: String,
    /// JSON: `Hello`, `Change`, `Heartbeat` or `Expired`.
    pub data: String,
    /// Milliseconds a client waits before reconnecting.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry: Option<u64>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct StreamParams {
    /// From `POST /api/v1/events/ticket`; it works once. The API token
    /// itself is refused here: URLs end up in logs.
    // Optional for serde so a missing ticket is a 401 that says where to
    // get one, not a 400; required in the document because it is.
    #[param(required = true)]
    pub ticket: Option<String>,
}

/// One open stream.
struct Feed {
    state: SharedState,
    holder: Holder,
    changes: watch::Receiver<Change>,
    closing: watch::Receiver<bool>,
    beat: tokio::time::Interval,
    greeted: bool,
    ended: bool,
}

enum Wake {
    Changed,
    Beat,
    Closed,
}

fn event(name: &str, data: &impl Serialize) -> Event {
    Event::default().event(name).json_data(data).unwrap_or_else(|_| Event::default().event(name))
}

impl Feed {
    async fn token_valid(&self) -> bool {
        let hash = self.holder.token_sha256.clone();
        // A failed lookup keeps the stream: it carries no data, and the
        // page's own API calls are checked anyway.
        state_lookup(&self.state, hash).await.unwrap_or(true)
    }

    async fn next(mut self) -> Option<(Result<Event, Infallible>, Self)> {
        if self.ended {
            return None;
        }
        if !self.greeted {
            self.greeted = true;
            let hello = Hello {
                seq: self.changes.borrow_and_update().seq,
                name: self.holder.caller.name.clone(),
                role: self.holder.caller.role,
                heartbeat_ms: u64::try_from(HEARTBEAT.as_millis()).unwrap_or(u64::MAX),
            };
            return Some((Ok(event("hello", &hello).retry(Duration::from_secs(2))), self));
        }
        let wake = tokio::select! {
            r = self.changes.changed() => if r.is_ok() { Wake::Changed } else { Wake::Closed },
            _ = self.closing.wait_for(|c| *c) => Wake::Closed,
            _ = self.beat.tick() => Wake::Beat,
        };
        match wake {
            Wake::Closed => None,
            // A change names devices and models: the token is checked
            // before each one goes out, not only at heartbeats.
            Wake::Changed if self.token_valid().await => {
                let c = self.changes.borrow_and_update().clone();
                Some((Ok(event("change", &c)), self))
            }
            Wake::Beat if self.token_valid().await => {
                Some((Ok(event("heartbeat", &Heartbeat { at_ms: crate::now_ms() })), self))
            }
            Wake::Changed | Wake::Beat => {
                self.ended = true;
                let why = Expired { message: "the token this stream was opened with was revoked".to_owned() };
                Some((Ok(event("expired", &why)), self))
            }
        }
    }
}

async fn state_lookup(state: &SharedState, hash: String) -> Result<bool, ApiError> {
    Ok(state.meta(move |m| Ok(m.find_token(&hash)?.is_some())).await?)
}

/// Watch for changes: server-sent events, opened with a ticket.
///
/// `GET /api/v1/events/stream?ticket=…` sends `hello` (at once), `change`
/// (see [`Change`]), `heartbeat`, and `expired` (the token was revoked; the
/// stream ends). It is authenticated by the ticket alone, never by an
/// `Authorization` header: a browser's `EventSource` cannot send one.
#[utoipa::path(get, path = "/api/v1/events/stream", params(StreamParams),
    responses(
        (status = 200, content_type = "text/event-stream", body = SseEvent,
            description = "Server-sent events, each with a JSON `data` line: `hello` at once (`Hello`); \
                `change` when deployments changed or a device connected or reported (`Change`: refetch \
                what you show); `heartbeat` every `heartbeat_ms` on an idle stream (`Heartbeat`); \
                `expired` at the first change or heartbeat after the token the ticket was issued to is revoked \
                (`Expired`), after which the stream ends. The stream also ends when the hub shuts down; \
                reconnect with a new ticket."),
        (status = 400, description = "a query parameter other than `ticket`", body = ErrorBody),
        (status = 401, description = "no ticket, or one that is unknown, spent or expired, or issued to a token since revoked", body = ErrorBody)))]
pub async fn stream(
    State(state): State<SharedState>,
    ApiQuery(p): ApiQuery<StreamParams>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let ticket = p.ticket.ok_or_else(|| {
        ApiError::unauthorized("open the stream with ?ticket=<ticket from POST /api/v1/events/ticket>")
    })?;
    let holder = state.events().tickets.redeem(&ticket).ok_or_else(|| {
        ApiError::unauthorized("the ticket is unknown, spent or expired; ask POST /api/v1/events/ticket for another")
    })?;
    // The ticket stands for its token: revoked since it was issued, it opens nothing.
    if !state_lookup(&state, holder.token_sha256.clone()).await? {
        return Err(ApiError::unauthorized("the token this ticket was issued to has been revoked"));
    }
    let mut beat = tokio::time::interval(HEARTBEAT);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    beat.reset(); // the first tick would be immediate; `hello` covers it
    let feed = Feed {
        changes: state.events().changes(),
        closing: state.events().closing(),
        state,
        holder,
        beat,
        greeted: false,
        ended: false,
    };
    Ok(Sse::new(futures_util::stream::unfold(feed, Feed::next)))
}
