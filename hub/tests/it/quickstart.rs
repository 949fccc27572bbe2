//! The quick start's promises: a hub started with nothing but a data dir
//! and a listen address connects devices on its one URL.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use sentinel_proto::pb::Hello;
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use serde_json::{Value, json};
use tokio::io::AsyncBufReadExt as _;

/// Bound on waits for something that should happen at once: generous, so
/// only a real hang trips it.
const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn a_hub_with_default_flags_serves_grpc_on_its_rest_url_and_logs_each_listener() {
    let tmp = tempfile::tempdir().unwrap();
    // No --grpc-listen: what a user types from the README.
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_sentinel-hub"))
        .args(["--data-dir", tmp.path().to_str().unwrap(), "--listen", "127.0.0.1:0", "--metrics-listen", "off"])
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut stdout = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let url = loop {
        let line = tokio::time::timeout(WAIT, stdout.next_line()).await.unwrap().unwrap().expect("the hub exited");
        assert!(!line.starts_with("sentinel-hub grpc on "), "no separate gRPC listener by default: {line}");
        if let Some(u) = line.strip_prefix("sentinel-hub listening on ") {
            break u.split_whitespace().next().unwrap().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = stdout.next_line().await {} });
    let addr = url.strip_prefix("http://").unwrap().to_owned();
    // The log names the listener and that it serves gRPC.
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    loop {
        let line = tokio::time::timeout(WAIT, stderr.next_line()).await.unwrap().unwrap().expect("the hub exited");
        if line.contains("listener") && line.contains(&addr) {
            assert!(line.contains("gRPC"), "{line}");
            assert!(line.contains("REST"), "{line}");
            break;
        }
    }
    tokio::spawn(async move { while let Ok(Some(_)) = stderr.next_line().await {} });

    sentinel_hub::install_crypto_provider();
    let admin = std::fs::read_to_string(tmp.path().join("admin.token")).unwrap().trim().to_owned();
    let http = reqwest::Client::new();
    let r = http
        .post(format!("{url}/api/v1/devices"))
        .bearer_auth(&admin)
        .json(&json!({"id": "edge-1", "labels": {"site": "lab"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();

    // The same URL speaks gRPC: the device's stream opens and the current
    // state comes first.
    let channel = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let mut client = AgentSyncClient::new(channel);
    let mut req = tonic::Request::new(Hello { device_id: "edge-1".into(), ..Hello::default() });
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    let mut stream = tokio::time::timeout(WAIT, client.subscribe(req)).await.unwrap().unwrap().into_inner();
    let first = tokio::time::timeout(WAIT, stream.message()).await.unwrap().unwrap();
    assert!(first.is_some(), "the current state comes first");
    // REST still answers on the same port.
    let r = http.get(format!("{url}/healthz")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    child.kill().await.unwrap();
}

/// The fenced block that follows the walkthrough marker in `readme`.
fn walkthrough(readme: &str) -> String {
    let marker = "<!-- walkthrough: run as written by hub/tests/it/quickstart.rs -->";
    let (_, after) = readme.split_once(marker).expect("the README has no walkthrough marker");
    let body = after.trim_start().strip_prefix("```bash\n").expect("a ```bash block follows the marker");
    let (block, _) = body.split_once("\n```\n").expect("the walkthrough block is closed");
    format!("{block}\n")
}

fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    listener.local_addr().expect("a bound address").port()
}

/// The README's walkthrough, as written, taken from the README: hub, model,
/// a device enrolled with the agent config and token file the CLI writes, the
/// agent, a deploy, then `curl` inference and feedback, status on both sides.
///
/// Run by bash with `-euo pipefail`, so any failing command fails the test.
/// What differs from a user's terminal: this build's binaries are on PATH (for
/// the README's `cargo build --release` line); the two fixed ports it names
/// (8080, 8601) become free ones, so a busy port cannot fail the test, and
/// the agent's inference API, which the walkthrough leaves at its default
/// 8601, moves to the free one through its documented environment variable;
/// the metrics listeners, also left at their defaults, are switched off the
/// same way for the same reason; `models/` is the repository's.
#[tokio::test]
async fn the_readme_walkthrough_runs_as_written() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let mut script = walkthrough(&readme);
    let inference = format!("127.0.0.1:{}", free_port());
    for (port, free) in
        [("127.0.0.1:8080", format!("127.0.0.1:{}", free_port())), ("127.0.0.1:8601", inference.clone())]
    {
        assert!(script.contains(port), "the walkthrough no longer names {port}: update this test");
        script = script.replace(port, &free);
    }
    let tmp = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root.join("models"), tmp.path().join("models")).unwrap();
    std::fs::write(tmp.path().join("walkthrough.sh"), &script).unwrap();
    // sentinel-agent and sentinel-worker beside sentinel-hub and sentinel.
    let (agent, _) = crate::common::agent_binaries();
    let bin_dir = agent.parent().unwrap().to_path_buf();
    assert!(bin_dir.join("sentinel-hub").is_file() && bin_dir.join("sentinel").is_file());
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());

    let mut cmd = tokio::process::Command::new("bash");
    cmd.args(["-euo", "pipefail", "walkthrough.sh"]).current_dir(tmp.path()).env("PATH", path);
    for var in ["SENTINEL_HUB", "SENTINEL_TOKEN", "SENTINEL_DATA_DIR", "SENTINEL_LISTEN", "SENTINEL_GRPC_LISTEN"] {
        cmd.env_remove(var);
    }
    cmd.env_remove("RUNTIME_DIRECTORY")
        .env("SENTINEL_METRICS_LISTEN", "off")
        .env("SENTINEL_AGENT_LISTEN", &inference)
        .env("SENTINEL_AGENT_METRICS_LISTEN", "")
        .env("NO_COLOR", "1")
        // Its own process group: whatever the script left running is killed with it.
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let group = child.id().unwrap();
    // A guard against a hang only: the script's own waits are bounded by curl's retries.
    let out = tokio::time::timeout(Duration::from_secs(300), child.wait_with_output()).await;
    let kill = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{group}")]).output();
    drop(kill);
    let out = out.expect("the walkthrough hung").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let logs = ["hub.log", "agent.log"]
        .map(|f| format!("--- {f}\n{}", std::fs::read_to_string(tmp.path().join(f)).unwrap_or_default()));
    let shown = format!("stdout:\n{stdout}\nstderr:\n{}\n{}", String::from_utf8_lossy(&out.stderr), logs.join("\n"));
    assert!(out.status.success(), "the README's walkthrough failed: {}\n{shown}", out.status);

    // The inference answered from the deployed version, and the feedback was taken.
    let json_lines: Vec<Value> = stdout.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    let answer = json_lines.iter().find(|v| v["id"] == "req-1" && v["outputs"].is_array()).unwrap_or_else(|| {
        panic!("no inference answer for req-1\n{shown}");
    });
    assert_eq!(answer["model_name"], "digits", "{shown}");
    assert_eq!(answer["model_version"], "1.0.0", "{shown}");
    let feedback = json_lines.iter().find(|v| v["id"] == "req-1" && v["correct"].is_boolean());
    let feedback = feedback.unwrap_or_else(|| panic!("no feedback answer for req-1\n{shown}"));
    assert_eq!(feedback["model_version"], "1.0.0", "{shown}");
    // The agent's status: the labels the hub assigned, and the version serving
    // (its desired state verified, so the key it pinned is the hub's).
    assert!(stdout.contains("edge-1 [site=lab]"), "{shown}");
    assert!(stdout.contains("serving 1.0.0"), "{shown}");
}
