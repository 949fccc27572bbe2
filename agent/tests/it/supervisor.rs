//! The supervisor runs real `sentinel-worker` processes: it gets correct answers
//! from a confined worker, tells bad input, timeouts, crashes and sandbox
//! violations apart, restarts a killed worker, refuses workers that cannot
//! start (memory limit, truncated model) with a clear error, and gives up on a
//! slot that keeps failing.
//!
//! Synchronisation is the slot's `watch` of states and the workers' exits,
//! always under a timeout.
// Helpers outside #[test] functions may unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use crate::common::{digit, model_path, read_f32, read_i64};
use sentinel_agent::supervisor::{
    InferError, RestartPolicy, SlotError, SlotState, Supervised, SupervisorError, TestProbes, Worker, WorkerSpec,
};
use sentinel_worker_protocol::frame::Tensor;

/// Bound on every wait in these tests; generous because another build may share the machine.
const BOUND: Duration = Duration::from_secs(60);

fn label_of(outputs: &[Tensor]) -> i64 {
    assert_eq!(outputs.len(), 2, "probabilities and label");
    outputs[1].to_i64().unwrap()[0]
}

fn spec(model: PathBuf, shape: &[usize], work_dir: &Path) -> WorkerSpec {
    let mut spec = WorkerSpec::new(crate::common::worker_bin(), model, vec![shape.to_vec()], work_dir.to_path_buf());
    spec.load_timeout = BOUND;
    spec.request_timeout = BOUND;
    spec
}

fn digits_spec(work_dir: &Path) -> WorkerSpec {
    spec(model_path("digits/digits_mlp_v1.onnx"), &[1, 64], work_dir)
}

/// The first half of digits v1: a model file that cannot load.
fn truncated_model(dir: &Path) -> PathBuf {
    let full = std::fs::read(model_path("digits/digits_mlp_v1.onnx")).unwrap();
    let path = dir.join("truncated.onnx");
    std::fs::write(&path, &full[..full.len() / 2]).unwrap();
    path
}

fn fast_policy() -> RestartPolicy {
    RestartPolicy {
        initial_backoff: Duration::from_millis(10),
        max_backoff: Duration::from_millis(100),
        ..RestartPolicy::default()
    }
}

/// Waits (bounded) for the slot to reach a state `done` accepts.
async fn wait_state(slot: &Supervised, done: impl FnMut(&SlotState) -> bool) -> SlotState {
    let mut rx = slot.subscribe();
    tokio::time::timeout(BOUND, rx.wait_for(done)).await.expect("slot state wait timed out").unwrap().clone()
}

#[tokio::test]
async fn confined_worker_classifies_digits_and_reports_rss() {
    let dir = tempfile::tempdir().unwrap();
    let x = read_f32("data/digits_test_x.bin");
    let y = read_i64("data/digits_test_y.bin");
    let worker = Worker::spawn(&digits_spec(dir.path())).await.unwrap();
    assert!(worker.confined(), "not confined: {:?}", worker.unconfined_reason());
    assert!(worker.rss_bytes().unwrap() > 0);
    let mut correct = 0;
    for (i, &label) in y.iter().enumerate().take(60) {
        correct += usize::from(label_of(&worker.infer(&[digit(&x, i)]).await.unwrap()) == label);
    }
    // The model is ~97% accurate, not perfect.
    assert!(correct >= 54, "{correct}/60 right");
    // A bad request is the caller's problem: the worker keeps serving.
    let wrong = Tensor::from_f32(vec![1, 63], &x[..63]);
    assert!(matches!(worker.infer(&[wrong]).await, Err(InferError::BadInput(_))));
    assert_eq!(label_of(&worker.infer(&[digit(&x, 9)]).await.unwrap()), y[9]);
    assert_eq!(worker.exit_status(), None);
}

