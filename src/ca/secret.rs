//! The CA Secret `outrider-ca`: its layout, the checks a CA must pass
//! before anything issues with it, a fresh one for bootstrapping, and its
//! manifest. Pure: the controller reads and writes the Secret, `outrider
//! ca secret` prints it; both go through the same checks here.
//!
//! Secret layout (type `kubernetes.io/tls`, like Linkerd's issuer
//! Secret): `tls.crt` the issuer certificate, `tls.key` its key (PKCS#8),
//! `ca.crt` the trust bundle (one or more roots; several during anchor
//! rotation). The trust anchor's key is not stored in the cluster.

use std::collections::BTreeMap;
use std::time::Duration;

use rustls_pki_types::UnixTime;
use time::OffsetDateTime;

use crate::ca::inspect::{inspect, parse_bundle};
use crate::ca::issuer::{self, SigningCa};
use crate::ca::store::trust_domain_of;
use crate::identity::{SpiffeId, TrustDomain};

pub const CA_SECRET: &str = "outrider-ca";
pub const ISSUER_CERT_KEY: &str = "tls.crt";
pub const ISSUER_KEY_KEY: &str = "tls.key";
pub const BUNDLE_KEY: &str = "ca.crt";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Secret {CA_SECRET} lacks {0}")]
    Missing(&'static str),
    #[error("Secret {CA_SECRET}: {0} is not UTF-8 PEM")]
    NotPem(&'static str),
    #[error("Secret {CA_SECRET}: the issuer is unusable: {0}")]
    Issuer(String),
    #[error("Secret {CA_SECRET}: the trust bundle is unusable: {0}")]
    Bundle(String),
    #[error(
        "Secret {CA_SECRET}: the issuer's trust domain {found} is not the configured {expected}"
    )]
    TrustDomain { expected: String, found: String },
    #[error(
        "Secret {CA_SECRET}: a certificate issued by this issuer does not verify against the bundle: {0}"
    )]
    Chain(String),
    #[error("cannot create a CA: {0}")]
    Create(String),
    #[error("cannot render the Secret: {0}")]
    Render(String),
}

/// A usable CA: everything checked.
pub struct CaMaterial {
    pub signing: SigningCa,
    pub issuer_pem: String,
    pub bundle_pem: String,
    pub trust_domain: TrustDomain,
    pub issuer_not_after: OffsetDateTime,
    /// The soonest expiry among the bundle's roots.
    pub anchor_not_after: OffsetDateTime,
}

impl std::fmt::Debug for CaMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaMaterial")
            .field("trust_domain", &self.trust_domain)
            .field("issuer_not_after", &self.issuer_not_after)
            .field("anchor_not_after", &self.anchor_not_after)
            .finish_non_exhaustive()
    }
}

/// Several PEM documents as one bundle, each ending in a newline.
pub fn concat_bundle<'a>(pems: impl IntoIterator<Item = &'a str>) -> String {
    let mut bundle = String::new();
    for pem in pems {
        bundle.push_str(pem);
        if !bundle.is_empty() && !bundle.ends_with('\n') {
            bundle.push('\n');
        }
    }
    bundle
}

/// The Secret's data as `outrider ca secret` hands it to `kubectl apply`:
/// checked exactly as the controller will check it, then rendered.
pub fn render(
    issuer_pem: &str,
    key_pem: &str,
    bundle_pem: &str,
    namespace: &str,
    now: OffsetDateTime,
) -> Result<String, Error> {
    use base64::Engine as _;
    let data = BTreeMap::from([
        (ISSUER_CERT_KEY.to_string(), issuer_pem.as_bytes().to_vec()),
        (ISSUER_KEY_KEY.to_string(), key_pem.as_bytes().to_vec()),
        (BUNDLE_KEY.to_string(), bundle_pem.as_bytes().to_vec()),
    ]);
    let trust_domain = trust_domain_of(issuer_pem).map_err(Error::Issuer)?;
    CaMaterial::from_secret_data(&data, &trust_domain, now)?;
    let b64 = |v: &str| base64::engine::general_purpose::STANDARD.encode(v);
    let secret = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": CA_SECRET, "namespace": namespace},
        "data": {
            BUNDLE_KEY: b64(bundle_pem),
            ISSUER_CERT_KEY: b64(issuer_pem),
            ISSUER_KEY_KEY: b64(key_pem),
        },
    });
    crate::yaml::to_string(&secret).map_err(|e| Error::Render(e.to_string()))
}

fn text<'a>(data: &'a BTreeMap<String, Vec<u8>>, key: &'static str) -> Result<&'a str, Error> {
    let bytes = data.get(key).ok_or(Error::Missing(key))?;
    std::str::from_utf8(bytes).map_err(|_| Error::NotPem(key))
}

