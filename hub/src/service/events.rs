//! The change feed behind the web interface's live views, and the tickets
//! that open its event stream.
//!
//! [`Live`] holds a `watch` channel of the latest [`Change`]: deployments
//! changed (deploy, rollback, halt) or a device reported. A watch keeps only
//! the newest value, so a burst of reports costs a slow browser one wake-up,
//! not a queue: the event says *that* something changed, and the page
//! refetches what it shows.
//!
//! A browser's `EventSource` cannot send an `Authorization` header, and the
//! API token must not travel in a URL, so the stream is opened with a
//! [`Tickets`] ticket: random, usable once, valid for [`TICKET_TTL`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::auth::{Caller, generate_token};

/// How long a ticket may wait before it opens a stream.
pub const TICKET_TTL: Duration = Duration::from_secs(30);

/// Outstanding tickets at most; more means a client asks without using them.
const MAX_TICKETS: usize = 4096;

/// Outstanding tickets per token at most, so one caller cannot use up
/// [`MAX_TICKETS`] and shut everyone else out of the live view.
pub const MAX_TICKETS_PER_TOKEN: usize = 16;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Nothing yet (the feed's initial value).
    #[default]
    None,
    /// A deployment was created, rolled back, or halted.
    Deployments,
    /// A device connected or reported.
    Device,
}

/// The latest change, as sent in `change` events.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Change {
    /// Counts every change since the hub started.
    pub seq: u64,
    pub kind: ChangeKind,
    /// The device, for [`ChangeKind::Device`].
    pub subject: String,
    pub at_ms: i64,
}

/// The change feed, stream tickets, and the switch that ends every stream
/// at shutdown (open streams would otherwise keep the server from draining).
#[derive(Debug)]
pub struct Live {
    changes: watch::Sender<Change>,
    closing: watch::Sender<bool>,
    pub tickets: Tickets,
}

impl Default for Live {
    fn default() -> Self {
        Self {
            changes: watch::channel(Change::default()).0,
            closing: watch::channel(false).0,
            tickets: Tickets::default(),
        }
    }
}

impl Live {
    /// Tells every open stream that something changed.
    pub fn notify(&self, kind: ChangeKind, subject: &str) {
        self.changes.send_modify(|c| {
            c.seq += 1;
            c.kind = kind;
            subject.clone_into(&mut c.subject);
            c.at_ms = crate::now_ms();
        });
    }

    /// Ends every stream (at shutdown).
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Follows the change feed from its latest value.
    pub fn changes(&self) -> watch::Receiver<Change> {
        self.changes.subscribe()
    }

    /// Flips to `true` at shutdown.
    pub fn closing(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }
}

/// Why no ticket was issued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TicketError {
    #[error("this token holds {MAX_TICKETS_PER_TOKEN} unused event-stream tickets")]
    TooManyForToken,
    #[error("the hub holds {MAX_TICKETS} unused event-stream tickets")]
    TooMany,
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
    /// Issues a ticket for `holder`, unless it or everyone holds too many.
    pub fn issue(&self, holder: Holder) -> Result<String, TicketError> {
        let now = Instant::now();
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        open.retain(|_, t| t.expires > now);
        if open.values().filter(|t| t.holder.token_sha256 == holder.token_sha256).count() >= MAX_TICKETS_PER_TOKEN {
            return Err(TicketError::TooManyForToken);
        }
        if open.len() >= MAX_TICKETS {
            return Err(TicketError::TooMany);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    #[tokio::test]
    async fn a_burst_of_changes_wakes_a_watcher_once_with_the_latest() {
        let live = Live::default();
        let mut rx = live.changes.subscribe();
        live.notify(ChangeKind::Device, "a");
        live.notify(ChangeKind::Deployments, "");
        rx.changed().await.expect("changed");
        let c = rx.borrow_and_update().clone();
        assert_eq!((c.seq, c.kind), (2, ChangeKind::Deployments));
        assert!(!rx.has_changed().expect("open"));
    }

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
