//! Server-side dynamic batching, in the spirit of Triton's dynamic batcher:
//! concurrent requests to one slot are joined into one worker exchange of up
//! to `max_batch_size` samples, waiting at most `max_queue_delay_us` after
//! the first for company, and each request gets its own samples' outputs back.
//!
//! How a joined batch runs depends on the engine:
//! - **tract**: the worker runs each sample by itself
//!   ([`frame::Request::rows`]), so a request's outputs are bit for bit those
//!   it gets alone. tract's batched kernels give a row other last bits than
//!   its single-row run, and other ones again by its place in the batch
//!   (measured on digits: 10 to 21 of 64 rows change when the batch is
//!   rotated by 1 to 7 places), so one batched run would make a request's
//!   answer depend on its neighbours. Only single-sample requests join.
//! - **ONNX Runtime**: one batched run when the workers run batches as one
//!   (their `max_batch`), as Triton does: each row matches its single run to
//!   f32 rounding, with the same label. Otherwise sample by sample.
//!
//! A lone request runs exactly as it would without the batcher. A joined
//! batch the worker refuses (one request's NaN, say) runs again request by
//! request, so only the culprit fails. At most as many joined batches run at
//! once as the pool has workers: while all are busy, requests queue and the
//! next batch takes as many of them as fit.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, TrySendError};
use std::time::{Duration, Instant};

use sentinel_worker_protocol::frame::Tensor;
use sentinel_worker_protocol::launch::Engine;

use tokio::sync::{Semaphore, oneshot};

use super::TensorInfo;
use crate::metrics::AgentMetrics;
use crate::supervisor::{InferError, Pool, SlotError};

/// What a request gets back: its outputs and the compute time of the run it was in.
pub type Answer = Result<(Vec<Tensor>, Duration), SlotError>;

/// Requests waiting for a batch, at most; past it a request is refused as
/// unavailable (503). The inference API's in-flight byte bound usually
/// holds the queue far below it.
const QUEUE: usize = 4096;

#[derive(Debug)]
struct Job {
    inputs: Vec<Tensor>,
    samples: usize,
    queued: Instant,
    reply: oneshot::Sender<Answer>,
}

/// The dynamic batcher of one slot: a thread that forms batches (Tokio's
/// timers have a resolution of 1 ms, too coarse for delays of a few hundred
/// microseconds; a thread waits on its queue with the kernel's precision),
/// and runtime tasks that run them. Dropping it ends the thread once the
/// batches already formed are handed over.
#[derive(Debug)]
pub struct Batcher {
    tx: std::sync::mpsc::SyncSender<Job>,
    max_samples: usize,
    delay: Duration,
    engine: Engine,
}

/// What joins: `samples` fit in a batch holding `total` of at most `max`.
pub fn fits(total: usize, samples: usize, max: usize) -> bool {
    total.checked_add(samples).is_some_and(|t| t <= max)
}

/// Whether requests to a model with these inputs and outputs can be joined:
/// every input carries a symbolic batch dim first (run at 1), and every
/// output a first dim that is symbolic or 1, to cut the batch back along.
pub fn joinable(inputs: &[TensorInfo], outputs: &[TensorInfo]) -> bool {
    !inputs.is_empty()
        && inputs.iter().all(TensorInfo::batched)
        && outputs.iter().all(|o| matches!(o.declared.first(), Some(None | Some(1))))
}

/// How a joined batch of `total` samples runs: `true` for sample by sample.
pub fn by_rows(engine: Engine, worker_max_batch: usize, total: usize) -> bool {
    engine == Engine::Tract || worker_max_batch < total
}

/// Cuts the joined outputs back into each request's, `counts` being the
/// samples each request brought, in order. Every output must carry the
/// batch in its first dim.
pub fn split(outputs: &[Tensor], counts: &[usize]) -> Result<Vec<Vec<Tensor>>, String> {
    let total: usize = counts.iter().sum();
    if let Some((index, t)) = outputs.iter().enumerate().find(|(_, t)| t.shape.first() != Some(&total)) {
        return Err(format!(
            "output {index} has shape {:?}, not the joined batch of {total} samples in its first dim",
            t.shape
        ));
    }
    let mut start = 0;
    Ok(counts
        .iter()
        .map(|&n| {
            let part = outputs.iter().map(|t| t.samples(start, n)).collect();
            start += n;
            part
        })
        .collect())
}

