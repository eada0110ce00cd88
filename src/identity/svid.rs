//! X509-SVID validation: the SPIFFE leaf rules and chain verification
//! against a trust bundle.
//!
//! Pure functions over DER bytes and a caller-supplied clock, so every rule
//! is unit-tested without sockets or files. The TLS verifiers, the identity
//! reloader and `outrider ca inspect` all call [`verify_svid`] or
//! [`parse_leaf`]; nothing else decides whether a certificate is an SVID.

use std::time::Duration;

use rustls_pki_types::{CertificateDer, TrustAnchor, UnixTime};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::spiffe::{InvalidSpiffeId, SpiffeId, TrustDomain};

/// Why a certificate is not an acceptable X509-SVID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SvidError {
    #[error("certificate is not valid DER X.509: {0}")]
    Malformed(String),
    #[error("leaf has {0} URI SANs; an X509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("leaf URI SAN is not a SPIFFE ID: {0}")]
    NotSpiffe(#[from] InvalidSpiffeId),
    #[error("leaf SPIFFE ID {0} has no path; a trust domain's ID cannot name a workload")]
    RootPath(SpiffeId),
    #[error("leaf is a CA certificate (basicConstraints cA=true)")]
    LeafIsCa,
    #[error("leaf has no key usage extension")]
    NoKeyUsage,
    #[error("leaf key usage extension is not critical")]
    KeyUsageNotCritical,
    #[error("leaf key usage lacks digitalSignature")]
    NoDigitalSignature,
    #[error("leaf key usage allows keyCertSign or cRLSign")]
    LeafCanSign,
    #[error("leaf extended key usage lacks serverAuth or clientAuth")]
    ExtendedKeyUsage,
    #[error("certificate expired at {not_after} (unix seconds; now {now})")]
    Expired { not_after: i64, now: i64 },
    #[error("certificate is not valid before {not_before} (unix seconds; now {now})")]
    NotYetValid { not_before: i64, now: i64 },
    #[error("trust domain {found} is not the expected {expected}")]
    WrongTrustDomain { expected: String, found: String },
    #[error("SPIFFE ID {found} is not the expected {expected}")]
    WrongId { expected: String, found: String },
    #[error("chain does not lead to a root in the trust bundle")]
    UnknownIssuer,
    #[error("chain is invalid: {0}")]
    Chain(String),
    #[error("trust bundle holds no usable root: {0}")]
    Bundle(String),
}

impl SvidError {
    /// A bounded label for metrics (`tls_handshake_failures_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "malformed_certificate",
            Self::UriSanCount(_) | Self::NotSpiffe(_) | Self::RootPath(_) => "not_svid",
            Self::LeafIsCa
            | Self::NoKeyUsage
            | Self::KeyUsageNotCritical
            | Self::NoDigitalSignature
            | Self::LeafCanSign
            | Self::ExtendedKeyUsage => "bad_leaf_usage",
            Self::Expired { .. } => "expired",
            Self::NotYetValid { .. } => "not_yet_valid",
            Self::WrongTrustDomain { .. } => "wrong_trust_domain",
            Self::WrongId { .. } => "wrong_identity",
            Self::UnknownIssuer => "unknown_ca",
            Self::Chain(_) | Self::Bundle(_) => "invalid_chain",
        }
    }
}

/// What we learn from a leaf that passed the structural SVID rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SvidLeaf {
    pub id: SpiffeId,
    /// Colon-separated hex, as `openssl x509 -serial` prints it (lowercase).
    pub serial: String,
    pub issuer: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

/// The roots a workload trusts. May hold several at once, which is how a
/// trust anchor is rotated without downtime.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    roots: Vec<CertificateDer<'static>>,
    anchors: Vec<TrustAnchor<'static>>,
}

/// Which end of a connection presents the certificate being verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
}

