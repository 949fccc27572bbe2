//! The workers that serve one slot: a [`Pool`] of [`Supervised`] workers,
//! each confined, memory-limited and restarted on its own. A request goes to
//! the least-loaded running worker; the rest of the agent sees one slot with
//! one state.

use std::borrow::Cow;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use sentinel_worker_protocol::frame::{self, Tensor};
use sentinel_worker_protocol::launch::Engine;

use super::{Delivered, InferError, RestartPolicy, SlotError, SlotState, Supervised, WorkerSpec};

/// One slot's state from its workers' states: failed when any worker gave up
/// (they all run the same model, so the others would follow); running while
/// at least one serves; otherwise starting.
pub fn aggregate(states: &[SlotState]) -> SlotState {
    if let Some(reason) = states.iter().find_map(|s| match s {
        SlotState::Failed(reason) => Some(reason),
        _ => None,
    }) {
        return SlotState::Failed(reason.clone());
    }
    let running = || {
        states.iter().filter_map(|s| match s {
            SlotState::Running { pid, confined, unconfined_reason } => Some((*pid, *confined, unconfined_reason)),
            _ => None,
        })
    };
    if let Some((pid, _, _)) = running().next() {
        return SlotState::Running {
            pid,
            confined: running().all(|(_, confined, _)| confined),
            unconfined_reason: running().find_map(|(_, _, reason)| reason.clone()),
        };
    }
    let attempt = states
        .iter()
        .map(|s| match s {
            SlotState::Starting { attempt } => *attempt,
            _ => 0,
        })
        .max()
        .unwrap_or(0);
    SlotState::Starting { attempt }
}

#[derive(Debug)]
struct Member {
    slot: Supervised,
    in_flight: AtomicUsize,
    /// Requests it answered (with outputs or a refusal).
    answered: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    members: Vec<Member>,
    engine: Engine,
    /// Where the search for the least-loaded worker starts: rotates, so
    /// equally loaded workers take turns.
    next: AtomicUsize,
}

/// The supervised workers of one slot. Cloning shares the pool; dropping the
/// last clone stops its workers once their requests finish.
#[derive(Debug, Clone)]
pub struct Pool {
    shared: Arc<Shared>,
}

/// One worker of a pool, as status shows it.
#[derive(Debug, Clone)]
pub struct WorkerView {
    pub state: SlotState,
    pub restarts: u64,
    pub last_failure: Option<String>,
    /// Requests running on it now.
    pub in_flight: usize,
    /// Requests it answered, over its restarts.
    pub answered: u64,
    pub rss_bytes: Option<u64>,
}

/// Decrements a worker's in-flight count when a request ends, however it ends.
struct InFlight<'a>(&'a AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Pool {
    /// Starts `size` workers (at least one) in the background. Must run
    /// inside a Tokio runtime; [`Pool::wait_ready`] waits for all of them.
    /// The workers start one after the other, each once the one before runs
    /// (or failed): starting a process and loading a model take CPU, and a
    /// new pool loads beside the one that serves.
    pub fn start(spec: &WorkerSpec, policy: &RestartPolicy, size: usize) -> Pool {
        let mut members: Vec<Member> = Vec::with_capacity(size.max(1));
        for _ in 0..size.max(1) {
            let after = members.last().map(|m: &Member| m.slot.subscribe());
            members.push(Member {
                slot: Supervised::start_after(spec.clone(), policy.clone(), after),
                in_flight: AtomicUsize::new(0),
                answered: AtomicU64::new(0),
            });
        }
        Pool { shared: Arc::new(Shared { members, engine: spec.engine, next: AtomicUsize::new(0) }) }
    }

    /// The engine every worker of the pool runs.
    pub fn engine(&self) -> Engine {
        self.shared.engine
    }

    /// The largest batch one request may carry, run as one by any worker
    /// (1 until the workers have started, or when they cannot batch).
    pub fn max_batch(&self) -> usize {
        self.members().map(Supervised::max_batch).filter(|&b| b > 0).min().unwrap_or(1)
    }

    /// How many workers the pool has.
    pub fn size(&self) -> usize {
        self.shared.members.len()
    }

    /// Each worker's supervisor, for watchers such as the restart metrics
    /// (each has its own state to subscribe to).
    pub fn members(&self) -> impl Iterator<Item = &Supervised> {
        self.shared.members.iter().map(|m| &m.slot)
    }

    /// The slot's state now, from its workers' current states (see [`aggregate`]).
    pub fn state(&self) -> SlotState {
        let states: Vec<SlotState> = self.members().map(Supervised::state).collect();
        aggregate(&states)
    }

    /// Replacement workers that came up after failures, over all workers.
    pub fn restarts(&self) -> u64 {
        self.members().map(Supervised::restarts).sum()
    }

    /// The last failure of the first worker that had one.
    pub fn last_failure(&self) -> Option<String> {
        self.members().find_map(Supervised::last_failure)
    }

    /// Each worker, in order.
    pub async fn workers(&self) -> Vec<WorkerView> {
        let mut out = Vec::with_capacity(self.size());
        for m in &self.shared.members {
            let rss_bytes = m.slot.worker().await.and_then(|w| w.rss_bytes());
            out.push(WorkerView {
                state: m.slot.state(),
                restarts: m.slot.restarts(),
                last_failure: m.slot.last_failure(),
                in_flight: m.in_flight.load(Ordering::Relaxed),
                answered: m.answered.load(Ordering::Relaxed),
                rss_bytes,
            });
        }
        out
    }