#[tokio::test]
async fn concurrent_requests_share_one_worker() {
    let dir = tempfile::tempdir().unwrap();
    let x = Arc::new(read_f32("data/digits_test_x.bin"));
    let worker = Arc::new(Worker::spawn(&digits_spec(dir.path())).await.unwrap());
    let mut sequential = Vec::new();
    let started = std::time::Instant::now();
    for i in 0..80 {
        sequential.push(label_of(&worker.infer(&[digit(&x, i)]).await.unwrap()));
    }
    // A figure for the log, not an assertion: speed belongs in benches/.
    eprintln!("sequential digits v1 round trip: {:?} per request", started.elapsed() / 80);
    let sequential = Arc::new(sequential);
    // Four tasks interleave on the same pipes: each must get its own answer.
    let tasks: Vec<_> = (0..4)
        .map(|t| {
            let (worker, x, sequential) = (Arc::clone(&worker), Arc::clone(&x), Arc::clone(&sequential));
            tokio::spawn(async move {
                for i in (t..80).step_by(4) {
                    assert_eq!(label_of(&worker.infer(&[digit(&x, i)]).await.unwrap()), sequential[i], "digit {i}");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
}

#[tokio::test]
async fn killed_worker_is_restarted_and_requests_resume() {
    let dir = tempfile::tempdir().unwrap();
    let x = Arc::new(read_f32("data/digits_test_x.bin"));
    let y = Arc::new(read_i64("data/digits_test_y.bin"));
    let slot = Supervised::start(digits_spec(dir.path()), RestartPolicy::default());
    let first = wait_state(&slot, |s| matches!(s, SlotState::Running { .. })).await;
    let SlotState::Running { pid: old_pid, confined: true, .. } = first else { panic!("{first:?}") };

    let failures = Arc::new(AtomicU32::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let warmed = Arc::new(tokio::sync::Notify::new());
    let client = {
        let (slot, x, y) = (slot.clone(), Arc::clone(&x), Arc::clone(&y));
        let (failures, stop, warmed) = (Arc::clone(&failures), Arc::clone(&stop), Arc::clone(&warmed));
        tokio::spawn(async move {
            let (mut ok, mut right) = (0u64, 0u64);
            let mut i = 0usize;
            while !stop.load(Ordering::SeqCst) {
                match slot.infer(&[digit(&x, i % 360)]).await {
                    Ok(out) => {
                        right += u64::from(label_of(&out) == y[i % 360]);
                        ok += 1;
                        if ok == 20 {
                            warmed.notify_one();
                        }
                    }
                    Err(e) => {
                        assert!(matches!(e, SlotError::Worker(InferError::Crashed { .. })), "{e}");
                        failures.fetch_add(1, Ordering::SeqCst);
                    }
                }
                i += 1;
            }
            (ok, right)
        })
    };
    tokio::time::timeout(BOUND, warmed.notified()).await.unwrap();
    // SAFETY: kill(2) on a pid we spawned; no memory is involved.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(i32::try_from(old_pid).unwrap(), libc::SIGKILL) };
    assert_eq!(rc, 0);
    let restarted = wait_state(&slot, |s| matches!(s, SlotState::Running { pid, .. } if *pid != old_pid)).await;
    let SlotState::Running { pid: new_pid, .. } = restarted else { panic!("{restarted:?}") };
    // Requests after the restart succeed on the new worker.
    let mut after = 0;
    for (i, &label) in y.iter().enumerate().take(20) {
        after += usize::from(label_of(&slot.infer(&[digit(&x, i)]).await.unwrap()) == label);
    }
    assert!(after >= 18, "{after}/20 right after the restart");
    stop.store(true, Ordering::SeqCst);
    let (ok, right) = tokio::time::timeout(BOUND, client).await.unwrap().expect("client task panicked");
    assert!(right * 10 >= ok * 9, "{right}/{ok} right");
    let failed = failures.load(Ordering::SeqCst);
    eprintln!("client: {ok} ok, {failed} failed across the restart (pid {old_pid} -> {new_pid})");
    assert!(failed < 5, "{failed} failed requests");
    assert_eq!(slot.restarts(), 1);
    assert!(slot.last_failure().unwrap().contains("signal 9"), "{:?}", slot.last_failure());
}

#[tokio::test]
async fn sigsys_is_a_sandbox_violation_and_fails_the_slot() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = digits_spec(dir.path());
    spec.test_probes = TestProbes::Honour;
    let slot = Supervised::start(spec, RestartPolicy::default());
    wait_state(&slot, |s| matches!(s, SlotState::Running { confined: true, .. })).await;
    let worker = slot.worker().await.unwrap();
    assert_eq!(worker.probe("none").await, Ok(vec![]));
    assert_eq!(worker.probe("socket").await, Err(InferError::SandboxViolation));
    // The slot notices on its health check and does not restart a model that
    // attempts forbidden syscalls.
    assert_eq!(slot.check().await, SlotState::Failed("sandbox violation (SIGSYS)".into()));
    assert_eq!(slot.last_failure().as_deref(), Some("sandbox violation (SIGSYS)"));
    assert!(matches!(slot.infer(&[]).await, Err(SlotError::Failed(_))));
    assert_eq!(slot.restarts(), 0);
}

#[tokio::test]
async fn tiny_memory_limit_fails_the_spawn_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = digits_spec(dir.path());
    spec.memory_limit_bytes = Some(16 << 20);
    let err = Worker::spawn(&spec).await.unwrap_err();
    eprintln!("16 MiB address space: {err}");
    // Where the limit bites (exec, the dynamic loader, the allocator) decides
    // between a spawn error and an early death; either way no ready frame and no hang.
    assert!(matches!(err, SupervisorError::ExitedBeforeReady { .. } | SupervisorError::Spawn { .. }), "{err}");
    if let SupervisorError::ExitedBeforeReady { .. } = err {
        assert!(err.to_string().contains("address-space limit of 16 MiB"), "{err}");
    }
}

#[tokio::test]
async fn truncated_model_fails_with_the_load_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(truncated_model(dir.path()), &[1, 64], dir.path());
    let err = Worker::spawn(&spec).await.unwrap_err();
    let message = err.to_string();
    eprintln!("truncated model: {message}");
    assert!(
        matches!(&err, SupervisorError::ExitedBeforeReady { exit, stderr, .. } if exit.code == Some(65) && !stderr.is_empty())
    );
    assert!(message.contains("exit code 65: model failed to load"), "{message}");
}

#[tokio::test]
async fn request_timeout_kills_the_worker_and_a_new_one_starts() {
    let dir = tempfile::tempdir().unwrap();
    let x = read_f32("data/digits_test_x.bin");
    let mut spec = spec(model_path("digits/digits_mlp_v3_slow.onnx"), &[360, 64], dir.path());
    spec.request_timeout = Duration::from_millis(1);
    let worker = Worker::spawn(&spec).await.unwrap();
    let batch = Tensor::from_f32(vec![360, 64], &x);
    assert_eq!(worker.infer(std::slice::from_ref(&batch)).await, Err(InferError::Timeout));
    let exit = tokio::time::timeout(BOUND, worker.exited()).await.unwrap();
    assert_eq!(exit.signal, Some(libc::SIGKILL), "{exit}");
    // The dead worker stays dead for later callers.
    assert_eq!(worker.infer(std::slice::from_ref(&batch)).await, Err(InferError::Timeout));

    spec.request_timeout = BOUND;
    let next = Worker::spawn(&spec).await.unwrap();
    // A caller that gives up mid-exchange must not leave its answer for the next one.
    let abandoned = tokio::time::timeout(Duration::from_millis(1), next.infer(std::slice::from_ref(&batch))).await;
    assert!(abandoned.is_err(), "the slow model answered within 1 ms");
    assert_eq!(next.infer(std::slice::from_ref(&batch)).await, Err(InferError::Cancelled));
    tokio::time::timeout(BOUND, next.exited()).await.unwrap();

    let next = Worker::spawn(&spec).await.unwrap();
    let outputs = next.infer(&[batch]).await.unwrap();
    assert_eq!(outputs[1].shape, vec![360]);
}

#[tokio::test]
async fn persistently_failing_slot_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let spec = spec(truncated_model(dir.path()), &[1, 64], dir.path());
    let slot = Supervised::start(spec, fast_policy());
    let end = wait_state(&slot, |s| matches!(s, SlotState::Failed(_))).await;
    let SlotState::Failed(reason) = end else { unreachable!() };
    assert!(reason.contains("exit code 65"), "{reason}");
    assert_eq!(slot.restarts(), 0);
    assert!(matches!(slot.infer(&[]).await, Err(SlotError::Failed(_))));
}

#[tokio::test]
async fn a_worker_that_dies_while_idle_is_replaced_without_waiting_for_a_request() {
    let dir = tempfile::tempdir().unwrap();
    let slot = Supervised::start(digits_spec(dir.path()), fast_policy());
    let first = match wait_state(&slot, |s| matches!(s, SlotState::Running { .. })).await {
        SlotState::Running { pid, .. } => pid,
        other => panic!("{other:?}"),
    };
    // SAFETY: sending SIGKILL to a child process this test started.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(i32::try_from(first).unwrap(), libc::SIGKILL) };
    assert_eq!(rc, 0);
    // No infer() and no check(): the monitor alone notices and restarts.
    let second = wait_state(&slot, |s| matches!(s, SlotState::Running { pid, .. } if *pid != first)).await;
    assert!(matches!(second, SlotState::Running { confined: true, .. }), "{second:?}");
    assert_eq!(slot.restarts(), 1);
    let x = read_f32("data/digits_test_x.bin");
    assert!(slot.infer(&[digit(&x, 0)]).await.is_ok());
}

/// The worker starts with its three pipes and nothing else, even when the
/// agent holds a descriptor some library opened without `O_CLOEXEC`: the
/// supervisor marks everything above stderr close-on-exec in the child.
#[tokio::test]
async fn a_worker_inherits_no_descriptor_but_its_pipes() {
    let dir = tempfile::tempdir().unwrap();
    let file = std::fs::File::open(model_path("digits/digits_mlp_v1.onnx")).unwrap();
    // A duplicate without O_CLOEXEC, as a careless library would leave one.
    #[allow(unsafe_code)]
    // SAFETY: fcntl on a descriptor this test owns; the duplicate is closed below.
    let leaked = unsafe { libc::fcntl(std::os::fd::AsRawFd::as_raw_fd(&file), libc::F_DUPFD, 100) };
    assert!(leaked >= 100, "F_DUPFD: {}", std::io::Error::last_os_error());
    #[allow(unsafe_code)]
    // SAFETY: reads the flags of the descriptor just made.
    let flags = unsafe { libc::fcntl(leaked, libc::F_GETFD) };
    assert_eq!(flags & libc::FD_CLOEXEC, 0, "the duplicate must be inheritable for this test to mean anything");

    let worker = Worker::spawn(&digits_spec(dir.path())).await;
    #[allow(unsafe_code)]
    // SAFETY: closes only the duplicate this test made.
    unsafe {
        libc::close(leaked);
    }
    let worker = worker.unwrap();
    let mut fds: Vec<i32> = std::fs::read_dir(format!("/proc/{}/fd", worker.pid()))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().parse().unwrap())
        .collect();
    fds.sort_unstable();
    assert_eq!(fds, [0, 1, 2], "the worker holds descriptors beyond its pipes");
}
