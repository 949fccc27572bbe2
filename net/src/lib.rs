//! Listener hygiene for every HTTP and gRPC listener of the hub and the
//! agent (REST, gRPC, metrics, the v2 inference API): no client, however
//! many connections it opens or however slowly it talks, can take a
//! listener, or the process's file descriptors, away from the others.
//!
//! One [`Connections`] per process is shared by its listeners:
//! - **A connection cap** ([`Limits::max_connections`], kept below the
//!   process's `RLIMIT_NOFILE`). At the cap a new connection evicts the
//!   oldest *unproven* connection (one that has not yet sent a complete
//!   request head: silent, slowloris, a stalled TLS handshake), else the
//!   longest-idle connection with nothing in flight. Only when every
//!   connection is busy is the new one refused, with a warning logged at
//!   most once per [`WARN_EVERY`]. Established device streams (requests in
//!   flight) are therefore never displaced by idle sockets.
//! - **A header-read timeout**: a connection must finish its TLS handshake
//!   and its first request head within [`Limits::header_read_timeout`]
//!   (hyper's own timer covers later heads on HTTP/1).
//! - **An idle timeout**: a connection with no request in flight for
//!   [`Limits::idle_timeout`] is closed. A long-lived gRPC or event stream is
//!   a request in flight, so it is never idle.
//! - **HTTP/2 keep-alive**: pings every [`Limits::http2_keepalive_interval`];
//!   a peer that does not answer within the timeout is dropped.
//!
//! Protocols are detected per connection (HTTP/1.1, or HTTP/2 by its
//! preface, as gRPC clients send it), so one listener can carry both.
//!
//! # Layout
//! Everything is in this file: [`Limits`], [`Connections`] and its accept
//! loop, and the per-connection driver.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tower::ServiceExt as _;

/// The connection-limit warning is logged at most this often.
pub const WARN_EVERY: Duration = Duration::from_secs(10);

/// File descriptors kept free of connections, for the database, model files,
/// worker pipes and logs.
pub const RESERVED_FDS: u64 = 256;

/// Bounds applied to every connection of a process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Connections open at once over all listeners.
    pub max_connections: usize,
    /// Time for the TLS handshake and the first request head.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight this long is closed.
    pub idle_timeout: Duration,
    /// HTTP/2 ping interval (`None`: no pings).
    pub http2_keepalive_interval: Option<Duration>,
    /// How long an HTTP/2 ping may go unanswered.
    pub http2_keepalive_timeout: Duration,
    /// How long a shutdown waits for requests in flight before closing them.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            http2_keepalive_interval: Some(Duration::from_secs(30)),
            http2_keepalive_timeout: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(10),
        }
    }
}

impl Limits {
    /// `wanted` connections, lowered to what this process's open-file
    /// limit can hold after [`RESERVED_FDS`] (each connection is one fd).
    pub fn connections_within_fd_limit(wanted: usize) -> usize {
        let fds = fd_limit().saturating_sub(RESERVED_FDS).max(16);
        wanted.min(usize::try_from(fds).unwrap_or(usize::MAX))
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (systemd's
/// `LimitNOFILE=` sets both) and returns the soft limit now in force.
pub fn raise_fd_limit() -> u64 {
    let Ok((soft, hard)) = rlimit_nofile() else { return 1024 };
    if soft < hard {
        let _ = set_rlimit_nofile(hard, hard);
    }
    fd_limit()
}

fn fd_limit() -> u64 {
    rlimit_nofile().map(|(soft, _)| soft).unwrap_or(1024)
}

fn rlimit_nofile() -> std::io::Result<(u64, u64)> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes one plain struct we own.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut r) };
    if rc == 0 { Ok((r.rlim_cur, r.rlim_max)) } else { Err(std::io::Error::last_os_error()) }
}

fn set_rlimit_nofile(soft: u64, hard: u64) -> std::io::Result<()> {
    let r = libc::rlimit { rlim_cur: soft, rlim_max: hard };
    // SAFETY: setrlimit reads one plain struct we own.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const r) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Counts since the process started, for logs, metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Connections open now.
    pub open: usize,
    /// Connections closed to make room for a new one at the cap.
    pub evicted: u64,
    /// New connections refused at the cap (every open one was busy).
    pub refused: u64,
    /// Connections closed by the header-read or idle timeout.
    pub timed_out: u64,
}

