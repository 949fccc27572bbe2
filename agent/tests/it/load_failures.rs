//! A version whose model does not load never gets traffic: the slot it was
//! staged in fails with the worker's reason, the committed state says so,
//! and the active version keeps answering. Real store, real confined
//! workers, no hub (the hub refuses such files at upload, so a device only
//! meets them when its copy differs from what the hub checked, e.g. an
//! engine that lacks an operator).
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use sentinel_agent::serving::{Install, InstallError, Serving};
use sentinel_agent::slots::{Color, SlotState};
use sentinel_agent::store::Store;
use sentinel_proto::pb::{Dimension, ModelManifest, TensorSpec, dimension::Kind};
use sentinel_worker_protocol::frame::Tensor;

fn digits_manifest(version: &str, sha256: &str) -> ModelManifest {
    let dim = |k: Kind| Dimension { kind: Some(k) };
    ModelManifest {
        name: "digits".into(),
        version: version.into(),
        sha256: sha256.into(),
        inputs: vec![TensorSpec {
            name: "input".into(),
            dtype: "float32".into(),
            shape: vec![dim(Kind::Symbolic("N".into())), dim(Kind::Fixed(64))],
        }],
        outputs: vec![
            TensorSpec {
                name: "probabilities".into(),
                dtype: "float32".into(),
                shape: vec![dim(Kind::Symbolic("N".into())), dim(Kind::Fixed(10))],
            },
            TensorSpec { name: "label".into(), dtype: "int64".into(), shape: vec![dim(Kind::Symbolic("N".into()))] },
        ],
        ..ModelManifest::default()
    }
}

fn serving(state: &Path) -> (Store, Serving) {
    let store = Store::open(state).unwrap();
    let text = "device_id = \"d\"\nhub_url = \"http://127.0.0.1:1\"\ngrpc_url = \"http://127.0.0.1:1\"\n\
                token_file = \"t\"\npinned_keys = [\"HMY/NU8+avTxTr2xxPvEEejvfDT2rPtpP+yM9qxqlck=\"]\nstate_dir = \"s\"\n";
    std::fs::write(state.join("t"), "x").unwrap();
    let config = sentinel_agent::AgentConfig::parse(text, &test_env(), state).unwrap();
    (store, Serving::new(config.serving, state.join("workers")))
}

async fn install(store: &Store, serving: &Serving, version: &str, bytes: &[u8]) -> Result<Option<f64>, InstallError> {
    let sha = sha256_hex(bytes);
    std::fs::write(store.model_path(&sha), bytes).unwrap();
    let m = digits_manifest(version, &sha);
    serving
        .install(
            store,
            Install {
                manifest: &m,
                deployment_id: 1,
                model_path: store.model_path(&sha),
                validation: None,
                policy: sentinel_agent::rollout::policy::default_policy(),
            },
        )
        .await
        .map(|i| i.accuracy)
}

async fn answers_with(serving: &Serving) -> String {
    let x = Tensor::from_f32(vec![1, 64], &[0.0; 64]);
    serving.infer("digits", None, vec![("input".into(), x)], None).await.unwrap().version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_and_unsupported_models_never_get_traffic() {
    let tmp = tempfile::tempdir().unwrap();
    let (store, serving) = serving(tmp.path());
    install(&store, &serving, "1.0.0", &model_bytes(V1)).await.unwrap();
    assert_eq!(answers_with(&serving).await, "1.0.0");

    let good = model_bytes(V1);
    let cases: BTreeMap<&str, Vec<u8>> = [
        ("2.0.0-truncated", good[..good.len() / 2].to_vec()),
        ("2.0.0-unsupported-op", model_bytes("broken/unsupported_op.onnx")),
    ]
    .into();
    for (version, bytes) in cases {
        let err = install(&store, &serving, version, &bytes).await.unwrap_err();
        assert_eq!(err.kind().as_str(), "load_failed", "{version}: {err}");
        // The worker's reason is the error's cause: events and status show the chain.
        let err = sentinel_agent::error_chain(&err);
        assert!(err.contains("exit code 65"), "{version}: the worker's reason is kept: {err}");
        if version.ends_with("unsupported-op") {
            assert!(err.contains("SentinelNoSuchOp"), "names the operator: {err}");
        }
        // The failure is committed; the active slot is untouched and serving.
        let slots = store.load_slots("digits").unwrap().unwrap();
        assert_eq!(slots.get(Color::Green).state, SlotState::Failed, "{slots}");
        assert_eq!(slots.get(Color::Green).version.as_deref(), Some(version));
        assert_eq!(slots.active(), Some(Color::Blue));
        let route = serving.model("digits").unwrap().route();
        assert!(route.candidate.is_none());
        assert_eq!(answers_with(&serving).await, "1.0.0");
        let x = Tensor::from_f32(vec![1, 64], &[0.0; 64]);
        let by_version = serving.infer("digits", Some(version), vec![("input".into(), x)], None).await;
        assert!(by_version.is_err(), "{version} is not reachable by version either");
    }
    let row = store.model("digits").unwrap().unwrap();
    assert_eq!((row.active_version.as_deref(), row.status.as_str()), (Some("1.0.0"), "serving"));
}
