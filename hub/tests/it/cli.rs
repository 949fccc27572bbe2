//! The `sentinel` binary against a real hub: output, JSON, and exit codes.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;
use serde_json::Value;

fn ok(r: &Run) {
    assert_eq!(r.code, 0, "stdout: {}\nstderr: {}", r.stdout, r.stderr);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_list_deploy_rollback_and_exit_codes() {
    let hub = TestHub::start().await;
    let admin = hub.admin.clone();
    let v1 = model_path(V1);
    let v1 = v1.to_str().unwrap();

    // No silent default version.
    let r = sentinel(&hub, &admin, &["model", "push", v1, "--name", "digits"]).await;
    assert_eq!(r.code, 64);
    assert!(r.stderr.contains("--version is required"), "{}", r.stderr);

    let r = sentinel(
        &hub,
        &admin,
        &[
            "model",
            "push",
            v1,
            "--name",
            "digits",
            "--version",
            "1.0.0",
            "--stage",
            "staging",
            "--accuracy",
            "0.9694",
            "--metric",
            "top1",
            "--hardware",
            "x86_64,aarch64",
        ],
    )
    .await;
    ok(&r);
    assert!(r.stdout.contains("pushed digits 1.0.0"), "{}", r.stdout);
    assert!(r.stdout.contains("a2548c61976d7687ddc92c70b77ef09758699d7fbe11f13f83ef0383075ec0c4"));

    // With a validation set from a directory.
    let vs = tempfile::tempdir().unwrap();
    std::fs::copy(model_path("data/digits_test_x.bin"), vs.path().join("inputs.bin")).unwrap();
    std::fs::copy(model_path("data/digits_test_y.bin"), vs.path().join("labels.bin")).unwrap();
    let r = sentinel(
        &hub,
        &admin,
        &[
            "--json",
            "model",
            "push",
            v1,
            "--name",
            "digits",
            "--version",
            "1.1.0",
            "--accuracy",
            "0.96",
            "--validation-set",
            vs.path().to_str().unwrap(),
        ],
    )
    .await;
    ok(&r);
    let v: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(v["manifest"]["validation"]["count"], 360);

    // Duplicate: conflict. Garbage: refused input. Missing file: local error.
    let r = sentinel(&hub, &admin, &["model", "push", v1, "--name", "digits", "--version", "1.0.0"]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("already has version 1.0.0"), "{}", r.stderr);
    let junk = vs.path().join("junk.onnx");
    std::fs::write(&junk, b"not a model").unwrap();
    let r =
        sentinel(&hub, &admin, &["model", "push", junk.to_str().unwrap(), "--name", "digits", "--version", "9.0.0"])
            .await;
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert!(r.stderr.contains("not an ONNX model") || r.stderr.contains("does not load"), "{}", r.stderr);
    let r =
        sentinel(&hub, &admin, &["model", "push", "/nonexistent.onnx", "--name", "digits", "--version", "9.0.0"]).await;
    assert_eq!(r.code, 66, "{}", r.stderr);

    // List and show, as tables and as JSON.
    let r = sentinel(&hub, &admin, &["model", "list"]).await;
    ok(&r);
    assert!(r.stdout.contains("digits") && r.stdout.contains("1.1.0"), "{}", r.stdout);
    let r = sentinel(&hub, &admin, &["--json", "model", "show", "digits"]).await;
    ok(&r);
    let m: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(m["versions"].as_array().unwrap().len(), 2);
    let r = sentinel(&hub, &admin, &["model", "show", "nope"]).await;
    assert_eq!(r.code, 1);

    // Deploy, list, show, roll back.
    let r =
        sentinel(&hub, &admin, &["model", "deploy", "digits", "--version", "1.0.0", "--target", "production"]).await;
    ok(&r);
    assert!(r.stdout.contains("ring=production"), "{}", r.stdout);
    ok(&sentinel(&hub, &admin, &["model", "deploy", "digits", "--version", "1.1.0", "--target", "production"]).await);
    let r = sentinel(&hub, &admin, &["model", "rollback", "digits", "--version", "1.0.0"]).await;
    ok(&r);
    assert!(r.stdout.contains("rollback"), "{}", r.stdout);
    let r = sentinel(&hub, &admin, &["--json", "deployments", "list"]).await;
    ok(&r);
    let d: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(d["total"], 3);
    let id = d["deployments"][0]["id"].to_string();
    let r = sentinel(&hub, &admin, &["deployments", "show", &id]).await;
    ok(&r);
    assert!(r.stdout.contains("active"), "{}", r.stdout);

    // Tokens and roles: a viewer cannot deploy.
    let r = sentinel(&hub, &admin, &["token", "create", "--role", "viewer", "--name", "ops"]).await;
    ok(&r);
    let viewer = r.stdout.trim().to_owned();
    assert!(viewer.starts_with("snt_"));
    let r = sentinel(&hub, &viewer, &["model", "deploy", "digits", "--version", "1.0.0", "--target", "*"]).await;
    assert_eq!(r.code, 77, "{}", r.stderr);
    assert!(r.stderr.contains("deployer"), "{}", r.stderr);
    let r = sentinel(&hub, "snt_wrong", &["model", "list"]).await;
    assert_eq!(r.code, 77);
    let r = sentinel(&hub, &admin, &["token", "list"]).await;
    ok(&r);
    assert!(r.stdout.contains("ops") && !r.stdout.contains(&viewer));

    // The hub key, for pinning: matches what the API serves.
    let r = sentinel(&hub, &admin, &["hub", "key"]).await;
    ok(&r);
    let keys: Value = hub.get("/api/v1/keys", &admin).await.json().await.unwrap();
    let line = format!(
        "{} {} active",
        keys["keys"][0]["key_id"].as_str().unwrap(),
        keys["keys"][0]["public_key"].as_str().unwrap()
    );
    assert_eq!(r.stdout.trim(), line);
    // `--pin`: only what the agent's `pinned_keys` takes.
    let r = sentinel(&hub, &admin, &["hub", "key", "--pin"]).await;
    ok(&r);
    assert_eq!(r.stdout, format!("{}\n", keys["keys"][0]["public_key"].as_str().unwrap()));

    // Delete: refused while deployed, then forced.
    let r = sentinel(&hub, &admin, &["model", "delete", "digits"]).await;
    assert_eq!(r.code, 3, "{}", r.stderr);
    ok(&sentinel(&hub, &admin, &["model", "delete", "digits", "--force"]).await);

    // Devices: enrol (token on stdout), list, show.
    let r = sentinel(&hub, &admin, &["device", "enroll", "edge-1", "--labels", "site=a,ring=production"]).await;
    ok(&r);
    assert!(r.stdout.trim().starts_with("snt_"), "{}", r.stdout);
    let r = sentinel(&hub, &admin, &["devices", "list"]).await;
    ok(&r);
    assert!(
        r.stdout.contains("edge-1") && r.stdout.contains("ring=production,site=a") && r.stdout.contains("offline"),
        "{}",
        r.stdout
    );
    let r = sentinel(&hub, &admin, &["--json", "devices", "show", "edge-1"]).await;
    ok(&r);
    let d: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(d["connected"], false);
    assert_eq!(d["labels"]["site"], "a");
    let r = sentinel(&hub, &admin, &["device", "enroll", "edge-1"]).await;
    assert_eq!(r.code, 3, "a second enrolment of the same id conflicts: {}", r.stderr);
    let r = sentinel(&hub, &admin, &["device", "enroll", "edge-2", "--labels", "nolabel"]).await;
    assert_eq!(r.code, 64);

    // Bad flags are usage errors; an unreachable hub is 69.
    assert_eq!(sentinel(&hub, &admin, &["model", "frobnicate"]).await.code, 64);
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sentinel"))
        .args(["--hub", "http://127.0.0.1:1", "--token", "x", "model", "list"])
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(69));
}

