//! Whether a connection is mutually authenticated, and if not, why not.
//!
//! Missing TLS is never a bare `None`: the reason travels with the
//! connection into logs and metric labels, as in Linkerd.

use crate::identity::SpiffeId;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsStatus {
    /// Mesh mTLS with this verified peer.
    Mtls(SpiffeId),
    NoTls(NoTlsReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoTlsReason {
    /// Inbound: the client did not start mesh TLS (it has no proxy, or it
    /// is the kubelet). Allowed in permissive mode only.
    NotProvidedByRemote,
    /// Outbound: the destination has no proxy (permissive fallback).
    PeerNotMeshed,
    /// Outbound: no upstream connection could be made at all.
    NoConnection,
}

impl TlsStatus {
    pub fn label(&self) -> &'static str {
        match self {
            Self::Mtls(_) => "true",
            Self::NoTls(_) => "false",
        }
    }

    pub fn no_tls_reason(&self) -> &'static str {
        match self {
            Self::Mtls(_) => "",
            Self::NoTls(NoTlsReason::NotProvidedByRemote) => "not_provided_by_remote",
            Self::NoTls(NoTlsReason::PeerNotMeshed) => "peer_not_meshed",
            Self::NoTls(NoTlsReason::NoConnection) => "no_connection",
        }
    }

    pub fn peer_id(&self) -> Option<&SpiffeId> {
        match self {
            Self::Mtls(id) => Some(id),
            Self::NoTls(_) => None,
        }
    }

    pub fn peer_id_label(&self) -> &str {
        self.peer_id().map_or("", SpiffeId::as_str)
    }
}
