//! A workload's credentials: its certificate chain, private key and trust
//! bundle, loaded from the Secret-style directory and validated as a unit.
//!
//! Loading never half-succeeds: either every file parses and the set is
//! consistent (key matches the leaf, the chain verifies against the bundle,
//! the SPIFFE ID is the expected one, the window covers now), or the caller
//! gets a [`LoadError`] naming the first problem and keeps what it had.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, UnixTime};

use super::spiffe::SpiffeId;
use super::svid::{Expected, SvidError, SvidLeaf, TrustBundle, Usage, parse_leaf, verify_svid};

/// File names inside the identity directory, as in a `kubernetes.io/tls`
/// Secret that also carries `ca.crt`.
pub const CERT_FILE: &str = "tls.crt";
pub const KEY_FILE: &str = "tls.key";
pub const BUNDLE_FILE: &str = "ca.crt";
/// The symlink kubelet swaps atomically when a mounted Secret changes.
pub const DATA_LINK: &str = "..data";

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{file} is not valid PEM: {reason}")]
    Pem { file: &'static str, reason: String },
    #[error("{0} holds no certificate")]
    NoCertificate(&'static str),
    #[error("tls.key holds no PKCS#8 or SEC1 private key")]
    NoKey,
    #[error("tls.key is not a usable signing key: {0}")]
    UnusableKey(String),
    #[error("tls.key does not belong to the leaf certificate in tls.crt")]
    KeyMismatch,
    #[error("tls.crt is not a valid X509-SVID for this workload: {0}")]
    Svid(#[from] SvidError),
}

impl LoadError {
    /// A bounded label for `identity_reloads_total{result="failure",reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Read { source, .. } if source.kind() == std::io::ErrorKind::NotFound => "missing",
            Self::Read { .. } => "unreadable",
            Self::Pem { .. } | Self::NoCertificate(_) | Self::NoKey => "malformed_pem",
            Self::UnusableKey(_) => "unusable_key",
            Self::KeyMismatch => "key_mismatch",
            Self::Svid(e) => e.reason(),
        }
    }
}

/// What a proxy needs to take part in mTLS. Immutable once built; a reload
/// builds a new one and swaps the `Arc`.
#[derive(Debug)]
pub struct Credentials {
    pub leaf: SvidLeaf,
    pub certified_key: Arc<CertifiedKey>,
    pub bundle: TrustBundle,
}

/// Raw file contents, read in one go so a concurrent kubelet swap cannot
/// give us a certificate from one generation and a key from another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawCredentials {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub bundle_pem: Vec<u8>,
}

// === impl RawCredentials ===

impl RawCredentials {
    /// Reads the three files. When `..data` exists it is resolved once and
    /// the files are read from its target, so all three come from the same
    /// generation even while kubelet is swapping.
    pub fn read_dir(dir: &Path) -> Result<Self, LoadError> {
        let base = match std::fs::read_link(dir.join(DATA_LINK)) {
            Ok(target) if target.is_absolute() => target,
            Ok(target) => dir.join(target),
            Err(_) => dir.to_path_buf(),
        };
        let read = |name: &str| {
            let path = base.join(name);
            std::fs::read(&path).map_err(|source| LoadError::Read { path, source })
        };
        Ok(Self {
            cert_pem: read(CERT_FILE)?,
            key_pem: read(KEY_FILE)?,
            bundle_pem: read(BUNDLE_FILE)?,
        })
    }
}

// === impl Credentials ===

