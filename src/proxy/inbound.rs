//! The inbound side: connections arriving for the local application.
//!
//! Mesh clients announce themselves with a TLS ClientHello carrying ALPN
//! `outrider/1`; those are terminated here with mutual TLS and the client's
//! SPIFFE ID travels with the connection. Anything else is plaintext from
//! outside the mesh: relayed as unauthenticated in permissive mode, closed
//! in strict mode. After that, HTTP goes through hyper (with the caller's
//! identity set in `x-outrider-client-id`) and everything else is relayed
//! as opaque bytes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::authn::Authenticator;
use super::authz::{Caller, Enforcer};
use super::connect::{AppConnector, Connect, Upstream};
use super::detect::{
    Alpn, Detection, Next, Protocol, Version, app_protocol, deadline_after, read_and_classify,
};
use super::endpoints::Target;
use super::first_word::{FirstWord, WatchedWord, first_word};
use super::http::{HttpServer, Side};
use super::io::{Activity, MeteredIo, Rewind};
use super::metrics::{Direction, Metrics, OpenConnection};
use super::orig_dst::original_dst;
use super::outcome::{ConnError, ConnOutcome, HandshakeFailure};
use super::respond::refuse_malformed;
use super::tls_status::{NoTlsReason, TlsStatus};
use super::{
    Error, Handler, InboundConfig, InboundTarget, Limits, Listener, MAX_DETECT_BYTES, ProtocolMode,
    ProxyConfig, TlsRx, bind, http_server,
};
use crate::identity::SpiffeId;
use crate::lifecycle::Watch;
use crate::listener::{Admission, OnProbation, SourceSlot, Sources};
use crate::policy::authz::admits_plaintext;
use crate::policy::{MtlsMode, PolicyRx};
use crate::tls::{handshake_failure_reason, negotiated_group};

const DIRECTION: Direction = Direction::Inbound;

/// The inbound listener's shared state: what every connection needs.
pub struct Inbound {
    local: SocketAddr,
    target: InboundTarget,
    protocol: ProtocolMode,
    opaque_ports: BTreeSet<u16>,
    limits: Limits,
    http: HttpServer,
    tls: TlsRx,
    metrics: Metrics,
    app: Arc<AppConnector>,
    enforcer: Arc<Enforcer>,
    /// Connections per source address still in detection or the mTLS
    /// handshake: one neighbour cannot hold them all.
    unverified: Arc<Sources>,
    /// Places for connections without a mesh identity: however many
    /// plaintext clients come, the rest of the listener is for mesh peers.
    plaintext: Arc<Semaphore>,
}

impl Inbound {
    /// Binds the inbound listener.
    pub async fn bind(
        config: &InboundConfig,
        proxy: &ProxyConfig,
        tls: TlsRx,
        policy: PolicyRx,
        metrics: Metrics,
    ) -> Result<Listener<Self>, Error> {
        let (listener, local) = bind(config.listen).await?;
        let limits = proxy.limits.clone();
        let app = Arc::new(AppConnector {
            connect_timeout: limits.connect_timeout,
        });
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
                http: http_server(
                    app.clone(),
                    limits.app_pool_idle_timeout,
                    metrics.clone(),
                    &limits,
                ),
                unverified: Arc::new(Sources::default()),
                plaintext: Arc::new(Semaphore::new(
                    limits.max_plaintext_connections.min(Semaphore::MAX_PERMITS),
                )),
                limits,
                tls,
                enforcer: Arc::new(Enforcer::new(
                    policy.clone(),
                    metrics.clone(),
                    Authenticator::following(proxy, &policy, &metrics),
                )),
                metrics,
                app,
            },
        ))
    }
}

/// What the inbound listener learns about a connection as it accepts it.
pub struct Accepted {
    app_addr: SocketAddr,
    /// When protocol detection gives up on a silent client.
    deadline: tokio::time::Instant,
    /// Held until the connection is identified (mesh handshake done, or
    /// plaintext detected).
    unverified: SourceSlot,
    _open: OpenConnection,
}

impl Handler for Inbound {
    type Context = Accepted;