impl CaMaterial {
    /// Reads and checks the Secret's data: the issuer key matches its
    /// certificate, the trust domain is the configured one, and a
    /// certificate it issues verifies against the bundle exactly as the
    /// proxies will verify it. A CA that fails any of this is never used.
    pub fn from_secret_data(
        data: &BTreeMap<String, Vec<u8>>,
        expected: &TrustDomain,
        now: OffsetDateTime,
    ) -> Result<Self, Error> {
        let issuer_pem = text(data, ISSUER_CERT_KEY)?.to_string();
        let key_pem = text(data, ISSUER_KEY_KEY)?;
        let bundle_pem = text(data, BUNDLE_KEY)?.to_string();
        let signing =
            SigningCa::from_pem(&issuer_pem, key_pem).map_err(|e| Error::Issuer(e.to_string()))?;
        let trust_domain = trust_domain_of(&issuer_pem).map_err(Error::Issuer)?;
        if &trust_domain != expected {
            return Err(Error::TrustDomain {
                expected: expected.to_string(),
                found: trust_domain.to_string(),
            });
        }
        let roots =
            parse_bundle(bundle_pem.as_bytes()).map_err(|e| Error::Bundle(e.to_string()))?;
        let mut anchor_not_after: Option<OffsetDateTime> = None;
        for root in &roots {
            let not_after = not_after_of(root).map_err(Error::Bundle)?;
            anchor_not_after = Some(anchor_not_after.map_or(not_after, |t| t.min(not_after)));
        }
        let anchor_not_after = anchor_not_after.ok_or(Error::Bundle("empty".into()))?;
        let issuer_der = {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_slice(issuer_pem.as_bytes())
                .map_err(|e| Error::Issuer(format!("{e:?}")))?
        };
        let issuer_not_after = not_after_of(&issuer_der).map_err(Error::Issuer)?;

        // The self-check: issue, then verify like a peer would.
        let probe_id = SpiffeId::parse(&format!(
            "spiffe://{trust_domain}/ns/outrider-system/sa/ca-self-check"
        ))
        .map_err(|e| Error::Issuer(e.to_string()))?;
        let probe = signing
            .issue(&probe_id, Duration::from_secs(300), now)
            .map_err(|e| Error::Issuer(e.to_string()))?;
        inspect(
            probe.chain_pem.as_bytes(),
            Some(bundle_pem.as_bytes()),
            unix(now),
        )
        .map_err(|e| Error::Chain(e.to_string()))?;
        Ok(Self {
            signing,
            issuer_pem,
            bundle_pem,
            trust_domain,
            issuer_not_after,
            anchor_not_after,
        })
    }

