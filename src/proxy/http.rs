//! HTTP/1.1 and HTTP/2 proxying through hyper, after the mesh hop.
//!
//! One downstream connection is served by a hyper server whose service
//! forwards every request to a fixed destination through the [`Pool`]:
//! authorization on the inbound [`Side`], header hygiene
//! ([`super::headers`]), the way upstream ([`route`], pure), and errors
//! turned into responses ([`super::respond`]). Upgrades (WebSocket and
//! friends) are relayed as a byte tunnel once both sides have switched
//! protocols.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};

use super::authz::{Caller, ConnectionAuthz, Enforcer};
use super::body::{BodyFault, RequestBody};
use super::detect::{Version, deadline_after};
use super::endpoints::{InFlight as Picked, Pick, Target};
use super::headers::{
    has_duplicate_host, is_grpc, is_websocket_upgrade, set_client_id, strip_hop_by_hop,
    strip_reserved,
};
use super::io::Activity;
use super::mesh_proto::{ORIG_PROTO_HEADER, http1_to_mesh_http2, mesh_http2_to_http1};
use super::metrics::{Direction, HttpMetrics, Metrics};
use super::outcome::{ConnError, ConnOutcome};
use super::pool::{
    CONNECTION_WINDOW, MAX_STREAMS_PER_CONNECTION, Pool, Route, STREAM_WINDOW, SendFailed, Sent,
};
use super::respond::{
    ProxyBody, bad_request, error_response, no_endpoints, payload_too_large, unexpected_upgrade,
};
use super::tls_status::{NoTlsReason, TlsStatus};
use crate::lifecycle::Watch;

/// Serves the HTTP connections of one listener, forwarding every request
/// through one pool.
pub struct HttpServer {
    pub pool: Arc<Pool>,
    pub metrics: Metrics,
    pub max_header_bytes: usize,
    pub idle_timeout: Duration,
    /// From the start of serving an HTTP/1 connection to its first
    /// request head; see [`serve`].
    pub request_head_timeout: Duration,
}

/// Which side of the proxy a connection is on, with what that side knows
/// about its caller.
pub enum Side {
    /// From the local application, to a destination.
    Outbound,
    /// From a caller, to the local application.
    Inbound {
        /// The downstream connection's mesh status.
        tls: TlsStatus,
        /// The caller-identity header value `tls` implies (computed once).
        client_id: Option<HeaderValue>,
        /// Who is calling, and what judges each request.
        authz: ConnectionAuthz,
        /// The most bytes a request body may carry.
        max_request_body: Option<u64>,
    },
}

impl Side {
    pub fn inbound(
        tls: TlsStatus,
        enforcer: Arc<Enforcer>,
        caller: Caller,
        max_request_body: Option<u64>,
    ) -> Self {
        let client_id = tls
            .peer_id()
            .and_then(|id| HeaderValue::from_str(id.as_str()).ok());
        Self::Inbound {
            tls,
            client_id,
            authz: ConnectionAuthz::new(enforcer, caller),
            max_request_body,
        }
    }

    pub fn direction(&self) -> Direction {
        match self {
            Self::Outbound => Direction::Outbound,
            Self::Inbound { .. } => Direction::Inbound,
        }
    }

    /// The downstream connection's mesh status, inbound.
    fn downstream_tls(&self) -> Option<&TlsStatus> {
        match self {
            Self::Outbound => None,
            Self::Inbound { tls, .. } => Some(tls),
        }
    }
}

impl HttpServer {
    /// Serves one downstream connection whose requests all go to
    /// `target`; returns how it ended.
    pub async fn serve<I>(
        &self,
        io: I,
        version: Version,
        target: Target,
        side: Side,
        activity: Arc<Activity>,
        drain: &Watch,
    ) -> ConnOutcome
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let forward = Arc::new(HttpForward {
            http_metrics: HttpMetrics::new(self.metrics.clone(), side.direction()),
            side,
            version,
            dst: target.original(),
            target,
            pool: self.pool.clone(),
            metrics: self.metrics.clone(),
            activity,
            idle_timeout: self.idle_timeout,
            drain: drain.clone(),
            head_arrived: AtomicBool::new(false),
        });
        let first_head_due = deadline_after(self.request_head_timeout);
        serve(
            io,
            forward,
            self.max_header_bytes,
            self.idle_timeout,
            first_head_due,
            drain,
        )
        .await
    }
}

