//! Opening upstream connections: mTLS to a peer proxy (with the permissive
//! plaintext fallback for destinations that have none), or plaintext to
//! the local application.
//!
//! What is known about a destination before connecting travels with its
//! address as an [`Upstream`]: discovery's word (this exact identity, or
//! no proxy at all) is final, and only a destination nobody vouched for
//! is probed for the permissive fallback.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::io::{Activity, MeteredIo, UpstreamIo};
use super::metrics::{ConnMetrics, Direction, Metrics};
use super::outcome::{ConnError, HandshakeFailure};
use super::tls_status::{NoTlsReason, TlsStatus};
use super::{MtlsMode, TlsRx};
use crate::identity::SpiffeId;
use crate::tls::{MESH_ALPN, PeerExpectation, handshake_failure_reason, negotiated_group};

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connecting to {addr} timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("cannot connect to {addr}: {source}")]
    Io { addr: SocketAddr, source: io::Error },
    #[error("mTLS handshake with {addr} failed: {}", reason.as_str())]
    Handshake {
        addr: SocketAddr,
        reason: HandshakeFailure,
    },
    #[error("{addr} did not negotiate the mesh protocol")]
    NotMeshProtocol { addr: SocketAddr },
    #[error("no workload identity is loaded yet")]
    NoIdentity,
    #[error("{addr} has no proxy and mTLS is strict")]
    UnmeshedInStrictMode { addr: SocketAddr },
}

impl ConnectError {
    /// What `connection_errors_total{reason}` and the `x-outrider-error`
    /// response header say about it.
    pub fn reason(&self) -> ConnError {
        match self {
            Self::Timeout { .. } => ConnError::ConnectTimeout,
            Self::Io { source, .. } if source.kind() == io::ErrorKind::ConnectionRefused => {
                ConnError::ConnectRefused
            }
            Self::Io { .. } => ConnError::ConnectFailed,
            Self::Handshake { .. } | Self::NotMeshProtocol { .. } => ConnError::UpstreamTlsFailed,
            Self::NoIdentity => ConnError::NoIdentity,
            Self::UnmeshedInStrictMode { .. } => ConnError::DestinationUnmeshed,
        }
    }
}

/// An upstream connection, its TLS status, and the metrics that count its
/// close when the connection is dropped.
pub struct Connected {
    pub io: UpstreamIo,
    pub tls: TlsStatus,
    pub metrics: Option<ConnMetrics>,
}

/// An address to connect to and what must answer there. Pooled
/// connections are keyed by all of it, so a connection made under one
/// expectation never serves a request made under another.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Upstream {
    pub addr: SocketAddr,
    pub peer: PeerKnown,
}

/// What is known about the proxy at an upstream address before
/// connecting.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerKnown {
    /// Nothing: the listener's route decides (its static peer identity,
    /// or any identity of the trust domain with the permissive fallback
    /// found by probing).
    Unvouched,
    /// Discovery names the pod's identity: mTLS to exactly it, never
    /// plaintext whatever the network answers. Shared: every request's
    /// upstream carries it.
    Mesh(std::sync::Arc<SpiffeId>),
    /// Discovery says the pod has no proxy: plaintext at once in
    /// permissive mode, refused in strict mode.
    NoProxy,
}

impl Upstream {
    /// An address nothing vouched for.
    pub fn unvouched(addr: SocketAddr) -> Self {
        Self {
            addr,
            peer: PeerKnown::Unvouched,
        }
    }
}

/// Something that opens upstream connections to an address.
pub trait Connect: Send + Sync + 'static {
    fn connect<'a>(
        &'a self,
        dst: &'a Upstream,
    ) -> Pin<Box<dyn Future<Output = Result<Connected, ConnectError>> + Send + 'a>>;

    /// True when connections to `dst` are known to be plaintext to a
    /// server without a proxy (so HTTP/1 must stay HTTP/1).
    fn known_plaintext(&self, _dst: &Upstream) -> bool {
        false
    }
}

