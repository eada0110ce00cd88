//! Reusable HTTP client connections, per destination address.
//!
//! HTTP/1 connections are checked out for one request at a time and come
//! back when the response body has been fully read (a connection whose
//! body was abandoned cannot be reused and is closed). HTTP/2 connections
//! are shared and multiplexed: a destination gets another one only when
//! each it has carries [`MAX_STREAMS_PER_CONNECTION`] requests. Between
//! two proxies, HTTP/1 requests also travel over HTTP/2 (see
//! [`Route::Http1OverHttp2`]). Idle connections expire.
//!
//! No head-of-line blocking on a shared connection: a stream can hold at
//! most [`STREAM_WINDOW`] of the connection's receive window, and the
//! connection window is that times the streams we open on it, so readers
//! that stop reading stall their own streams and never the others. The
//! memory this can pin is bounded: at most the connection window per
//! connection, and at most [`MAX_CONNECTIONS_PER_DESTINATION`] connections.
//! A request that fails on a reused connection before it was written is
//! retried on a fresh one, which covers the race with a server closing an
//! idle keep-alive connection. A request that fails before it was written
//! for any other reason is handed back ([`SendFailed::unsent`]), so the
//! caller may try another endpoint.
//!
//! Connections are keyed by [`Upstream`]: the address and what must
//! answer there.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use parking_lot::Mutex;
use tokio::sync::watch;

use super::body::RequestBody;
use super::connect::{Connect, Connected, Upstream};
use super::mesh_proto::mesh_http2_to_http1;
use super::metrics::ConnMetrics;
use super::outcome::ConnOutcome;
use super::tls_status::TlsStatus;

/// The most requests in flight on one HTTP/2 connection this proxy opens
/// (and the most streams its HTTP/2 servers accept at once).
pub const MAX_STREAMS_PER_CONNECTION: usize = 128;
/// HTTP/2 connections kept per destination; past them, requests queue on
/// the least loaded one.
const MAX_CONNECTIONS_PER_DESTINATION: usize = 8;
/// A stream's receive window: what one unread response may hold back.
pub const STREAM_WINDOW: u32 = 64 * 1024;
/// A connection's receive window: room for every stream's window at once.
pub const CONNECTION_WINDOW: u32 = MAX_STREAMS_PER_CONNECTION as u32 * STREAM_WINDOW;

/// How long a just-released HTTP/1 connection may take to become ready
/// again: its connection task runs as soon as it is scheduled.
const RELEASED_READY_WAIT: Duration = Duration::from_millis(100);
/// HTTP/2 PINGs on idle mesh connections, so a dead peer is noticed
/// before a request is sent on its connection.
const MESH_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

mod failure;
pub use failure::{ForwardError, SendFailed};

/// How a request travels upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// HTTP/1 on a connection of the pool; an upgrade gets a connection of
    /// its own.
    Http1 { upgrade: bool },
    /// HTTP/2 on the destination's shared connection.
    Http2,
    /// An HTTP/1 request carried over the shared HTTP/2 connection to a
    /// peer proxy (already converted by the caller with
    /// [`super::mesh_proto::http1_to_mesh_http2`]), or turned back and
    /// sent as HTTP/1 when the destination turns out to have no proxy.
    Http1OverHttp2,
}

pub struct Pool {
    connector: Arc<dyn Connect>,
    idle_timeout: Duration,
    max_idle_per_destination: usize,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    http1: HashMap<Upstream, Vec<IdleHttp1>>,
    http2: HashMap<Upstream, Http2Slot>,
}

/// A multiplexed connection, the TLS status of its peer, and how many
/// requests are on it now.
#[derive(Clone)]
struct Http2Conn {
    sender: http2::SendRequest<RequestBody>,
    tls: TlsStatus,
    in_flight: Arc<AtomicUsize>,
}

