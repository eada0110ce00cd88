//! How connections end and why they fail, as closed sets: the only place
//! the data plane's outcome and error labels are spelled.
//!
//! Metrics take these types, never strings, so a label value that
//! `docs/metrics.md` does not list cannot be written.

/// How a downstream connection ended: `tcp_close_total{result}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnOutcome {
    /// Both sides closed normally.
    Ok,
    /// An I/O or protocol error ended it.
    Error,
    /// Nothing moved for the idle timeout.
    IdleTimeout,
    /// An HTTP/1 connection's first request head did not arrive within
    /// `limits.request_head_timeout`.
    HeadTimeout,
    /// The proxy was draining and closed it after its in-flight requests.
    Drained,
    /// Authorization refused it when it started.
    Denied,
    /// A policy update denied it while it was open.
    Terminated,
    /// Shaped like HTTP but not a request the proxy serves: answered 400
    /// and closed.
    Refused,
}

impl ConnOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::Error => "error",
            Self::IdleTimeout => "idle_timeout",
            Self::HeadTimeout => "head_timeout",
            Self::Drained => "drained",
            Self::Denied => "denied",
            Self::Terminated => "terminated",
            Self::Refused => "refused",
        }
    }
}

/// Why a connection was refused or an upstream could not be used:
/// `connection_errors_total{reason}`, and the `x-outrider-error` header of
/// the response the proxy writes instead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnError {
    /// `accept` failed (out of file descriptors and the like).
    AcceptFailed,
    /// The listener's connection limit was reached.
    MaxConnections,
    /// The listener was full; this connection, the longest silent one
    /// waiting for its client's first bytes, was closed to make room.
    EvictedSilent,
    /// One source address already holds its share of connections still in
    /// detection or the mTLS handshake.
    UnverifiedAtCapacity,
    /// The plaintext share of the inbound listener is taken.
    PlaintextAtCapacity,
    /// The listener was full and a newcomer took the place of this
    /// connection, the longest still in detection or its handshake.
    EvictedUnidentified,
    /// Sent straight to the proxy's own port rather than redirected to it.
    LoopDetected,
    /// Plaintext on a port whose mTLS mode is STRICT.
    PlaintextRefused,
    ConnectTimeout,
    ConnectRefused,
    ConnectFailed,
    /// Discovery knows the destination, and it has no endpoint.
    NoEndpoints,
    /// Discovery says the destination has no proxy, and mTLS is strict.
    DestinationUnmeshed,
    /// The upstream's mTLS handshake failed or it spoke another protocol.
    UpstreamTlsFailed,
    /// No workload identity is loaded yet.
    NoIdentity,
    /// The upstream broke the HTTP exchange.
    UpstreamHttpError,
    /// Bytes shaped like an HTTP request that is not one we serve.
    MalformedHttp,
}

impl ConnError {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AcceptFailed => "accept_failed",
            Self::MaxConnections => "max_connections",
            Self::EvictedSilent => "evicted_silent",
            Self::UnverifiedAtCapacity => "unverified_at_capacity",
            Self::PlaintextAtCapacity => "plaintext_at_capacity",
            Self::EvictedUnidentified => "evicted_unidentified",
            Self::LoopDetected => "loop_detected",
            Self::PlaintextRefused => "plaintext_refused",
            Self::ConnectTimeout => "connect_timeout",
            Self::ConnectRefused => "connect_refused",
            Self::ConnectFailed => "connect_error",
            Self::NoEndpoints => "no_endpoints",
            Self::DestinationUnmeshed => "destination_unmeshed",
            Self::UpstreamTlsFailed => "upstream_tls_failed",
            Self::NoIdentity => "no_identity",
            Self::UpstreamHttpError => "upstream_http_error",
            Self::MalformedHttp => "malformed_http",
        }
    }
}

/// Why a mesh handshake failed: `tls_handshake_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeFailure {
    /// No workload identity is loaded yet, so there is nothing to present.
    NoIdentity,
    /// The handshake did not finish within the handshake timeout.
    Timeout,
    /// The chain verified but its leaf names no SPIFFE ID we can use.
    UnknownPeer,
    /// The server did not select the mesh ALPN.
    AlpnMismatch,
    /// As rustls or the socket reported it ([`crate::tls::handshake_failure_reason`]).
    Tls(&'static str),
}

impl HandshakeFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoIdentity => "no_identity",
            Self::Timeout => "timeout",
            Self::UnknownPeer => "unknown_peer",
            Self::AlpnMismatch => "alpn_mismatch",
            Self::Tls(reason) => reason,
        }
    }
}

/// Which authorization check a decision answers: `authz_decisions_total{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthzKind {
    /// An opaque connection, judged when it starts and on policy changes.
    Tcp,
    /// One HTTP request.
    Http,
}

impl AuthzKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Http => "http",
        }
    }
}

/// gRPC status codes the proxy answers with (trailers-only responses), so
/// gRPC clients see a status rather than an HTTP error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrpcStatus {
    PermissionDenied,
    ResourceExhausted,
    Internal,
    Unavailable,
    Unauthenticated,
}

impl GrpcStatus {
    pub fn code(self) -> u16 {
        match self {
            Self::PermissionDenied => 7,
            Self::ResourceExhausted => 8,
            Self::Internal => 13,
            Self::Unavailable => 14,
            Self::Unauthenticated => 16,
        }
    }
}
