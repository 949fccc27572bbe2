//! Ground-truth feedback: recent predictions by request id, bounded in
//! count and bytes, and the score a label gives the slot that answered.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, PoisonError, Weak};

use super::Serving;
use super::slot::Loaded;

/// Requests remembered for ground-truth feedback, per agent.
pub const FEEDBACK_MEMORY: usize = 20_000;
/// Bytes of model names and request ids remembered for feedback, per agent
/// (ids are capped at 256 bytes by the API; this bounds any other caller).
pub const FEEDBACK_MEMORY_BYTES: usize = 8 << 20;
/// What one remembered request costs beyond its key's bytes (map entry,
/// queue entry, weak pointer, label), for the byte bound.
const FEEDBACK_ENTRY_OVERHEAD: usize = 96;

/// Recent predictions by request id, for ground-truth feedback.
#[derive(Debug, Default)]
pub(super) struct Predictions {
    pub(super) by_id: HashMap<(String, String), (Weak<Loaded>, i64)>,
    pub(super) order: VecDeque<(String, String)>,
    /// Bytes the entries of `order` account for.
    pub(super) bytes: usize,
}

pub(super) fn feedback_cost(key: &(String, String)) -> usize {
    key.0.len() + key.1.len() + FEEDBACK_ENTRY_OVERHEAD
}

impl Predictions {
    /// Remembers `key`, forgetting the oldest entries past either bound.
    pub(super) fn insert(&mut self, key: (String, String), value: (Weak<Loaded>, i64)) {
        if self.by_id.insert(key.clone(), value).is_none() {
            self.bytes += feedback_cost(&key);
            self.order.push_back(key);
        }
        while self.order.len() > FEEDBACK_MEMORY || self.bytes > FEEDBACK_MEMORY_BYTES {
            let Some(old) = self.order.pop_front() else { break };
            self.bytes -= feedback_cost(&old);
            self.by_id.remove(&old);
        }
    }
}

/// What feedback on one request found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeedbackOutcome {
    pub version: String,
    pub predicted: i64,
    pub correct: bool,
}

impl Serving {
    pub(super) fn remember(&self, model: &str, id: &str, slot: &Arc<Loaded>, label: i64) {
        let mut p = self.predictions.lock().unwrap_or_else(PoisonError::into_inner);
        p.insert((model.to_owned(), id.to_owned()), (Arc::downgrade(slot), label));
    }

    /// Ground truth for an earlier request: scores the slot that answered it.
    /// `None` when the id is unknown or too old.
    pub fn feedback(&self, model: &str, id: &str, label: i64) -> Option<FeedbackOutcome> {
        let (slot, predicted) = {
            let mut p = self.predictions.lock().unwrap_or_else(PoisonError::into_inner);
            p.by_id.remove(&(model.to_owned(), id.to_owned()))?
        };
        let slot = slot.upgrade()?;
        let correct = predicted == label;
        slot.record_feedback(correct);
        Some(FeedbackOutcome { version: slot.version.clone(), predicted, correct })
    }
}
