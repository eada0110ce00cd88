//! rustls for the mesh: configurations built from the current credentials,
//! SPIFFE verifiers, and the classification of handshake failures.
//!
//! Depends only on `identity`. Knows nothing about sockets beyond the error
//! types tokio-rustls hands back.

mod config;
mod verify;

use std::io;

pub use config::{KxGroup, MeshTls, TlsSettings};
pub use verify::{ClientVerifier, PeerExpectation, ServerVerifier};

use crate::identity::SvidError;

/// The ALPN protocol id that marks a connection as mesh traffic.
pub const MESH_ALPN: &[u8] = b"outrider/1";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid TLS configuration: {0}")]
    Config(rustls::Error),
    #[error("no key-exchange group configured")]
    NoKeyExchange,
}

/// The key-exchange group a completed handshake agreed on.
pub fn negotiated_group(session: &rustls::CommonState) -> Option<KxGroup> {
    session
        .negotiated_key_exchange_group()
        .and_then(|group| KxGroup::negotiated(group.name()))
}

/// A bounded label saying why a handshake failed, for
/// `tls_handshake_failures_total{reason}` and logs.
pub fn handshake_failure_reason(error: &io::Error) -> &'static str {
    if let Some(tls) = error
        .get_ref()
        .and_then(|e| e.downcast_ref::<rustls::Error>())
    {
        return rustls_reason(tls);
    }
    match error.kind() {
        io::ErrorKind::UnexpectedEof => "peer_closed",
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => "peer_reset",
        io::ErrorKind::TimedOut => "timeout",
        io::ErrorKind::InvalidData => "protocol_error",
        _ => "io_error",
    }
}

fn rustls_reason(error: &rustls::Error) -> &'static str {
    use rustls::CertificateError as C;
    match error {
        rustls::Error::InvalidCertificate(cert) => match cert {
            C::Expired | C::ExpiredContext { .. } => "expired",
            C::NotValidYet | C::NotValidYetContext { .. } => "not_yet_valid",
            C::UnknownIssuer => "unknown_ca",
            C::BadEncoding => "malformed_certificate",
            C::Other(other) => other
                .0
                .downcast_ref::<SvidError>()
                .map_or("invalid_certificate", SvidError::reason),
            _ => "invalid_certificate",
        },
        rustls::Error::NoCertificatesPresented => "no_client_cert",
        rustls::Error::AlertReceived(_) => "peer_alert",
        rustls::Error::NoApplicationProtocol => "alpn_mismatch",
        rustls::Error::PeerIncompatible(_) => "incompatible",
        rustls::Error::InvalidMessage(_)
        | rustls::Error::InappropriateMessage { .. }
        | rustls::Error::InappropriateHandshakeMessage { .. }
        | rustls::Error::PeerMisbehaved(_) => "protocol_error",
        _ => "tls_error",
    }
}

#[cfg(test)]
mod tests;