#[tokio::test]
async fn hub_urls_without_a_scheme_json_errors_and_completions() {
    let hub = TestHub::start().await;
    // HOST:PORT on loopback means http://.
    let bare = hub.url.trim_start_matches("http://").to_owned();
    let r = sentinel(&hub, &hub.admin, &["--hub", &bare, "model", "list"]).await;
    ok(&r);
    // Anywhere else a scheme is needed, and the message says which flag.
    let r = sentinel_at("hub.example:8080", None, &["model", "list"]).await;
    assert_eq!(r.code, 64, "{}", r.stderr);
    assert!(
        r.stderr.contains("--hub \"hub.example:8080\" has no scheme: write https://hub.example:8080"),
        "{}",
        r.stderr
    );

    // With --json, an error is JSON on stderr, with the same exit code.
    let r = sentinel(&hub, &hub.admin, &["--json", "model", "show", "nope"]).await;
    assert_eq!(r.code, 1, "{}", r.stderr);
    let err: Value = serde_json::from_str(r.stderr.trim()).unwrap_or_else(|e| panic!("{e}: {}", r.stderr));
    assert_eq!(err["error"]["exit_code"], 1);
    assert_eq!(err["error"]["hub_status"], 404);
    assert!(err["error"]["message"].as_str().unwrap().contains("model \"nope\" is not registered"), "{err}");
    let r = sentinel(&hub, &hub.admin, &["model", "show", "nope"]).await;
    assert_eq!((r.code, r.stderr.trim()), (1, "sentinel: the hub answered 404: model \"nope\" is not registered"));

    // Completion scripts for each shell, with the commands in them.
    for shell in ["bash", "zsh", "fish"] {
        let r = sentinel_at(&hub.url, None, &["completions", shell]).await;
        ok(&r);
        assert!(r.stdout.contains("publisher") && r.stdout.contains("deploy"), "{shell}: {}", r.stdout.len());
    }
    let r = sentinel_at(&hub.url, None, &["completions", "tcsh"]).await;
    assert_eq!(r.code, 64, "{}", r.stderr);
}

