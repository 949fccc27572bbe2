//! A download cut at 50% resumes from 50%: the bytes crossing the link add
//! up to one copy of the model, not one and a half.
#![allow(clippy::unwrap_used)]

use crate::common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_download_resumes_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let size = model_bytes(V3).len() as u64;
    let (tell, upstream) = tokio::sync::oneshot::channel();
    // Cut once half the body is through (headers are a few hundred bytes).
    let proxy = CuttingProxy::bind(size / 2, upstream).await;
    let proxy_url = format!("http://{}", proxy.addr);
    let hub = TestHub::start_at(&tmp.path().join("hub"), |c| c.public_url = Some(proxy_url)).await;
    tell.send(hub.rest_addr).unwrap();
    hub.push("slow", "1.0.0", V3, "").await;
    let agent = start_agent(&tmp.path().join("a"), &hub, "edge-1", &[]).await;
    hub.deploy("slow", "1.0.0", "*").await;

    let v = agent.wait_for(WAIT, |v| active(v, "slow").as_deref() == Some("1.0.0")).await.unwrap();
    let file = tmp.path().join("a/state/models").join(sha256_hex(&model_bytes(V3)));
    assert_eq!(std::fs::read(&file).unwrap(), model_bytes(V3), "the resumed file is whole and verified");

    // One resume, from about half-way.
    assert_eq!(v.downloads_resumed_from.len(), 1, "{v:?}");
    let from = v.downloads_resumed_from[0];
    assert!(from > size * 45 / 100 && from <= size / 2, "resumed from {from} of {size}");

    let log = proxy.log.lock().unwrap().clone();
    let artifact: Vec<&ProxiedRequest> = log.iter().filter(|r| r.head.contains("/artifact")).collect();
    assert_eq!(artifact.len(), 2, "{log:?}");
    assert!(artifact[0].cut && !artifact[0].head.to_ascii_lowercase().contains("range:"));
    assert!(artifact[1].head.to_ascii_lowercase().contains(&format!("range: bytes={from}-")), "{}", artifact[1].head);
    let total: u64 = artifact.iter().map(|r| r.bytes_down).sum();
    // One copy of the body plus two sets of response headers.
    assert!(total < size + 2048, "{total} bytes crossed the link for a {size}-byte model");
    assert!(total >= size);
    agent.shutdown().await;
}