impl Batcher {
    /// Starts the batcher of `pool`; each exchange is counted in `metrics`
    /// under the model's name. Must be called inside a Tokio runtime, which
    /// runs the batches.
    pub fn start(
        pool: Pool,
        max_samples: usize,
        delay: Duration,
        metrics: (Arc<AgentMetrics>, String),
    ) -> std::io::Result<Batcher> {
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let engine = pool.engine();
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name(format!("batcher-{}", metrics.1))
            .spawn(move || collect(&rx, &pool, max_samples, delay, &metrics, &runtime))?;
        Ok(Batcher { tx, max_samples, delay, engine })
    }

    /// The most samples one joined batch carries.
    pub fn max_samples(&self) -> usize {
        self.max_samples
    }

    /// How long the first request of a batch waits for company.
    pub fn delay(&self) -> Duration {
        self.delay
    }

    /// Whether a request of `samples` samples joins batches (see the module docs).
    pub fn takes(&self, samples: usize) -> bool {
        samples <= self.max_samples && (self.engine != Engine::Tract || samples == 1)
    }

    /// Queues a request of `samples` samples and waits for its outputs.
    pub async fn run(&self, inputs: Vec<Tensor>, samples: usize) -> Answer {
        let (reply, answer) = oneshot::channel();
        let job = Job { inputs, samples, queued: Instant::now(), reply };
        self.tx.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => SlotError::Failed(format!("{QUEUE} requests already wait for a batch")),
            TrySendError::Disconnected(_) => SlotError::Failed("the slot's batcher stopped".into()),
        })?;
        answer.await.map_err(|_| SlotError::Failed("the slot's batcher stopped".into()))?
    }
}

/// Forms batches while the batcher lives: each waits for a free worker,
/// then takes the oldest request and what joins it until the batch is full
/// or the oldest has waited `delay` (with 0, only what is already queued).
fn collect(
    rx: &Receiver<Job>,
    pool: &Pool,
    max: usize,
    delay: Duration,
    (metrics, model): &(Arc<AgentMetrics>, String),
    runtime: &tokio::runtime::Handle,
) {
    let workers = Arc::new(Semaphore::new(pool.size()));
    let mut carried: Option<Job> = None;
    loop {
        let Ok(permit) = runtime.block_on(workers.clone().acquire_owned()) else { return };
        let first = match carried.take() {
            Some(job) => job,
            None => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
        };
        let deadline = first.queued + delay;
        let mut total = first.samples;
        let mut jobs = vec![first];
        while total < max {
            let next = match deadline.checked_duration_since(Instant::now()).filter(|left| !left.is_zero()) {
                Some(left) => rx.recv_timeout(left).ok(),
                None => rx.try_recv().ok(),
            };
            match next {
                Some(job) if fits(total, job.samples, max) => {
                    total += job.samples;
                    jobs.push(job);
                }
                Some(job) => {
                    carried = Some(job);
                    break;
                }
                None => break,
            }
        }
        metrics.joined(model, jobs.len());
        let pool = pool.clone();
        runtime.spawn(async move {
            run_batch(&pool, jobs, total).await;
            drop(permit);
        });
    }
}

