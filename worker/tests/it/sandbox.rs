//! The confined inference worker serves real models after confining itself,
//! and its seccomp filter is what stops forbidden actions: each one kills a
//! confined worker with `SIGSYS` and succeeds when confinement is off.
//!
//! Every test spawns the real `sentinel-worker` binary; reading its ready frame
//! is the synchronisation. These tests expect a Linux kernel with seccomp: a
//! worker that reports itself unconfined fails them.
// Helpers outside #[test] functions may unwrap too: a panic is a failed test.
#![allow(clippy::unwrap_used)]

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio};

use sentinel_testkit::models::{digit, model_path, read_f32, read_i64};
use sentinel_worker::probe;
use sentinel_worker_protocol::frame::{
    self as protocol, DType, Ready, ResponseError, Tensor, decode_ready, decode_response, encode_request,
};

fn digits_model() -> PathBuf {
    model_path("digits/digits_mlp_v1.onnx")
}

struct Worker {
    child: Child,
    stdin: ChildStdin,
    stdout: ChildStdout,
    ready: Ready,
}

impl Worker {
    /// Spawns a worker and waits for its ready frame.
    fn spawn(model: &Path, shape: &str, extra: &[&str]) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sentinel-worker"))
            .arg("--model")
            .arg(model)
            .args(["--input-shape", shape])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let mut stdout = child.stdout.take().unwrap();
        let frame = protocol::read_frame(&mut stdout).unwrap().expect("worker exited before its ready frame");
        let ready = decode_ready(&frame).unwrap();
        assert!(ready.ready, "{ready:?}");
        Worker { child, stdin, stdout, ready }
    }

    /// Spawns a confined worker and fails the test loudly if the sandbox could not be installed.
    fn confined(model: &Path, shape: &str, extra: &[&str]) -> Worker {
        let w = Worker::spawn(model, shape, extra);
        assert!(w.ready.confined, "the worker is not confined on this machine: {:?}", w.ready.reason);
        assert_eq!(w.ready.reason, None);
        w
    }

    /// Sends one payload; `None` if the worker closed stdout instead of answering.
    fn send(&mut self, payload: &[u8]) -> Option<Vec<u8>> {
        // A dead worker may already have closed its end of stdin.
        protocol::write_frame(&mut self.stdin, payload).ok()?;
        protocol::read_frame(&mut self.stdout).unwrap()
    }

    fn infer(&mut self, inputs: &[Tensor]) -> Result<Vec<Tensor>, ResponseError> {
        decode_response(&self.send(&encode_request(inputs)).expect("worker died"))
    }

    fn vm_rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Closes stdin and waits for the process to end.
    fn finish(mut self) -> ExitStatus {
        drop(self.stdin);
        let mut rest = Vec::new();
        self.stdout.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "unexpected output after the last response: {} bytes", rest.len());
        self.child.wait().unwrap()
    }
}

/// Checks one digits answer and returns the predicted label.
fn label_of(outputs: &[Tensor]) -> i64 {
    assert_eq!(outputs.len(), 2, "probabilities and label");
    assert_eq!((outputs[0].dtype, outputs[0].shape.as_slice()), (DType::F32, &[1, 10][..]));
    let sum: f32 = outputs[0].to_f32().unwrap().iter().sum();
    assert!((sum - 1.0).abs() < 1e-4, "probabilities sum to {sum}");
    assert_eq!((outputs[1].dtype, outputs[1].shape.as_slice()), (DType::I64, &[1][..]));
    outputs[1].to_i64().unwrap()[0]
}

#[test]
fn confined_by_default_and_classifies_all_test_digits() {
    let x = read_f32("data/digits_test_x.bin");
    let y = read_i64("data/digits_test_y.bin");
    assert_eq!((x.len(), y.len()), (360 * 64, 360));
    // No --confinement flag: enforcing is the default.
    let mut w = Worker::confined(&digits_model(), "1,64", &[]);
    eprintln!("worker VmRSS after loading digits v1, warm-up and confinement: {} KiB", w.vm_rss_kib());
    let correct = (0..360).filter(|&i| label_of(&w.infer(&[digit(&x, i)]).unwrap()) == y[i]).count();
    let accuracy = correct as f64 / 360.0;
    assert!(accuracy >= 0.96, "accuracy {accuracy} ({correct}/360)");
    assert!(w.finish().success());
}

/// A confined worker answers a harmless probe, then attempting `action` kills it with SIGSYS.
fn assert_killed_by_sigsys(action: &str) {
    let mut w = Worker::confined(&digits_model(), "1,64", &["--test-forbidden"]);
    assert_eq!(decode_response(&w.send(b"FORBID:none").unwrap()), Ok(vec![]));
    let answer = w.send(format!("FORBID:{action}").as_bytes());
    assert!(answer.is_none(), "worker answered {answer:?} instead of dying");
    let status = w.child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{action}: {status:?}");
}

#[test]
fn socket_kills_a_confined_worker_with_sigsys() {
    assert_killed_by_sigsys("socket");
}

#[test]
fn opening_a_file_for_writing_kills_a_confined_worker_with_sigsys() {
    let mut w = Worker::confined(&digits_model(), "1,64", &["--test-forbidden"]);
    let target = probe::write_target(w.child.id());
    assert!(w.send(b"FORBID:open-write").is_none());
    assert_eq!(w.child.wait().unwrap().signal(), Some(libc::SIGSYS));
    assert!(!target.exists(), "{} was created", target.display());
}