impl Http2Conn {
    fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// A destination's HTTP/2 connections, and the connect in progress.
#[derive(Default)]
struct Http2Slot {
    conns: Vec<Http2Conn>,
    /// One request is connecting; the others wait for what it finds.
    connecting: Option<watch::Receiver<Option<Found>>>,
}

/// One request on an HTTP/2 connection, counted until it is dropped
/// (with the response body, or when sending fails).
pub struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn start(counter: &Arc<AtomicUsize>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self(counter.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the connect for a destination's shared slot found, as every
/// request that waited on it sees it.
#[derive(Clone)]
enum Found {
    Mesh(Http2Conn),
    /// The destination has no proxy: requests go as HTTP/1.
    Plaintext,
    Failed(Arc<ForwardError>),
}

/// Where a request on the HTTP/2 path is sent.
enum Via {
    Http2 {
        conn: Http2Conn,
        /// From the slot rather than just connected (so may be stale).
        reused: bool,
    },
    /// The destination has no proxy: HTTP/1, on this new connection when
    /// the request found that out itself, else from the pool.
    Http1(Option<(http1::SendRequest<RequestBody>, TlsStatus)>),
}

/// What a request does about the shared slot.
enum Turn {
    Ready(Http2Conn),
    Wait(watch::Receiver<Option<Found>>),
    Connect(watch::Sender<Option<Found>>),
}

struct IdleHttp1 {
    sender: http1::SendRequest<RequestBody>,
    tls: TlsStatus,
    since: Instant,
}

/// A response and the TLS status of the connection it came over.
pub struct Sent {
    pub response: Response<Incoming>,
    pub tls: TlsStatus,
    /// For HTTP/1: hands the connection back once the body is done.
    pub release: Option<Release>,
    /// For HTTP/2: counts the request on its connection until dropped.
    pub in_flight: Option<InFlight>,
    /// Whether the request opened the connection it went on.
    pub new_connection: bool,
}

/// The right to return an HTTP/1 connection to its pool.
pub struct Release {
    pool: Weak<Pool>,
    dst: Upstream,
    sender: http1::SendRequest<RequestBody>,
    tls: TlsStatus,
}

impl Release {
    /// Returns the connection for reuse. Call only once the response body
    /// has been read to its end.
    pub fn release(self) {
        let Some(pool) = self.pool.upgrade() else {
            return;
        };
        if self.sender.is_closed() {
            return;
        }
        let mut state = pool.state.lock();
        let idle = state.http1.entry(self.dst).or_default();
        if idle.len() < pool.max_idle_per_destination {
            idle.push(IdleHttp1 {
                sender: self.sender,
                tls: self.tls,
                since: Instant::now(),
            });
        }
    }
}

// === impl Pool ===

impl Pool {
    pub fn new(
        connector: Arc<dyn Connect>,
        idle_timeout: Duration,
        max_idle_per_destination: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            connector,
            idle_timeout,
            max_idle_per_destination,
            state: Mutex::new(State::default()),
        })
    }

    /// Drops expired and closed connections every idle period, until the
    /// pool is gone.
    pub fn spawn_eviction(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let every = self.idle_timeout.max(Duration::from_secs(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { break };
                pool.evict_idle();
            }
        });
    }

    fn evict_idle(&self) {
        let mut state = self.state.lock();
        let now = Instant::now();
        state.http1.retain(|_, idle| {
            idle.retain(|c| {
                !c.sender.is_closed() && now.duration_since(c.since) < self.idle_timeout
            });
            !idle.is_empty()
        });
        state.http2.retain(|_, slot| {
            slot.conns.retain(|c| !c.sender.is_closed());
            slot.connecting = slot.connecting.take().filter(|rx| rx.has_changed().is_ok());
            !slot.conns.is_empty() || slot.connecting.is_some()
        });
    }

    fn release(
        self: &Arc<Self>,
        dst: &Upstream,
        sender: http1::SendRequest<RequestBody>,
        tls: TlsStatus,
    ) -> Release {
        Release {
            pool: Arc::downgrade(self),
            dst: dst.clone(),
            sender,
            tls,
        }
    }

    /// Sends `req` to `dst` the way `route` says.
    pub async fn send(
        self: &Arc<Self>,
        dst: &Upstream,
        req: Request<RequestBody>,
        route: Route,
    ) -> Result<Sent, SendFailed> {
        match route {
            Route::Http1 { upgrade } => self.send_http1(dst, req, upgrade).await,
            Route::Http2 | Route::Http1OverHttp2 => self.send_http2(dst, req, route).await,
        }
    }

    /// Whether HTTP/1 requests to `dst` may ride HTTP/2: not when it is
    /// known to have no proxy.
    pub fn mesh_http2_possible(&self, dst: &Upstream) -> bool {
        !self.connector.known_plaintext(dst)
    }

    /// Forgets the connections to an upstream that left its destination:
    /// requests on them finish, and each closes once its last is done.
    pub fn retire(&self, dst: &Upstream) {
        let mut state = self.state.lock();
        state.http1.remove(dst);
        state.http2.remove(dst);
    }