async fn connect_tcp(dst: SocketAddr, timeout: Duration) -> Result<TcpStream, ConnectError> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(dst))
        .await
        .map_err(|_| ConnectError::Timeout { addr: dst, timeout })?
        .map_err(|source| ConnectError::Io { addr: dst, source })?;
    let _ = stream.set_nodelay(true);
    Ok(stream)
}

// === AppConnector ===

/// Plaintext connections to the local application (inbound).
pub struct AppConnector {
    pub connect_timeout: Duration,
}

impl Connect for AppConnector {
    fn connect<'a>(
        &'a self,
        dst: &'a Upstream,
    ) -> Pin<Box<dyn Future<Output = Result<Connected, ConnectError>> + Send + 'a>> {
        Box::pin(async move {
            let stream = connect_tcp(dst.addr, self.connect_timeout).await?;
            Ok(Connected {
                io: UpstreamIo::Plain(MeteredIo::new(stream, Activity::new())),
                tls: TlsStatus::NoTls(NoTlsReason::NotProvidedByRemote),
                metrics: None,
            })
        })
    }
}

// === MeshConnector ===

/// Whom an outbound route expects at the other end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExpectedPeer {
    /// Any workload of our own trust domain.
    SameTrustDomain,
    /// Exactly this workload; such a route never falls back to plaintext.
    Id(SpiffeId),
}

/// mTLS connections to peer proxies (outbound).
pub struct MeshConnector {
    pub tls: TlsRx,
    pub expected: ExpectedPeer,
    pub mode: MtlsMode,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub fallback_ttl: Duration,
    pub metrics: Metrics,
    /// Destinations found to have no proxy, until when.
    unmeshed: Mutex<HashMap<SocketAddr, Instant>>,
}

/// Why a handshake failed, as far as the fallback decision cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PeerKind {
    /// Not speaking TLS at all: a plaintext server without a proxy.
    NotTls,
    /// A TLS server that is not a mesh proxy (rejected our ALPN or showed
    /// a certificate that is not one of ours).
    ForeignTls,
    /// Anything else (timeouts, resets mid-handshake): no conclusion.
    Unknown,
}

fn peer_kind(error: &io::Error) -> PeerKind {
    if let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return match tls {
            rustls::Error::InvalidMessage(_) => PeerKind::NotTls,
            rustls::Error::AlertReceived(_)
            | rustls::Error::NoApplicationProtocol
            | rustls::Error::InvalidCertificate(_)
            | rustls::Error::PeerIncompatible(_) => PeerKind::ForeignTls,
            _ => PeerKind::Unknown,
        };
    }
    match error.kind() {
        // A plaintext server that reads our ClientHello as a bad request
        // and hangs up.
        io::ErrorKind::UnexpectedEof | io::ErrorKind::ConnectionReset => PeerKind::NotTls,
        _ => PeerKind::Unknown,
    }
}

