//! Raw mTLS clients that present any certificate at all, for proving what
//! the proxy refuses.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::ClientConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::identity::{TrustBundle, TrustDomain};
use crate::tls::{MESH_ALPN, PeerExpectation, ServerVerifier};

/// A client that verifies the server properly (against `root_pem`) and
/// presents `chain_pem`/`key_pem`, or no certificate when `None`.
pub fn client_config(root_pem: &str, client: Option<(&str, &str)>) -> Arc<ClientConfig> {
    let provider = Arc::new(crate::crypto::provider());
    let roots = CertificateDer::pem_slice_iter(root_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .expect("root pem");
    let verifier = ServerVerifier::new(
        TrustBundle::new(roots).expect("bundle"),
        PeerExpectation::TrustDomain(TrustDomain::parse("cluster.local").expect("td")),
        Duration::from_secs(60),
        provider.signature_verification_algorithms,
    );
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls13")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match client {
        Some((chain, key)) => {
            let chain = CertificateDer::pem_slice_iter(chain.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .expect("chain pem");
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).expect("key pem");
            builder
                .with_client_auth_cert(chain, key)
                .expect("client cert")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![MESH_ALPN.to_vec()];
    Arc::new(config)
}

/// Sends one HTTP request over mesh TLS with `config`. `Ok(reply)` if the
/// server answered; `Err` if the handshake failed or the server hung up.
pub async fn mesh_request(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let mut tls = TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"GET / HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut reply = Vec::new();
    match tls.read_to_end(&mut reply).await {
        Ok(_) if reply.starts_with(b"HTTP/1.1") => Ok(String::from_utf8_lossy(&reply).into_owned()),
        Ok(_) => Err("closed without a reply".into()),
        Err(e) => Err(format!("read: {e}")),
    }
}

/// The serial of the leaf the server at `addr` presents to a new handshake.
pub async fn served_serial(addr: SocketAddr, config: Arc<ClientConfig>) -> Result<String, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let tls = TlsConnector::from(config)
        .connect(ServerName::IpAddress(addr.ip().into()), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no certificate")?;
    crate::identity::svid::parse_leaf(leaf)
        .map(|l| l.serial)
        .map_err(|e| e.to_string())
}
