//! Connection hygiene (issue 11, finding 5). 19,990 silent TCP connections
//! used to make REST, `/healthz`, `/metrics` and gRPC all fail ("Too many
//! open files"), and slowloris connections were never closed. Now, at the
//! hub's default limits, 20,000 silent connections held open against REST
//! and gRPC leave `/healthz`, `/metrics` and an enrolled device's stream
//! working; slow and idle connections are closed by their timeouts.
//!
//! The silent connections are held by `python3` child processes, so the
//! client sockets do not share this process's open-file limit with the hub.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use prost::Message as _;
use sentinel_hub::HubConfig;
use sentinel_proto::pb::agent_sync_client::AgentSyncClient;
use sentinel_proto::pb::{DesiredState, Hello, HubMessage, hub_message};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tonic::Streaming;
use tonic::transport::Channel;

/// Opens `n` TCP connections to `addr`, sends nothing, and keeps them open
/// until its stdin closes.
const HOLDER: &str = r#"
import resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
held = []
for _ in range(n):
    held.append(socket.create_connection((host, port)))
print("held", len(held), flush=True)
sys.stdin.read()
"#;

/// Connections one holder process keeps: within its open-file limit.
fn per_holder() -> usize {
    let out = std::process::Command::new("python3")
        .args(["-c", "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE)[1])"])
        .output()
        .unwrap();
    let hard: usize = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(1024);
    hard.saturating_sub(64).min(10_000)
}

/// Holds `n` silent connections to `addr`; they close when the children end.
async fn hold(addr: SocketAddr, n: usize) -> Vec<Child> {
    let mut children = Vec::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(per_holder());
        let mut child = Command::new("python3")
            .args(["-c", HOLDER, &addr.ip().to_string(), &addr.port().to_string(), &k.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap()).read_line(&mut line).await.unwrap();
        assert_eq!(line.trim(), format!("held {k}"), "the holder could not open its connections");
        children.push(child);
        left -= k;
    }
    children
}

fn grpc_addr(hub: &TestHub) -> SocketAddr {
    hub.grpc_url.trim_start_matches("http://").parse().unwrap()
}

fn rest_addr(hub: &TestHub) -> SocketAddr {
    hub.url.trim_start_matches("http://").parse().unwrap()
}

/// An enrolled device's open subscription.
async fn subscribe(hub: &TestHub, id: &str) -> Streaming<HubMessage> {
    let r = hub.post_json("/api/v1/devices", &hub.admin, json!({"id": id, "labels": {"site": "a"}})).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let token = r.json::<Value>().await.unwrap()["token"].as_str().unwrap().to_owned();
    let channel = Channel::from_shared(hub.grpc_url.clone()).unwrap().connect().await.unwrap();
    let hello = Hello {
        device_id: id.into(),
        hardware: vec!["x86_64".into()],
        agent_version: "test".into(),
        ..Hello::default()
    };
    let mut req = tonic::Request::new(hello);
    req.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    AgentSyncClient::new(channel).subscribe(req).await.unwrap().into_inner()
}

/// The next desired state assigning a model; the timeout only turns a hang
/// into a failure.
async fn assigned(stream: &mut Streaming<HubMessage>) -> DesiredState {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(60), stream.message())
            .await
            .expect("a message within 60 s")
            .unwrap()
            .expect("the stream is open");
        if let Some(hub_message::Kind::State(signed)) = msg.kind {
            let state = DesiredState::decode(&signed.state[..]).unwrap();
            if !state.models.is_empty() {
                return state;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_silent_connections_leave_health_metrics_and_device_streams_working() {
    let hub = TestHub::start().await;
    let mut stream = subscribe(&hub, "edge-1").await;

    // Half against REST, half against gRPC: more than the cap, which is
    // kept below this process's open-file limit.
    let mut holders = hold(rest_addr(&hub), 10_000).await;
    holders.extend(hold(grpc_addr(&hub), 10_000).await);

    // Fresh clients, so each needs a new connection past the flood.
    let fresh = || reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    let r = fresh().get(format!("{}/healthz", hub.url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let r = fresh().get(format!("{}/metrics", hub.metrics_url)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // The device's stream, opened before the flood, still carries a deploy
    // made during it; a device subscribing now gets through too.
    hub.register("digits").await;
    hub.push_v1("digits", "1.0.0").await;
    let r = hub.post_json("/api/v1/models/digits/deploy", &hub.admin, json!({"version": "1.0.0", "target": "site=a"}));
    let r = r.await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    let state = assigned(&mut stream).await;
    assert_eq!(state.device_id, "edge-1");
    let mut late = subscribe(&hub, "edge-2").await;
    assert_eq!(assigned(&mut late).await.device_id, "edge-2");
    for mut h in holders {
        drop(h.stdin.take());
        h.wait().await.unwrap();
    }
}

/// Reads until the hub closes the connection (EOF or reset).
async fn closed_by_peer(s: &mut TcpStream) {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .expect("the hub closes the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_by_their_timeouts() {
    let tmp = tempfile::tempdir().unwrap();
    let mut config = HubConfig::new(tmp.path());
    config.connections.header_read_timeout = Duration::from_secs(1);
    config.connections.idle_timeout = Duration::from_secs(2);
    let hub = TestHub::start_with(config).await;
    for addr in [rest_addr(&hub), grpc_addr(&hub)] {
        // Silent, and slowloris (half a request head): the header-read timeout.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        let mut slow = TcpStream::connect(addr).await.unwrap();
        slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n").await.unwrap();
        closed_by_peer(&mut silent).await;
        closed_by_peer(&mut slow).await;
    }
    // The silent connections are closed only by the hub's own timer, so
    // both are counted; a slowloris head may instead be cut by hyper's
    // header timer, which ends the connection as an error, not a count.
    let text = reqwest::get(format!("{}/metrics", hub.metrics_url)).await.unwrap().text().await.unwrap();
    let timed_out: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("sentinel_hub_connections_dropped_total{reason=\"timed_out\"} "))
        .unwrap_or_else(|| panic!("no timed_out count in:\n{text}"))
        .parse()
        .unwrap();
    assert!(timed_out >= 2, "{timed_out}");
    assert!(text.contains("sentinel_hub_connections_open "), "{text}");
    // A device stream is a request in flight: never idle, however long it
    // is quiet. The idle keep-alive connection below is closed after the
    // idle timeout, all of which passes after the stream opened.
    let mut stream = subscribe(&hub, "edge-1").await;
    let mut idle = TcpStream::connect(rest_addr(&hub)).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: hub\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 1024];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    closed_by_peer(&mut idle).await;
    hub.register("digits").await;
    hub.push_v1("digits", "1.0.0").await;
    let r = hub.post_json("/api/v1/models/digits/deploy", &hub.admin, json!({"version": "1.0.0", "target": "site=a"}));
    assert_eq!(r.await.status(), 201);
    assert_eq!(assigned(&mut stream).await.device_id, "edge-1");
}