impl MeshConnector {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        tls: TlsRx,
        expected: ExpectedPeer,
        mode: MtlsMode,
        connect_timeout: Duration,
        handshake_timeout: Duration,
        fallback_ttl: Duration,
        metrics: Metrics,
    ) -> Self {
        Self {
            tls,
            expected,
            mode,
            connect_timeout,
            handshake_timeout,
            fallback_ttl,
            metrics,
            unmeshed: Mutex::new(HashMap::new()),
        }
    }

    /// Opens a connection to `upstream`. `app_tls` says the application's
    /// own bytes are TLS, so relaying them without our mTLS exposes
    /// nothing.
    pub async fn connect_to(
        &self,
        upstream: &Upstream,
        app_tls: bool,
    ) -> Result<Connected, ConnectError> {
        let dst = upstream.addr;
        match &upstream.peer {
            PeerKnown::NoProxy if self.mode == MtlsMode::Permissive => {
                return self.plaintext(dst, false).await;
            }
            PeerKnown::NoProxy => {
                return Err(ConnectError::UnmeshedInStrictMode { addr: dst });
            }
            PeerKnown::Unvouched if self.may_fall_back() && self.known_unmeshed(dst) => {
                return self.plaintext(dst, true).await;
            }
            PeerKnown::Unvouched | PeerKnown::Mesh(_) => {}
        }
        let mesh = self.tls.borrow().clone().ok_or(ConnectError::NoIdentity)?;
        let expectation = match (&upstream.peer, &self.expected) {
            (PeerKnown::Mesh(id), _) => PeerExpectation::Id(SpiffeId::clone(id)),
            (_, ExpectedPeer::Id(id)) => PeerExpectation::Id(id.clone()),
            (_, ExpectedPeer::SameTrustDomain) => {
                PeerExpectation::TrustDomain(mesh.credentials().id().trust_domain())
            }
        };
        let config = mesh
            .client_config(&expectation)
            .map_err(|_| ConnectError::NoIdentity)?;
        let stream = connect_tcp(dst, self.connect_timeout).await?;
        let activity = Activity::new();
        let handshake = TlsConnector::from(config).connect(
            ServerName::IpAddress(dst.ip().into()),
            MeteredIo::new(stream, activity),
        );
        let error = match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => {
                let (_, session) = tls.get_ref();
                if session.alpn_protocol() != Some(MESH_ALPN) {
                    self.metrics
                        .handshake_failed(Direction::Outbound, HandshakeFailure::AlpnMismatch);
                    return Err(ConnectError::NotMeshProtocol { addr: dst });
                }
                let server_id = session
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|leaf| mesh.server_id(&expectation, leaf));
                let Some(server_id) = server_id else {
                    // The verifier accepted a chain whose leaf it cannot
                    // name: refuse rather than guess.
                    self.metrics
                        .handshake_failed(Direction::Outbound, HandshakeFailure::UnknownPeer);
                    return Err(ConnectError::Handshake {
                        addr: dst,
                        reason: HandshakeFailure::UnknownPeer,
                    });
                };
                self.metrics
                    .handshake_ok(Direction::Outbound, negotiated_group(session));
                let status = TlsStatus::Mtls(server_id);
                let mut tls = Box::new(tls);
                let metrics = self.metrics.connection(Direction::Outbound, &status);
                tls.get_mut().0.set_counters(metrics.bytes());
                return Ok(Connected {
                    io: UpstreamIo::Tls(tls),
                    tls: status,
                    metrics: Some(metrics),
                });
            }
            Ok(Err(error)) => error,
            Err(_elapsed) => io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"),
        };
        let reason = HandshakeFailure::Tls(handshake_failure_reason(&error));
        self.metrics.handshake_failed(Direction::Outbound, reason);
        let kind = peer_kind(&error);
        // Only a destination nobody vouched for is judged by what the
        // network answers: a forged reset must not turn off mTLS to a pod
        // discovery knows is meshed.
        let fall_back = upstream.peer == PeerKnown::Unvouched
            && self.may_fall_back()
            && (kind == PeerKind::NotTls || (kind == PeerKind::ForeignTls && app_tls));
        if fall_back {
            tracing::info!(%dst, reason = reason.as_str(), "Destination has no proxy; sending plaintext (permissive mode)");
            self.remember_unmeshed(dst);
            return self.plaintext(dst, true).await;
        }
        tracing::debug!(%dst, reason = reason.as_str(), %error, "Outbound mTLS handshake failed");
        Err(ConnectError::Handshake { addr: dst, reason })
    }

    fn may_fall_back(&self) -> bool {
        self.mode == MtlsMode::Permissive && self.expected == ExpectedPeer::SameTrustDomain
    }

    fn known_unmeshed(&self, dst: SocketAddr) -> bool {
        let mut unmeshed = self.unmeshed.lock();
        match unmeshed.get(&dst) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                unmeshed.remove(&dst);
                false
            }
            None => false,
        }
    }

    fn remember_unmeshed(&self, dst: SocketAddr) {
        let mut unmeshed = self.unmeshed.lock();
        // Bounded: forget everything rather than grow without limit.
        if unmeshed.len() >= 4096 {
            unmeshed.clear();
        }
        unmeshed.insert(dst, Instant::now() + self.fallback_ttl);
    }

    /// A plaintext connection to a destination without a proxy; `probed`
    /// says the fallback was concluded from a failed handshake rather
    /// than from discovery.
    async fn plaintext(&self, dst: SocketAddr, probed: bool) -> Result<Connected, ConnectError> {
        let stream = connect_tcp(dst, self.connect_timeout).await?;
        if probed {
            self.metrics.plaintext_fallback();
        }
        let status = TlsStatus::NoTls(NoTlsReason::PeerNotMeshed);
        let metrics = self.metrics.connection(Direction::Outbound, &status);
        let mut io = MeteredIo::new(stream, Activity::new());
        io.set_counters(metrics.bytes());
        Ok(Connected {
            io: UpstreamIo::Plain(io),
            tls: status,
            metrics: Some(metrics),
        })
    }
}