#[test]
fn exec_kills_a_confined_worker_with_sigsys() {
    assert_killed_by_sigsys("exec");
}

#[test]
fn abort_under_the_filter_is_sigabrt_not_a_violation() {
    let mut w = Worker::confined(&digits_model(), "1,64", &["--test-forbidden"]);
    assert!(w.send(b"FORBID:abort").is_none());
    assert_eq!(w.child.wait().unwrap().signal(), Some(libc::SIGABRT));
}

#[test]
fn harmless_requests_work_after_confinement() {
    let x = read_f32("data/digits_test_x.bin");
    let y = read_i64("data/digits_test_y.bin");
    let mut w = Worker::confined(&digits_model(), "1,64", &["--test-forbidden"]);
    assert_eq!(decode_response(&w.send(b"FORBID:none").unwrap()), Ok(vec![]));
    assert_eq!(label_of(&w.infer(&[digit(&x, 0)]).unwrap()), y[0]);
    assert_eq!(decode_response(&w.send(b"FORBID:none").unwrap()), Ok(vec![]));
    assert!(w.finish().success());
}

#[test]
fn without_confinement_the_forbidden_actions_go_through() {
    // The control for the SIGSYS tests: the same requests, no filter.
    let mut w = Worker::spawn(&digits_model(), "1,64", &["--confinement", "off", "--test-forbidden"]);
    assert!(!w.ready.confined);
    assert_eq!(w.ready.reason.as_deref(), Some("confinement off"));
    assert_eq!(decode_response(&w.send(b"FORBID:socket").unwrap()), Ok(vec![]));
    assert_eq!(decode_response(&w.send(b"FORBID:open-write").unwrap()), Ok(vec![]));
    // The exec target does not exist: an execve that is let through fails
    // with ENOENT and the worker answers instead of dying.
    match decode_response(&w.send(b"FORBID:exec").unwrap()) {
        Err(ResponseError::Worker(msg)) => assert!(msg.contains("No such file or directory"), "{msg}"),
        other => panic!("exec: {other:?}"),
    }
    assert!(w.finish().success());
}

#[test]
fn bad_requests_get_errors_and_the_worker_keeps_serving() {
    let x = read_f32("data/digits_test_x.bin");
    let y = read_i64("data/digits_test_y.bin");
    let mut w = Worker::confined(&digits_model(), "1,64", &[]);
    let good = digit(&x, 1);

    let mut short = good.clone();
    short.data.pop();
    let mut nan = good.clone();
    nan.data[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    let wrong_shape = Tensor::from_f32(vec![1, 63], &x[..63]);
    let wrong_dtype = Tensor::from_i64(vec![1, 64], &[0; 64]);
    let cases: [(&str, Vec<u8>, &str); 7] = [
        ("wrong byte count", encode_request(&[short]), "needs 256 bytes, frame says 255"),
        ("NaN", encode_request(&[nan]), "element 3 is NaN"),
        ("wrong shape", encode_request(&[wrong_shape]), "expected shape [1, 64], got [1, 63]"),
        ("wrong dtype", encode_request(&[wrong_dtype]), "expected float32, got int64"),
        ("two inputs", encode_request(&[good.clone(), good.clone()]), "expected 1 input tensors, got 2"),
        ("garbage", b"\x01\x00".to_vec(), "truncated"),
        // Probes are plain malformed requests unless the test flag is given.
        ("probe without the test flag", b"FORBID:socket".to_vec(), "bad request"),
    ];
    for (name, payload, needle) in cases {
        match decode_response(&w.send(&payload).expect("worker died")) {
            Err(ResponseError::Worker(msg)) => assert!(msg.contains(needle), "{name}: {msg:?} lacks {needle:?}"),
            other => panic!("{name}: {other:?}"),
        }
        assert_eq!(label_of(&w.infer(std::slice::from_ref(&good)).unwrap()), y[1], "after {name}");
    }
    assert!(w.finish().success());
}

#[test]
fn vision_model_matches_onnx_runtime_when_confined() {
    let input = read_f32("data/textcls_sample_input.bin");
    let reference = read_f32("data/textcls_sample_ref_output.bin");
    assert_eq!((input.len(), reference.len()), (3 * 48 * 192, 2));
    let model = model_path("vision/ch_ppocr_mobile_v2.0_cls_infer.onnx");
    let mut w = Worker::confined(&model, "1,3,48,192", &[]);
    let outputs = w.infer(&[Tensor::from_f32(vec![1, 3, 48, 192], &input)]).unwrap();
    assert_eq!(outputs.len(), 1);
    assert_eq!((outputs[0].dtype, outputs[0].shape.as_slice()), (DType::F32, &[1, 2][..]));
    let got = outputs[0].to_f32().unwrap();
    for (g, r) in got.iter().zip(&reference) {
        assert!((g - r).abs() <= 1e-3, "tract {got:?} vs ONNX Runtime {reference:?}");
    }
    assert!(w.finish().success());
}

#[test]
fn a_worker_that_cannot_load_its_model_exits_65() {
    let status = Command::new(env!("CARGO_BIN_EXE_sentinel-worker"))
        .args(["--model", "/nonexistent/model.onnx", "--input-shape", "1,64"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert_eq!(status.code(), Some(65));
}