/// What the verifier insists on beyond a valid chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected<'a> {
    /// Any workload of this trust domain.
    TrustDomain(&'a TrustDomain),
    /// Exactly this ID.
    Id(&'a SpiffeId),
}

// === impl TrustBundle ===

impl TrustBundle {
    pub fn new(roots: Vec<CertificateDer<'static>>) -> Result<Self, SvidError> {
        if roots.is_empty() {
            return Err(SvidError::Bundle("no certificates".into()));
        }
        let anchors = roots
            .iter()
            .map(|der| {
                webpki::anchor_from_trusted_cert(der)
                    .map(|a| a.to_owned())
                    .map_err(|e| SvidError::Bundle(format!("{e}")))
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self { roots, anchors })
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    pub fn len(&self) -> usize {
        self.roots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.roots.is_empty()
    }
}

/// Checks the SPIFFE leaf rules that do not need the issuer: exactly one URI
/// SAN holding a non-root SPIFFE ID, `cA=false`, a critical key usage with
/// digitalSignature and without keyCertSign/cRLSign, and, when present, an
/// extended key usage carrying both serverAuth and clientAuth.
pub fn parse_leaf(der: &[u8]) -> Result<SvidLeaf, SvidError> {
    let (rest, cert) =
        X509Certificate::from_der(der).map_err(|e| SvidError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(SvidError::Malformed(
            "trailing bytes after the certificate".into(),
        ));
    }
    let malformed = |e: x509_parser::error::X509Error| SvidError::Malformed(e.to_string());

    let uris: Vec<&str> = cert
        .subject_alternative_name()
        .map_err(malformed)?
        .map(|san| {
            san.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some(*uri),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    if uris.len() != 1 {
        return Err(SvidError::UriSanCount(uris.len()));
    }
    let id = SpiffeId::parse(uris[0])?;
    if id.is_root() {
        return Err(SvidError::RootPath(id));
    }

    if cert
        .basic_constraints()
        .map_err(malformed)?
        .is_some_and(|bc| bc.value.ca)
    {
        return Err(SvidError::LeafIsCa);
    }
    let key_usage = cert
        .key_usage()
        .map_err(malformed)?
        .ok_or(SvidError::NoKeyUsage)?;
    if !key_usage.critical {
        return Err(SvidError::KeyUsageNotCritical);
    }
    if !key_usage.value.digital_signature() {
        return Err(SvidError::NoDigitalSignature);
    }
    if key_usage.value.key_cert_sign() || key_usage.value.crl_sign() {
        return Err(SvidError::LeafCanSign);
    }
    if let Some(eku) = cert.extended_key_usage().map_err(malformed)?
        && !(eku.value.server_auth && eku.value.client_auth)
    {
        return Err(SvidError::ExtendedKeyUsage);
    }

    let validity = cert.validity();
    Ok(SvidLeaf {
        id,
        serial: cert.raw_serial_as_string().to_lowercase(),
        issuer: cert.issuer().to_string(),
        not_before: validity.not_before.timestamp(),
        not_after: validity.not_after.timestamp(),
    })
}

/// Verifies a presented chain as an X509-SVID: the leaf rules, the validity
/// window (with `skew` of tolerance either side), the chain up to a root of
/// `bundle`, and the expected trust domain or exact ID.
pub fn verify_svid(
    bundle: &TrustBundle,
    end_entity: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
    expected: &Expected<'_>,
    usage: Usage,
    now: UnixTime,
    skew: Duration,
) -> Result<SvidLeaf, SvidError> {
    let leaf = parse_leaf(end_entity)?;
    match expected {
        Expected::TrustDomain(td) => {
            if leaf.id.trust_domain_str() != td.as_str() {
                return Err(SvidError::WrongTrustDomain {
                    expected: td.to_string(),
                    found: leaf.id.trust_domain_str().to_string(),
                });
            }
        }
        Expected::Id(id) => {
            if &leaf.id != *id {
                return Err(SvidError::WrongId {
                    expected: id.to_string(),
                    found: leaf.id.to_string(),
                });
            }
        }
    }
    let verify_at = time_within_window(&leaf, now, skew)?;

    let ee = webpki::EndEntityCert::try_from(end_entity)
        .map_err(|e| SvidError::Malformed(e.to_string()))?;
    let eku = match usage {
        Usage::Server => webpki::KeyUsage::server_auth(),
        Usage::Client => webpki::KeyUsage::client_auth(),
    };
    ee.verify_for_usage(
        crate::crypto::CHAIN_ALGORITHMS,
        &bundle.anchors,
        intermediates,
        verify_at,
        eku,
        None,
        None,
    )
    .map_err(|e| match e {
        // A foreign CA with the same subject name as one of ours shows up
        // as a bad signature rather than an unknown issuer; both mean the
        // chain does not lead to a root we trust.
        webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => {
            SvidError::UnknownIssuer
        }
        other => SvidError::Chain(format!("{other}")),
    })?;
    Ok(leaf)
}

/// The instant at which the chain is checked. Inside the leaf's window that
/// is `now`; within `skew` outside it, the nearest edge of the window, so a
/// peer whose clock runs slightly ahead or behind still connects.
fn time_within_window(
    leaf: &SvidLeaf,
    now: UnixTime,
    skew: Duration,
) -> Result<UnixTime, SvidError> {
    let now_s = now.as_secs() as i64;
    let skew_s = skew.as_secs() as i64;
    if now_s < leaf.not_before {
        if leaf.not_before - now_s > skew_s {
            return Err(SvidError::NotYetValid {
                not_before: leaf.not_before,
                now: now_s,
            });
        }
        return Ok(UnixTime::since_unix_epoch(Duration::from_secs(
            leaf.not_before as u64,
        )));
    }
    if now_s > leaf.not_after {
        if now_s - leaf.not_after > skew_s {
            return Err(SvidError::Expired {
                not_after: leaf.not_after,
                now: now_s,
            });
        }
        return Ok(UnixTime::since_unix_epoch(Duration::from_secs(
            leaf.not_after as u64,
        )));
    }
    Ok(now)
}

#[cfg(test)]
mod tests;
