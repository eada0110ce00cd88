//! `outrider ca inspect`: describes a certificate file and says whether it
//! is a valid X509-SVID right now (and, given a bundle, whether its chain
//! verifies).

use std::fmt;
use std::time::Duration;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::identity::svid::{Expected, Usage, parse_leaf, verify_svid};
use crate::identity::{SvidError, SvidLeaf, TrustBundle};
use crate::units::{format_duration, format_utc};

#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    #[error("not a PEM certificate file: {0}")]
    Pem(String),
    #[error("the file holds no certificate")]
    Empty,
    #[error("not a valid X509-SVID: {0}")]
    Invalid(#[from] SvidError),
}

/// What `ca inspect` prints.
#[derive(Debug)]
pub struct Report {
    pub leaf: SvidLeaf,
    pub chain_len: usize,
    pub remaining: Duration,
    /// True when a bundle was given and the chain verified against it.
    pub chain_verified: bool,
}

/// Describes the first certificate of `pem` (the leaf) and validates it as
/// an X509-SVID at `now`; with `bundle_pem`, also verifies the chain.
pub fn inspect(
    pem: &[u8],
    bundle_pem: Option<&[u8]>,
    now: UnixTime,
) -> Result<Report, InspectError> {
    let chain = parse_pem(pem)?;
    let leaf_der = chain.first().ok_or(InspectError::Empty)?;
    let leaf = match bundle_pem {
        Some(bundle_pem) => {
            let bundle = TrustBundle::new(parse_pem(bundle_pem)?)?;
            let leaf = parse_leaf(leaf_der)?;
            let td = leaf.id.trust_domain();
            verify_svid(
                &bundle,
                leaf_der,
                &chain[1..],
                &Expected::TrustDomain(&td),
                Usage::Server,
                now,
                Duration::ZERO,
            )?
        }
        None => {
            let leaf = parse_leaf(leaf_der)?;
            let now_s = now.as_secs() as i64;
            if now_s < leaf.not_before {
                return Err(SvidError::NotYetValid {
                    not_before: leaf.not_before,
                    now: now_s,
                }
                .into());
            }
            if now_s > leaf.not_after {
                return Err(SvidError::Expired {
                    not_after: leaf.not_after,
                    now: now_s,
                }
                .into());
            }
            leaf
        }
    };
    let remaining = Duration::from_secs((leaf.not_after - now.as_secs() as i64).max(0) as u64);
    Ok(Report {
        chain_len: chain.len(),
        remaining,
        chain_verified: bundle_pem.is_some(),
        leaf,
    })
}

/// Parses a PEM bundle, insisting on at least one certificate.
pub fn parse_bundle(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, InspectError> {
    parse_pem(pem)
}

fn parse_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, InspectError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| InspectError::Pem(format!("{e:?}")))?;
    if certs.is_empty() {
        return Err(InspectError::Empty);
    }
    Ok(certs)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "SPIFFE ID:   {}", self.leaf.id)?;
        writeln!(f, "Issuer:      {}", self.leaf.issuer)?;
        writeln!(f, "Serial:      {}", self.leaf.serial)?;
        writeln!(f, "Not before:  {}", format_utc(self.leaf.not_before))?;
        writeln!(f, "Not after:   {}", format_utc(self.leaf.not_after))?;
        writeln!(f, "Remaining:   {}", format_duration(self.remaining))?;
        writeln!(f, "Chain:       {} certificate(s)", self.chain_len)?;
        if self.chain_verified {
            writeln!(f, "Verified:    chain leads to a root in the bundle")?;
        }
        Ok(())
    }
}
