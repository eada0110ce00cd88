//! Direct mTLS probes against an inbound listener: which certificate does
//! it serve now, and does it refuse a given client?

use std::net::SocketAddr;
use std::sync::Arc;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::identity::svid::parse_leaf;
use crate::identity::{Credentials, SvidLeaf};
use crate::tls::{MeshTls, PeerExpectation, TlsSettings};

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("TLS configuration: {0}")]
    Tls(#[from] crate::tls::Error),
    #[error("the server presented no certificate")]
    NoCertificate,
    #[error("the server's certificate is not an SVID: {0}")]
    NotSvid(#[from] crate::identity::SvidError),
}

/// A mesh handshake with `addr` presenting `client`'s identity, accepting
/// any server of the same trust domain.
async fn connect_as(
    addr: SocketAddr,
    client: Arc<Credentials>,
    settings: &TlsSettings,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ProbeError> {
    let td = client.id().trust_domain();
    let mesh = MeshTls::new(client, settings)?;
    let config = mesh.client_config(&PeerExpectation::TrustDomain(td))?;
    let tcp = TcpStream::connect(addr).await?;
    Ok(TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await?)
}

/// Performs a mesh handshake as `client` and returns the leaf the server
/// presented.
pub async fn served_leaf(
    addr: SocketAddr,
    client: Arc<Credentials>,
    settings: &TlsSettings,
) -> Result<SvidLeaf, ProbeError> {
    let tls = connect_as(addr, client, settings).await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or(ProbeError::NoCertificate)?;
    Ok(parse_leaf(leaf)?)
}

/// Connects as `client`, sends an HTTP request, and reports whether the
/// server answered (`Ok(true)`) or tore the connection down (`Ok(false)`).
pub async fn is_served(
    addr: SocketAddr,
    client: Arc<Credentials>,
    settings: &TlsSettings,
) -> Result<bool, ProbeError> {
    // In TLS 1.3 the client finishes its side of the handshake before the
    // server has judged the client certificate; a refusal shows up on the
    // first read.
    let Ok(mut tls) = connect_as(addr, client, settings).await else {
        return Ok(false);
    };
    if tls
        .write_all(b"GET / HTTP/1.1\r\nhost: probe\r\nconnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return Ok(false);
    }
    let mut reply = Vec::new();
    let _ = tls.read_to_end(&mut reply).await;
    Ok(reply.starts_with(b"HTTP/1.1"))
}
