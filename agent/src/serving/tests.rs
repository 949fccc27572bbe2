//! Unit tests of serving's pure parts: feedback bounds, batching, input and
//! output checks, canary shares.

use super::feedback::feedback_cost;
use super::*;
use sentinel_worker_protocol::frame::DType;
use std::sync::Weak;

/// Finding 2 of issue 11: 200 ids of 4 MB took the agent to 1.66 GB.
#[test]
fn remembered_feedback_is_bounded_in_count_and_bytes() {
    let mut p = Predictions::default();
    for i in 0..FEEDBACK_MEMORY + 10 {
        p.insert(("m".into(), i.to_string()), (Weak::new(), 0));
    }
    assert_eq!((p.order.len(), p.by_id.len()), (FEEDBACK_MEMORY, FEEDBACK_MEMORY));
    assert!(!p.by_id.contains_key(&("m".to_owned(), "9".to_owned())), "the oldest go first");
    let long = "x".repeat(1 << 20);
    for i in 0..20 {
        p.insert(("m".into(), format!("{i}{long}")), (Weak::new(), 0));
        assert!(p.bytes <= FEEDBACK_MEMORY_BYTES, "{} bytes after {i}", p.bytes);
    }
    let held: usize = p.order.iter().map(feedback_cost).sum();
    assert_eq!(held, p.bytes);
    assert!(p.order.len() < 10, "{} entries", p.order.len());
}

fn info(name: &str, declared: &[Option<u64>], fixed: &[usize]) -> TensorInfo {
    TensorInfo { name: name.to_owned(), dtype: DType::F32, declared: declared.to_vec(), fixed: fixed.to_vec() }
}

#[test]
fn batches_split_only_on_a_symbolic_first_dim() {
    let specs = [info("input", &[None, Some(64)], &[1, 64])];
    let t = |shape: Vec<usize>| Tensor::from_f32(shape.clone(), &vec![0.0; shape.iter().product()]);
    assert_eq!(check_inputs(&specs, &[t(vec![1, 64])]), Ok(None));
    assert_eq!(check_inputs(&specs, &[t(vec![5, 64])]), Ok(Some(5)));
    assert!(matches!(check_inputs(&specs, &[t(vec![5, 63])]), Err(ServeError::BadInput(m)) if m.contains("[5, 63]")));
    assert!(matches!(check_inputs(&specs, &[t(vec![0, 64])]), Err(ServeError::BadInput(_))));
    assert!(matches!(check_inputs(&specs, &[]), Err(ServeError::BadInput(m)) if m.contains("[input]")));
    let fixed = [info("x", &[Some(1), Some(4)], &[1, 4])];
    assert!(check_inputs(&fixed, &[t(vec![2, 4])]).is_err(), "a fixed batch dim does not split");
    let i64_input = Tensor::from_i64(vec![1, 64], &[0; 64]);
    assert!(
        matches!(check_inputs(&specs, &[i64_input]), Err(ServeError::BadInput(m)) if m.contains("must be float32, got int64"))
    );
}

#[test]
fn canary_shares_are_exact_and_interleaved() {
    for p in [1u8, 10, 33, 50, 99] {
        let picks: Vec<bool> = (0..1000).map(|s| canary_turn(s, p)).collect();
        assert_eq!(picks.iter().filter(|x| **x).count(), usize::from(p) * 10, "{p}%");
        // No stretch of 100 requests is far from the share.
        for w in picks.windows(100) {
            assert!(w.iter().filter(|x| **x).count().abs_diff(usize::from(p)) <= 1, "{p}%");
        }
    }
}

#[test]
fn labels_come_from_any_integer_output_or_any_float_argmax() {
    use half::f16;
    let probs16 = Tensor::from_values(vec![1, 3], &[f16::from_f32(0.1), f16::from_f32(0.7), f16::from_f32(0.2)]);
    assert_eq!(predicted_label(std::slice::from_ref(&probs16)), Some(1));
    let label32 = Tensor::from_values::<i32>(vec![1], &[2]);
    assert_eq!(predicted_label(&[probs16.clone(), label32]), Some(2));
    let label64 = Tensor::from_i64(vec![1], &[0]);
    let label8 = Tensor::from_values::<u8>(vec![1], &[2]);
    assert_eq!(predicted_label(&[label8, label64, probs16]), Some(0), "an int64 label first");
    let probs64 = Tensor::from_values::<f64>(vec![1, 2], &[0.9, 0.1]);
    assert_eq!(predicted_label(&[probs64]), Some(0));
    assert_eq!(predicted_label(&[Tensor::from_strings(vec![1], &["cat"])]), None);
}

#[test]
fn outputs_are_checked_against_the_manifest() {
    let specs = [info("p", &[None, Some(10)], &[]), TensorInfo { dtype: DType::I64, ..info("l", &[None], &[]) }];
    let probs = Tensor::from_f32(vec![1, 10], &[0.1; 10]);
    let label = Tensor::from_i64(vec![1], &[3]);
    check_outputs(&specs, &[probs.clone(), label.clone()]).expect("fits");
    assert_eq!(predicted_label(&[probs.clone(), label.clone()]), Some(3));
    let wrong = Tensor::from_f32(vec![1, 9], &[0.1; 9]);
    assert!(check_outputs(&specs, &[wrong, label.clone()]).unwrap_err().to_string().contains("[?, 10]"));
    let nan = Tensor::from_f32(vec![1, 10], &[f32::NAN; 10]);
    assert!(check_outputs(&specs, &[nan, label.clone()]).unwrap_err().to_string().contains("not finite"));
    assert!(check_outputs(&specs, &[probs]).unwrap_err().to_string().contains("2"));
}

#[test]
fn the_symbolic_dims_refusal_says_how_to_fix_it() {
    let e = super::io::TensorsError::Symbolic { what: "input", name: "x".into(), declared: "[?, ?]".into() };
    assert_eq!(
        e.to_string(),
        "input `x` has symbolic dims [?, ?] besides the batch; fix them at push with \
         `sentinel model push --input-shape x=...` or on this device with `serving.input_shapes`"
    );
}

/// TensorRT's engines are kept per model file under the state dir: a load
/// with none there builds one (status says so), a load after it reuses it,
/// and they go when the model file goes.
#[test]
fn tensorrt_engines_are_cached_per_model_file_and_removed_with_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = format!(
        "{}[serving]\n[serving.models.det]\nengine = \"ort\"\nexecution_providers = [\"tensorrt\", \"cpu\"]\n\
         [serving.models.cls]\nengine = \"ort\"\n",
        crate::config::testing::base(dir.path())
    );
    let config =
        crate::config::AgentConfig::parse(&text, &std::collections::BTreeMap::new(), dir.path()).expect("config");
    let serving = Serving::new(config.serving, dir.path().join("workers"));
    let sha = "ab".repeat(32);
    assert!(serving.builds_engine("det", &sha), "no engine yet");
    assert!(!serving.builds_engine("cls", &sha), "not a TensorRT model");
    let cache = dir.path().join("workers/tensorrt-cache").join(&sha);
    std::fs::create_dir_all(&cache).expect("cache");
    assert!(serving.builds_engine("det", &sha), "an empty cache builds too");
    std::fs::write(cache.join("TensorrtExecutionProvider_TRTKernel_sm87.engine"), b"engine").expect("engine");
    assert!(!serving.builds_engine("det", &sha), "a restart or rollback reuses the engine");
    serving.forget_engines(std::slice::from_ref(&sha));
    assert!(!cache.exists());
    assert!(serving.builds_engine("det", &sha));
}
