//! Reusable HTTP client connections, per destination address.
//!
//! HTTP/1 connections are checked out for one request at a time and come
//! back when the response body has been fully read (a connection whose
//! body was abandoned cannot be reused and is closed). HTTP/2 connections
//! are shared: one per destination, multiplexed. Between two proxies,
//! HTTP/1 requests also travel over one shared HTTP/2 connection (see
//! [`Route::Http1OverHttp2`]). Idle connections expire.
//! A request that fails on a reused connection before it was written is
//! retried on a fresh one, which covers the race with a server closing an
//! idle keep-alive connection.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::sync::watch;

use super::connect::{Connect, ConnectError, Connected};
use super::metrics::ConnMetrics;
use super::tls_status::TlsStatus;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("upstream HTTP error: {0}")]
    Http(#[from] hyper::Error),
    /// The failure of a connect that several requests waited on.
    #[error(transparent)]
    Shared(Arc<ForwardError>),
    #[error("connection pool lock poisoned")]
    Poisoned,
}

impl ForwardError {
    pub fn reason(&self) -> &'static str {
        match self.root() {
            Self::Connect(e) => e.reason(),
            Self::Http(_) => "upstream_http_error",
            Self::Shared(_) | Self::Poisoned => "internal_error",
        }
    }

    /// The error itself, whether it was this request's or a shared one.
    pub fn root(&self) -> &ForwardError {
        match self {
            Self::Shared(inner) => inner.root(),
            other => other,
        }
    }
}

/// HTTP version of a downstream connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http1,
    Http2,
}

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
    /// [`super::http::http1_to_mesh_http2`]), or turned back and sent as
    /// HTTP/1 when the destination turns out to have no proxy.
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
    http1: HashMap<SocketAddr, Vec<IdleHttp1>>,
    http2: HashMap<SocketAddr, Http2Slot>,
}

/// A destination's shared HTTP/2 connection, or the connect in progress.
enum Http2Slot {
    Ready(http2::SendRequest<Incoming>, TlsStatus),
    Connecting(watch::Receiver<Option<Outcome>>),
}

/// How a shared connect ended, for the requests that waited on it.
#[derive(Clone)]
enum Outcome {
    Ready(http2::SendRequest<Incoming>, TlsStatus),
    /// The destination has no proxy: use HTTP/1.
    Plaintext,
    Failed(Arc<ForwardError>),
}

/// Whether a request connects for everyone or waits for another's connect.
enum Role {
    Connect(watch::Sender<Option<Outcome>>),
    Wait(watch::Receiver<Option<Outcome>>),
}

/// What [`Pool::shared_http2`] hands a request.
enum SharedConn {
    Http2 {
        sender: http2::SendRequest<Incoming>,
        tls: TlsStatus,
        /// From the pool rather than just connected (so may be stale).
        reused: bool,
    },
    /// This request's own connect found plaintext: send on it as HTTP/1.
    Http1 {
        sender: http1::SendRequest<Incoming>,
        tls: TlsStatus,
    },
    /// Another request's connect found plaintext.
    UseHttp1,
}

/// A new connection for the shared HTTP/2 slot: HTTP/2 to a peer proxy, or
/// HTTP/1 when the destination answered in plaintext (no proxy).
enum Shared {
    Http2(http2::SendRequest<Incoming>, TlsStatus),
    Http1(http1::SendRequest<Incoming>, TlsStatus),
}

struct IdleHttp1 {
    sender: http1::SendRequest<Incoming>,
    tls: TlsStatus,
    since: Instant,
}

/// A response and the TLS status of the connection it came over.
pub struct Sent {
    pub response: Response<Incoming>,
    pub tls: TlsStatus,
    /// For HTTP/1: hands the connection back once the body is done.
    pub release: Option<Release>,
}