/// The connections of one process, over all its listeners.
#[derive(Debug, Clone)]
pub struct Connections {
    inner: Arc<Registry>,
}

#[derive(Debug)]
struct Registry {
    limits: Limits,
    epoch: Instant,
    state: Mutex<Table>,
    next_id: AtomicU64,
    evicted: AtomicU64,
    refused: AtomicU64,
    timed_out: AtomicU64,
}

#[derive(Debug, Default)]
struct Table {
    open: HashMap<u64, Arc<Conn>>,
    /// Ids in accept order; entries since proven or closed are skipped when
    /// an eviction looks for the oldest unproven connection.
    unproven: VecDeque<u64>,
    last_warning: Option<Instant>,
}

#[derive(Debug)]
struct Conn {
    id: u64,
    listener: &'static str,
    accepted: Instant,
    /// A complete request head has arrived.
    proven: AtomicBool,
    in_flight: AtomicUsize,
    /// Milliseconds after the registry's epoch when `in_flight` last fell to 0.
    idle_since_ms: AtomicU64,
    evict: Notify,
}

impl Connections {
    pub fn new(limits: Limits) -> Connections {
        Connections { inner: Arc::new(Registry::new(limits)) }
    }

    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn stats(&self) -> Stats {
        Stats {
            open: self.inner.table().open.len(),
            evicted: self.inner.evicted.load(Ordering::Relaxed),
            refused: self.inner.refused.load(Ordering::Relaxed),
            timed_out: self.inner.timed_out.load(Ordering::Relaxed),
        }
    }

    /// Serves `app` on `listener` (named `name` in logs), with TLS when an
    /// acceptor is given, until `shutdown` completes; then stops accepting,
    /// lets requests in flight finish for up to [`Limits::drain_timeout`],
    /// and returns.
    pub async fn serve<L>(
        &self,
        name: &'static str,
        mut listener: L,
        tls: Option<tokio_rustls::TlsAcceptor>,
        app: Router,
        shutdown: impl Future<Output = ()> + Send,
    ) where
        L: axum::serve::Listener,
        L::Io: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut tasks = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            let io = tokio::select! {
                () = &mut shutdown => break,
                Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
                (io, _) = listener.accept() => io,
            };
            // Refused: dropping the socket closes it.
            let Some(conn) = self.inner.admit(name) else { continue };
            tasks.spawn(serve_one(self.inner.clone(), conn, io, tls.clone(), app.clone(), stop_rx.clone()));
        }
        drop(listener);
        let _ = stop_tx.send(true);
        let drained =
            tokio::time::timeout(self.inner.limits.drain_timeout, async { while tasks.join_next().await.is_some() {} })
                .await;
        if drained.is_err() {
            tracing::warn!(listener = name, left = tasks.len(), "closing connections still busy after the drain time");
            tasks.shutdown().await;
        }
    }
}

impl Registry {
    fn new(limits: Limits) -> Registry {
        Registry {
            limits,
            epoch: Instant::now(),
            state: Mutex::default(),
            next_id: AtomicU64::new(1),
            evicted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            timed_out: AtomicU64::new(0),
        }
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Registers a new connection, making room at the cap; `None` when every
    /// open connection is busy.
    fn admit(&self, listener: &'static str) -> Option<Arc<Conn>> {
        let mut t = self.table();
        t.forget_settled();
        if t.open.len() >= self.limits.max_connections {
            match t.victim() {
                Some(victim) => {
                    if let Some(v) = t.open.remove(&victim) {
                        v.evict.notify_one();
                    }
                    self.evicted.fetch_add(1, Ordering::Relaxed);
                }
                None => {
                    self.refused.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    if t.last_warning.is_none_or(|w| now.duration_since(w) >= WARN_EVERY) {
                        t.last_warning = Some(now);
                        tracing::warn!(
                            listener,
                            limit = self.limits.max_connections,
                            refused_so_far = self.refused.load(Ordering::Relaxed),
                            "connection limit reached and every connection is busy: refusing new connections"
                        );
                    }
                    return None;
                }
            }
        }
        let conn = Arc::new(Conn {
            id: self.next_id.fetch_add(1, Ordering::Relaxed),
            listener,
            accepted: Instant::now(),
            proven: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(self.now_ms()),
            evict: Notify::new(),
        });
        t.open.insert(conn.id, conn.clone());
        t.unproven.push_back(conn.id);
        Some(conn)
    }
}

impl Table {
    /// Drops ids from the front of `unproven` that are proven or closed.
    /// The front can only stall on a connection still within its header-read
    /// timeout, so the queue holds at most the connections accepted within
    /// that time, however many a long-running process accepts.
    fn forget_settled(&mut self) {
        while let Some(id) = self.unproven.front() {
            if self.open.get(id).is_some_and(|c| !c.proven.load(Ordering::Acquire)) {
                break;
            }
            self.unproven.pop_front();
        }
    }