/// Runs one formed batch and answers each of its requests.
async fn run_batch(pool: &Pool, mut jobs: Vec<Job>, total: usize) {
    if jobs.len() == 1 {
        let job = jobs.remove(0);
        return answer_alone(pool, &job.inputs, job.reply).await;
    }
    let counts: Vec<usize> = jobs.iter().map(|j| j.samples).collect();
    // The requests were checked against the same declared inputs, so they join.
    let inputs = jobs.iter_mut().map(|j| std::mem::take(&mut j.inputs)).collect();
    let Ok(joined) = Tensor::concat_each(inputs) else {
        for job in jobs {
            let _ = job.reply.send(Err(SlotError::Failed("requests of one batch did not join".into())));
        }
        return;
    };
    let run = if by_rows(pool.engine(), pool.max_batch(), total) {
        pool.infer_rows_timed(&joined).await
    } else {
        pool.infer_timed(&joined).await
    };
    match run {
        Ok((outputs, compute)) => match split(&outputs, &counts) {
            Ok(parts) => {
                for (job, part) in jobs.into_iter().zip(parts) {
                    let _ = job.reply.send(Ok((part, compute.unwrap_or_default())));
                }
            }
            Err(reason) => {
                for job in jobs {
                    let _ = job.reply.send(Err(SlotError::Failed(reason.clone())));
                }
            }
        },
        // A refusal may be one request's fault: each runs again alone, its
        // inputs cut back out of the joined ones.
        Err(SlotError::Worker(InferError::BadInput(_))) => {
            let mut start = 0;
            for job in jobs {
                let inputs: Vec<Tensor> = joined.iter().map(|t| t.samples(start, job.samples)).collect();
                start += job.samples;
                answer_alone(pool, &inputs, job.reply).await;
            }
        }
        Err(e) => {
            for job in jobs {
                let _ = job.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Runs one request by itself, as it would run without the batcher, and answers it.
async fn answer_alone(pool: &Pool, inputs: &[Tensor], reply: oneshot::Sender<Answer>) {
    let _ = reply.send(pool.infer_timed(inputs).await.map(|(outputs, compute)| (outputs, compute.unwrap_or_default())));
}

#[cfg(test)]
mod tests {
    use super::*;
    use sentinel_worker_protocol::frame::DType;

    fn info(declared: Vec<Option<u64>>, fixed: Vec<usize>) -> TensorInfo {
        TensorInfo { name: "x".into(), dtype: DType::F32, declared, fixed }
    }

    #[test]
    fn requests_join_while_their_samples_fit() {
        assert!(fits(0, 64, 64));
        assert!(fits(63, 1, 64));
        assert!(!fits(63, 2, 64), "a request is never split across batches");
        assert!(!fits(usize::MAX, 1, usize::MAX), "no overflow");
    }

    #[test]
    fn tract_runs_joined_batches_by_rows_and_onnx_runtime_as_one_when_its_workers_can() {
        assert!(by_rows(Engine::Tract, 64, 8), "tract's batched kernels change a row's last bits");
        assert!(!by_rows(Engine::Ort, 64, 8));
        assert!(by_rows(Engine::Ort, 1, 8), "workers that run single samples");
        assert!(by_rows(Engine::Ort, 4, 8), "larger than the workers' batch");
    }

    #[test]
    fn only_models_with_a_batch_dim_in_and_out_join() {
        let input = info(vec![None, Some(64)], vec![1, 64]);
        let output = info(vec![None, Some(10)], vec![1, 10]);
        assert!(joinable(std::slice::from_ref(&input), std::slice::from_ref(&output)));
        assert!(joinable(std::slice::from_ref(&input), &[info(vec![Some(1), Some(10)], vec![1, 10])]));
        let fixed = info(vec![Some(1), Some(64)], vec![1, 64]);
        assert!(!joinable(&[fixed], std::slice::from_ref(&output)), "a fixed input has no batch dim");
        assert!(!joinable(std::slice::from_ref(&input), &[info(vec![], vec![])]), "a scalar output");
        assert!(!joinable(std::slice::from_ref(&input), &[info(vec![Some(10)], vec![10])]));
        assert!(!joinable(&[], &[output]));
    }

    #[test]
    fn joined_outputs_are_cut_back_per_request_in_order() {
        let probs = Tensor::from_f32(vec![4, 2], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]);
        let labels = Tensor::from_i64(vec![4], &[10, 11, 12, 13]);
        let parts = split(&[probs.clone(), labels], &[1, 2, 1]).expect("splits");
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[1][0].to_f32().unwrap(), vec![2.0, 3.0, 4.0, 5.0]);
        assert_eq!((parts[1][0].shape.clone(), parts[1][1].to_i64().unwrap()), (vec![2, 2], vec![11, 12]));
        assert_eq!(parts[2][1].to_i64().unwrap(), vec![13]);
        let e = split(&[probs], &[1, 2]).expect_err("4 rows for 3 samples");
        assert!(e.contains("not the joined batch of 3"), "{e}");
    }
}
