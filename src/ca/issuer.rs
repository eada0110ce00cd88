//! Certificate signing for the mesh CA: the trust anchor, the issuer
//! (intermediate) and workload X509-SVIDs.
//!
//! Pure apart from key generation and randomness: the caller passes the
//! clock, and nothing here touches files. Every certificate it signs follows
//! the X509-SVID profile: ECDSA P-256; signing certificates carry the trust
//! domain's root SPIFFE ID, `cA=true` and keyCertSign; leaves carry exactly
//! one URI SAN, `cA=false`, a critical digitalSignature-only key usage and
//! EKU serverAuth+clientAuth.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::identity::{SpiffeId, TrustDomain};

/// Leaves are backdated by this much so a peer whose clock is slightly
/// behind ours still accepts a certificate issued a moment ago.
pub const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    #[error("could not generate a key pair: {0}")]
    KeyGen(rcgen::Error),
    #[error("could not sign the certificate: {0}")]
    Sign(rcgen::Error),
    #[error("issuer certificate or key is unusable: {0}")]
    Issuer(rcgen::Error),
    #[error("issuer key does not match the issuer certificate")]
    IssuerKeyMismatch,
    #[error("lifetime {0:?} is out of range")]
    Lifetime(Duration),
    #[error("{0} is not a URI SAN rcgen accepts")]
    Uri(String),
    #[error("no secure randomness available for the serial number")]
    Random,
}

/// A signed certificate with its private key, both PEM.
#[derive(Debug, Clone)]
pub struct SignedPem {
    pub cert_pem: String,
    /// PKCS#8.
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
}

/// A CA certificate and key that can sign the next level down.
pub struct SigningCa {
    issuer: Issuer<'static, KeyPair>,
    cert_pem: String,
}

/// A freshly issued workload identity, as the files kubelet would mount.
#[derive(Debug, Clone)]
pub struct IssuedSvid {
    /// Leaf followed by the issuer (the content of `tls.crt`).
    pub chain_pem: String,
    /// PKCS#8 (the content of `tls.key`).
    pub key_pem: String,
    pub id: SpiffeId,
    /// Lowercase colon-separated hex, as `ca inspect` prints it.
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// Creates a self-signed trust anchor for `td`.
pub fn new_trust_anchor(
    td: &TrustDomain,
    lifetime: Duration,
    now: OffsetDateTime,
) -> Result<SignedPem, IssueError> {
    let key = generate_key()?;
    let params = ca_params(td, "outrider trust anchor", None, lifetime, now)?;
    let cert = params.self_signed(&key).map_err(IssueError::Sign)?;
    Ok(SignedPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
    })
}

/// Creates an issuer (intermediate) signed by `parent`.
pub fn new_intermediate(
    td: &TrustDomain,
    parent: &SigningCa,
    lifetime: Duration,
    now: OffsetDateTime,
) -> Result<SignedPem, IssueError> {
    let key = generate_key()?;
    let params = ca_params(td, "outrider issuer", Some(0), lifetime, now)?;
    let cert = params
        .signed_by(&key, &parent.issuer)
        .map_err(IssueError::Sign)?;
    Ok(SignedPem {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        cert_der: cert.der().clone(),
    })
}

// === impl SigningCa ===

impl SigningCa {
    /// Loads a CA from PEM, refusing a key that does not belong to the
    /// certificate (signing with it would produce unverifiable leaves).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, IssueError> {
        let key = KeyPair::from_pem(key_pem).map_err(IssueError::Issuer)?;
        let cert_der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|_| IssueError::Issuer(rcgen::Error::CouldNotParseCertificate))?;
        let (_, cert) = X509Certificate::from_der(&cert_der)
            .map_err(|_| IssueError::Issuer(rcgen::Error::CouldNotParseCertificate))?;
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(IssueError::IssuerKeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(IssueError::Issuer)?;
        Ok(Self {
            issuer,
            cert_pem: cert_pem.to_string(),
        })
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues an X509-SVID for `id`, valid from [`BACKDATE`] before `now`
    /// for `lifetime` after it.
    pub fn issue(
        &self,
        id: &SpiffeId,
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<IssuedSvid, IssueError> {
        let key = generate_key()?;
        let serial = random_serial()?;
        let mut params = leaf_params(lifetime, now, &serial)?;
        // An empty subject makes rcgen mark the SAN extension critical, as
        // RFC 5280 and the X509-SVID standard require in that case.
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.as_str()
                .try_into()
                .map_err(|_| IssueError::Uri(id.to_string()))?,
        )];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(IssueError::Sign)?;
        Ok(IssuedSvid {
            chain_pem: format!("{}{}", cert.pem(), ensure_newline(&self.cert_pem)),
            key_pem: key.serialize_pem(),
            id: id.clone(),
            serial: hex_serial(&serial),
            not_after: params.not_after,
        })
    }
}

