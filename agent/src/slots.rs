//! Blue and green slots for one model: a pure state machine.
//!
//! Every transition ([`Slots::stage`], [`Slots::begin_validation`],
//! [`Slots::start_canary`], [`Slots::promote`], [`Slots::fail`],
//! [`Slots::rollback`]) changes memory only and returns an error when it is
//! not allowed from the current states. Nothing is durable until
//! [`crate::store::Store::commit_slots`] writes the whole pair in one
//! transaction, so after power loss a device comes back with either the old
//! or the new assignment, never half of each.
//!
//! Invariants, checked by the tests: at most one slot is `Active`; a slot in
//! `Loading`, `Validating` or `Failed` never receives traffic; a rollback
//! needs a warm `Standby`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Which slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Color {
    Blue,
    Green,
}

impl Color {
    pub fn other(self) -> Self {
        match self {
            Color::Blue => Color::Green,
            Color::Green => Color::Blue,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Color::Blue => "blue",
            Color::Green => "green",
        }
    }
}

/// What a slot is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SlotState {
    Empty,
    Loading,
    Validating,
    /// Serving part of the traffic (or mirrored traffic) next to the active slot.
    Canary,
    Active,
    /// The previous active version, kept warm for an instant rollback.
    Standby,
    Failed,
}

impl SlotState {
    /// Whether requests may be routed to a slot in this state.
    pub fn takes_traffic(self) -> bool {
        matches!(self, SlotState::Active | SlotState::Canary)
    }
}

/// One slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slot {
    pub version: Option<String>,
    pub sha256: Option<String>,
    pub state: SlotState,
    /// Why the slot failed or was rolled back, for status and reports.
    pub reason: String,
}

impl Slot {
    fn empty() -> Self {
        Self { version: None, sha256: None, state: SlotState::Empty, reason: String::new() }
    }
}

/// A transition that is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("slot transition `{op}` not allowed: {why}")]
pub struct SlotError {
    pub op: &'static str,
    pub why: String,
}

fn refuse(op: &'static str, why: impl Into<String>) -> SlotError {
    SlotError { op, why: why.into() }
}

/// The blue and green slots of one model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Slots {
    pub model: String,
    pub blue: Slot,
    pub green: Slot,
}

impl fmt::Display for Slots {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |slot: &Slot| format!("{:?} {}", slot.state, slot.version.as_deref().unwrap_or("-"));
        write!(f, "{}: blue {} / green {}", self.model, s(&self.blue), s(&self.green))
    }
}

impl Slots {
    pub fn new(model: &str) -> Self {
        Self { model: model.to_owned(), blue: Slot::empty(), green: Slot::empty() }
    }

    pub fn get(&self, c: Color) -> &Slot {
        match c {
            Color::Blue => &self.blue,
            Color::Green => &self.green,
        }
    }

    fn get_mut(&mut self, c: Color) -> &mut Slot {
        match c {
            Color::Blue => &mut self.blue,
            Color::Green => &mut self.green,
        }
    }

    /// The slot serving the model, if any.
    pub fn active(&self) -> Option<Color> {
        [Color::Blue, Color::Green].into_iter().find(|c| self.get(*c).state == SlotState::Active)
    }

    /// Puts a new version into the idle slot (the one that is not active)
    /// and marks it `Loading`. A standby in that slot is given up.
    pub fn stage(&mut self, version: &str, sha256: &str) -> Result<Color, SlotError> {
        let target = match self.active() {
            Some(c) => c.other(),
            None => Color::Blue,
        };
        // The same file under a new version number (a re-push) is a new
        // version: it goes through validation and rollout like any other.
        if let Some(a) = self.active()
            && self.get(a).sha256.as_deref() == Some(sha256)
            && self.get(a).version.as_deref() == Some(version)
        {
            return Err(refuse("stage", format!("{version} is already active in {}", a.as_str())));
        }
        let slot = self.get_mut(target);
        if matches!(slot.state, SlotState::Loading | SlotState::Validating | SlotState::Canary) {
            return Err(refuse("stage", format!("{} is busy ({:?})", target.as_str(), slot.state)));
        }
        *slot = Slot {
            version: Some(version.to_owned()),
            sha256: Some(sha256.to_owned()),
            state: SlotState::Loading,
            reason: String::new(),
        };
        Ok(target)
    }

    fn expect(&self, op: &'static str, c: Color, from: SlotState) -> Result<(), SlotError> {
        let s = self.get(c).state;
        if s == from { Ok(()) } else { Err(refuse(op, format!("{} is {s:?}, not {from:?}", c.as_str()))) }
    }

    /// Loaded: now being validated (no traffic yet).
    pub fn begin_validation(&mut self, c: Color) -> Result<(), SlotError> {
        self.expect("begin_validation", c, SlotState::Loading)?;
        self.get_mut(c).state = SlotState::Validating;
        Ok(())
    }

    /// Validated: starts taking a share of traffic next to the active slot.
    pub fn start_canary(&mut self, c: Color) -> Result<(), SlotError> {
        self.expect("start_canary", c, SlotState::Validating)?;
        self.get_mut(c).state = SlotState::Canary;
        Ok(())
    }