    async fn send_http1(
        self: &Arc<Self>,
        dst: &Upstream,
        mut req: Request<RequestBody>,
        upgrade: bool,
    ) -> Result<Sent, SendFailed> {
        loop {
            let reused = if upgrade {
                None
            } else {
                self.checkout_http1(dst).await
            };
            let was_reused = reused.is_some();
            let (mut sender, tls) = match reused {
                Some(conn) => conn,
                None => match self.connect_http1(dst).await {
                    Ok(conn) => conn,
                    Err(error) => return Err(SendFailed::unsent(error, req)),
                },
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let release = (!upgrade).then(|| self.release(dst, sender, tls.clone()));
                    return Ok(Sent {
                        response,
                        tls,
                        release,
                        in_flight: None,
                        new_connection: !was_reused,
                    });
                }
                Err(error) => match SendFailed::from_try_send(error) {
                    // Never written: the pooled connection had gone stale.
                    SendFailed {
                        unsent: Some(unsent),
                        ..
                    } if was_reused => req = unsent,
                    failed => return Err(failed),
                },
            }
        }
    }

    async fn checkout_http1(
        &self,
        dst: &Upstream,
    ) -> Option<(http1::SendRequest<RequestBody>, TlsStatus)> {
        loop {
            let mut conn = self.state.lock().http1.get_mut(dst)?.pop()?;
            if conn.sender.is_closed() || conn.since.elapsed() >= self.idle_timeout {
                continue;
            }
            if conn.sender.is_ready() {
                return Some((conn.sender, conn.tls));
            }
            // Released a moment ago; its connection task has not yet
            // caught up. It becomes ready as soon as it runs.
            match tokio::time::timeout(RELEASED_READY_WAIT, conn.sender.ready()).await {
                Ok(Ok(())) => return Some((conn.sender, conn.tls)),
                _ => continue,
            }
        }
    }

    async fn connect_http1(
        &self,
        dst: &Upstream,
    ) -> Result<(http1::SendRequest<RequestBody>, TlsStatus), ForwardError> {
        handshake_http1(self.connector.connect(dst).await?).await
    }

    /// Sends on the destination's shared HTTP/2 connection. A request
    /// routed [`Route::Http1OverHttp2`] is turned back and sent as HTTP/1
    /// should the destination turn out to have no proxy.
    async fn send_http2(
        self: &Arc<Self>,
        dst: &Upstream,
        mut req: Request<RequestBody>,
        route: Route,
    ) -> Result<Sent, SendFailed> {
        loop {
            let shared = match self.shared_http2(dst, route).await {
                Ok(shared) => shared,
                Err(error) => return Err(SendFailed::unsent(error, req)),
            };
            let (mut conn, reused) = match shared {
                Via::Http2 { conn, reused } => (conn, reused),
                Via::Http1(Some((mut sender, tls))) => {
                    mesh_http2_to_http1(&mut req);
                    let response = sender
                        .try_send_request(req)
                        .await
                        .map_err(SendFailed::from_try_send)?;
                    let release = Some(self.release(dst, sender, tls.clone()));
                    return Ok(Sent {
                        response,
                        tls,
                        release,
                        in_flight: None,
                        new_connection: true,
                    });
                }
                Via::Http1(None) => {
                    mesh_http2_to_http1(&mut req);
                    return self.send_http1(dst, req, false).await;
                }
            };
            let in_flight = InFlight::start(&conn.in_flight);
            match conn.sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok(Sent {
                        response,
                        tls: conn.tls,
                        release: None,
                        in_flight: Some(in_flight),
                        new_connection: !reused,
                    });
                }
                Err(error) => match SendFailed::from_try_send(error) {
                    // Never written: the shared connection had gone away.
                    SendFailed {
                        unsent: Some(unsent),
                        ..
                    } if reused => {
                        self.forget_closed(dst);
                        req = unsent;
                    }
                    failed => return Err(failed),
                },
            }
        }
    }

    /// The destination's shared HTTP/2 connection. Only one task connects
    /// at a time; the others wait for what it finds, so a burst of
    /// requests to a new destination opens one connection, not one each.
    async fn shared_http2(&self, dst: &Upstream, route: Route) -> Result<Via, ForwardError> {
        loop {
            // Decided under the lock, acted on after it.
            let mut found = match self.join_or_claim(dst) {
                Turn::Ready(conn) => {
                    return Ok(Via::Http2 { conn, reused: true });
                }
                Turn::Wait(rx) => rx,
                Turn::Connect(tx) => return self.connect_for_all(dst, route, tx).await,
            };
            let outcome = match found.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone(),
                // The connecting request was cancelled: try again.
                Err(_) => continue,
            };
            return match outcome {
                Some(Found::Mesh(conn)) => Ok(Via::Http2 {
                    conn,
                    reused: false,
                }),
                Some(Found::Plaintext) => Ok(Via::Http1(None)),
                Some(Found::Failed(error)) => Err(ForwardError::Shared(error)),
                None => continue,
            };
        }
    }

    /// Drops the slot's closed connections.
    fn forget_closed(&self, dst: &Upstream) {
        if let Some(slot) = self.state.lock().http2.get_mut(dst) {
            slot.conns.retain(|c| !c.sender.is_closed());
        }
    }

    /// The least loaded live connection if it has room for another
    /// request; else the connect in progress to wait for; else the right
    /// to connect, claimed; and with every connection full and no room
    /// for another, the least loaded one anyway (the request queues).
    fn join_or_claim(&self, dst: &Upstream) -> Turn {
        let mut state = self.state.lock();
        let slot = state.http2.entry(dst.clone()).or_default();
        slot.conns.retain(|c| !c.sender.is_closed());
        let least = slot.conns.iter().min_by_key(|c| c.load()).cloned();
        if let Some(conn) = &least
            && conn.load() < MAX_STREAMS_PER_CONNECTION
        {
            return Turn::Ready(conn.clone());
        }
        // A connect in progress whose task is still alive.
        if let Some(rx) = slot
            .connecting
            .as_ref()
            .filter(|rx| rx.has_changed().is_ok())
        {
            return Turn::Wait(rx.clone());
        }
        match least {
            Some(conn) if slot.conns.len() >= MAX_CONNECTIONS_PER_DESTINATION => Turn::Ready(conn),
            _ => {
                let (tx, rx) = watch::channel(None);
                slot.connecting = Some(rx);
                Turn::Connect(tx)
            }
        }
    }

    /// Connects for the slot and tells the waiting requests what it found.
    async fn connect_for_all(
        &self,
        dst: &Upstream,
        route: Route,
        found: watch::Sender<Option<Found>>,
    ) -> Result<Via, ForwardError> {
        let result = self.connect_shared(dst, route).await;
        let mut state = self.state.lock();
        let slot = state.http2.entry(dst.clone()).or_default();
        slot.connecting = None;
        match result {
            Ok(Via::Http2 { conn, reused }) => {
                slot.conns.push(conn.clone());
                found.send_replace(Some(Found::Mesh(conn.clone())));
                Ok(Via::Http2 { conn, reused })
            }
            Ok(http1) => {
                found.send_replace(Some(Found::Plaintext));
                Ok(http1)
            }
            Err(error) => {
                let error = Arc::new(error);
                found.send_replace(Some(Found::Failed(error.clone())));
                Err(ForwardError::Shared(error))
            }
        }
    }

    /// A new connection for the slot: HTTP/2 to a peer proxy, or HTTP/1
    /// when an HTTP/1 request found the destination in plaintext.
    async fn connect_shared(&self, dst: &Upstream, route: Route) -> Result<Via, ForwardError> {
        let connected = self.connector.connect(dst).await?;
        if route == Route::Http1OverHttp2 && connected.tls.peer_id().is_none() {
            return Ok(Via::Http1(Some(handshake_http1(connected).await?)));
        }
        let Connected { io, tls, metrics } = connected;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(MESH_KEEPALIVE_INTERVAL))
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .handshake(TokioIo::new(io))
            .await?;
        spawn_connection(conn, metrics);
        Ok(Via::Http2 {
            conn: Http2Conn {
                sender,
                tls,
                in_flight: Arc::new(AtomicUsize::new(0)),
            },
            reused: false,
        })
    }
}

async fn handshake_http1(
    connected: Connected,
) -> Result<(http1::SendRequest<RequestBody>, TlsStatus), ForwardError> {
    let Connected { io, tls, metrics } = connected;
    let (sender, conn) = http1::Builder::new().handshake(TokioIo::new(io)).await?;
    spawn_connection(conn.with_upgrades(), metrics);
    Ok((sender, tls))
}

/// Drives a client connection on a task of its own; its metrics count the
/// close, as an error if the connection failed.
fn spawn_connection<E>(
    conn: impl std::future::Future<Output = Result<(), E>> + Send + 'static,
    metrics: Option<ConnMetrics>,
) {
    tokio::spawn(async move {
        let mut metrics = metrics;
        if conn.await.is_err()
            && let Some(m) = metrics.as_mut()
        {
            m.set_result(ConnOutcome::Error);
        }
    });
}
