//! `sentinel model import mlflow` against a real MLflow tracking server
//! (the venv of `.ci/install-mlflow`) and a real hub: versions registered by
//! MLflow's own client arrive with their version numbers, tags and accuracy,
//! once; what cannot be imported is refused by name.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use sentinel_testkit::mlflow::MlflowServer;
use serde_json::{Value, json};

async fn import(hub: &TestHub, tracking: &str, args: &[&str]) -> (Run, Value) {
    let mut all = vec!["--json", "model", "import", "mlflow", "--tracking-uri", tracking];
    all.extend_from_slice(args);
    let r = sentinel(hub, &hub.admin, &all).await;
    let v = serde_json::from_str(&r.stdout).unwrap_or(Value::Null);
    (r, v)
}

/// `(mlflow_version, outcome)` of each reported version.
fn outcomes(v: &Value) -> Vec<(String, String)> {
    v["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["mlflow_version"].as_str().unwrap().to_owned(), r["outcome"].as_str().unwrap().to_owned()))
        .collect()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_versions_import_once_with_their_versions_tags_and_accuracy() {
    let (mlflow, hub) = tokio::join!(MlflowServer::start(), TestHub::start());
    let readme = sentinel_testkit::models::models_dir().join("README.md");
    let (v1, v2) = (model_path(V1), model_path(V2));
    let reg = mlflow
        .register(
            "digits",
            &json!([
                // 1: the onnx flavor, tagged, with an alias.
                {"onnx": v1, "accuracy": 0.9694, "tags": {"team": "vision"}, "aliases": ["champion"]},
                // 2: a version tag gives the semver; a legacy stage.
                {"onnx": v2, "accuracy": 0.91, "tags": {"sentinel.version": "2.1.0"}, "stage": "Production"},
                // 3: a run whose artifacts hold no ONNX file.
                {"files": [readme], "accuracy": 0.5},
                // 4: MLflow's default onnx flavor: the weights in a .data file beside it.
                {"onnx": v1, "accuracy": 0.9694, "external_data": true},
            ]),
        )
        .await;
    assert_eq!(reg.iter().map(|r| r.version.as_str()).collect::<Vec<_>>(), ["1", "2", "3", "4"]);

    // --version picks one.
    let (r, v) = import(&hub, &mlflow.url, &["--model", "digits", "--version", "1", "--metric", "accuracy"]).await;
    assert_eq!(r.code, 0, "{}\n{}", r.stdout, r.stderr);
    assert_eq!(outcomes(&v), pairs(&[("1", "imported")]));
    assert_eq!(v["versions"][0]["version"], "1.0.0");

    // --all: 1 is already there, 2 is new, 3 and 4 are refused naming why.
    let (r, v) = import(&hub, &mlflow.url, &["--model", "digits", "--all", "--metric", "accuracy"]).await;
    assert_eq!(r.code, 4, "some versions were refused: {}\n{}", r.stdout, r.stderr);
    assert!(r.stderr.contains("2 of 4 MLflow versions were refused"), "{}", r.stderr);
    assert_eq!(outcomes(&v), pairs(&[("1", "already_present"), ("2", "imported"), ("3", "refused"), ("4", "refused")]));
    assert_eq!(
        (v["imported"].as_u64(), v["already_present"].as_u64(), v["refused"].as_u64()),
        (Some(1), Some(1), Some(2))
    );
    assert_eq!(v["versions"][1]["version"], "2.1.0");
    let why3 = v["versions"][2]["reason"].as_str().unwrap();
    assert_eq!(why3, "no ONNX file among the artifacts (found: README.md)");
    let why4 = v["versions"][3]["reason"].as_str().unwrap();
    // Refused by the hub's own read of the file, before any engine opens the path it names.
    assert!(
        why4.contains("the hub refused it (422)")
            && why4.contains("keeps its data in an external file")
            && why4.contains("save_as_external_data=False"),
        "{why4}"
    );

    // What the hub holds: the numbers, tags, accuracy, stage and bytes MLflow has.
    let one = hub.admin_get("/api/v1/models/digits/versions/1.0.0").await;
    assert_eq!(one["sha256"].as_str(), reg[0].sha256.as_deref());
    assert_eq!(one["sha256"], hex_sha256(&model_bytes(V1)), "MLflow kept the file as it was");
    assert_eq!(one["manifest"]["accuracy"]["value"], 0.9694);
    assert_eq!(one["manifest"]["accuracy"]["metric"], "accuracy");
    assert_eq!(one["stage"], "development");
    let tags: Vec<&str> = one["manifest"]["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    let run_tag = format!("mlflow.run_id={}", reg[0].run_id);
    assert_eq!(tags, ["team=vision", "mlflow.version=1", &run_tag, "mlflow.model=digits"]);
    let two = hub.admin_get("/api/v1/models/digits/versions/2.1.0").await;
    assert_eq!(two["sha256"].as_str(), reg[1].sha256.as_deref());
    assert_eq!(two["stage"], "production");
    assert_eq!(two["manifest"]["accuracy"]["value"], 0.91);
    let listed = hub.admin_get("/api/v1/models/digits/versions").await;
    assert_eq!(listed["total"], 2, "nothing of a refused version was stored");

    // A second run imports nothing; --alias and --stage pick what they name.
    let (r, v) = import(&hub, &mlflow.url, &["--model", "digits", "--all", "--metric", "accuracy"]).await;
    assert_eq!(r.code, 4);
    assert_eq!((v["imported"].as_u64(), v["already_present"].as_u64()), (Some(0), Some(2)));
    let (r, v) = import(&hub, &mlflow.url, &["--model", "digits", "--alias", "champion"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(outcomes(&v), pairs(&[("1", "already_present")]));
    assert_eq!(v["versions"][0]["version"], "1.0.0");
    let (r, v) = import(&hub, &mlflow.url, &["--model", "digits", "--stage", "Production"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(outcomes(&v), pairs(&[("2", "already_present")]));
    // No selector: the latest version (4, refused again).
    let (r, v) = import(&hub, &mlflow.url, &["--model", "digits"]).await;
    assert_eq!(r.code, 4);
    assert_eq!(outcomes(&v), pairs(&[("4", "refused")]));

    // The human report says the same, a line per version.
    let r = sentinel(
        &hub,
        &hub.admin,
        &["model", "import", "mlflow", "--tracking-uri", &mlflow.url, "--model", "digits", "--version", "2"],
    )
    .await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("already present  digits 2.1.0 from MLflow digits version 2"), "{}", r.stdout);

    // Another MLflow model's version 1, imported into the same Sentinel
    // model: the same source version with other bytes, refused naming both.
    let other = mlflow.register("digits-b", &json!([{"onnx": v2}])).await;
    let (r, v) = import(&hub, &mlflow.url, &["--model", "digits-b", "--name", "digits"]).await;
    assert_eq!(r.code, 4, "{}", r.stderr);
    let why = v["versions"][0]["reason"].as_str().unwrap();
    let (theirs, ours) = (other[0].sha256.as_deref().unwrap(), one["sha256"].as_str().unwrap());
    assert!(why.contains("1.0.0") && why.contains(theirs) && why.contains(ours), "{why}");
    // Into its own name, it imports.
    let (r, v) = import(&hub, &mlflow.url, &["--model", "digits-b"]).await;
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(outcomes(&v), pairs(&[("1", "imported")]));

    // A model that requires a publisher signature: a version whose
    // model-signing bundle was logged beside the file (`model.sig`) imports
    // signed; one without is refused naming why.
    let dir = tempfile::tempdir().unwrap();
    let key = sentinel_testkit::signing::keypair(dir.path(), "pipeline");
    let onnx = dir.path().join("model.onnx");
    std::fs::copy(&v2, &onnx).unwrap();
    let sig = sentinel_testkit::signing::sign(&onnx, &key, &dir.path().join("model.sig"));
    let pem = std::fs::read_to_string(&key.public).unwrap();
    hub.admin_post("/api/v1/publishers", json!({"name": "pipeline", "public_key": pem})).await;
    hub.admin_post("/api/v1/models", json!({"name": "signed", "require_publisher": true})).await;
    mlflow.register("signed", &json!([{"files": [onnx, sig]}, {"onnx": v1}])).await;
    let (r, v) = import(&hub, &mlflow.url, &["--model", "signed", "--all"]).await;
    assert_eq!(r.code, 4, "{}", r.stderr);
    assert_eq!(outcomes(&v), pairs(&[("1", "imported"), ("2", "refused")]));
    assert_eq!(v["versions"][0]["publisher"], "pipeline");
    let why = v["versions"][1]["reason"].as_str().unwrap();
    assert!(why.contains("model signed requires a publisher signature"), "{why}");
    let signed = hub.admin_get("/api/v1/models/signed/versions/1.0.0").await;
    assert_eq!(signed["manifest"]["publisher"]["name"], "pipeline");

    // What MLflow does not have is "not found"; selectors are exclusive.
    let (r, _) = import(&hub, &mlflow.url, &["--model", "nope"]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("Registered Model with name=nope not found"), "{}", r.stderr);
    let (r, _) = import(&hub, &mlflow.url, &["--model", "digits", "--alias", "nope"]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains("has no version with alias nope"), "{}", r.stderr);
    let (r, _) = import(&hub, &mlflow.url, &["--model", "digits", "--version", "1", "--all"]).await;
    assert_eq!(r.code, 64, "{}", r.stderr);
}

#[tokio::test]
async fn an_unreachable_tracking_server_is_a_clear_error() {
    let hub = TestHub::start().await;
    // Nothing listens there.
    let port = sentinel_testkit::free_loopback_port();
    let url = format!("http://127.0.0.1:{port}");
    let (r, _) = import(&hub, &url, &["--model", "digits"]).await;
    assert_eq!(r.code, 69, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("cannot reach the MLflow tracking server at {url}")), "{}", r.stderr);
    let listed = hub.admin_get("/api/v1/models").await;
    assert_eq!(listed["total"], 0);
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, bytes))
}
