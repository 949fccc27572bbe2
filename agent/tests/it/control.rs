//! The operator commands of the real `sentinel-agent` binary against a real
//! agent (in this process) and a real hub: `status` (table and JSON),
//! `models`, `rollback`, and offline `verify`, with their exit codes.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::path::Path;
use std::process::Output;

use common::*;
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_sentinel-agent");

/// Runs the binary off the async runtime's threads (it blocks on the socket).
async fn run(args: &[&str]) -> Output {
    let args: Vec<String> = args.iter().map(|s| (*s).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN).args(&args).env_remove("RUNTIME_DIRECTORY").output().unwrap()
    })
    .await
    .unwrap()
}

fn text(o: &Output) -> (String, String) {
    (String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

async fn infer(addr: std::net::SocketAddr) -> Value {
    let body = json!({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32", "data": vec![0.5; 64]}]});
    let r =
        reqwest::Client::new().post(format!("http://{addr}/v2/models/digits/infer")).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_both_slots_and_rollback_puts_the_standby_back() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.push("digits", "2.0.0", V2, "").await;
    // The standby stays watched for an hour: the rollback comes from the
    // operator. Each slot has a pool of two workers.
    let extra = "[rollout]\nstandby_bake_seconds = 3600\n[labels]\nsite = \"a\"\n[serving]\nworkers = 2\n";
    let agent = start_agent_with(&tmp.path().join("agent"), &hub, "edge-1", &[("site", "a")], extra).await;
    let config = tmp.path().join("agent/agent.toml");
    let config = config.to_str().unwrap();
    serve_2_over_warm_1(&hub, &agent).await;
    let addr = agent.inference_addr.unwrap();
    for _ in 0..5 {
        assert_eq!(infer(addr).await["model_version"], "2.0.0");
    }

    let out = run(&["status", "--config", config]).await;
    let (stdout, stderr) = text(&out);
    println!("{stdout}");
    assert!(out.status.success(), "{stderr}");
    for want in [
        "edge-1 [site=a]",
        "connected since",
        "MODEL",
        "blue",
        "green",
        "standby",
        "active",
        "100%",
        "MiB",
        "tract",
        " +1",
    ] {
        assert!(stdout.contains(want), "`{want}` missing from the table:\n{stdout}");
    }

    let out = run(&["status", "--json", "--config", config]).await;
    assert!(out.status.success(), "{}", text(&out).1);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["hub"]["connected"], true);
    assert!(s["hub"]["since_ms"].as_i64().unwrap() > 0);
    assert_eq!(s["device_id"], "edge-1");
    assert_eq!(s["labels"], json!({"site": "a"}));
    assert!(s["disk"]["models_bytes"].as_u64().unwrap() >= model_bytes(V1).len() as u64);
    let slots = s["models"][0]["slots"].as_array().unwrap();
    let slot = |state: &str| slots.iter().find(|x| x["state"] == state).unwrap_or_else(|| panic!("no {state}: {s}"));
    assert_eq!(slot("active")["version"], "2.0.0");
    assert_eq!(slot("active")["traffic_percent"], 100);
    assert_eq!(slot("active")["metrics"]["requests"], 5);
    assert_eq!(slot("standby")["version"], "1.0.0");
    assert_eq!(slot("standby")["traffic_percent"], 0);
    let pids = |slot: &Value| -> Vec<u64> {
        slot["worker"]["workers"].as_array().unwrap().iter().map(|w| w["pid"].as_u64().unwrap()).collect()
    };
    for x in slots {
        let w = &x["worker"];
        assert!(w["pid"].as_u64().unwrap() > 0, "{x}");
        assert_eq!(w["state"], "running");
        assert_eq!(w["engine"], "tract");
        assert_eq!(w["confined"], true);
        // Each worker is listed, running and confined; the memory figures are the pool's totals.
        let workers = w["workers"].as_array().unwrap();
        assert_eq!(workers.len(), 2, "{x}");
        assert!(workers.iter().all(|p| p["state"] == "running" && p["confined"] == true), "{x}");
        let rss: u64 = workers.iter().map(|p| p["rss_bytes"].as_u64().unwrap()).sum();
        assert!(rss > 0);
        assert_eq!(w["rss_bytes"].as_u64().unwrap(), rss, "{x}");
        assert_eq!(w["memory_limit_bytes"], 2 * (2048u64 << 20), "{x}");
        assert_ne!(pids(x)[0], pids(x)[1]);
    }
    // Validation ran its probe on every worker of the new pool.
    assert!(
        slot("active")["worker"]["workers"].as_array().unwrap().iter().all(|w| w["answered"].as_u64().unwrap() >= 1)
    );
    let standby_pids = pids(slot("standby"));
    assert_eq!(s["last_rollback"], Value::Null);

    let out = run(&["models", "--config", config]).await;
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert!(stdout.lines().any(|l| l.starts_with("digits") && l.contains("2.0.0") && l.contains("1.0.0")), "{stdout}");

    // The operator's rollback: the standby answers again at once.
    let out = run(&["rollback", "digits", "--config", config]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("2.0.0 rolled back; 1.0.0 is active again"), "{stdout}");
    assert_eq!(infer(addr).await["model_version"], "1.0.0");
    let dev = hub
        .wait_device("edge-1", |d| {
            d["events"].as_array().unwrap().iter().any(|e| e["kind"] == "rolled_back" && e["version"] == "2.0.0")
        })
        .await;
    let event = dev["events"].as_array().unwrap().iter().find(|e| e["kind"] == "rolled_back").unwrap();
    assert_eq!(event["reason"], "operator rollback", "{event}");
    assert_eq!(event["evidence"]["kind"], "operator", "{event}");

    let out = run(&["status", "--json", "--config", config]).await;
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    let slots = s["models"][0]["slots"].as_array().unwrap();
    let active = slots.iter().find(|x| x["state"] == "active").unwrap();
    assert_eq!(pids(active), standby_pids, "the rollback switched the whole warm pool back: {s}");
    assert_eq!(s["last_rollback"]["reason"], "operator rollback");
    assert_eq!(s["last_rollback"]["version"], "2.0.0");
    let out = run(&["status", "--config", config]).await;
    println!("{}", text(&out).0);
    assert!(text(&out).0.contains("digits 2.0.0 at "), "{}", text(&out).0);

    // Nothing left to go back to: refused with the reason, exit 1.
    let out = run(&["rollback", "digits", "--config", config]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no warm standby"), "{stderr}");
    let out = run(&["rollback", "nope", "--config", config]).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).1.contains("no model `nope`"), "{}", text(&out).1);
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_without_an_agent_exits_69_naming_the_socket() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::write(dir.join("token"), "snt_x").unwrap();
    std::fs::write(
        dir.join("agent.toml"),
        "device_id = \"edge-1\"\nhub_url = \"http://127.0.0.1:1\"\ngrpc_url = \"http://127.0.0.1:2\"\n\
         token_file = \"token\"\npinned_keys = [\"HMY/NU8+avTxTr2xxPvEEejvfDT2rPtpP+yM9qxqlck=\"]\nstate_dir = \"state\"\n",
    )
    .unwrap();
    let config = dir.join("agent.toml");
    let socket = dir.join("state/run/control.sock");
    let out = run(&["status", "--config", config.to_str().unwrap()]).await;
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains(socket.to_str().unwrap()) && stderr.contains("not running"), "{stderr}");

    // A socket file left by a dead agent: still "not running".
    std::fs::create_dir_all(socket.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let out = run(&["status", "--json", "--config", config.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(69), "{}", text(&out).1);
    let out = run(&["models", "--socket", socket.to_str().unwrap()]).await;
    assert_eq!(out.status.code(), Some(69), "{}", text(&out).1);
}

fn write(path: &Path, bytes: &[u8]) -> String {
    std::fs::write(path, bytes).unwrap();
    path.to_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_checks_the_signature_then_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let key = hub.public_key().await;
    let signed = hub.admin_get("/api/v1/models/digits/versions/1.0.0/manifest").await;
    let dir = tmp.path();
    let json_manifest = write(&dir.join("manifest.json"), signed.to_string().as_bytes());
    let b64 = |f: &str| {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.decode(signed[f].as_str().unwrap()).unwrap()
    };
    let proto = sentinel_proto::pb::SignedManifest {
        manifest: b64("manifest"),
        signature: b64("signature"),
        key_id: signed["key_id"].as_str().unwrap().to_owned(),
    };
    let proto_manifest = write(&dir.join("manifest.pb"), &prost::Message::encode_to_vec(&proto));
    let good = model_bytes(V1);
    let file = write(&dir.join("model.onnx"), &good);

    for manifest in [&json_manifest, &proto_manifest] {
        let out = run(&["verify", &file, "--manifest", manifest, "--key", &key]).await;
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        assert!(stdout.contains("ok: digits 1.0.0") && stdout.contains(&sha256_hex(&good)), "{stdout}");
    }
    // The pinned keys of an agent config work as well as --key.
    std::fs::write(dir.join("token"), "snt_x").unwrap();
    let config = write(
        &dir.join("agent.toml"),
        format!(
            "device_id = \"edge-1\"\nhub_url = \"{}\"\ngrpc_url = \"{}\"\ntoken_file = \"token\"\n\
             pinned_keys = [\"{key}\"]\nstate_dir = \"state\"\n",
            hub.url, hub.grpc_url
        )
        .as_bytes(),
    );
    let out = run(&["verify", &file, "--manifest", &json_manifest, "--config", &config]).await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);

    let mut tampered = good.clone();
    tampered[100] ^= 1;
    let tampered = write(&dir.join("tampered.onnx"), &tampered);
    let truncated = write(&dir.join("truncated.onnx"), &good[..good.len() - 1]);
    let other_key = "HMY/NU8+avTxTr2xxPvEEejvfDT2rPtpP+yM9qxqlck=";
    let cases = [
        (&tampered, key.as_str(), "hashes to sha256"),
        (&truncated, key.as_str(), &*format!("has {} bytes; the signed manifest says {}", good.len() - 1, good.len())),
        (&file, other_key, "does not verify against the pinned keys"),
    ];
    for (f, k, why) in cases {
        let out = run(&["verify", f, "--manifest", &json_manifest, "--key", k]).await;
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{f}: {stderr}");
        assert!(stderr.contains("verification FAILED") && stderr.contains(why), "{f}: {stderr}");
    }
    // A manifest whose signed bytes were edited fails the signature check.
    let mut forged = proto.clone();
    forged.manifest[10] ^= 1;
    let forged = write(&dir.join("forged.pb"), &prost::Message::encode_to_vec(&forged));
    let out = run(&["verify", &file, "--manifest", &forged, "--key", &key]).await;
    assert_eq!(out.status.code(), Some(1), "{}", text(&out).1);
    let out =
        run(&["verify", &dir.join("missing").to_string_lossy(), "--manifest", &json_manifest, "--key", &key]).await;
    assert_eq!(out.status.code(), Some(66), "{}", text(&out).1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shouts_when_a_worker_runs_unconfined() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let extra = "[serving]\nconfinement = \"off\"\n";
    let agent = start_agent_with(&tmp.path().join("agent"), &hub, "edge-1", &[("site", "a")], extra).await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();
    let config = tmp.path().join("agent/agent.toml");
    let out = run(&["status", "--config", config.to_str().unwrap()]).await;
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("UNCONFINED"), "{stdout}");
    assert!(stdout.contains("!!! WARNING: the blue worker of digits 1.0.0"), "{stdout}");
    assert!(stdout.contains("RUNS WITHOUT ITS SECCOMP SANDBOX"), "{stdout}");
    agent.shutdown().await;
}

/// Datagrams on a `NOTIFY_SOCKET`, as systemd would receive them.
struct Systemd {
    socket: tokio::net::UnixDatagram,
    seen: Vec<String>,
}

impl Systemd {
    /// Waits for a message satisfying `pred`, keeping every message seen.
    async fn wait_for(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut buf = vec![0u8; 4096];
        loop {
            let n = tokio::time::timeout(WAIT, self.socket.recv(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {what} from the agent; got {:?}", self.seen))
                .unwrap();
            let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
            self.seen.push(msg.clone());
            if pred(&msg) {
                return msg;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_tells_systemd_it_is_ready_what_it_serves_and_that_it_stops() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    let dir = tmp.path().join("agent");
    let token = hub.enroll("edge-1", &[("site", "a")]).await;
    let key = hub.public_key().await;
    agent_config(&dir, &hub, "edge-1", &token, &key, "");
    let socket_path = tmp.path().join("notify.sock");
    let mut systemd = Systemd { socket: tokio::net::UnixDatagram::bind(&socket_path).unwrap(), seen: Vec::new() };

    let mut child = tokio::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(dir.join("agent.toml"))
        .envs(test_env())
        .env("NOTIFY_SOCKET", &socket_path)
        .env_remove("RUNTIME_DIRECTORY")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    systemd.wait_for("READY=1", |m| m == "READY=1").await;
    systemd.wait_for("a connected STATUS", |m| m.starts_with("STATUS=hub connected; ")).await;
    hub.deploy("digits", "1.0.0", "site=a").await;
    systemd.wait_for("a STATUS naming the model", |m| m == "STATUS=hub connected; digits 1.0.0").await;

    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(i32::try_from(child.id().unwrap()).unwrap(), libc::SIGTERM) };
    assert_eq!(rc, 0);
    systemd.wait_for("STOPPING=1", |m| m == "STOPPING=1").await;
    let status = tokio::time::timeout(WAIT, child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "SIGTERM is a clean stop: {status}; systemd saw {:?}", systemd.seen);
    assert!(
        systemd.seen.iter().position(|m| m == "READY=1") < systemd.seen.iter().position(|m| m.starts_with("STATUS=")),
        "READY comes first: {:?}",
        systemd.seen
    );
}

/// `status` answers while an install holds the model, from the committed
/// slots: the new version's worker is held before it starts (its executable
/// waits on a FIFO the test owns), and status shows the slot `loading`. It
/// shows the labels the hub assigned at enrolment, not those of the config.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_answers_during_an_install_with_the_labels_the_hub_assigned() {
    let tmp = tempfile::tempdir().unwrap();
    let hub = TestHub::start_at(&tmp.path().join("hub"), |_| {}).await;
    hub.push("digits", "1.0.0", V1, "").await;
    hub.push("digits", "2.0.0", V2, "").await;
    // The real worker, behind a script that waits on `gate` while it exists.
    let gate = tmp.path().join("gate");
    let held = tmp.path().join("held-worker");
    let script = format!(
        "#!/bin/sh\nif [ -p '{gate}' ]; then read _ < '{gate}'; fi\nexec '{worker}' \"$@\"\n",
        gate = gate.display(),
        worker = crate::common::worker_bin().display(),
    );
    std::fs::write(&held, script).unwrap();
    std::fs::set_permissions(&held, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    // The config names no labels: those shown come from the hub.
    let token = hub.enroll("edge-1", &[("site", "a"), ("ring", "production")]).await;
    let key = hub.public_key().await;
    let mut agent_config = agent_config(&tmp.path().join("agent"), &hub, "edge-1", &token, &key, "");
    agent_config.serving.worker_bin = held;
    let agent = sentinel_agent::start(agent_config).await.unwrap();
    let config = tmp.path().join("agent/agent.toml");
    let config = config.to_str().unwrap();
    hub.deploy("digits", "1.0.0", "site=a").await;
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("1.0.0")).await.unwrap();

    let made = std::process::Command::new("mkfifo").arg(&gate).status().unwrap();
    assert!(made.success());
    hub.deploy("digits", "2.0.0", "site=a").await;
    // Every call answers; one of them sees 2.0.0 loading behind the gate.
    let deadline = std::time::Instant::now() + WAIT;
    let s = loop {
        let out = run(&["status", "--json", "--config", config]).await;
        assert!(out.status.success(), "status failed during the install: {}", text(&out).1);
        let s: Value = serde_json::from_slice(&out.stdout).unwrap();
        let slots = s["models"][0]["slots"].as_array().cloned().unwrap_or_default();
        if slots.iter().any(|x| x["version"] == "2.0.0" && x["state"] == "loading") {
            break s;
        }
        assert!(std::time::Instant::now() < deadline, "2.0.0 never showed as loading: {s}");
        tokio::task::yield_now().await;
    };
    assert_eq!(s["labels"], json!({"ring": "production", "site": "a"}), "{s}");
    assert_eq!(s["labels_from"], "hub", "{s}");
    assert_eq!(s["hub"]["connected"], true, "{s}");
    assert_eq!(s["hub"]["last_error"], "", "{s}");
    let out = run(&["status", "--config", config]).await;
    let (table, _) = text(&out);
    assert!(table.contains("edge-1 [ring=production, site=a]"), "{table}");
    assert!(table.contains("loading"), "{table}");
    // 1.0.0 serves meanwhile.
    assert_eq!(infer(agent.inference_addr.unwrap()).await["model_version"], "1.0.0");

    // The gate opens: the worker starts and 2.0.0 goes through.
    let g = gate.clone();
    tokio::task::spawn_blocking(move || std::fs::write(g, "go\n")).await.unwrap().unwrap();
    std::fs::remove_file(&gate).unwrap();
    agent.wait_for(WAIT, |v| active(v, "digits").as_deref() == Some("2.0.0")).await.unwrap();
    agent.shutdown().await;
}

#[test]
fn completion_scripts_for_each_shell_name_the_commands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = std::process::Command::new(BIN).args(["completions", shell]).output().unwrap();
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        let script = String::from_utf8(out.stdout).unwrap();
        assert!(script.contains("check-config") && script.contains("rollback"), "{shell}: {}", script.len());
    }
    let out = std::process::Command::new(BIN).args(["completions", "tcsh"]).output().unwrap();
    assert_eq!(out.status.code(), Some(64));
}