/// The right to return an HTTP/1 connection to its pool.
pub struct Release {
    pool: Weak<Pool>,
    dst: SocketAddr,
    sender: http1::SendRequest<Incoming>,
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
        let Ok(mut state) = pool.state.lock() else {
            return;
        };
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
        let pool = Arc::new(Self {
            connector,
            idle_timeout,
            max_idle_per_destination,
            state: Mutex::new(State::default()),
        });
        let weak = Arc::downgrade(&pool);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(idle_timeout.max(Duration::from_secs(1)));
            loop {
                tick.tick().await;
                let Some(pool) = weak.upgrade() else { break };
                pool.evict_idle();
            }
        });
        pool
    }

    fn evict_idle(&self) {
        let Ok(mut state) = self.state.lock() else {
            return;
        };
        let now = Instant::now();
        state.http1.retain(|_, idle| {
            idle.retain(|c| {
                !c.sender.is_closed() && now.duration_since(c.since) < self.idle_timeout
            });
            !idle.is_empty()
        });
        state.http2.retain(|_, slot| match slot {
            Http2Slot::Ready(sender, _) => !sender.is_closed(),
            Http2Slot::Connecting(rx) => rx.has_changed().is_ok(),
        });
    }

    fn release(
        self: &Arc<Self>,
        dst: SocketAddr,
        sender: http1::SendRequest<Incoming>,
        tls: TlsStatus,
    ) -> Release {
        Release {
            pool: Arc::downgrade(self),
            dst,
            sender,
            tls,
        }
    }

    /// Sends `req` to `dst` the way `route` says.
    pub async fn send(
        self: &Arc<Self>,
        dst: SocketAddr,
        req: Request<Incoming>,
        route: Route,
    ) -> Result<Sent, ForwardError> {
        match route {
            Route::Http1 { upgrade } => self.send_http1(dst, req, upgrade).await,
            Route::Http2 => self.send_http2(dst, req, false).await,
            Route::Http1OverHttp2 => self.send_http2(dst, req, true).await,
        }
    }

    /// Whether HTTP/1 requests to `dst` may ride HTTP/2: not when it is
    /// known to have no proxy.
    pub fn mesh_http2_possible(&self, dst: SocketAddr) -> bool {
        !self.connector.known_plaintext(dst)
    }

    async fn send_http1(
        self: &Arc<Self>,
        dst: SocketAddr,
        mut req: Request<Incoming>,
        upgrade: bool,
    ) -> Result<Sent, ForwardError> {
        loop {
            let reused = if upgrade {
                None
            } else {
                self.checkout_http1(dst).await
            };
            let was_reused = reused.is_some();
            let (mut sender, tls) = match reused {
                Some(conn) => conn,
                None => self.connect_http1(dst).await?,
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    let release = (!upgrade).then(|| self.release(dst, sender, tls.clone()));
                    return Ok(Sent {
                        response,
                        tls,
                        release,
                    });
                }
                Err(mut error) => match error.take_message() {
                    // Never written: the pooled connection had gone stale.
                    Some(unsent) if was_reused => req = unsent,
                    _ => return Err(error.into_error().into()),
                },
            }
        }
    }

    async fn checkout_http1(
        &self,
        dst: SocketAddr,
    ) -> Option<(http1::SendRequest<Incoming>, TlsStatus)> {
        loop {
            let mut conn = {
                let mut state = self.state.lock().ok()?;
                state.http1.get_mut(&dst)?.pop()?
            };
            if conn.sender.is_closed() || conn.since.elapsed() >= self.idle_timeout {
                continue;
            }
            if conn.sender.is_ready() {
                return Some((conn.sender, conn.tls));
            }
            // Released a moment ago; its connection task has not yet
            // caught up. It becomes ready as soon as it runs.
            match tokio::time::timeout(Duration::from_millis(100), conn.sender.ready()).await {
                Ok(Ok(())) => return Some((conn.sender, conn.tls)),
                _ => continue,
            }
        }
    }

    async fn connect_http1(
        &self,
        dst: SocketAddr,
    ) -> Result<(http1::SendRequest<Incoming>, TlsStatus), ForwardError> {
        handshake_http1(self.connector.connect(dst).await?).await
    }

    /// `converted`: `req` is an HTTP/1 request already put in HTTP/2 form
    /// for a peer proxy; should the destination turn out to have no proxy,
    /// it is turned back and sent as HTTP/1.
    async fn send_http2(
        self: &Arc<Self>,
        dst: SocketAddr,
        mut req: Request<Incoming>,
        converted: bool,
    ) -> Result<Sent, ForwardError> {
        loop {
            let (mut sender, tls, reused) = match self.shared_http2(dst, converted).await? {
                SharedConn::Http2 {
                    sender,
                    tls,
                    reused,
                } => (sender, tls, reused),
                SharedConn::Http1 { mut sender, tls } => {
                    super::http::mesh_http2_to_http1(&mut req);
                    let response = sender
                        .try_send_request(req)
                        .await
                        .map_err(|e| e.into_error())?;
                    let release = Some(self.release(dst, sender, tls.clone()));
                    return Ok(Sent {
                        response,
                        tls,
                        release,
                    });
                }
                SharedConn::UseHttp1 => {
                    super::http::mesh_http2_to_http1(&mut req);
                    return self.send_http1(dst, req, false).await;
                }
            };
            match sender.try_send_request(req).await {
                Ok(response) => {
                    return Ok(Sent {
                        response,
                        tls,
                        release: None,
                    });
                }
                Err(mut error) => match error.take_message() {
                    // Never written: the shared connection had gone away.
                    Some(unsent) if reused => {
                        if let Ok(mut state) = self.state.lock() {
                            if matches!(state.http2.get(&dst), Some(Http2Slot::Ready(s, _)) if s.is_closed())
                            {
                                state.http2.remove(&dst);
                            }
                        }
                        req = unsent;
                    }
                    _ => return Err(error.into_error().into()),
                },
            }
        }
    }

    /// The destination's shared HTTP/2 connection. Only one task connects
    /// at a time; the others wait for its outcome, so a burst of requests
    /// to a new destination opens one connection, not one each.
    async fn shared_http2(
        &self,
        dst: SocketAddr,
        converted: bool,
    ) -> Result<SharedConn, ForwardError> {
        loop {
            let role = {
                let mut state = self.state.lock().map_err(|_| ForwardError::Poisoned)?;
                let waiting = match state.http2.get(&dst) {
                    Some(Http2Slot::Ready(sender, tls)) if !sender.is_closed() => {
                        return Ok(SharedConn::Http2 {
                            sender: sender.clone(),
                            tls: tls.clone(),
                            reused: true,
                        });
                    }
                    // A connect in progress whose task is still alive.
                    Some(Http2Slot::Connecting(rx)) if rx.has_changed().is_ok() => Some(rx.clone()),
                    _ => None,
                };
                match waiting {
                    Some(rx) => Role::Wait(rx),
                    None => {
                        let (tx, rx) = watch::channel(None);
                        state.http2.insert(dst, Http2Slot::Connecting(rx));
                        Role::Connect(tx)
                    }
                }
            };
            let mut rx = match role {
                Role::Wait(rx) => rx,
                Role::Connect(tx) => return self.connect_http2_for_all(dst, converted, tx).await,
            };
            let outcome = match rx.wait_for(Option::is_some).await {
                Ok(outcome) => outcome.clone(),
                // The connecting request was cancelled: try again.
                Err(_) => continue,
            };
            return match outcome {
                Some(Outcome::Ready(sender, tls)) => Ok(SharedConn::Http2 {
                    sender,
                    tls,
                    reused: false,
                }),
                Some(Outcome::Plaintext) => Ok(SharedConn::UseHttp1),
                Some(Outcome::Failed(error)) => Err(ForwardError::Shared(error)),
                None => continue,
            };
        }
    }

    async fn connect_http2_for_all(
        &self,
        dst: SocketAddr,
        converted: bool,
        tx: watch::Sender<Option<Outcome>>,
    ) -> Result<SharedConn, ForwardError> {
        let result = self.connect_shared(dst, converted).await;
        let mut state = self.state.lock().map_err(|_| ForwardError::Poisoned)?;
        match result {
            Ok(Shared::Http2(sender, tls)) => {
                state
                    .http2
                    .insert(dst, Http2Slot::Ready(sender.clone(), tls.clone()));
                tx.send_replace(Some(Outcome::Ready(sender.clone(), tls.clone())));
                Ok(SharedConn::Http2 {
                    sender,
                    tls,
                    reused: false,
                })
            }
            Ok(Shared::Http1(sender, tls)) => {
                state.http2.remove(&dst);
                tx.send_replace(Some(Outcome::Plaintext));
                Ok(SharedConn::Http1 { sender, tls })
            }
            Err(error) => {
                state.http2.remove(&dst);
                let error = Arc::new(error);
                tx.send_replace(Some(Outcome::Failed(error.clone())));
                Err(ForwardError::Shared(error))
            }
        }
    }

    async fn connect_shared(
        &self,
        dst: SocketAddr,
        http1_if_plaintext: bool,
    ) -> Result<Shared, ForwardError> {
        let connected = self.connector.connect(dst).await?;
        if http1_if_plaintext && connected.tls.peer_id().is_none() {
            let (sender, tls) = handshake_http1(connected).await?;
            return Ok(Shared::Http1(sender, tls));
        }
        let Connected { io, tls, metrics } = connected;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .handshake(TokioIo::new(io))
            .await?;
        spawn_connection(conn, metrics);
        Ok(Shared::Http2(sender, tls))
    }
}

async fn handshake_http1(
    connected: Connected,
) -> Result<(http1::SendRequest<Incoming>, TlsStatus), ForwardError> {
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
        if conn.await.is_err() {
            if let Some(m) = metrics.as_mut() {
                m.set_result("error");
            }
        }
    });
}
