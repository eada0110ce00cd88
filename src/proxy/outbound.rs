//! The outbound side: connections the local application opens.
//!
//! The destination is the static peer of the route or the address the
//! application dialled. With discovery, a destination the controller knows
//! is its endpoints ([`Target::Balanced`]): HTTP requests are balanced one
//! by one, opaque connections one by one, each endpoint held to its own
//! identity; one it does not know (or cannot answer for in time) is the
//! original address, as without discovery. HTTP is served through hyper
//! and forwarded over pooled mTLS connections; everything else (and every
//! opaque port, configured or discovered, without waiting for the client
//! to speak) gets an mTLS connection of its own and is relayed as bytes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;

use super::connect::{ConnectError, Connected, ExpectedPeer, MeshConnector, Upstream};
use super::detect::{Detection, Next, Protocol, app_protocol, deadline_after};
use super::discover::Resolver;
use super::endpoints::{Destinations, InFlight as Picked, Pick, Target};
use super::first_word::{FirstWord, WatchedWord, first_word};
use super::http::{HttpServer, Side};
use super::io::{Activity, MeteredIo, Rewind};
use super::metrics::{Direction, Metrics, OpenConnection};
use super::orig_dst::original_dst;
use super::outcome::ConnError;
use super::respond::refuse_malformed;
use super::{
    Error, Handler, Limits, Listener, MAX_DETECT_BYTES, OutboundConfig, OutboundTarget,
    ProtocolMode, ProxyConfig, TlsRx, bind, http_server,
};
use crate::lifecycle::Watch;
use crate::listener::{Admission, OnProbation};

const DIRECTION: Direction = Direction::Outbound;

/// The outbound listener's shared state: what every connection needs.
pub struct Outbound {
    local: SocketAddr,
    target: OutboundTarget,
    protocol: ProtocolMode,
    opaque_ports: BTreeSet<u16>,
    limits: Limits,
    http: HttpServer,
    metrics: Metrics,
    connector: Arc<MeshConnector>,
    /// With discovery, in transparent mode.
    destinations: Option<Destinations>,
}

impl Outbound {
    /// Binds the outbound listener.
    pub async fn bind(
        config: &OutboundConfig,
        proxy: &ProxyConfig,
        tls: TlsRx,
        resolver: Option<Resolver>,
        metrics: Metrics,
    ) -> Result<Listener<Self>, Error> {
        let (listener, local) = bind(config.listen).await?;
        let limits = proxy.limits.clone();
        let expected = match &config.target {
            OutboundTarget::Peer { id: Some(id), .. } => ExpectedPeer::Id(id.clone()),
            _ => ExpectedPeer::SameTrustDomain,
        };
        let connector = Arc::new(MeshConnector::new(
            tls,
            expected,
            proxy.mtls_mode,
            limits.connect_timeout,
            limits.handshake_timeout,
            proxy.plaintext_fallback_ttl,
            metrics.clone(),
        ));
        let http = http_server(
            connector.clone(),
            limits.peer_pool_idle_timeout,
            metrics.clone(),
            &limits,
        );
        // A static route that names its peer's identity has nothing to
        // learn from discovery; one that names only an address (a Service
        // address, say) is resolved like any destination.
        let destinations = match (&config.target, resolver) {
            (
                OutboundTarget::OriginalDst | OutboundTarget::Peer { id: None, .. },
                Some(resolver),
            ) => Some(Destinations::new(
                resolver,
                http.pool.clone(),
                metrics.clone(),
            )),
            _ => None,
        };
        Ok(Listener::new(
            listener,
            local,
            DIRECTION,
            limits.max_connections,
            metrics.clone(),
            Self {
                local,
                target: config.target.clone(),
                protocol: config.protocol,
                opaque_ports: proxy.opaque_ports.clone(),
                http,
                limits,
                metrics,
                connector,
                destinations,
            },
        ))
    }
}