impl Connect for MeshConnector {
    fn connect<'a>(
        &'a self,
        dst: &'a Upstream,
    ) -> Pin<Box<dyn Future<Output = Result<Connected, ConnectError>> + Send + 'a>> {
        Box::pin(self.connect_to(dst, false))
    }

    fn known_plaintext(&self, dst: &Upstream) -> bool {
        match dst.peer {
            PeerKnown::NoProxy => self.mode == MtlsMode::Permissive,
            PeerKnown::Mesh(_) => false,
            PeerKnown::Unvouched => self.may_fall_back() && self.known_unmeshed(dst.addr),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_error(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn a_plaintext_reply_means_the_destination_has_no_proxy() {
        let e = tls_error(rustls::Error::InvalidMessage(
            rustls::InvalidMessage::InvalidContentType,
        ));
        assert_eq!(peer_kind(&e), PeerKind::NotTls);
        assert_eq!(
            peer_kind(&io::Error::from(io::ErrorKind::UnexpectedEof)),
            PeerKind::NotTls
        );
    }

    #[test]
    fn an_untrusted_certificate_means_a_foreign_tls_server() {
        let e = tls_error(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        assert_eq!(peer_kind(&e), PeerKind::ForeignTls);
        let e = tls_error(rustls::Error::AlertReceived(
            rustls::AlertDescription::NoApplicationProtocol,
        ));
        assert_eq!(peer_kind(&e), PeerKind::ForeignTls);
    }

    /// A connector for `shop/client` in `mode`, its metrics' registry.
    fn connector(mode: MtlsMode) -> (MeshConnector, prometheus::Registry) {
        use crate::test_util::certs::TestCa;
        use crate::tls::{KxGroup, MeshTls, TlsSettings};
        let credentials = TestCa::new("cluster.local").credentials("shop", "client");
        let settings = TlsSettings {
            clock_skew: Duration::from_secs(60),
            resumption: false,
            key_exchange: vec![KxGroup::X25519],
        };
        let mesh = MeshTls::new(std::sync::Arc::new(credentials), &settings).unwrap();
        let (_tx, tls) = tokio::sync::watch::channel(Some(std::sync::Arc::new(mesh)));
        let registry = prometheus::Registry::new();
        let metrics = Metrics::new(&registry).unwrap();
        let connector = MeshConnector::new(
            tls,
            ExpectedPeer::SameTrustDomain,
            mode,
            Duration::from_secs(1),
            Duration::from_secs(1),
            Duration::from_secs(60),
            metrics,
        );
        (connector, registry)
    }

    /// A plaintext server that reads what comes and hangs up, as an app
    /// without a proxy answers a ClientHello (or an on-path attacker's
    /// reset would look).
    async fn plaintext_server() -> (SocketAddr, tokio::sync::mpsc::Receiver<Vec<u8>>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut first = vec![0u8; 64];
                let n = tokio::time::timeout(
                    Duration::from_millis(200),
                    tokio::io::AsyncReadExt::read(&mut stream, &mut first),
                )
                .await
                .map_or(0, |r| r.unwrap_or(0));
                first.truncate(n);
                let _ = tx.send(first).await;
            }
        });
        (addr, rx)
    }

    fn counter(registry: &prometheus::Registry, name: &str) -> f64 {
        registry
            .gather()
            .iter()
            .filter(|family| family.name() == name)
            .flat_map(|family| family.get_metric().to_vec())
            .map(|m| m.get_counter().get_value())
            .sum()
    }

    #[tokio::test]
    async fn an_endpoint_discovery_calls_unmeshed_gets_plaintext_at_once_when_permissive() {
        let (connector, registry) = connector(MtlsMode::Permissive);
        let (addr, mut seen) = plaintext_server().await;
        let upstream = Upstream {
            addr,
            peer: PeerKnown::NoProxy,
        };
        let connected = connector.connect_to(&upstream, false).await.unwrap();
        assert_eq!(connected.tls, TlsStatus::NoTls(NoTlsReason::PeerNotMeshed));
        drop(connected);
        // No ClientHello went first: nothing was probed.
        assert_eq!(seen.recv().await.unwrap(), Vec::<u8>::new());
        assert_eq!(
            counter(&registry, "outbound_plaintext_fallbacks_total"),
            0.0
        );
        assert_eq!(counter(&registry, "tls_handshake_failures_total"), 0.0);
    }

    #[tokio::test]
    async fn an_endpoint_discovery_calls_unmeshed_is_refused_when_strict() {
        let (connector, _) = connector(MtlsMode::Strict);
        let (addr, _seen) = plaintext_server().await;
        let upstream = Upstream {
            addr,
            peer: PeerKnown::NoProxy,
        };
        let refused = connector.connect_to(&upstream, false).await;
        assert!(
            matches!(refused, Err(ConnectError::UnmeshedInStrictMode { .. })),
            "{:?}",
            refused.map(|c| c.tls)
        );
    }

    #[tokio::test]
    async fn a_pod_discovery_calls_meshed_is_never_sent_plaintext_whatever_the_network_answers() {
        let (connector, registry) = connector(MtlsMode::Permissive);
        let (addr, mut seen) = plaintext_server().await;
        let meshed = Upstream {
            addr,
            peer: PeerKnown::Mesh(std::sync::Arc::new(
                SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/web").unwrap(),
            )),
        };
        // The handshake meets a hang-up, as a forged reset would make it.
        for _ in 0..3 {
            let result = connector.connect_to(&meshed, false).await;
            assert!(
                matches!(result, Err(ConnectError::Handshake { .. })),
                "{:?}",
                result.map(|c| c.tls)
            );
            let first = seen.recv().await.unwrap();
            assert_eq!(
                first.first(),
                Some(&0x16),
                "a TLS handshake record each time"
            );
        }
        assert_eq!(
            counter(&registry, "outbound_plaintext_fallbacks_total"),
            0.0
        );
        // The same server, unvouched: the permissive fallback, as before.
        let unvouched = Upstream::unvouched(addr);
        let connected = connector.connect_to(&unvouched, false).await.unwrap();
        assert_eq!(connected.tls, TlsStatus::NoTls(NoTlsReason::PeerNotMeshed));
        assert_eq!(
            counter(&registry, "outbound_plaintext_fallbacks_total"),
            1.0
        );
    }

    #[test]
    fn a_timeout_proves_nothing_about_the_destination() {
        assert_eq!(
            peer_kind(&io::Error::from(io::ErrorKind::TimedOut)),
            PeerKind::Unknown
        );
    }
}