impl Credentials {
    /// Parses and validates a credential set for the workload `expected`.
    pub fn from_raw(
        raw: &RawCredentials,
        expected: &SpiffeId,
        now: UnixTime,
        skew: Duration,
    ) -> Result<Self, LoadError> {
        let chain = parse_certs(&raw.cert_pem, CERT_FILE)?;
        let roots = parse_certs(&raw.bundle_pem, BUNDLE_FILE)?;
        let key = PrivateKeyDer::from_pem_slice(&raw.key_pem).map_err(|e| match e {
            rustls_pki_types::pem::Error::NoItemsFound => LoadError::NoKey,
            other => LoadError::Pem {
                file: KEY_FILE,
                reason: format!("{other:?}"),
            },
        })?;
        if matches!(key, PrivateKeyDer::Pkcs1(_)) {
            return Err(LoadError::UnusableKey(
                "RSA PKCS#1 keys are not supported".into(),
            ));
        }
        let signing_key = crate::crypto::provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| LoadError::UnusableKey(e.to_string()))?;
        // Structure first, so garbage is reported as garbage rather than as
        // a key that does not match it.
        parse_leaf(&chain[0])?;
        let certified_key = CertifiedKey::new(chain, signing_key);
        match certified_key.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(LoadError::KeyMismatch);
            }
            Err(other) => return Err(LoadError::UnusableKey(other.to_string())),
        }

        let bundle = TrustBundle::new(roots)?;
        let (leaf_der, intermediates) = certified_key
            .cert
            .split_first()
            .ok_or(LoadError::NoCertificate(CERT_FILE))?;
        // parse_leaf (inside verify_svid) has already insisted that an EKU,
        // when present, carries both serverAuth and clientAuth, so checking
        // the chain for one usage covers both directions.
        let leaf = verify_svid(
            &bundle,
            leaf_der,
            intermediates,
            &Expected::Id(expected),
            Usage::Server,
            now,
            skew,
        )?;
        Ok(Self {
            leaf,
            certified_key: Arc::new(certified_key),
            bundle,
        })
    }

    pub fn id(&self) -> &SpiffeId {
        &self.leaf.id
    }
}

fn parse_certs(pem: &[u8], file: &'static str) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| LoadError::Pem {
            file,
            reason: format!("{e:?}"),
        })?;
    if certs.is_empty() {
        return Err(LoadError::NoCertificate(file));
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::certs::TestCa;

    fn raw(chain: &str, key: &str, bundle: &str) -> RawCredentials {
        RawCredentials {
            cert_pem: chain.as_bytes().to_vec(),
            key_pem: key.as_bytes().to_vec(),
            bundle_pem: bundle.as_bytes().to_vec(),
        }
    }

    fn load(raw: &RawCredentials, id: &SpiffeId) -> Result<Credentials, LoadError> {
        Credentials::from_raw(raw, id, UnixTime::now(), Duration::from_secs(60))
    }

    #[test]
    fn a_consistent_set_loads() {
        let ca = TestCa::new("cluster.local");
        let svid = ca.issue("shop", "orders");
        let creds = load(&raw(&svid.chain_pem, &svid.key_pem, &ca.root_pem), &svid.id).unwrap();
        assert_eq!(creds.id(), &svid.id);
        assert_eq!(creds.bundle.len(), 1);
    }

    #[test]
    fn each_inconsistency_is_reported_with_its_reason() {
        let ca = TestCa::new("cluster.local");
        let svid = ca.issue("shop", "orders");
        let other = ca.issue("shop", "orders");
        let foreign = TestCa::new("cluster.local");
        let cases = [
            (raw("", &svid.key_pem, &ca.root_pem), "malformed_pem"),
            (raw(&svid.chain_pem, "", &ca.root_pem), "malformed_pem"),
            (
                raw(&svid.chain_pem, &svid.key_pem, "nothing"),
                "malformed_pem",
            ),
            (
                raw(&svid.chain_pem, &other.key_pem, &ca.root_pem),
                "key_mismatch",
            ),
            (
                raw(&svid.chain_pem, &svid.key_pem, &foreign.root_pem),
                "unknown_ca",
            ),
        ];
        for (raw, reason) in cases {
            let err = load(&raw, &svid.id).unwrap_err();
            assert_eq!(err.reason(), reason, "{err}");
        }
        let payments = ca.id("shop", "payments");
        let err = load(
            &raw(&svid.chain_pem, &svid.key_pem, &ca.root_pem),
            &payments,
        )
        .unwrap_err();
        assert_eq!(err.reason(), "wrong_identity");
    }

    #[test]
    fn reading_through_data_gives_one_generation() {
        let ca = TestCa::new("cluster.local");
        let dir = tempfile::tempdir().unwrap();
        let first = ca.issue("shop", "orders");
        crate::test_util::certs::write_identity(
            dir.path(),
            &first.chain_pem,
            &first.key_pem,
            &ca.root_pem,
        );
        let raw = RawCredentials::read_dir(dir.path()).unwrap();
        assert_eq!(raw.cert_pem, first.chain_pem.as_bytes());
        assert_eq!(raw.key_pem, first.key_pem.as_bytes());
    }
}