/// What the outbound listener learns about a connection as it accepts it.
pub struct Accepted {
    dst: SocketAddr,
    opaque: bool,
    /// When protocol detection gives up on a silent client.
    deadline: tokio::time::Instant,
    _open: OpenConnection,
}

impl Handler for Outbound {
    type Context = Accepted;

    fn admit(&self, stream: &std::net::TcpStream, _client: SocketAddr) -> Admission<Accepted> {
        let dst = match &self.target {
            OutboundTarget::Peer { addr, .. } => *addr,
            OutboundTarget::OriginalDst => match stream.local_addr() {
                Ok(local) => original_dst(stream.as_fd(), local),
                Err(_) => return Admission::Refuse,
            },
        };
        if dst == self.local {
            self.metrics
                .connection_error(DIRECTION, ConnError::LoopDetected);
            return Admission::Refuse;
        }
        // Server-speaks-first protocols live on opaque ports: connect at
        // once, without waiting for the client. Discovery's hint counts
        // when its answer is already at hand (it never blocks an accept).
        let opaque = self.protocol == ProtocolMode::Opaque
            || self.opaque_ports.contains(&dst.port())
            || self
                .destinations
                .as_ref()
                .is_some_and(|d| d.known_opaque(dst));
        let accepted = Accepted {
            dst,
            opaque,
            deadline: deadline_after(self.limits.detect_timeout),
            _open: self.metrics.accepted(DIRECTION),
        };
        if opaque {
            Admission::Serve(accepted)
        } else {
            let deadline = accepted.deadline;
            Admission::AwaitFirstBytes(accepted, deadline)
        }
    }

    async fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        _client: SocketAddr,
        accepted: Accepted,
        _probation: Option<OnProbation>,
        drain: Watch,
    ) {
        let (target, discovered_opaque) = match &self.destinations {
            Some(destinations) => destinations.resolve(accepted.dst).await,
            None => (Target::Fixed(Upstream::unvouched(accepted.dst)), false),
        };
        let activity = Activity::new();
        let mut io = MeteredIo::new(stream, activity.clone());
        let mut prefix = BytesMut::new();
        let detection = app_protocol(
            &mut io,
            &mut prefix,
            accepted.opaque || discovered_opaque,
            accepted.deadline,
            MAX_DETECT_BYTES,
            || self.metrics.detect_timeout(DIRECTION),
        )
        .await;
        let Some(next) = detection.next() else {
            return;
        };
        // The application's own TLS stays end-to-end encrypted even if
        // the destination turns out to have no proxy.
        let app_tls = matches!(detection, Detection::Detected(Protocol::Tls(_)));
        self.forward(io, prefix, next, target, app_tls, activity, drain)
            .await;
    }
}

