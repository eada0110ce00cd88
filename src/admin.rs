//! The admin listener: `/metrics` (Prometheus text), `/ready`, `/live`,
//! and, when the owner asks for it, `POST /shutdown` from loopback only
//! (how a classic-sidecar Job tells its proxy it is done).
//!
//! Serves whatever registry and readiness check it is given; it owns no
//! business logic and knows nothing of the proxy. It keeps answering while
//! the proxy drains, so orchestrators can watch `/ready` turn 503.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Response, StatusCode, header};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::{Encoder, Registry, TextEncoder};
use tokio::net::TcpListener;

use crate::listener::{Caps, accept_loop};

/// Concurrent admin connections, and from one source address; more are
/// closed on accept. One address (a neighbour pod) cannot take the
/// kubelet's share; it takes many addresses at once to fill the total.
const CAPS: Caps = Caps {
    total: 256,
    per_source: Some(8),
};
/// An admin connection must deliver a request head this soon, also after
/// a keep-alive response: probes and scrapes are fast, an idle connection
/// is worth nothing here, and closing it frees its slot.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// Answers "should this instance receive traffic?".
pub type ReadyCheck = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct Error {
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

pub struct Admin {
    listener: TcpListener,
    registry: Registry,
    ready: ReadyCheck,
    shutdown: Option<Arc<tokio::sync::Notify>>,
}

/// What every admin request is answered from.
struct AdminState {
    registry: Registry,
    ready: ReadyCheck,
    shutdown: Option<Arc<tokio::sync::Notify>>,
}

impl Admin {
    pub async fn bind(
        addr: SocketAddr,
        registry: Registry,
        ready: ReadyCheck,
    ) -> Result<Self, Error> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| Error { addr, source })?;
        Ok(Self {
            listener,
            registry,
            ready,
            shutdown: None,
        })
    }

    /// Serves `POST /shutdown` (loopback callers only) by notifying
    /// `shutdown`.
    pub fn with_shutdown(mut self, shutdown: Arc<tokio::sync::Notify>) -> Self {
        self.shutdown = Some(shutdown);
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the task is dropped.
    pub async fn run(self) {
        let state = Arc::new(AdminState {
            registry: self.registry,
            ready: self.ready,
            shutdown: self.shutdown,
        });
        // Scrapers and probes need a handful of connections; a flood must
        // not exhaust the process's file descriptors.
        accept_loop(
            self.listener,
            CAPS,
            std::future::pending(),
            |_refused| {},
            move |stream, peer| {
                let state = state.clone();
                async move {
                    let service = service_fn(move |req| {
                        let state = state.clone();
                        async move {
                            Ok::<_, Infallible>(route(req.method(), req.uri().path(), peer, &state))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .timer(TokioTimer::new())
                        .header_read_timeout(HEAD_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            },
        )
        .await;
    }
}

fn route(
    method: &Method,
    path: &str,
    peer: SocketAddr,
    state: &AdminState,
) -> Response<Full<Bytes>> {
    let (registry, ready) = (&state.registry, &state.ready);
    if path == "/shutdown" {
        let Some(shutdown) = &state.shutdown else {
            return text(StatusCode::NOT_FOUND, "not found\n");
        };
        if method != Method::POST {
            return text(StatusCode::METHOD_NOT_ALLOWED, "POST /shutdown\n");
        }
        // The admin port is reachable from the whole cluster (scrapes,
        // probes); only the pod itself may stop its proxy. Bound to `[::]`,
        // an IPv4 loopback caller arrives as `::ffff:127.0.0.1`.
        if !peer.ip().to_canonical().is_loopback() {
            return text(StatusCode::FORBIDDEN, "only from localhost\n");
        }
        tracing::info!("Shutdown requested on the admin port");
        shutdown.notify_one();
        return text(StatusCode::ACCEPTED, "shutting down\n");
    }
    if method != Method::GET && method != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
    }
    match path {
        "/metrics" => {
            let mut body = Vec::new();
            let encoder = TextEncoder::new();
            match encoder.encode(&registry.gather(), &mut body) {
                Ok(()) => {
                    let mut response = Response::new(Full::new(Bytes::from(body)));
                    if let Ok(value) = encoder.format_type().parse() {
                        response.headers_mut().insert(header::CONTENT_TYPE, value);
                    }
                    response
                }
                Err(error) => {
                    tracing::warn!(%error, "Cannot encode metrics");
                    text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n")
                }
            }
        }
        "/ready" if ready() => text(StatusCode::OK, "ready\n"),
        "/ready" => text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n"),
        "/live" => text(StatusCode::OK, "live\n"),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(shutdown: Option<Arc<tokio::sync::Notify>>) -> AdminState {
        AdminState {
            registry: Registry::new(),
            ready: Arc::new(|| true),
            shutdown,
        }
    }

    #[test]
    fn shutdown_is_a_loopback_only_post_and_absent_unless_enabled() {
        let local: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:5000".parse().unwrap();
        let remote: SocketAddr = "10.1.2.3:5000".parse().unwrap();
        let notify = Arc::new(tokio::sync::Notify::new());
        let with = state(Some(notify.clone()));
        assert_eq!(
            route(&Method::POST, "/shutdown", remote, &with).status(),
            StatusCode::FORBIDDEN
        );
        assert_eq!(
            route(&Method::GET, "/shutdown", local, &with).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
        assert_eq!(
            route(&Method::POST, "/shutdown", local, &with).status(),
            StatusCode::ACCEPTED
        );
        assert_eq!(
            route(&Method::POST, "/shutdown", mapped, &with).status(),
            StatusCode::ACCEPTED
        );
        // The permit is stored: the owner sees it even if it was not yet waiting.
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            tokio::time::timeout(std::time::Duration::from_secs(1), notify.notified())
                .await
                .expect("notified");
        });
        let without = state(None);
        assert_eq!(
            route(&Method::POST, "/shutdown", local, &without).status(),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            route(&Method::POST, "/metrics", local, &without).status(),
            StatusCode::METHOD_NOT_ALLOWED
        );
    }
}
