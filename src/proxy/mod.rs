//! The data plane: inbound and outbound listeners, mTLS, protocol
//! detection, HTTP and opaque forwarding, and their metrics.
//!
//! Takes its configuration as plain data and its TLS material from a
//! `watch` channel; never reads files, flags or the environment, and never
//! calls the CA. Each listener is bound in [`Proxy::bind`] (so tests can
//! use port 0 and ask for the address) and served by [`Proxy::run`] until
//! the drain signal.

pub mod authn;
mod authz;
pub mod balance;
mod body;
mod connect;
mod detect;
pub mod discover;
mod endpoints;
mod first_word;
pub mod headers;
mod http;
mod inbound;
mod io;
pub mod jwks;
mod mesh_proto;
pub mod metrics;
mod orig_dst;
mod outbound;
pub mod outcome;
mod pool;
pub mod ratelimit;
mod respond;
mod tcp;
mod tls_status;

use std::collections::BTreeSet;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

pub use connect::ExpectedPeer;
pub use detect::{Alpn, Protocol, classify};
pub use metrics::{Direction, Metrics};
pub use tls_status::{NoTlsReason, TlsStatus};

use self::inbound::Inbound;
use self::outbound::Outbound;
use self::outcome::ConnError;
use crate::identity::SpiffeId;
use crate::lifecycle::Watch;
use crate::listener::{Admission, Caps, Notice, OnProbation, accept_admitting};
use crate::policy::{MtlsMode, PolicyRx};
use crate::tls::MeshTls;

/// The TLS material in use; `None` until an identity is loaded.
pub type TlsRx = watch::Receiver<Option<Arc<MeshTls>>>;

/// Bytes read while detecting a protocol: a full TLS record, or an HTTP/1
/// request line.
const MAX_DETECT_BYTES: usize = 17 * 1024;

/// Whether a listener detects protocols or treats everything as opaque.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProtocolMode {
    Detect,
    Opaque,
}

/// Where inbound connections go after the proxy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InboundTarget {
    /// The address the client dialled (`SO_ORIGINAL_DST`).
    OriginalDst,
    /// A fixed application address (local mode).
    App(SocketAddr),
}

/// Where outbound connections go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutboundTarget {
    /// The address the application dialled (`SO_ORIGINAL_DST`).
    OriginalDst,
    /// A fixed peer proxy, optionally with the identity it must present.
    Peer {
        addr: SocketAddr,
        id: Option<SpiffeId>,
    },
}

#[derive(Debug, Clone)]
pub struct InboundConfig {
    pub listen: SocketAddr,
    pub target: InboundTarget,
    pub protocol: ProtocolMode,
}

#[derive(Debug, Clone)]
pub struct OutboundConfig {
    pub listen: SocketAddr,
    pub target: OutboundTarget,
    pub protocol: ProtocolMode,
}

