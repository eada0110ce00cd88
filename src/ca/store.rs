//! The CA directory written by `outrider ca init`: `root.crt`, `root.key`,
//! `issuer.crt`, `issuer.key` as PEM, keys readable by the owner only.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use super::issuer::{self, IssueError, SigningCa};
use crate::identity::{SvidError, TrustDomain};

pub const ROOT_CERT: &str = "root.crt";
pub const ROOT_KEY: &str = "root.key";
pub const ISSUER_CERT: &str = "issuer.crt";
pub const ISSUER_KEY: &str = "issuer.key";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0} already holds a CA; pass --force to replace it")]
    Exists(PathBuf),
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a PEM certificate")]
    NotCertificate { path: PathBuf },
    #[error("{path} does not name a trust domain: {reason}")]
    NoTrustDomain { path: PathBuf, reason: String },
    #[error(transparent)]
    Issue(#[from] IssueError),
}

/// A CA on disk.
pub struct CaDir {
    dir: PathBuf,
}

/// What `ca init` created.
pub struct CreatedCa {
    pub trust_domain: TrustDomain,
    pub root_not_after: OffsetDateTime,
    pub issuer_not_after: OffsetDateTime,
}

// === impl CaDir ===

impl CaDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Creates a trust anchor and an issuer signed by it.
    pub fn init(
        &self,
        td: &TrustDomain,
        root_lifetime: Duration,
        issuer_lifetime: Duration,
        force: bool,
        now: OffsetDateTime,
    ) -> Result<CreatedCa, StoreError> {
        if !force {
            for name in [ROOT_CERT, ROOT_KEY, ISSUER_CERT, ISSUER_KEY] {
                if self.path(name).exists() {
                    return Err(StoreError::Exists(self.dir.clone()));
                }
            }
        }
        let root = issuer::new_trust_anchor(td, root_lifetime, now)?;
        let root_ca = SigningCa::from_pem(&root.cert_pem, &root.key_pem)?;
        let intermediate = issuer::new_intermediate(td, &root_ca, issuer_lifetime, now)?;
        std::fs::create_dir_all(&self.dir).map_err(|source| StoreError::Write {
            path: self.dir.clone(),
            source,
        })?;
        self.write(ROOT_CERT, &root.cert_pem, 0o644)?;
        self.write(ROOT_KEY, &root.key_pem, 0o600)?;
        self.write(ISSUER_CERT, &intermediate.cert_pem, 0o644)?;
        self.write(ISSUER_KEY, &intermediate.key_pem, 0o600)?;
        Ok(CreatedCa {
            trust_domain: td.clone(),
            root_not_after: now + root_lifetime,
            issuer_not_after: now + issuer_lifetime,
        })
    }

    /// Replaces the issuer with a new one signed by the same trust anchor
    /// (needs `root.key`). Returns the new issuer's expiry.
    pub fn rotate_issuer(
        &self,
        issuer_lifetime: Duration,
        now: OffsetDateTime,
    ) -> Result<OffsetDateTime, StoreError> {
        let root_cert = self.read(ROOT_CERT)?;
        let root_key = self.read(ROOT_KEY)?;
        let td = self.trust_domain()?;
        let root_ca = SigningCa::from_pem(&root_cert, &root_key)?;
        let intermediate = issuer::new_intermediate(&td, &root_ca, issuer_lifetime, now)?;
        self.write(ISSUER_CERT, &intermediate.cert_pem, 0o644)?;
        self.write(ISSUER_KEY, &intermediate.key_pem, 0o600)?;
        Ok(now + issuer_lifetime)
    }

    /// The issuer, ready to sign leaves.
    pub fn signing_ca(&self) -> Result<SigningCa, StoreError> {
        let cert = self.read(ISSUER_CERT)?;
        let key = self.read(ISSUER_KEY)?;
        Ok(SigningCa::from_pem(&cert, &key)?)
    }

    /// The trust anchor's PEM, as it goes into a bundle.
    pub fn root_pem(&self) -> Result<String, StoreError> {
        self.read(ROOT_CERT)
    }

    /// The trust domain named by the root's `spiffe://<td>` URI SAN.
    pub fn trust_domain(&self) -> Result<TrustDomain, StoreError> {
        let path = self.path(ROOT_CERT);
        let pem = self.read(ROOT_CERT)?;
        trust_domain_of(&pem).map_err(|reason| StoreError::NoTrustDomain { path, reason })
    }

    fn read(&self, name: &str) -> Result<String, StoreError> {
        let path = self.path(name);
        std::fs::read_to_string(&path).map_err(|source| StoreError::Read { path, source })
    }

    /// Writes through a temporary file and a rename, so an interrupted
    /// `init --force` never leaves a half-written key.
    fn write(&self, name: &str, contents: &str, mode: u32) -> Result<(), StoreError> {
        let path = self.path(name);
        let tmp = self.path(&format!(".{name}.tmp"));
        let fail = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        let _ = std::fs::remove_file(&tmp);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(fail)?;
        file.write_all(contents.as_bytes()).map_err(fail)?;
        file.sync_all().map_err(fail)?;
        std::fs::rename(&tmp, &path).map_err(fail)
    }
}

/// Reads the trust domain from a CA certificate's URI SAN.
pub fn trust_domain_of(pem: &str) -> Result<TrustDomain, String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::{FromDer, X509Certificate};
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| format!("{e:?}"))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| e.to_string())?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| e.to_string())?
        .ok_or("no subjectAltName")?;
    let uri = san
        .value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .ok_or("no URI SAN")?;
    let id = crate::identity::SpiffeId::parse(uri).map_err(|e| SvidError::from(e).to_string())?;
    Ok(id.trust_domain())
}

/// Whether `dir` looks like a CA directory (used for clearer errors).
pub fn is_ca_dir(dir: &Path) -> bool {
    dir.join(ROOT_CERT).exists() && dir.join(ISSUER_KEY).exists()
}
