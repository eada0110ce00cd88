//! rustls verifiers that authenticate peers by SPIFFE ID, not DNS name.
//!
//! Both directions verify the presented chain against the trust bundle
//! with [`verify_svid`] and then check the identity: the client side insists
//! on the route's exact ID (or at least our trust domain), the server side
//! on our trust domain. A verifier is built for one credentials generation;
//! a reload builds a new one, so a rotated bundle takes effect for every
//! new handshake at once.
//!
//! Verified leaves are cached by their exact DER bytes for a short time.
//! The cache saves the two chain signature checks when the same peer
//! connects again (the common case between two sidecars) and lets the
//! proxy read the peer's ID after the handshake without re-parsing. It
//! never skips the per-handshake proof of key possession
//! (CertificateVerify), and the leaf's validity window is re-checked on
//! every hit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::identity::svid::{Expected, Usage, verify_svid};
use crate::identity::{SpiffeId, SvidError, SvidLeaf, TrustBundle, TrustDomain};

/// How long a verified chain is trusted without re-verifying its
/// signatures. Bounds how late an intermediate's expiry is noticed.
const CACHE_TTL: Duration = Duration::from_secs(60);
/// Enough for every peer a sidecar talks to; cleared wholesale when full.
const CACHE_CAPACITY: usize = 512;

/// Whom the client side of a connection expects to reach.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PeerExpectation {
    /// Any workload of this trust domain (transparent mode without
    /// discovery: we know the destination address, not its identity).
    TrustDomain(TrustDomain),
    /// Exactly this workload (a static route that names its peer).
    Id(SpiffeId),
}

/// Verification shared by both directions.
#[derive(Debug)]
struct SpiffeVerifier {
    bundle: TrustBundle,
    skew: Duration,
    algorithms: WebPkiSupportedAlgorithms,
    cache: Mutex<HashMap<Vec<u8>, CachedLeaf>>,
}

#[derive(Debug, Clone)]
struct CachedLeaf {
    leaf: SvidLeaf,
    verified_at: u64,
}

/// Client side: verifies the server we connected to.
#[derive(Debug)]
pub struct ServerVerifier {
    inner: SpiffeVerifier,
    expected: PeerExpectation,
}

/// Server side: verifies the client that connected to us.
#[derive(Debug)]
pub struct ClientVerifier {
    inner: SpiffeVerifier,
    trust_domain: TrustDomain,
}

// === impl SpiffeVerifier ===

impl SpiffeVerifier {
    fn new(bundle: TrustBundle, skew: Duration, algorithms: WebPkiSupportedAlgorithms) -> Self {
        Self {
            bundle,
            skew,
            algorithms,
            cache: Mutex::new(HashMap::new()),
        }
    }

    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        expected: &Expected<'_>,
        usage: Usage,
        now: UnixTime,
    ) -> Result<SvidLeaf, SvidError> {
        if let Some(leaf) = self.cached(end_entity, now) {
            check_expected(&leaf, expected)?;
            check_window(&leaf, now, self.skew)?;
            return Ok(leaf);
        }
        let leaf = verify_svid(
            &self.bundle,
            end_entity,
            intermediates,
            expected,
            usage,
            now,
            self.skew,
        )?;
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_CAPACITY {
            cache.clear();
        }
        cache.insert(
            end_entity.to_vec(),
            CachedLeaf {
                leaf: leaf.clone(),
                verified_at: now.as_secs(),
            },
        );
        drop(cache);
        Ok(leaf)
    }

    fn cached(&self, end_entity: &[u8], now: UnixTime) -> Option<SvidLeaf> {
        let cache = self.cache.lock();
        let hit = cache.get(end_entity)?;
        (now.as_secs().saturating_sub(hit.verified_at) < CACHE_TTL.as_secs())
            .then(|| hit.leaf.clone())
    }

    /// The ID of a leaf this verifier accepted during a handshake.
    fn peer_id(&self, end_entity: &[u8]) -> Option<SpiffeId> {
        self.cache
            .lock()
            .get(end_entity)
            .map(|hit| hit.leaf.id.clone())
    }

    fn verify_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }
}

fn check_expected(leaf: &SvidLeaf, expected: &Expected<'_>) -> Result<(), SvidError> {
    match expected {
        Expected::TrustDomain(td) if leaf.id.trust_domain_str() != td.as_str() => {
            Err(SvidError::WrongTrustDomain {
                expected: td.to_string(),
                found: leaf.id.trust_domain_str().to_string(),
            })
        }
        Expected::Id(id) if &leaf.id != *id => Err(SvidError::WrongId {
            expected: id.to_string(),
            found: leaf.id.to_string(),
        }),
        _ => Ok(()),
    }
}

fn check_window(leaf: &SvidLeaf, now: UnixTime, skew: Duration) -> Result<(), SvidError> {
    let now = now.as_secs() as i64;
    let skew = skew.as_secs() as i64;
    if now + skew < leaf.not_before {
        return Err(SvidError::NotYetValid {
            not_before: leaf.not_before,
            now,
        });
    }
    if now - skew > leaf.not_after {
        return Err(SvidError::Expired {
            not_after: leaf.not_after,
            now,
        });
    }
    Ok(())
}

/// Maps our reasons onto rustls errors so the peer gets the matching TLS
/// alert, while the SPIFFE-specific ones keep their detail for metrics.
fn to_rustls(error: SvidError) -> rustls::Error {
    let cert_error = match error {
        SvidError::Expired { .. } => CertificateError::Expired,
        SvidError::NotYetValid { .. } => CertificateError::NotValidYet,
        SvidError::UnknownIssuer => CertificateError::UnknownIssuer,
        SvidError::Malformed(_) => CertificateError::BadEncoding,
        other => CertificateError::Other(rustls::OtherError(Arc::new(other))),
    };
    rustls::Error::InvalidCertificate(cert_error)
}

// === impl ServerVerifier ===

impl ServerVerifier {
    pub fn new(
        bundle: TrustBundle,
        expected: PeerExpectation,
        skew: Duration,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Self {
        Self {
            inner: SpiffeVerifier::new(bundle, skew, algorithms),
            expected,
        }
    }

    pub fn peer_id(&self, end_entity: &[u8]) -> Option<SpiffeId> {
        self.inner.peer_id(end_entity)
    }
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let expected = match &self.expected {
            PeerExpectation::TrustDomain(td) => Expected::TrustDomain(td),
            PeerExpectation::Id(id) => Expected::Id(id),
        };
        self.inner
            .verify(end_entity, intermediates, &expected, Usage::Server, now)
            .map(|_| ServerCertVerified::assertion())
            .map_err(to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // The mesh speaks TLS 1.3 only; the config never negotiates 1.2.
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.algorithms.supported_schemes()
    }
}

// === impl ClientVerifier ===

impl ClientVerifier {
    pub fn new(
        bundle: TrustBundle,
        trust_domain: TrustDomain,
        skew: Duration,
        algorithms: WebPkiSupportedAlgorithms,
    ) -> Self {
        Self {
            inner: SpiffeVerifier::new(bundle, skew, algorithms),
            trust_domain,
        }
    }

    pub fn peer_id(&self, end_entity: &[u8]) -> Option<SpiffeId> {
        self.inner.peer_id(end_entity)
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Every mesh client has exactly one identity; hints would only
        // lengthen the handshake.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify(
                end_entity,
                intermediates,
                &Expected::TrustDomain(&self.trust_domain),
                Usage::Client,
                now,
            )
            .map(|_| ClientCertVerified::assertion())
            .map_err(to_rustls)
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.algorithms.supported_schemes()
    }
}