    /// A new trust anchor and issuer, as Secret data. The anchor's key is
    /// dropped: nothing in the cluster can mint a new issuer, which is the
    /// point (see docs/operations.md for rotating the issuer).
    pub fn bootstrap(
        trust_domain: &TrustDomain,
        anchor_lifetime: Duration,
        issuer_lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<BTreeMap<String, String>, Error> {
        let fail = |e: issuer::IssueError| Error::Create(e.to_string());
        let root = issuer::new_trust_anchor(trust_domain, anchor_lifetime, now).map_err(fail)?;
        let root_ca = SigningCa::from_pem(&root.cert_pem, &root.key_pem).map_err(fail)?;
        let intermediate =
            issuer::new_intermediate(trust_domain, &root_ca, issuer_lifetime, now).map_err(fail)?;
        Ok(BTreeMap::from([
            (ISSUER_CERT_KEY.to_string(), intermediate.cert_pem),
            (ISSUER_KEY_KEY.to_string(), intermediate.key_pem),
            (BUNDLE_KEY.to_string(), root.cert_pem),
        ]))
    }
}

pub fn unix(t: OffsetDateTime) -> UnixTime {
    UnixTime::since_unix_epoch(Duration::from_secs(t.unix_timestamp().max(0) as u64))
}

/// The notAfter of a DER certificate.
pub fn not_after_of(der: &[u8]) -> Result<OffsetDateTime, String> {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
    OffsetDateTime::from_unix_timestamp(cert.validity().not_after.timestamp())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn td() -> TrustDomain {
        TrustDomain::parse("cluster.local").unwrap()
    }

    fn bytes(data: BTreeMap<String, String>) -> BTreeMap<String, Vec<u8>> {
        data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect()
    }

    #[test]
    fn a_bootstrapped_ca_loads_and_reports_its_expiry_dates() {
        let now = OffsetDateTime::now_utc();
        let data = CaMaterial::bootstrap(
            &td(),
            Duration::from_secs(3650 * 86400),
            Duration::from_secs(365 * 86400),
            now,
        )
        .unwrap();
        let ca = CaMaterial::from_secret_data(&bytes(data), &td(), now).unwrap();
        let year = time::Duration::days(365);
        assert!((ca.issuer_not_after - (now + year)).abs() < time::Duration::minutes(2));
        assert!(ca.anchor_not_after > ca.issuer_not_after);
    }

    #[test]
    fn a_ca_that_would_issue_unverifiable_certificates_is_refused() {
        let now = OffsetDateTime::now_utc();
        let year = Duration::from_secs(365 * 86400);
        let a = CaMaterial::bootstrap(&td(), year, year, now).unwrap();
        let b = CaMaterial::bootstrap(&td(), year, year, now).unwrap();
        // Issuer from one CA, bundle from another.
        let mut mixed = a.clone();
        mixed.insert(BUNDLE_KEY.into(), b[BUNDLE_KEY].clone());
        let err = CaMaterial::from_secret_data(&bytes(mixed), &td(), now).unwrap_err();
        assert!(matches!(err, Error::Chain(_)), "{err}");
        // A key that is not the issuer's.
        let mut wrong_key = a.clone();
        wrong_key.insert(ISSUER_KEY_KEY.into(), b[ISSUER_KEY_KEY].clone());
        let err = CaMaterial::from_secret_data(&bytes(wrong_key), &td(), now).unwrap_err();
        assert!(matches!(err, Error::Issuer(_)), "{err}");
        // Missing and garbage entries.
        let mut missing = a.clone();
        missing.remove(BUNDLE_KEY);
        assert!(matches!(
            CaMaterial::from_secret_data(&bytes(missing), &td(), now),
            Err(Error::Missing("ca.crt"))
        ));
        let mut garbage = a.clone();
        garbage.insert(BUNDLE_KEY.into(), "not a certificate".into());
        assert!(matches!(
            CaMaterial::from_secret_data(&bytes(garbage), &td(), now),
            Err(Error::Bundle(_))
        ));
        // Another trust domain.
        let other = TrustDomain::parse("example.org").unwrap();
        assert!(matches!(
            CaMaterial::from_secret_data(&bytes(a), &other, now),
            Err(Error::TrustDomain { .. })
        ));
    }

    #[test]
    fn the_rendered_secret_round_trips_and_a_bad_ca_renders_nothing() {
        let now = OffsetDateTime::now_utc();
        let year = Duration::from_secs(365 * 86400);
        let a = CaMaterial::bootstrap(&td(), year, year, now).unwrap();
        let b = CaMaterial::bootstrap(&td(), year, year, now).unwrap();
        let yaml = render(
            &a[ISSUER_CERT_KEY],
            &a[ISSUER_KEY_KEY],
            &a[BUNDLE_KEY],
            "mesh-system",
            now,
        )
        .unwrap();
        let secret: serde_json::Value = crate::yaml::value(&yaml).unwrap();
        assert_eq!(secret["metadata"]["name"], CA_SECRET);
        assert_eq!(secret["metadata"]["namespace"], "mesh-system");
        assert_eq!(secret["type"], "kubernetes.io/tls");
        let decoded = crate::test_util::secret_data(&secret);
        assert_eq!(decoded, bytes(a.clone()));
        let refused = render(
            &a[ISSUER_CERT_KEY],
            &a[ISSUER_KEY_KEY],
            &b[BUNDLE_KEY],
            "mesh-system",
            now,
        );
        assert!(matches!(refused, Err(Error::Chain(_))), "{refused:?}");
    }

    #[test]
    fn bundles_are_concatenated_one_pem_after_another() {
        assert_eq!(concat_bundle(["a\n", "b", "c\n"]), "a\nb\nc\n");
        assert_eq!(concat_bundle([]), "");
    }

    #[test]
    fn a_bundle_with_two_roots_during_rotation_is_accepted() {
        let now = OffsetDateTime::now_utc();
        let year = Duration::from_secs(365 * 86400);
        let old = CaMaterial::bootstrap(&td(), year, year, now).unwrap();
        let new = CaMaterial::bootstrap(&td(), year * 2, year, now).unwrap();
        let mut both = old.clone();
        both.insert(
            BUNDLE_KEY.into(),
            format!("{}{}", old[BUNDLE_KEY], new[BUNDLE_KEY]),
        );
        let ca = CaMaterial::from_secret_data(&bytes(both), &td(), now).unwrap();
        // The soonest-expiring root is the one to watch.
        let one_year = now + time::Duration::days(365);
        assert!((ca.anchor_not_after - one_year).abs() < time::Duration::minutes(2));
    }
}