    /// The connection to close for a new one: the oldest unproven, else the
    /// longest idle with nothing in flight.
    fn victim(&mut self) -> Option<u64> {
        while let Some(id) = self.unproven.pop_front() {
            if self.open.get(&id).is_some_and(|c| !c.proven.load(Ordering::Acquire)) {
                return Some(id);
            }
        }
        self.open
            .values()
            .filter(|c| c.in_flight.load(Ordering::Acquire) == 0)
            .min_by_key(|c| c.idle_since_ms.load(Ordering::Relaxed))
            .map(|c| c.id)
    }
}

/// Unregisters a connection when its task ends, however it ends.
struct Registered(Arc<Registry>, u64);

impl Drop for Registered {
    fn drop(&mut self) {
        self.0.table().open.remove(&self.1);
    }
}

/// One request in flight on a connection; dropped with the response body.
struct InFlight(Arc<Registry>, Arc<Conn>);

impl InFlight {
    fn start(reg: &Arc<Registry>, conn: &Arc<Conn>) -> InFlight {
        conn.proven.store(true, Ordering::Release);
        conn.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(reg.clone(), conn.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.1.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.1.idle_since_ms.store(self.0.now_ms(), Ordering::Relaxed);
        }
    }
}

impl Conn {
    /// When to look at this connection again, or why it has expired.
    fn check(&self, reg: &Registry, now: Instant) -> Result<Instant, &'static str> {
        let limits = &reg.limits;
        if !self.proven.load(Ordering::Acquire) {
            let due = self.accepted + limits.header_read_timeout;
            return if now >= due { Err("no complete request head within the header-read timeout") } else { Ok(due) };
        }
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Ok(now + limits.idle_timeout);
        }
        let due = reg.epoch + Duration::from_millis(self.idle_since_ms.load(Ordering::Relaxed)) + limits.idle_timeout;
        if now >= due { Err("idle past the idle timeout") } else { Ok(due) }
    }
}

async fn serve_one<I>(
    reg: Arc<Registry>,
    conn: Arc<Conn>,
    io: I,
    tls: Option<tokio_rustls::TlsAcceptor>,
    app: Router,
    stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let _registered = Registered(reg.clone(), conn.id);
    match tls {
        None => drive(reg, conn, TokioIo::new(io), app, stop).await,
        Some(acceptor) => {
            let due = conn.accepted + reg.limits.header_read_timeout;
            let handshake = tokio::select! {
                r = tokio::time::timeout_at(due, acceptor.accept(io)) => r,
                () = conn.evict.notified() => return,
            };
            match handshake {
                Ok(Ok(stream)) => drive(reg, conn, TokioIo::new(stream), app, stop).await,
                Ok(Err(e)) => tracing::debug!(listener = conn.listener, error = %e, "TLS handshake failed"),
                Err(_) => {
                    reg.timed_out.fetch_add(1, Ordering::Relaxed);
                    tracing::debug!(listener = conn.listener, "TLS handshake timed out");
                }
            }
        }
    }
}

