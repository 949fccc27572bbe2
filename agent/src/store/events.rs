//! The event log: what happened on the device, kept until the hub has it.

use rusqlite::params;
use sentinel_proto::pb::RolloutEvidence;

use super::{EventKind, Store, StoreError, db, word};
use crate::util::now_ms;

/// One logged event.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    pub id: i64,
    pub at_ms: i64,
    pub kind: EventKind,
    pub model: String,
    pub version: String,
    pub reason: String,
    /// A rollout decision's evidence, for rollout_phase and rolled_back events.
    pub evidence: Option<RolloutEvidence>,
}

impl Store {
    /// Appends an event for the hub (and the log).
    pub fn event(&self, kind: EventKind, model: &str, version: &str, reason: &str) -> Result<(), StoreError> {
        self.event_with(kind, model, version, reason, None)
    }

    /// Appends an event with a rollout decision's evidence.
    pub fn event_with(
        &self,
        kind: EventKind,
        model: &str,
        version: &str,
        reason: &str,
        evidence: Option<&RolloutEvidence>,
    ) -> Result<(), StoreError> {
        let evidence = evidence.map(prost::Message::encode_to_vec);
        self.execute(
            "log event",
            "INSERT INTO events (at_ms, kind, model, version, reason, evidence) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now_ms(), kind.as_str(), model, version, reason, evidence],
        )?;
        Ok(())
    }

    /// Events not yet acknowledged by the hub, oldest first.
    pub fn unreported_events(&self, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.events_where("reported = 0 ORDER BY id LIMIT ?1", [limit])
    }

    /// The newest events, newest first.
    pub fn recent_events(&self, limit: u32) -> Result<Vec<Event>, StoreError> {
        self.events_where("1 = 1 ORDER BY id DESC LIMIT ?1", [limit])
    }

    /// The newest event of `kind`, if any.
    pub fn last_event(&self, kind: EventKind) -> Result<Option<Event>, StoreError> {
        Ok(self.events_where("kind = ?1 ORDER BY id DESC LIMIT 1", [kind.as_str()])?.pop())
    }

    /// Events matching `clause` (a fixed SQL tail: filter, order and limit,
    /// with `args` bound to its placeholders).
    fn events_where(&self, clause: &str, args: impl rusqlite::Params) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("SELECT id, at_ms, kind, model, version, reason, evidence FROM events WHERE {clause}"))
            .map_err(db("list events"))?;
        let rows = stmt
            .query_map(args, |r| {
                Ok(Event {
                    id: r.get(0)?,
                    at_ms: r.get(1)?,
                    kind: word(r, 2)?,
                    model: r.get(3)?,
                    version: r.get(4)?,
                    reason: r.get(5)?,
                    // Written by this agent from a valid message; unreadable reads as none.
                    evidence: r
                        .get::<_, Option<Vec<u8>>>(6)?
                        .and_then(|b| <RolloutEvidence as prost::Message>::decode(b.as_slice()).ok()),
                })
            })
            .map_err(db("list events"))?;
        rows.collect::<Result<Vec<_>, _>>().map_err(db("list events"))
    }

    pub fn mark_reported(&self, up_to_id: i64) -> Result<(), StoreError> {
        self.execute("mark reported", "UPDATE events SET reported = 1 WHERE id <= ?1", [up_to_id])?;
        Ok(())
    }
}