/// Everything the service needs for one downstream connection.
struct HttpForward {
    side: Side,
    version: Version,
    /// The address the client dialled (or the static route's).
    dst: SocketAddr,
    target: Target,
    pool: Arc<Pool>,
    metrics: Metrics,
    http_metrics: HttpMetrics,
    activity: Arc<Activity>,
    idle_timeout: Duration,
    /// Cloned into upgrade tunnels, so draining waits for them too.
    drain: Watch,
    /// Whether a request head has come in on this connection yet.
    head_arrived: AtomicBool,
}

// === impl HttpForward ===

impl HttpForward {
    async fn forward(self: Arc<Self>, mut req: Request<Incoming>) -> Response<ProxyBody> {
        self.head_arrived.store(true, Ordering::Relaxed);
        let start = Instant::now();
        let grpc = is_grpc(&req);
        let (refusal, authenticated) =
            if self.version == Version::Http1 && has_duplicate_host(req.headers()) {
                (Some(bad_request(grpc)), None)
            } else if let Side::Inbound {
                authz,
                max_request_body,
                ..
            } = &self.side
            {
                match admit::inbound(authz, &mut req, *max_request_body, grpc).await {
                    Ok(authenticated) => (None, authenticated),
                    Err(response) => (Some(response), None),
                }
            } else {
                (None, None)
            };
        if let Some(response) = refusal {
            if let Some(tls) = self.side.downstream_tls() {
                self.http_metrics
                    .record(tls, response.status().as_u16(), start.elapsed());
            }
            return response;
        }
        let upgrade = self.version == Version::Http1 && is_websocket_upgrade(&req);
        let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        strip_hop_by_hop(req.headers_mut(), upgrade);
        // Each hop negotiates its own version and keep-alive: an HTTP/1.0
        // client must not make a pooled upstream connection single-use, and
        // an HTTP/1.0 upstream must not close the downstream connection.
        let downstream_version = req.version();
        let direction = self.side.direction();
        let (upstream, picked) = match &self.target {
            Target::Fixed(upstream) => (upstream.clone(), None),
            Target::Balanced(endpoints) => match endpoints.pick_request() {
                (Pick::NoEndpoints, _) => {
                    self.metrics
                        .connection_error(direction, ConnError::NoEndpoints);
                    let response = no_endpoints(grpc);
                    self.http_metrics.record(
                        &TlsStatus::NoTls(NoTlsReason::NoConnection),
                        response.status().as_u16(),
                        start.elapsed(),
                    );
                    return response;
                }
                (pick, picked) => {
                    let upstream = pick
                        .upstream(self.dst)
                        .unwrap_or_else(|| super::connect::Upstream::unvouched(self.dst));
                    (upstream, picked)
                }
            },
        };
        let route = route(RouteFacts {
            version: self.version,
            direction,
            from_mesh_peer: matches!(self.side.downstream_tls(), Some(TlsStatus::Mtls(_))),
            upgrade,
            connect: req.method() == http::Method::CONNECT,
            mesh_http2_possible: direction == Direction::Outbound
                && self.pool.mesh_http2_possible(&upstream),
            converted: req.headers().contains_key(&ORIG_PROTO_HEADER),
        });
        // A peer proxy's conversion is undone before our headers go, and
        // ours is made after, so no caller can set one.
        if let (Route::Http1 { .. }, Version::Http2) = (route, self.version) {
            mesh_http2_to_http1(&mut req);
        }
        strip_reserved(req.headers_mut());
        if route == Route::Http1OverHttp2 {
            http1_to_mesh_http2(&mut req, self.dst);
        }
        if let Side::Inbound { client_id, .. } = &self.side {
            set_client_id(req.headers_mut(), client_id.as_ref());
        }
        if let Some(authenticated) = &authenticated {
            super::authn::set_headers(req.headers_mut(), authenticated);
        }
        if let Route::Http1 { .. } = route {
            *req.version_mut() = http::Version::HTTP_11;
        }
        let (parts, body) = req.into_parts();
        let limit = match &self.side {
            Side::Inbound {
                max_request_body, ..
            } => *max_request_body,
            Side::Outbound => None,
        };
        let (body, body_fault) = RequestBody::new(body, limit);
        let req = Request::from_parts(parts, body);

        let (response, upstream_tls) = match self
            .send(upstream, picked, req, route, &body_fault)
            .await
        {
            Ok(Sent {
                mut response,
                tls,
                release,
                in_flight,
                ..
            }) => {
                let switched = response.status() == StatusCode::SWITCHING_PROTOCOLS;
                if switched && !upgrade {
                    // Nothing asked to switch (an h2c upgrade was removed):
                    // an upstream switching anyway is not relayed.
                    (unexpected_upgrade(grpc), tls)
                } else {
                    if let (Some(downstream), true) = (downstream_upgrade, switched) {
                        let upstream = hyper::upgrade::on(&mut response);
                        tokio::spawn(tunnel(
                            downstream,
                            upstream,
                            self.activity.clone(),
                            self.idle_timeout,
                            self.drain.clone(),
                        ));
                    }
                    strip_hop_by_hop(response.headers_mut(), upgrade && switched);
                    *response.version_mut() = downstream_version;
                    let response = response.map(|body| ProxyBody::Upstream {
                        body,
                        release,
                        in_flight,
                        ended: false,
                    });
                    (response, tls)
                }
            }
            Err(SendFailed { .. }) if body_fault.too_large() => {
                self.metrics.request_body_too_large();
                (
                    payload_too_large(grpc),
                    TlsStatus::NoTls(NoTlsReason::NoConnection),
                )
            }
            Err(SendFailed { error, .. }) if body_fault.client_body_failed() => {
                self.metrics
                    .connection_error(direction, ConnError::MalformedHttp);
                tracing::debug!(direction = direction.as_str(), dst = %self.dst, %error, "The client's request body broke");
                (
                    bad_request(grpc),
                    TlsStatus::NoTls(NoTlsReason::NoConnection),
                )
            }
            Err(SendFailed { error, .. }) => {
                self.metrics.connection_error(direction, error.reason());
                tracing::debug!(direction = direction.as_str(), dst = %self.dst, %error, "Request failed");
                (
                    error_response(&error, grpc),
                    TlsStatus::NoTls(NoTlsReason::NoConnection),
                )
            }
        };
        // Inbound requests are counted by the caller's status, outbound
        // ones by the upstream connection's.
        let tls = self.side.downstream_tls().unwrap_or(&upstream_tls);
        self.http_metrics
            .record(tls, response.status().as_u16(), start.elapsed());
        response
    }
}