    fn admit(&self, stream: &std::net::TcpStream, client: SocketAddr) -> Admission<Accepted> {
        let app_addr = match &self.target {
            InboundTarget::App(addr) => *addr,
            InboundTarget::OriginalDst => match stream.local_addr() {
                Ok(local) => original_dst(stream.as_fd(), local),
                Err(_) => return Admission::Refuse,
            },
        };
        if app_addr == self.local {
            // Sent straight to the listener, not redirected: forwarding it
            // would connect the proxy to itself.
            self.metrics
                .connection_error(DIRECTION, ConnError::LoopDetected);
            return Admission::Refuse;
        }
        let Some(unverified) = self
            .unverified
            .take(client.ip(), self.limits.max_unverified_per_source)
        else {
            self.metrics
                .connection_error(DIRECTION, ConnError::UnverifiedAtCapacity);
            tracing::debug!(%client, "Too many unidentified connections from this address; closing");
            return Admission::Refuse;
        };
        // Every inbound connection begins with its client's bytes (a
        // ClientHello, or plaintext): until they arrive it waits in the
        // listener's room, holding no task and no buffer.
        let deadline = deadline_after(self.limits.detect_timeout);
        let accepted = Accepted {
            app_addr,
            deadline,
            unverified,
            _open: self.metrics.accepted(DIRECTION),
        };
        Admission::Probation(accepted, deadline)
    }

    async fn handle(
        self: Arc<Self>,
        stream: TcpStream,
        client: SocketAddr,
        accepted: Accepted,
        probation: Option<OnProbation>,
        drain: Watch,
    ) {
        let Accepted {
            app_addr,
            deadline,
            unverified,
            ..
        } = accepted;
        // Admitted on probation (see `admit`); without one there is
        // nothing to give up.
        let Some(mut probation) = probation else {
            return;
        };
        let identified = tokio::select! {
            identified = self.identify(stream, client, app_addr, deadline) => identified,
            place = probation.cut() => {
                self.metrics.connection_error(DIRECTION, ConnError::EvictedUnidentified);
                tracing::debug!(%client, "Listener full; a newcomer takes the place of this unidentified connection");
                // The connection's socket and buffers went with the
                // `identify` future above; now the place can go too.
                drop(place);
                return;
            }
        };
        drop(unverified);
        let Some(_place) = probation.pass() else {
            // The place went to a newcomer just as the connection passed.
            self.metrics
                .connection_error(DIRECTION, ConnError::EvictedUnidentified);
            return;
        };
        match identified {
            Some(Identified::Mesh {
                tls,
                peer,
                activity,
            }) => {
                self.serve_mesh(tls, peer, client, app_addr, activity, drain)
                    .await;
            }
            Some(Identified::Plaintext {
                io,
                prefix,
                detected,
                activity,
            }) => {
                self.serve_plaintext(io, prefix, detected, client, app_addr, activity, drain)
                    .await;
            }
            None => {}
        }
    }
}

/// Who a connection turned out to be from. One per connection, on its
/// task: boxing the large variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Identified {
    /// A peer proxy, authenticated by mTLS.
    Mesh {
        tls: TlsStream<Rewind<MeteredIo<TcpStream>>>,
        peer: SpiffeId,
        activity: Arc<Activity>,
    },
    /// A client without mesh TLS, on a port that admits it.
    Plaintext {
        io: MeteredIo<TcpStream>,
        prefix: BytesMut,
        detected: Detection,
        activity: Arc<Activity>,
    },
}

impl Inbound {
    /// Detection, and the mTLS handshake for a mesh peer: the part of a
    /// connection's life before it has shown who it is (and may be shed).
    /// `None` when it closed, failed or was refused (each counted).
    async fn identify(
        &self,
        stream: TcpStream,
        client: SocketAddr,
        app_addr: SocketAddr,
        deadline: tokio::time::Instant,
    ) -> Option<Identified> {
        // The port's mTLS mode as the policy says now (PeerAuthentication,
        // or the mesh default).
        let strict = self.enforcer.policy().borrow().mtls_mode(app_addr.port()) == MtlsMode::Strict;
        let activity = Activity::new();
        let mut io = MeteredIo::new(stream, activity.clone());
        let mut prefix = BytesMut::new();
        let detected = read_and_classify(&mut io, &mut prefix, deadline, MAX_DETECT_BYTES)
            .await
            .ok()?;

        // A peer proxy asks for the mesh ALPN. In strict mode a client that
        // offers no ALPN at all also gets the mesh handshake: a SPIFFE-aware
        // client without a sidecar can then authenticate with its SVID,
        // and anything else is refused either way. In permissive mode such
        // TLS belongs to the application and is passed through, as Istio
        // does.
        let mesh = match detected {
            Detection::Detected(Protocol::Tls(Alpn::Mesh)) => true,
            Detection::Detected(Protocol::Tls(Alpn::Absent)) => strict,
            _ => false,
        };
        if mesh {
            let (tls, peer) = self
                .handshake(Rewind::new(prefix.freeze(), io), client)
                .await?;
            return Some(Identified::Mesh {
                tls,
                peer,
                activity,
            });
        }
        if detected == Detection::Closed {
            return None;
        }
        // Not mesh TLS: the client has no proxy (or is the kubelet). On a
        // strict port only the kubelet's probes may get further, and the
        // authorization decision lets nothing else through.
        if !admits_plaintext(&self.enforcer.policy().borrow(), app_addr.port()) {
            self.metrics
                .connection_error(DIRECTION, ConnError::PlaintextRefused);
            tracing::debug!(%client, "Refused a connection without mesh TLS (strict mode)");
            return None;
        }
        Some(Identified::Plaintext {
            io,
            prefix,
            detected,
            activity,
        })
    }

