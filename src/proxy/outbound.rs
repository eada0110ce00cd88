//! The outbound side: connections the local application opens.
//!
//! The destination is the static peer of the route or the address the
//! application dialled. HTTP is served through hyper and forwarded over
//! pooled mTLS connections; everything else (and every configured opaque
//! port, without waiting for the client to speak) gets an mTLS connection
//! of its own and is relayed as bytes.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::net::TcpStream;

use super::connect::{ExpectedPeer, MeshConnector};
use super::detect::{Detection, Protocol, read_and_classify};
use super::http::HttpServer;
use super::inbound::protocol_label;
use super::io::{Activity, MeteredIo, Rewind};
use super::metrics::{Direction, Metrics};
use super::orig_dst::original_dst;
use super::pool::{Pool, Version};
use super::{
    Error, Handler, Limits, Listener, MAX_DETECT_BYTES, OutboundConfig, OutboundTarget,
    ProtocolMode, ProxyConfig, TlsRx, bind, http_server,
};
use crate::lifecycle::Watch;

const DIRECTION: Direction = Direction::Outbound;

pub struct Shared {
    local: SocketAddr,
    target: OutboundTarget,
    protocol: ProtocolMode,
    opaque_ports: BTreeSet<u16>,
    limits: Limits,
    http: HttpServer,
    metrics: Metrics,
    connector: Arc<MeshConnector>,
}

/// Binds the outbound listener.
pub async fn listener(
    config: &OutboundConfig,
    proxy: &ProxyConfig,
    tls: TlsRx,
    metrics: Metrics,
) -> Result<Listener<Shared>, Error> {
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
    let pool = Pool::new(
        connector.clone(),
        limits.peer_pool_idle_timeout,
        limits.pool_max_idle_per_destination,
    );
    Ok(Listener::new(
        listener,
        local,
        DIRECTION,
        limits.max_connections,
        metrics.clone(),
        Shared {
            local,
            target: config.target.clone(),
            protocol: config.protocol,
            opaque_ports: proxy.opaque_ports.clone(),
            http: http_server(DIRECTION, pool, metrics.clone(), &limits),
            limits,
            metrics,
            connector,
        },
    ))
}

impl Handler for Shared {
    async fn handle(self: Arc<Self>, stream: TcpStream, _client: SocketAddr, drain: Watch) {
        self.serve(stream, drain).await
    }
}

impl Shared {
    async fn serve(&self, stream: TcpStream, drain: Watch) {
        let dst = match &self.target {
            OutboundTarget::Peer { addr, .. } => *addr,
            OutboundTarget::OriginalDst => match original_dst(&stream) {
                Ok(addr) => addr,
                Err(_) => return,
            },
        };
        if dst == self.local {
            self.metrics.connection_error(DIRECTION, "loop_detected");
            return;
        }
        let _open = self.metrics.accepted(DIRECTION);
        let activity = Activity::new();
        let mut io = MeteredIo::new(stream, activity.clone());
        let mut prefix = BytesMut::new();

        let protocol =
            if self.protocol == ProtocolMode::Opaque || self.opaque_ports.contains(&dst.port()) {
                // Server-speaks-first protocols live here: connect at once.
                Protocol::Unknown
            } else {
                match read_and_classify(
                    &mut io,
                    &mut prefix,
                    self.limits.detect_timeout,
                    MAX_DETECT_BYTES,
                )
                .await
                {
                    Ok(Detection::Detected(p)) => p,
                    Ok(Detection::TimedOut) => {
                        self.metrics.detect_timeout(DIRECTION);
                        Protocol::Unknown
                    }
                    Ok(Detection::Closed) | Err(_) => return,
                }
            };
        let io = Rewind::new(prefix.freeze(), io);
        let version = match protocol {
            Protocol::Http1 => Some(Version::Http1),
            Protocol::Http2 => Some(Version::Http2),
            _ => None,
        };
        self.metrics.protocol(DIRECTION, protocol_label(version));

        if let Some(version) = version {
            self.http
                .serve(io, version, dst, None, activity, &drain)
                .await;
            return;
        }

        // The application's own TLS stays end-to-end encrypted even if the
        // destination turns out to have no proxy.
        let app_tls = matches!(protocol, Protocol::Tls(_));
        let upstream = match self.connector.connect_to(dst, app_tls).await {
            Ok(upstream) => upstream,
            Err(error) => {
                self.metrics.connection_error(DIRECTION, error.reason());
                tracing::debug!(%dst, %error, "Outbound connection failed");
                return;
            }
        };
        let mut conn = upstream.metrics;
        let result = super::tcp::relay(io, upstream.io, &activity, self.limits.idle_timeout).await;
        if let Some(conn) = conn.as_mut() {
            conn.set_result(result);
        }
    }
}