impl SigningCa {
    /// Issues a TLS server certificate for DNS names (the injection
    /// webhook's: the API server verifies it by Service DNS name against
    /// the trust anchors in the webhook's `caBundle`). Not an X509-SVID:
    /// it carries no SPIFFE ID, so no proxy accepts it as a workload.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<SignedPem, IssueError> {
        let key = generate_key()?;
        let mut params = leaf_params(lifetime, now, &random_serial()?)?;
        params.subject_alt_names = dns_names
            .iter()
            .map(|name| {
                name.as_str()
                    .try_into()
                    .map(SanType::DnsName)
                    .map_err(IssueError::Sign)
            })
            .collect::<Result<_, _>>()?;
        let mut dn = DistinguishedName::new();
        if let Some(first) = dns_names.first() {
            dn.push(DnType::CommonName, first.as_str());
        }
        params.distinguished_name = dn;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(IssueError::Sign)?;
        Ok(SignedPem {
            cert_pem: format!("{}{}", cert.pem(), ensure_newline(&self.cert_pem)),
            key_pem: key.serialize_pem(),
            cert_der: cert.der().clone(),
        })
    }
}

/// What every end-entity certificate we sign shares: not a CA, a
/// digitalSignature key usage, the issuer's key identifier, backdated
/// validity, a random serial.
fn leaf_params(
    lifetime: Duration,
    now: OffsetDateTime,
    serial: &[u8],
) -> Result<CertificateParams, IssueError> {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = checked_after(now, lifetime)?;
    params.serial_number = Some(SerialNumber::from_slice(serial));
    Ok(params)
}

fn ca_params(
    td: &TrustDomain,
    common_name: &str,
    path_len: Option<u8>,
    lifetime: Duration,
    now: OffsetDateTime,
) -> Result<CertificateParams, IssueError> {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, td.as_str());
    dn.push(DnType::CommonName, common_name);
    params.distinguished_name = dn;
    // Signing certificates SHOULD carry the trust domain's own SPIFFE ID.
    let td_id = td.id();
    params.subject_alt_names = vec![SanType::URI(
        td_id
            .as_str()
            .try_into()
            .map_err(|_| IssueError::Uri(td_id.to_string()))?,
    )];
    params.is_ca = IsCa::Ca(match path_len {
        Some(n) => BasicConstraints::Constrained(n),
        None => BasicConstraints::Unconstrained,
    });
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.use_authority_key_identifier_extension = path_len.is_some();
    params.not_before = now - BACKDATE;
    params.not_after = checked_after(now, lifetime)?;
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()?));
    Ok(params)
}

fn generate_key() -> Result<KeyPair, IssueError> {
    KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(IssueError::KeyGen)
}

fn checked_after(now: OffsetDateTime, lifetime: Duration) -> Result<OffsetDateTime, IssueError> {
    if lifetime.is_zero() {
        return Err(IssueError::Lifetime(lifetime));
    }
    let lifetime_t =
        time::Duration::try_from(lifetime).map_err(|_| IssueError::Lifetime(lifetime))?;
    now.checked_add(lifetime_t)
        .ok_or(IssueError::Lifetime(lifetime))
}

/// 16 random bytes with the top bit clear, so the DER INTEGER is positive
/// and exactly 16 bytes long.
fn random_serial() -> Result<[u8; 16], IssueError> {
    let mut serial = [0u8; 16];
    crate::crypto::provider()
        .secure_random
        .fill(&mut serial)
        .map_err(|_| IssueError::Random)?;
    serial[0] &= 0x7f;
    serial[0] |= 0x01;
    Ok(serial)
}

fn hex_serial(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

fn ensure_newline(pem: &str) -> String {
    if pem.ends_with('\n') {
        pem.to_string()
    } else {
        format!("{pem}\n")
    }
}
