//! Test certificate authorities built on the real issuer, plus the broken
//! certificates the real issuer refuses to produce.

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, Issuer,
    KeyPair, KeyUsagePurpose, SanType,
};
use time::OffsetDateTime;

use crate::ca::issuer::{self, IssuedSvid, SigningCa};
use crate::ca::secret_dir;
use crate::identity::{SpiffeId, TrustDomain};

/// A trust anchor and an issuer, in memory.
pub struct TestCa {
    pub trust_domain: TrustDomain,
    pub root_pem: String,
    pub issuer: SigningCa,
    issuer_cert_pem: String,
    issuer_key_pem: String,
}

/// A leaf as PEM: the chain (leaf + issuer) and the PKCS#8 key.
#[derive(Debug, Clone)]
pub struct LeafPem {
    pub chain_pem: String,
    pub key_pem: String,
}

impl TestCa {
    pub fn new(trust_domain: &str) -> Self {
        let td = TrustDomain::parse(trust_domain).expect("valid trust domain");
        let now = OffsetDateTime::now_utc();
        let root =
            issuer::new_trust_anchor(&td, Duration::from_secs(86400 * 365), now).expect("root");
        let root_ca = SigningCa::from_pem(&root.cert_pem, &root.key_pem).expect("root loads");
        let intermediate =
            issuer::new_intermediate(&td, &root_ca, Duration::from_secs(86400 * 30), now)
                .expect("issuer");
        let issuer = SigningCa::from_pem(&intermediate.cert_pem, &intermediate.key_pem)
            .expect("issuer loads");
        Self {
            trust_domain: td,
            root_pem: root.cert_pem,
            issuer,
            issuer_cert_pem: intermediate.cert_pem,
            issuer_key_pem: intermediate.key_pem,
        }
    }

    /// The CA a controller keeps in its CA Secret (`data` decoded), so a
    /// test can issue SVIDs its proxies and the controller both trust.
    pub fn from_ca_secret(
        data: &std::collections::BTreeMap<String, Vec<u8>>,
        trust_domain: &str,
    ) -> Self {
        use crate::ca::secret::{BUNDLE_KEY, ISSUER_CERT_KEY, ISSUER_KEY_KEY};
        let text = |key: &str| String::from_utf8(data[key].clone()).expect("PEM");
        let issuer_cert_pem = text(ISSUER_CERT_KEY);
        let issuer_key_pem = text(ISSUER_KEY_KEY);
        let issuer = SigningCa::from_pem(&issuer_cert_pem, &issuer_key_pem).expect("issuer loads");
        Self {
            trust_domain: TrustDomain::parse(trust_domain).expect("valid trust domain"),
            root_pem: text(BUNDLE_KEY),
            issuer,
            issuer_cert_pem,
            issuer_key_pem,
        }
    }

    pub fn id(&self, namespace: &str, service_account: &str) -> SpiffeId {
        SpiffeId::workload(&self.trust_domain, namespace, service_account).expect("valid id")
    }

    /// A valid 24-hour SVID.
    pub fn issue(&self, namespace: &str, service_account: &str) -> IssuedSvid {
        self.issuer
            .issue(
                &self.id(namespace, service_account),
                Duration::from_secs(86400),
                OffsetDateTime::now_utc(),
            )
            .expect("issue")
    }

    /// Validated credentials for `namespace/service_account`, as a proxy
    /// loads them from its identity directory.
    pub fn credentials(
        &self,
        namespace: &str,
        service_account: &str,
    ) -> crate::identity::Credentials {
        let svid = self.issue(namespace, service_account);
        crate::identity::Credentials::from_raw(
            &crate::identity::RawCredentials {
                cert_pem: svid.chain_pem.into_bytes(),
                key_pem: svid.key_pem.into_bytes(),
                bundle_pem: self.root_pem.clone().into_bytes(),
            },
            &svid.id,
            rustls_pki_types::UnixTime::now(),
            Duration::from_secs(60),
        )
        .expect("credentials")
    }

    /// A leaf built from SVID-like defaults that `tweak` may break.
    pub fn leaf_with(&self, uris: &[&str], tweak: impl FnOnce(&mut CertificateParams)) -> LeafPem {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().expect("ia5 uri")))
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(1);
        params.not_after = now + time::Duration::hours(1);
        tweak(&mut params);
        let issuer_key = KeyPair::from_pem(&self.issuer_key_pem).expect("issuer key");
        let issuer = Issuer::from_ca_cert_pem(&self.issuer_cert_pem, issuer_key).expect("issuer");
        let cert = params.signed_by(&key, &issuer).expect("sign");
        LeafPem {
            chain_pem: format!("{}{}", cert.pem(), self.issuer_cert_pem),
            key_pem: key.serialize_pem(),
        }
    }

    /// A leaf with two URI SANs.
    pub fn leaf_with_two_uris(&self, namespace: &str, service_account: &str) -> LeafPem {
        let id = self.id(namespace, service_account);
        let other = self.id(namespace, "other");
        self.leaf_with(&[id.as_str(), other.as_str()], |_| {})
    }

    /// A leaf marked `CA:true`.
    pub fn leaf_marked_ca(&self, namespace: &str, service_account: &str) -> LeafPem {
        let id = self.id(namespace, service_account);
        self.leaf_with(&[id.as_str()], |p| {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        })
    }

    /// A leaf whose window ended an hour ago.
    pub fn leaf_expired(&self, namespace: &str, service_account: &str) -> LeafPem {
        let id = self.id(namespace, service_account);
        self.leaf_with(&[id.as_str()], |p| {
            let now = OffsetDateTime::now_utc();
            p.not_before = now - time::Duration::hours(2);
            p.not_after = now - time::Duration::hours(1);
        })
    }

    /// A leaf whose window starts in an hour.
    pub fn leaf_not_yet_valid(&self, namespace: &str, service_account: &str) -> LeafPem {
        let id = self.id(namespace, service_account);
        self.leaf_with(&[id.as_str()], |p| {
            let now = OffsetDateTime::now_utc();
            p.not_before = now + time::Duration::hours(1);
            p.not_after = now + time::Duration::hours(2);
        })
    }
}

/// Publishes a credential set into `dir` the way kubelet does.
pub fn write_identity(dir: &Path, chain_pem: &str, key_pem: &str, bundle_pem: &str) {
    secret_dir::publish_identity(dir, chain_pem, key_pem, bundle_pem).expect("publish identity");
}
