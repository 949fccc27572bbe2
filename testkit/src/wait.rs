//! Bounded waiting, for what has no event or `watch` to wait on.

use std::time::Duration;

/// Bound on every wait: generous, so only a real hang trips it.
pub const WAIT: Duration = Duration::from_secs(60);

/// Asks `check` again and again until it returns `Some`, for at most
/// `deadline`, then panics naming `what`. The one poll loop of the tests, for
/// what has no event or `watch` to wait on (counters, files, the hub's API);
/// prefer a subscription where there is one.
pub async fn eventually<T>(what: &str, deadline: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> T {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < end, "{what}: not within {deadline:?}");
        // The polling period: how often to look, not a wait for anything.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