    /// Waits until every worker runs, or one gave up; returns the slot's state then.
    pub async fn wait_ready(&self) -> SlotState {
        for m in self.members() {
            let mut rx = m.subscribe();
            let end = rx.wait_for(|s| matches!(s, SlotState::Running { .. } | SlotState::Failed(_))).await;
            match end.as_deref() {
                Ok(SlotState::Failed(reason)) => return SlotState::Failed(reason.clone()),
                Ok(_) => {}
                Err(_) => return SlotState::Failed("the worker supervisor stopped".into()),
            }
        }
        self.state()
    }

    /// Runs one inference on the least-loaded running worker.
    pub async fn infer(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, SlotError> {
        self.infer_timed(inputs).await.map(|(outputs, _)| outputs)
    }

    /// Like [`Pool::infer`], with the model's compute time as the worker
    /// measured it. A request that never reached its worker (it had died
    /// first) runs once more on another; one that did is not repeated, as it
    /// may be what killed the worker.
    pub async fn infer_timed(&self, inputs: &[Tensor]) -> Result<(Vec<Tensor>, Option<Duration>), SlotError> {
        self.exchange(&frame::request_parts(inputs, false)).await
    }

    /// Like [`Pool::infer_timed`], the worker running each sample of the
    /// inputs' first dim by itself (see [`frame::Request::rows`]).
    pub async fn infer_rows_timed(&self, inputs: &[Tensor]) -> Result<(Vec<Tensor>, Option<Duration>), SlotError> {
        self.exchange(&frame::request_parts(inputs, true)).await
    }

    async fn exchange(&self, payload: &[Cow<'_, [u8]>]) -> Result<(Vec<Tensor>, Option<Duration>), SlotError> {
        let first = self.pick(None);
        match self.run(first, payload).await {
            Err((_, Delivered::No)) if self.size() > 1 => {
                self.run(self.pick(Some(first)), payload).await.map_err(|(e, _)| e)
            }
            done => done.map_err(|(e, _)| e),
        }
    }

    /// Runs the same inference on every worker, in order: the probe that
    /// checks and warms each of them before the slot takes traffic.
    pub async fn infer_each(&self, inputs: &[Tensor]) -> Result<Vec<Vec<Tensor>>, SlotError> {
        let payload = frame::request_parts(inputs, false);
        let mut out = Vec::with_capacity(self.size());
        for i in 0..self.size() {
            out.push(self.run(i, &payload).await.map_err(|(e, _)| e)?.0);
        }
        Ok(out)
    }

    async fn run(
        &self,
        index: usize,
        payload: &[Cow<'_, [u8]>],
    ) -> Result<(Vec<Tensor>, Option<Duration>), (SlotError, Delivered)> {
        let member = &self.shared.members[index];
        member.in_flight.fetch_add(1, Ordering::Relaxed);
        let _guard = InFlight(&member.in_flight);
        let outcome = member.slot.attempt(payload).await;
        if matches!(&outcome, Ok(_) | Err((SlotError::Worker(InferError::BadInput(_)), _))) {
            member.answered.fetch_add(1, Ordering::Relaxed);
        }
        outcome
    }

    /// The running worker with the fewest requests in flight, other than
    /// `except`; the next in turn when none runs (its request then waits for it).
    fn pick(&self, except: Option<usize>) -> usize {
        let members = &self.shared.members;
        let n = members.len();
        let start = self.shared.next.fetch_add(1, Ordering::Relaxed) % n;
        let order = (0..n).map(|i| (start + i) % n).filter(|i| Some(*i) != except);
        order
            .clone()
            .filter(|i| members[*i].slot.is_running())
            .min_by_key(|i| members[*i].in_flight.load(Ordering::Relaxed))
            .or_else(|| order.clone().next())
            .unwrap_or(start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(pid: u32, confined: bool) -> SlotState {
        SlotState::Running { pid, confined, unconfined_reason: (!confined).then(|| format!("no filter on {pid}")) }
    }

    #[test]
    fn one_failed_worker_fails_the_slot() {
        let state = aggregate(&[running(1, true), SlotState::Failed("sandbox violation (SIGSYS)".into())]);
        assert_eq!(state, SlotState::Failed("sandbox violation (SIGSYS)".into()));
    }

    #[test]
    fn the_slot_runs_while_any_worker_runs_and_is_confined_only_if_all_are() {
        assert_eq!(aggregate(&[SlotState::Starting { attempt: 2 }, running(7, true)]), running(7, true));
        let mixed = aggregate(&[running(7, true), running(8, false)]);
        assert_eq!(
            mixed,
            SlotState::Running { pid: 7, confined: false, unconfined_reason: Some("no filter on 8".into()) }
        );
    }

    #[test]
    fn a_slot_with_no_running_worker_is_starting_at_the_highest_attempt() {
        let state = aggregate(&[SlotState::Starting { attempt: 1 }, SlotState::Starting { attempt: 3 }]);
        assert_eq!(state, SlotState::Starting { attempt: 3 });
        assert_eq!(aggregate(&[]), SlotState::Starting { attempt: 0 });
    }
}