/// Timeouts and limits that protect the proxy from slow or hostile peers.
#[derive(Debug, Clone)]
pub struct Limits {
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub detect_timeout: Duration,
    pub idle_timeout: Duration,
    /// From the start of a new HTTP/1 connection to its first request head.
    pub request_head_timeout: Duration,
    /// Per listener.
    pub max_connections: usize,
    /// Inbound connections without a mesh identity, of `max_connections`.
    pub max_plaintext_connections: usize,
    /// Inbound connections from one address still in detection or the
    /// mTLS handshake.
    pub max_unverified_per_source: usize,
    pub max_header_bytes: usize,
    /// Idle pooled connections to the local application are not reused
    /// after this.
    pub app_pool_idle_timeout: Duration,
    /// Idle pooled connections to peer proxies are not reused after this.
    pub peer_pool_idle_timeout: Duration,
    pub pool_max_idle_per_destination: usize,
    /// Inbound request bodies over this many bytes are refused (413).
    pub max_request_body: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct ProxyConfig {
    pub inbound: Option<InboundConfig>,
    pub outbound: Option<OutboundConfig>,
    pub mtls_mode: MtlsMode,
    pub opaque_ports: BTreeSet<u16>,
    pub plaintext_fallback_ttl: Duration,
    pub limits: Limits,
    /// Where to resolve destinations; `None`: every destination is its
    /// original address.
    pub discovery: Option<discover::DiscoveryConfig>,
    /// How issuers' keys are fetched.
    pub jwks: JwksSettings,
}

/// How the proxy fetches JWKS documents.
#[derive(Debug, Clone)]
pub struct JwksSettings {
    /// CA certificates trusted beside the platform's roots.
    pub extra_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// The deadline of one fetch, redirects included.
    pub fetch_timeout: Duration,
}

impl Default for JwksSettings {
    fn default() -> Self {
        Self {
            extra_roots: Vec::new(),
            fetch_timeout: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The bound listeners, ready to serve.
pub struct Proxy {
    inbound: Option<Listener<Inbound>>,
    outbound: Option<Listener<Outbound>>,
}

/// Serves one accepted connection.
trait Handler: Send + Sync + 'static {
    /// What [`Handler::admit`] learns about a connection and hands on.
    type Context: Send + 'static;

    /// Decides, as the connection is accepted and before any task exists
    /// for it, whether it is served now, after its client's first bytes,
    /// or not at all.
    fn admit(&self, stream: &std::net::TcpStream, client: SocketAddr) -> Admission<Self::Context>;

    /// Serves a connection; `probation` is there when `admit` asked for
    /// it, and must be passed once the connection has shown who it is.
    fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        client: SocketAddr,
        context: Self::Context,
        probation: Option<OnProbation>,
        drain: Watch,
    ) -> impl Future<Output = ()> + Send;
}

/// A bound listener and what serves its connections.
struct Listener<H> {
    listener: TcpListener,
    local: SocketAddr,
    direction: Direction,
    max_connections: usize,
    metrics: Metrics,
    handler: Arc<H>,
}

impl<H: Handler> Listener<H> {
    fn new(
        listener: TcpListener,
        local: SocketAddr,
        direction: Direction,
        max_connections: usize,
        metrics: Metrics,
        handler: H,
    ) -> Self {
        Self {
            listener,
            local,
            direction,
            max_connections,
            metrics,
            handler: Arc::new(handler),
        }
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Accepts until draining starts; each connection is handled with a
    /// [`Watch`] of its own, so the drain waits for it.
    async fn run(self, drain: Watch) {
        let (handler, direction, metrics) = (self.handler, self.direction, self.metrics);
        let stop = drain.clone();
        accept_admitting(
            self.listener,
            Caps::total(self.max_connections),
            async move { stop.signaled().await },
            |refused| match refused {
                Notice::AcceptFailed(error) => {
                    tracing::warn!(direction = direction.as_str(), %error, "Accept failed");
                    metrics.connection_error(direction, ConnError::AcceptFailed);
                }
                Notice::AtCapacity(client) | Notice::SourceAtCapacity(client) => {
                    tracing::debug!(direction = direction.as_str(), %client, "Connection limit reached; closing");
                    metrics.connection_error(direction, ConnError::MaxConnections);
                }
                Notice::EvictedOnProbation => {
                    tracing::debug!(direction = direction.as_str(), "Connection limit reached; the longest unidentified connection gave up its place");
                }
                Notice::EvictedSilent(client) => {
                    tracing::debug!(direction = direction.as_str(), %client, "Connection limit reached; closed the longest silent connection");
                    metrics.connection_error(direction, ConnError::EvictedSilent);
                }
            },
            |stream, client| handler.admit(stream, client),
            |stream, client, context, probation| {
                let _ = stream.set_nodelay(true);
                handler
                    .clone()
                    .handle(stream, client, context, probation, drain.clone())
            },
        )
        .await;
        tracing::debug!(direction = direction.as_str(), "Listener closed");
    }
}

impl Proxy {
    /// `policy` decides inbound authorization and each port's mTLS mode.
    /// `resolver` is discovery's client, when configured
    /// (`config.discovery`).
    pub async fn bind(
        config: &ProxyConfig,
        tls: TlsRx,
        policy: PolicyRx,
        resolver: Option<discover::Resolver>,
        metrics: Metrics,
    ) -> Result<Self, Error> {
        let inbound = match &config.inbound {
            Some(c) => Some(Inbound::bind(c, config, tls.clone(), policy, metrics.clone()).await?),
            None => None,
        };
        let outbound = match &config.outbound {
            Some(c) => Some(Outbound::bind(c, config, tls, resolver, metrics).await?),
            None => None,
        };
        Ok(Self { inbound, outbound })
    }

    pub fn inbound_addr(&self) -> Option<SocketAddr> {
        self.inbound.as_ref().map(|i| i.local_addr())
    }

    pub fn outbound_addr(&self) -> Option<SocketAddr> {
        self.outbound.as_ref().map(|o| o.local_addr())
    }

    /// Accepts until draining starts. Connections already accepted keep
    /// their own [`Watch`] and finish on their own terms.
    pub async fn run(self, drain: Watch) {
        let inbound = self.inbound.map(|i| tokio::spawn(i.run(drain.clone())));
        let outbound = self.outbound.map(|o| tokio::spawn(o.run(drain.clone())));
        drop(drain);
        if let Some(task) = inbound {
            let _ = task.await;
        }
        if let Some(task) = outbound {
            let _ = task.await;
        }
    }
}

/// Binds a listener and reports the address it got (port 0 in tests).
async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), Error> {
    let fail = |source| Error::Bind { addr, source };
    let socket = match addr {
        SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4(),
        SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6(),
    }
    .map_err(fail)?;
    let listener = socket
        .set_reuseaddr(true)
        .and_then(|()| socket.bind(addr))
        .and_then(|()| socket.listen(1024))
        .map_err(fail)?;
    let local = listener.local_addr().map_err(fail)?;
    Ok((listener, local))
}

/// The HTTP side of a listener: a pool of connections made by
/// `connector`, idle ones retired after `pool_idle_timeout`.
fn http_server(
    connector: Arc<dyn connect::Connect>,
    pool_idle_timeout: Duration,
    metrics: Metrics,
    limits: &Limits,
) -> http::HttpServer {
    let pool = pool::Pool::new(
        connector,
        pool_idle_timeout,
        limits.pool_max_idle_per_destination,
    );
    pool.spawn_eviction();
    http::HttpServer {
        pool,
        metrics,
        max_header_bytes: limits.max_header_bytes,
        idle_timeout: limits.idle_timeout,
        request_head_timeout: limits.request_head_timeout,
    }
}