    /// The server side of the mesh mTLS handshake; the peer's identity.
    async fn handshake(
        &self,
        io: Rewind<MeteredIo<TcpStream>>,
        client: SocketAddr,
    ) -> Option<(TlsStream<Rewind<MeteredIo<TcpStream>>>, SpiffeId)> {
        let Some(mesh) = self.tls.borrow().clone() else {
            self.metrics
                .handshake_failed(DIRECTION, HandshakeFailure::NoIdentity);
            return None;
        };
        let accept = TlsAcceptor::from(mesh.server_config()).accept(io);
        let tls = match tokio::time::timeout(self.limits.handshake_timeout, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                let reason = handshake_failure_reason(&error);
                self.metrics
                    .handshake_failed(DIRECTION, HandshakeFailure::Tls(reason));
                tracing::debug!(%client, reason, %error, "Inbound mTLS handshake failed");
                return None;
            }
            Err(_) => {
                self.metrics
                    .handshake_failed(DIRECTION, HandshakeFailure::Timeout);
                return None;
            }
        };
        let (peer, group) = {
            let (_, session) = tls.get_ref();
            let peer = session
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|leaf| mesh.client_id(leaf));
            (peer, negotiated_group(session))
        };
        let Some(peer) = peer else {
            self.metrics
                .handshake_failed(DIRECTION, HandshakeFailure::UnknownPeer);
            return None;
        };
        self.metrics.handshake_ok(DIRECTION, group);
        Some((tls, peer))
    }

    /// A client without mesh TLS: within the plaintext share, forwarded
    /// by what detection found.
    #[allow(clippy::too_many_arguments)]
    async fn serve_plaintext(
        &self,
        mut io: MeteredIo<TcpStream>,
        prefix: BytesMut,
        detected: Detection,
        client: SocketAddr,
        app_addr: SocketAddr,
        activity: Arc<Activity>,
        drain: Watch,
    ) {
        let Ok(_plaintext) = self.plaintext.clone().try_acquire_owned() else {
            self.metrics
                .connection_error(DIRECTION, ConnError::PlaintextAtCapacity);
            tracing::debug!(%client, "The plaintext share of the listener is full; closing");
            return;
        };
        if matches!(detected, Detection::Silent | Detection::Stalled(_)) {
            self.metrics.detect_timeout(DIRECTION);
        }
        let tls = TlsStatus::NoTls(NoTlsReason::NotProvidedByRemote);
        let mut conn = self.metrics.connection(DIRECTION, &tls);
        io.set_counters(conn.bytes());
        // An opaque port relays whatever came.
        let next = if self.is_opaque(app_addr) {
            Next::Relay
        } else {
            match detected.next() {
                Some(next) => next,
                None => return,
            }
        };
        let caller = Caller {
            peer: None,
            source: client.ip(),
            port: app_addr.port(),
        };
        let connection = Connection {
            tls,
            caller,
            app_addr,
            activity,
            drain,
        };
        conn.set_result(self.forward(io, prefix, next, connection).await);
    }

    /// A peer proxy's connection after the handshake: its own protocol
    /// detection, then forwarding.
    async fn serve_mesh(
        &self,
        mut tls: TlsStream<Rewind<MeteredIo<TcpStream>>>,
        peer: SpiffeId,
        client: SocketAddr,
        app_addr: SocketAddr,
        activity: Arc<Activity>,
        drain: Watch,
    ) {
        let caller = Caller {
            peer: Some(peer.clone()),
            source: client.ip(),
            port: app_addr.port(),
        };
        let status = TlsStatus::Mtls(peer);
        let mut conn = self.metrics.connection(DIRECTION, &status);
        tls.get_mut().0.get_mut().set_counters(conn.bytes());

        let mut prefix = BytesMut::new();
        let detection = app_protocol(
            &mut tls,
            &mut prefix,
            self.is_opaque(app_addr),
            deadline_after(self.limits.detect_timeout),
            MAX_DETECT_BYTES,
            || self.metrics.detect_timeout(DIRECTION),
        )
        .await;
        let Some(next) = detection.next() else {
            return;
        };
        let connection = Connection {
            tls: status,
            caller,
            app_addr,
            activity,
            drain,
        };
        conn.set_result(self.forward(tls, prefix, next, connection).await);
    }

    fn is_opaque(&self, app_addr: SocketAddr) -> bool {
        self.protocol == ProtocolMode::Opaque || self.opaque_ports.contains(&app_addr.port())
    }

    /// Serves, relays or refuses the connection as `next` says.
    async fn forward<I>(
        &self,
        mut io: I,
        prefix: BytesMut,
        next: Next,
        connection: Connection,
    ) -> ConnOutcome
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        match next {
            Next::Serve(version) => {
                self.serve_http(Rewind::new(prefix.freeze(), io), version, connection)
                    .await
            }
            Next::Refuse => {
                self.metrics
                    .connection_error(DIRECTION, ConnError::MalformedHttp);
                refuse_malformed(&mut io).await;
                ConnOutcome::Refused
            }
            Next::Relay | Next::RelayWatchingTheWord | Next::AwaitFirstWord => {
                self.relay(io, prefix, next, connection).await
            }
        }
    }

    async fn serve_http<I>(&self, io: I, version: Version, c: Connection) -> ConnOutcome
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.metrics.protocol(DIRECTION, Some(version));
        let side = Side::inbound(
            c.tls,
            self.enforcer.clone(),
            c.caller,
            self.limits.max_request_body,
        );
        self.http
            .serve(
                io,
                version,
                Target::Fixed(Upstream::unvouched(c.app_addr)),
                side,
                c.activity,
                &c.drain,
            )
            .await
    }

    /// Opaque: judged now, and again at every policy change. A client
    /// that was silent is watched until someone speaks first.
    async fn relay<I>(
        &self,
        mut io: I,
        mut prefix: BytesMut,
        next: Next,
        c: Connection,
    ) -> ConnOutcome
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        if self.enforcer.check_tcp(&c.caller).is_err() {
            return ConnOutcome::Denied;
        }
        let mut upstream = match self.app.connect(&Upstream::unvouched(c.app_addr)).await {
            Ok(upstream) => upstream.io,
            Err(error) => {
                self.metrics.connection_error(DIRECTION, error.reason());
                tracing::debug!(app_addr = %c.app_addr, %error, "Cannot reach the application");
                return ConnOutcome::Error;
            }
        };
        let mut banner = Bytes::new();
        let mut next = next;
        if next == Next::AwaitFirstWord {
            let word = first_word(
                &mut io,
                &mut prefix,
                &mut upstream,
                self.limits.detect_timeout,
                MAX_DETECT_BYTES,
                &c.activity,
                self.limits.idle_timeout,
            )
            .await;
            match word {
                FirstWord::Server(said) => banner = said,
                FirstWord::Client(detection) => match detection.next() {
                    Some(relay @ (Next::Relay | Next::RelayWatchingTheWord)) => next = relay,
                    Some(serve_or_refuse) => {
                        // A request after all: the application connection
                        // goes, and it is served (or refused) as any.
                        drop(upstream);
                        return Box::pin(self.forward(io, prefix, serve_or_refuse, c)).await;
                    }
                    None => return ConnOutcome::Ok,
                },
                FirstWord::Ended => return ConnOutcome::Ok,
            }
        }
        self.metrics.protocol(DIRECTION, None);
        let word = (next == Next::RelayWatchingTheWord).then_some(prefix.len());
        let watched = WatchedWord::new(io, word);
        let upstream = Rewind::new(banner, watched.server(upstream));
        let downstream = Rewind::new(prefix.freeze(), watched);
        tokio::select! {
            result = super::tcp::relay(downstream, upstream, &c.activity, self.limits.idle_timeout) => result,
            _ = self.enforcer.denied_later(&c.caller) => ConnOutcome::Terminated,
        }
    }
}

/// What is known about one inbound connection once its TLS is settled.
struct Connection {
    tls: TlsStatus,
    caller: Caller,
    app_addr: SocketAddr,
    activity: Arc<Activity>,
    drain: Watch,
}
