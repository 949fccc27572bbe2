//! Bounded waiting, for what has no event or `watch` to wait on.

use std::time::Duration;

/// Bound on every wait: generous, so only a real hang trips it.
pub const WAIT: Duration = Duration::from_secs(60);

/// Asks `check` again and again until it returns `Some`, for at most
/// `deadline`, then panics naming `what`. The one poll loop of the tests, for
/// what has no event or `watch` to wait on (counters, files, the hub's API);
/// prefer a subscription where there is one.
pub async fn eventually<T>(what: &str, deadline: Duration, check: impl AsyncFnMut() -> Option<T>) -> T {
    match within(deadline, check).await {
        Some(v) => v,
        None => panic!("{what}: not within {deadline:?}"),
    }
}

/// [`eventually`] for a test that explains a timeout itself: `None` once
/// `deadline` has passed.
pub async fn within<T>(deadline: Duration, mut check: impl AsyncFnMut() -> Option<T>) -> Option<T> {
    let end = tokio::time::Instant::now() + deadline;
    loop {
        if let Some(v) = check().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= end {
            return None;
        }
        // The polling period: how often to look, not a wait for anything.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}