impl HttpForward {
    /// Sends through the pool; a request to a balanced destination that
    /// failed before any of it was written goes once more, to another
    /// endpoint. The balancer hears how each attempt ended: a failure the
    /// client's own body caused is no fault of the endpoint, so it is
    /// never counted against it (one broken client must not get healthy
    /// endpoints paused for every other request of the pod).
    async fn send(
        &self,
        upstream: super::connect::Upstream,
        picked: Option<Picked>,
        req: Request<RequestBody>,
        route: Route,
        body_fault: &BodyFault,
    ) -> Result<Sent, SendFailed> {
        let result = self.pool.send(&upstream, req, route).await;
        let (Target::Balanced(endpoints), Some(picked)) = (&self.target, picked) else {
            return result;
        };
        let failed = match result {
            Ok(sent) => {
                picked.answered(sent.new_connection);
                return Ok(sent);
            }
            Err(failed) => failed,
        };
        if body_fault.client_body_failed() {
            // Dropped unfinished: abandoned, not failed.
            drop(picked);
            return Err(failed);
        }
        picked.failed();
        let SendFailed {
            error,
            unsent: Some(req),
        } = failed
        else {
            return Err(failed);
        };
        let (Pick::Endpoint(retry), Some(picked)) = endpoints.pick(Some(&upstream)) else {
            return Err(SendFailed {
                error,
                unsent: Some(req),
            });
        };
        if retry == upstream {
            return Err(SendFailed {
                error,
                unsent: Some(req),
            });
        }
        self.metrics.retried();
        tracing::debug!(dst = %self.dst, failed = %upstream.addr, retry = %retry.addr, %error, "Retrying on another endpoint");
        let result = self.pool.send(&retry, req, route).await;
        match &result {
            Ok(sent) => picked.answered(sent.new_connection),
            Err(_) if body_fault.client_body_failed() => drop(picked),
            Err(_) => picked.failed(),
        }
        result
    }
}

/// Relays an upgraded connection as bytes until either side closes or it
/// idles. `drain_guard` is held so the proxy's drain waits for it.
async fn tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    activity: Arc<Activity>,
    idle: Duration,
    drain_guard: Watch,
) {
    let (Ok(downstream), Ok(upstream)) = tokio::join!(downstream, upstream) else {
        return;
    };
    let mut downstream = TokioIo::new(downstream);
    let mut upstream = TokioIo::new(upstream);
    tokio::select! {
        _ = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => {}
        _ = activity.idle_for(idle) => {}
    }
    drop(drain_guard);
}