async fn drive<I>(reg: Arc<Registry>, conn: Arc<Conn>, io: I, app: Router, mut stop: watch::Receiver<bool>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let service = {
        let (reg, conn) = (reg.clone(), conn.clone());
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let guard = InFlight::start(&reg, &conn);
            let call = app.clone().oneshot(req.map(Body::new));
            async move {
                let response = match call.await {
                    Ok(r) => r,
                    Err(never) => match never {},
                };
                // The request stays in flight until its body is sent or dropped.
                Ok::<_, Infallible>(response.map(|body| {
                    Body::new(body.map_frame(move |frame| {
                        let _ = &guard;
                        frame
                    }))
                }))
            }
        })
    };
    let limits = &reg.limits;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder.http1().timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keepalive_interval)
        .keep_alive_timeout(limits.http2_keepalive_timeout);
    let connection = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(connection);
    let mut draining = *stop.borrow();
    if draining {
        return;
    }
    loop {
        let wake = match conn.check(&reg, Instant::now()) {
            Ok(at) => at,
            Err(why) => {
                reg.timed_out.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(listener = conn.listener, why, "closing a connection");
                return;
            }
        };
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(listener = conn.listener, error = %e, "connection ended with an error");
                }
                return;
            }
            () = conn.evict.notified() => {
                tracing::debug!(listener = conn.listener, "closing a connection to make room at the limit");
                return;
            }
            () = tokio::time::sleep_until(wake) => {}
            _ = stop.changed(), if !draining => {
                if !conn.proven.load(Ordering::Acquire) {
                    return;
                }
                draining = true;
                connection.as_mut().graceful_shutdown();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(max: usize) -> Registry {
        Registry::new(Limits { max_connections: max, ..Limits::default() })
    }

    #[test]
    fn at_the_cap_the_oldest_unproven_connection_makes_room() {
        let reg = registry(3);
        let a = reg.admit("t").unwrap();
        let b = reg.admit("t").unwrap();
        let c = reg.admit("t").unwrap();
        a.proven.store(true, Ordering::Release);
        a.in_flight.store(1, Ordering::Release);
        let d = reg.admit("t").unwrap();
        let open: Vec<u64> = {
            let mut v: Vec<u64> = reg.table().open.keys().copied().collect();
            v.sort_unstable();
            v
        };
        assert_eq!(open, vec![a.id, c.id, d.id], "b, the oldest unproven, went");
        assert_eq!(reg.evicted.load(Ordering::Relaxed), 1);
        drop((b, c, d));
    }

    #[test]
    fn busy_connections_are_never_evicted_and_idle_ones_go_before_refusing() {
        let reg = registry(2);
        let a = reg.admit("t").unwrap();
        let b = reg.admit("t").unwrap();
        for c in [&a, &b] {
            c.proven.store(true, Ordering::Release);
            c.in_flight.store(1, Ordering::Release);
        }
        assert!(reg.admit("t").is_none());
        assert_eq!(reg.refused.load(Ordering::Relaxed), 1);
        b.in_flight.store(0, Ordering::Release);
        let c = reg.admit("t").unwrap();
        assert!(reg.table().open.contains_key(&a.id));
        assert!(!reg.table().open.contains_key(&b.id));
        assert!(reg.table().open.contains_key(&c.id));
    }

    #[test]
    fn the_unproven_queue_does_not_grow_with_connections_served_below_the_cap() {
        let reg = registry(1000);
        for _ in 0..10_000 {
            let c = reg.admit("t").unwrap();
            c.proven.store(true, Ordering::Release);
            reg.table().open.remove(&c.id);
        }
        assert!(reg.table().unproven.len() <= 1, "{} ids kept", reg.table().unproven.len());
        // An unproven connection at the front is kept, and so is what follows.
        let silent = reg.admit("t").unwrap();
        let served = reg.admit("t").unwrap();
        served.proven.store(true, Ordering::Release);
        reg.admit("t").unwrap();
        assert_eq!(reg.table().unproven.front(), Some(&silent.id));
    }

    #[test]
    fn deadlines_follow_the_connection_phase() {
        let reg = registry(4);
        let c = reg.admit("t").unwrap();
        let now = c.accepted;
        assert_eq!(c.check(&reg, now), Ok(now + reg.limits.header_read_timeout));
        assert!(c.check(&reg, now + reg.limits.header_read_timeout).is_err());
        c.proven.store(true, Ordering::Release);
        c.in_flight.store(1, Ordering::Release);
        let later = now + Duration::from_secs(3600);
        assert_eq!(c.check(&reg, later), Ok(later + reg.limits.idle_timeout), "busy: never idle");
        c.in_flight.store(0, Ordering::Release);
        assert!(c.check(&reg, later).is_err(), "idle since accept");
    }

    #[test]
    fn the_connection_cap_stays_within_the_fd_limit() {
        assert!(Limits::connections_within_fd_limit(usize::MAX) < usize::MAX);
        assert_eq!(Limits::connections_within_fd_limit(10), 10);
    }
}