/// Issue 17: a refused push left an empty registered model behind.
#[tokio::test]
async fn a_refused_push_registers_nothing_and_a_good_one_registers_its_model() {
    let hub = TestHub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let junk = dir.path().join("junk.onnx");
    std::fs::write(&junk, b"not an onnx file").unwrap();
    let r =
        sentinel(&hub, &hub.admin, &["model", "push", junk.to_str().unwrap(), "--name", "fresh", "--version", "1.0.0"])
            .await;
    assert_eq!(r.code, 65, "{}", r.stderr);
    assert_eq!(hub.get("/api/v1/models/fresh", &hub.admin).await.status(), 404, "nothing was registered");

    let v1 = model_path(V1);
    let args =
        ["model", "push", v1.to_str().unwrap(), "--name", "fresh", "--version", "1.0.0", "--description", "a b&c"];
    ok(&sentinel(&hub, &hub.admin, &args).await);
    let model: Value = hub.get("/api/v1/models/fresh", &hub.admin).await.json().await.unwrap();
    assert_eq!((model["description"].as_str(), model["version_count"].as_u64()), (Some("a b&c"), Some(1)));
    // A name that cannot be a model is refused before anything is read.
    let r = sentinel(&hub, &hub.admin, &["model", "push", v1.to_str().unwrap(), "--name", "a b", "--version", "1.0.0"])
        .await;
    assert_eq!(r.code, 65, "{}", r.stderr);
}

/// Lists fit `COLUMNS`: one line per row, long cells cut with `…` but never
/// the id `show` takes; the matching `show` has the whole value, and piped
/// output without `COLUMNS` is left whole.
#[tokio::test]
async fn lists_fit_the_width_and_show_has_the_whole_cell() {
    let hub = TestHub::start().await;
    let admin = hub.admin.as_str();
    let labels = "site=north-harbour-warehouse-7,room=cold-storage-b,rack=r12,shelf=top";
    ok(&sentinel(&hub, admin, &["device", "enroll", "edge-1", "--labels", labels]).await);
    let description = "digit classifier for the loading-dock scanners, trained on the 2025 warehouse set";
    let v1 = model_path(V1);
    let push = ["model", "push", v1.to_str().unwrap(), "--name", "digits", "--version", "1.0.0"];
    ok(&sentinel(&hub, admin, &[&push[..], &["--description", description]].concat()).await);
    let narrow = [("COLUMNS", "80")];
    let sorted = |t: &str| {
        let mut v: Vec<&str> = t.split(',').collect();
        v.sort_unstable();
        v.join(",")
    };

    for (list, id, whole) in
        [(["device", "list"], "edge-1", sorted(labels)), (["model", "list"], "digits", description.to_owned())]
    {
        let r = sentinel_env(&hub.url, Some(admin), &narrow, &list).await;
        ok(&r);
        let widest = r.stdout.lines().map(|l| l.chars().count()).max().unwrap();
        assert!(widest <= 80, "{list:?} is {widest} wide:\n{}", r.stdout);
        assert!(r.stdout.contains('…') && !r.stdout.contains(&whole), "{list:?}:\n{}", r.stdout);
        // One line for the one row, between the header's rule and the bottom
        // border, with the id whole.
        let rows: Vec<&str> =
            r.stdout.lines().skip_while(|l| !l.starts_with('╞')).skip(1).take_while(|l| !l.starts_with('└')).collect();
        assert_eq!(rows.len(), 1, "{list:?}: one line per row:\n{}", r.stdout);
        assert!(rows[0].contains(&format!("│ {id} ")), "{list:?}: the id is never cut:\n{}", r.stdout);
        // Piped without COLUMNS: whole.
        let r = sentinel(&hub, admin, &list).await;
        ok(&r);
        assert!(r.stdout.contains(&whole) && !r.stdout.contains('…'), "{list:?}:\n{}", r.stdout);
    }
    let r = sentinel_env(&hub.url, Some(admin), &narrow, &["device", "show", "edge-1"]).await;
    ok(&r);
    assert!(r.stdout.contains(&format!("labels     {}", sorted(labels))), "{}", r.stdout);
    let r = sentinel_env(&hub.url, Some(admin), &[("COLUMNS", "60")], &["model", "show", "digits"]).await;
    ok(&r);
    assert!(r.stdout.starts_with(&format!("digits: {description}\n")), "{}", r.stdout);
    // A show's own table (below name, tags and publisher lines) wraps rather than cuts.
    let table: Vec<&str> = r.stdout.lines().skip(3).collect();
    assert!(!r.stdout.contains('…') && table.iter().all(|l| l.chars().count() <= 60), "{}", r.stdout);
}