    /// Makes `c` active in one step; the previously active slot becomes
    /// the warm standby. Allowed from `Validating` (no canary phase) or `Canary`.
    pub fn promote(&mut self, c: Color) -> Result<(), SlotError> {
        let s = self.get(c).state;
        if !matches!(s, SlotState::Validating | SlotState::Canary) {
            return Err(refuse("promote", format!("{} is {s:?}", c.as_str())));
        }
        if let Some(old) = self.active() {
            self.get_mut(old).state = SlotState::Standby;
        }
        self.get_mut(c).state = SlotState::Active;
        Ok(())
    }

    /// Marks a slot failed (load error, validation failure, crash); it
    /// takes no traffic. Failing the active slot is a rollback's job.
    pub fn fail(&mut self, c: Color, reason: &str) -> Result<(), SlotError> {
        if self.get(c).state == SlotState::Active {
            return Err(refuse("fail", "the active slot is replaced by rollback, not failed in place"));
        }
        let slot = self.get_mut(c);
        slot.state = SlotState::Failed;
        slot.reason = reason.to_owned();
        Ok(())
    }

    /// Puts the standby back in service in one step and marks the slot it
    /// replaces failed with `reason`. Also aborts a canary: the canary slot
    /// fails and the active one keeps serving.
    pub fn rollback(&mut self, reason: &str) -> Result<Color, SlotError> {
        if let Some(canary) = [Color::Blue, Color::Green].into_iter().find(|c| self.get(*c).state == SlotState::Canary)
        {
            self.fail(canary, reason)?;
            return self.active().ok_or_else(|| refuse("rollback", "no active slot behind the canary"));
        }
        let active = self.active().ok_or_else(|| refuse("rollback", "nothing is active"))?;
        let standby = active.other();
        self.expect("rollback", standby, SlotState::Standby)?;
        self.get_mut(standby).state = SlotState::Active;
        let bad = self.get_mut(active);
        bad.state = SlotState::Failed;
        bad.reason = reason.to_owned();
        Ok(standby)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn invariant(s: &Slots) {
        let actives = [&s.blue, &s.green].iter().filter(|x| x.state == SlotState::Active).count();
        assert!(actives <= 1, "two active slots: {s}");
    }

    #[test]
    fn first_version_then_upgrade_then_rollback() {
        let mut s = Slots::new("digits");
        let b = s.stage("1.0.0", "a").expect("stage");
        assert_eq!(b, Color::Blue);
        s.begin_validation(b).expect("validate");
        assert!(!s.get(b).state.takes_traffic());
        s.promote(b).expect("promote");
        invariant(&s);
        let g = s.stage("2.0.0", "b").expect("stage v2");
        assert_eq!(g, Color::Green);
        s.begin_validation(g).expect("validate");
        s.start_canary(g).expect("canary");
        assert!(s.get(g).state.takes_traffic() && s.get(b).state.takes_traffic());
        s.promote(g).expect("promote v2");
        invariant(&s);
        assert_eq!(s.get(b).state, SlotState::Standby);
        let back = s.rollback("p95 latency 4.1x blue").expect("rollback");
        assert_eq!(back, Color::Blue);
        assert_eq!(s.get(g).state, SlotState::Failed);
        assert_eq!(s.get(g).reason, "p95 latency 4.1x blue");
        invariant(&s);
    }

    #[test]
    fn a_failed_canary_never_disturbs_the_active_slot() {
        let mut s = Slots::new("m");
        let b = s.stage("1", "a").expect("stage");
        s.begin_validation(b).expect("v");
        s.promote(b).expect("p");
        let g = s.stage("2", "b").expect("stage");
        s.begin_validation(g).expect("v");
        s.start_canary(g).expect("c");
        assert_eq!(s.rollback("accuracy 0.60 < 0.94").expect("abort"), Color::Blue);
        assert_eq!((s.get(b).state, s.get(g).state), (SlotState::Active, SlotState::Failed));
    }

    #[test]
    fn illegal_transitions_are_refused_and_change_nothing() {
        let mut s = Slots::new("m");
        assert!(s.rollback("x").is_err(), "nothing to roll back to");
        assert!(s.promote(Color::Blue).is_err(), "empty slot");
        let b = s.stage("1", "a").expect("stage");
        let before = s.clone();
        assert!(s.promote(b).is_err(), "still loading");
        assert!(s.start_canary(b).is_err(), "not validated");
        assert_eq!(s, before);
        s.begin_validation(b).expect("v");
        s.promote(b).expect("p");
        assert!(s.fail(b, "x").is_err(), "the active slot is not failed in place");
        assert!(s.stage("1", "a").is_err(), "already active");
        assert!(s.rollback("x").is_err(), "no standby yet");
        let g = s.stage("2", "b").expect("stage");
        assert!(s.stage("3", "c").is_err(), "idle slot is busy loading");
        s.fail(g, "does not load").expect("fail");
        assert!(!s.get(g).state.takes_traffic());
        s.stage("3", "c").expect("a failed slot can be reused");
    }

    #[test]
    fn serialises_for_the_commit() {
        let mut s = Slots::new("m");
        let b = s.stage("1", "a").expect("stage");
        s.fail(b, "bad").expect("fail");
        let text = serde_json::to_string(&s).expect("ser");
        assert_eq!(serde_json::from_str::<Slots>(&text).expect("de"), s);
    }
}