/// A hyper connection future that can be asked to finish gracefully.
trait GracefulConnection: Future {
    fn shut_down(self: Pin<&mut Self>);
}

impl<I, S> GracefulConnection for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

impl<I, S, E> GracefulConnection for hyper::server::conn::http2::Connection<I, S, E>
where
    Self: Future,
    I: hyper::rt::Read + hyper::rt::Write + Unpin,
    S: hyper::service::HttpService<Incoming, ResBody = ProxyBody>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, ProxyBody>,
{
    fn shut_down(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// Serves one downstream connection until it closes. Draining or idling
/// asks hyper to finish in-flight requests and close. An HTTP/1
/// connection whose first request head is not in by `first_head_due` is
/// closed: a client trickling its head a byte at a time would otherwise
/// hold the connection until the idle timeout. Only the first head: later
/// ones follow idle keep-alive periods that are the client's to choose.
/// Returns how it ended.
async fn serve<I>(
    io: I,
    forward: Arc<HttpForward>,
    max_header_bytes: usize,
    idle_timeout: Duration,
    first_head_due: tokio::time::Instant,
    drain: &Watch,
) -> ConnOutcome
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = forward.activity.clone();
    let version = forward.version;
    let watched = forward.clone();
    let service = service_fn(move |req| {
        let forward = forward.clone();
        async move { Ok::<_, Infallible>(forward.forward(req).await) }
    });
    match version {
        Version::Http1 => {
            // Not hyper's header-read timer: hyper runs it while a
            // keep-alive connection idles too, which would close
            // connections that clients are about to reuse.
            let conn = hyper::server::conn::http1::Builder::new()
                .header_read_timeout(None)
                .max_buf_size(max_header_bytes.max(8192))
                .serve_connection(TokioIo::new(io), service)
                .with_upgrades();
            let first_head = FirstHead {
                due: first_head_due,
                forward: watched,
            };
            drive(conn, &activity, idle_timeout, Some(first_head), drain).await
        }
        Version::Http2 => {
            // The same flow-control bounds as the pool's connections: a
            // stream whose upstream stops reading its body holds back its
            // own window only.
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION as u32)
                .initial_stream_window_size(STREAM_WINDOW)
                .initial_connection_window_size(CONNECTION_WINDOW)
                .max_header_list_size(u32::try_from(max_header_bytes).unwrap_or(u32::MAX))
                .serve_connection(TokioIo::new(io), service);
            drive(conn, &activity, idle_timeout, None, drain).await
        }
    }
}

/// When the first request head of a connection is due, and where its
/// arrival shows.
struct FirstHead {
    due: tokio::time::Instant,
    forward: Arc<HttpForward>,
}

impl FirstHead {
    /// Completes if the deadline passes before a head came in.
    async fn overdue(self) {
        tokio::time::sleep_until(self.due).await;
        if self.forward.head_arrived.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
    }
}

async fn drive<C, E>(
    conn: C,
    activity: &Activity,
    idle: Duration,
    first_head: Option<FirstHead>,
    drain: &Watch,
) -> ConnOutcome
where
    C: GracefulConnection<Output = Result<(), E>>,
{
    tokio::pin!(conn);
    let head_overdue = async {
        match first_head {
            Some(first_head) => first_head.overdue().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(head_overdue);
    let mut closing: Option<ConnOutcome> = None;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                return match (result, closing) {
                    (_, Some(why)) => why,
                    (Ok(()), None) => ConnOutcome::Ok,
                    (Err(_), None) => ConnOutcome::Error,
                };
            }
            () = &mut head_overdue, if closing.is_none() => {
                // Nothing is in flight to finish: close at once.
                return ConnOutcome::HeadTimeout;
            }
            _ = drain.signaled(), if closing.is_none() => {
                conn.as_mut().shut_down();
                closing = Some(ConnOutcome::Drained);
            }
            _ = activity.idle_for(idle), if closing.is_none() => {
                conn.as_mut().shut_down();
                closing = Some(ConnOutcome::IdleTimeout);
            }
        }
    }
}

mod admit;
mod route;
pub use route::{RouteFacts, route};

#[cfg(test)]
mod tests;