impl Outbound {
    /// Serves, relays or refuses the connection as `next` says.
    #[allow(clippy::too_many_arguments)]
    async fn forward(
        &self,
        mut io: MeteredIo<TcpStream>,
        mut prefix: BytesMut,
        next: Next,
        target: Target,
        app_tls: bool,
        activity: Arc<Activity>,
        drain: Watch,
    ) {
        let next = match next {
            Next::Serve(version) => {
                self.metrics.protocol(DIRECTION, Some(version));
                let io = Rewind::new(prefix.freeze(), io);
                self.http
                    .serve(io, version, target, Side::Outbound, activity, &drain)
                    .await;
                return;
            }
            Next::Refuse => {
                self.metrics
                    .connection_error(DIRECTION, ConnError::MalformedHttp);
                refuse_malformed(&mut io).await;
                return;
            }
            next @ (Next::Relay | Next::RelayWatchingTheWord | Next::AwaitFirstWord) => next,
        };
        let dst = target.original();
        let (upstream, picked) = match self.connect(&target, app_tls).await {
            Ok(upstream) => upstream,
            Err(error) => {
                self.metrics.connection_error(DIRECTION, error.reason());
                tracing::debug!(%dst, %error, "Outbound connection failed");
                return;
            }
        };
        let (mut upstream_io, mut conn) = (upstream.io, upstream.metrics);
        let mut banner = Bytes::new();
        let mut next = next;
        if next == Next::AwaitFirstWord {
            let word = first_word(
                &mut io,
                &mut prefix,
                &mut upstream_io,
                self.limits.detect_timeout,
                MAX_DETECT_BYTES,
                &activity,
                self.limits.idle_timeout,
            )
            .await;
            match word {
                FirstWord::Server(said) => banner = said,
                FirstWord::Client(detection) => match detection.next() {
                    Some(relay @ (Next::Relay | Next::RelayWatchingTheWord)) => next = relay,
                    Some(next) => {
                        // A request after all: this upstream connection
                        // goes, and it is served (or refused) as any.
                        drop((upstream_io, conn, picked));
                        let app_tls = matches!(detection, Detection::Detected(Protocol::Tls(_)));
                        return Box::pin(
                            self.forward(io, prefix, next, target, app_tls, activity, drain),
                        )
                        .await;
                    }
                    None => return,
                },
                FirstWord::Ended => return,
            }
        }
        self.metrics.protocol(DIRECTION, None);
        let word = (next == Next::RelayWatchingTheWord).then_some(prefix.len());
        let watched = WatchedWord::new(io, word);
        let upstream_io = Rewind::new(banner, watched.server(upstream_io));
        let result = super::tcp::relay(
            Rewind::new(prefix.freeze(), watched),
            upstream_io,
            &activity,
            self.limits.idle_timeout,
        )
        .await;
        if let Some(conn) = conn.as_mut() {
            conn.set_result(result);
        }
        // The connection no longer counts on its endpoint.
        drop(picked);
    }
}

/// Why an opaque connection found no upstream.
#[derive(Debug, thiserror::Error)]
enum OpaqueConnectError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("the destination has no endpoints")]
    NoEndpoints,
}

impl OpaqueConnectError {
    fn reason(&self) -> ConnError {
        match self {
            Self::Connect(error) => error.reason(),
            Self::NoEndpoints => ConnError::NoEndpoints,
        }
    }
}

impl Outbound {
    /// The upstream connection of an opaque connection: for a balanced
    /// destination an endpoint picked for it (P2C over its open
    /// connections, counted while the returned guard lives), and once
    /// more on another endpoint if the first cannot be connected to.
    async fn connect(
        &self,
        target: &Target,
        app_tls: bool,
    ) -> Result<(Connected, Option<Picked>), OpaqueConnectError> {
        let endpoints = match target {
            Target::Fixed(upstream) => {
                return Ok((self.connector.connect_to(upstream, app_tls).await?, None));
            }
            Target::Balanced(endpoints) => endpoints,
        };
        let original = endpoints.original();
        let (pick, picked) = endpoints.pick(None);
        let upstream = pick
            .upstream(original)
            .ok_or(OpaqueConnectError::NoEndpoints)?;
        let error = match self.connector.connect_to(&upstream, app_tls).await {
            Ok(connected) => {
                if let Some(picked) = &picked {
                    picked.connected();
                }
                return Ok((connected, picked));
            }
            Err(error) => error,
        };
        let Some(picked) = picked else {
            return Err(error.into());
        };
        picked.failed();
        let (Pick::Endpoint(retry), picked) = endpoints.pick(Some(&upstream)) else {
            return Err(error.into());
        };
        if retry == upstream {
            return Err(error.into());
        }
        self.metrics.retried();
        tracing::debug!(dst = %original, failed = %upstream.addr, retry = %retry.addr, %error, "Connecting to another endpoint");
        match self.connector.connect_to(&retry, app_tls).await {
            Ok(connected) => {
                if let Some(picked) = &picked {
                    picked.connected();
                }
                Ok((connected, picked))
            }
            Err(error) => {
                if let Some(picked) = picked {
                    picked.failed();
                }
                Err(error.into())
            }
        }
    }
}
