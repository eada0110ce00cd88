//! The demo's identity provider: an ES256 signing key, its JWKS served
//! over HTTPS on loopback (a certificate for `127.0.0.1` from a CA of its
//! own, which the backend's sidecar is told to trust), and tokens minted
//! for users, as an OIDC provider would issue them.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use http::Response;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use tokio::net::TcpListener;

pub const ISSUER: &str = "https://issuer.demo.outrider";
pub const AUDIENCE: &str = "backend";
const KEY_ID: &str = "demo-1";

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("key: {0}")]
    Key(String),
    #[error("certificate: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("token: {0}")]
    Token(#[from] jsonwebtoken::errors::Error),
}

pub struct Issuer {
    /// Where its keys are published.
    pub jwks_uri: String,
    /// The CA its HTTPS certificate chains to.
    pub ca_file: PathBuf,
    signing: EncodingKey,
}

impl Issuer {
    /// Makes a key and a certificate, writes the CA to `dir` and starts
    /// serving the JWKS.
    pub async fn start(dir: &Path) -> Result<Self, IssuerError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|e| IssuerError::Key(e.to_string()))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
            .map_err(|e| IssuerError::Key(e.to_string()))?;
        let point = pair.public_key().as_ref();
        let (x, y) = point
            .get(1..33)
            .zip(point.get(33..65))
            .ok_or_else(|| IssuerError::Key("not an uncompressed P-256 point".into()))?;
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256", "kid": KEY_ID,
            "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
        }]})
        .to_string();

        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "outrider demo issuer CA");
        let ca_cert = ca_params.self_signed(&ca_key)?;
        let ca = rcgen::Issuer::new(ca_params, &ca_key);
        let leaf_key = rcgen::KeyPair::generate()?;
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_string()])?
            .signed_by(&leaf_key, &ca)?;
        let ca_file = dir.join("issuer-ca.pem");
        std::fs::create_dir_all(dir)?;
        std::fs::write(&ca_file, ca_cert.pem())?;

        let tls = rustls::ServerConfig::builder_with_provider(Arc::new(crate::crypto::provider()))
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![leaf.der().clone()],
                rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
            )?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        tokio::spawn(serve(
            listener,
            tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
            Bytes::from(jwks),
        ));
        Ok(Self {
            jwks_uri: jwks_url(addr),
            ca_file,
            signing: EncodingKey::from_ec_der(pkcs8.as_ref()),
        })
    }

    /// A token for `user`, valid from now for `lifetime_seconds` (negative:
    /// already expired).
    pub fn mint(&self, user: &str, lifetime_seconds: i64) -> Result<String, IssuerError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(KEY_ID.into());
        let claims = serde_json::json!({
            "iss": ISSUER, "sub": user, "aud": AUDIENCE,
            "iat": now, "exp": now + lifetime_seconds,
        });
        Ok(jsonwebtoken::encode(&header, &claims, &self.signing)?)
    }
}

fn jwks_url(addr: SocketAddr) -> String {
    format!("https://{addr}/.well-known/jwks.json")
}

async fn serve(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, jwks: Bytes) {
    while let Ok((stream, _)) = listener.accept().await {
        let (acceptor, jwks) = (acceptor.clone(), jwks.clone());
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(stream).await else {
                return;
            };
            let service = service_fn(move |_req| {
                let jwks = jwks.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(jwks))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .await;
        });
    }
}
