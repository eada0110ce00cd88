//! SPIFFE IDs and trust domains, parsed exactly as the SPIFFE-ID standard
//! says (`spiffe://<trust-domain>/<path>`).
//!
//! Pure string logic: no certificates, no I/O. Everything that accepts an
//! identity from a certificate, a config file or a flag goes through
//! [`SpiffeId::parse`], so there is one definition of "valid".

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

const SCHEME: &str = "spiffe://";
/// The standard requires implementations to support IDs of at least this many
/// bytes and not to generate longer ones; we refuse longer ones outright.
const MAX_ID_BYTES: usize = 2048;
const MAX_TRUST_DOMAIN_BYTES: usize = 255;

/// Why a string is not a SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid SPIFFE ID {input:?}: {reason}")]
pub struct InvalidSpiffeId {
    pub input: String,
    pub reason: &'static str,
}

/// A validated trust domain (`cluster.local`).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(Arc<str>);

/// A validated SPIFFE ID. Cheap to clone (one shared allocation).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    id: Arc<str>,
    /// Byte offset where the path starts (== id.len() for a root ID).
    path_start: usize,
}

// === impl TrustDomain ===

impl TrustDomain {
    pub fn parse(input: &str) -> Result<Self, InvalidSpiffeId> {
        check_trust_domain(input).map_err(|reason| InvalidSpiffeId {
            input: input.to_string(),
            reason,
        })?;
        Ok(Self(input.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The trust domain's own ID, `spiffe://<td>`, used as the URI SAN of
    /// signing certificates.
    pub fn id(&self) -> SpiffeId {
        SpiffeId {
            id: format!("{SCHEME}{}", self.0).into(),
            path_start: SCHEME.len() + self.0.len(),
        }
    }
}

impl FromStr for TrustDomain {
    type Err = InvalidSpiffeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TrustDomain({})", self.0)
    }
}

fn check_trust_domain(td: &str) -> Result<(), &'static str> {
    if td.is_empty() {
        return Err("trust domain is empty");
    }
    if td.len() > MAX_TRUST_DOMAIN_BYTES {
        return Err("trust domain is longer than 255 bytes");
    }
    if !td
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("trust domain may only contain lowercase letters, digits, '.', '-' and '_'");
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), &'static str> {
    // `path` is either empty or starts with '/'.
    if path.is_empty() {
        return Ok(());
    }
    if path.ends_with('/') {
        return Err("path has a trailing '/'");
    }
    for segment in path[1..].split('/') {
        match segment {
            "" => return Err("path has an empty segment"),
            "." | ".." => return Err("path has a '.' or '..' segment"),
            s if !s
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_')) =>
            {
                return Err("path segments may only contain letters, digits, '.', '-' and '_'");
            }
            _ => {}
        }
    }
    Ok(())
}

// === impl SpiffeId ===

impl SpiffeId {
    pub fn parse(input: &str) -> Result<Self, InvalidSpiffeId> {
        let fail = |reason| InvalidSpiffeId {
            input: input.to_string(),
            reason,
        };
        if input.len() > MAX_ID_BYTES {
            return Err(fail("longer than 2048 bytes"));
        }
        let rest = input
            .strip_prefix(SCHEME)
            .ok_or_else(|| fail("scheme is not 'spiffe://'"))?;
        if rest.contains(['?', '#']) {
            return Err(fail("query and fragment are not allowed"));
        }
        if rest.contains(['@', '%']) {
            return Err(fail("userinfo and percent-encoding are not allowed"));
        }
        let td_end = rest.find('/').unwrap_or(rest.len());
        let (td, path) = rest.split_at(td_end);
        if td.contains(':') {
            return Err(fail("a port is not allowed in the trust domain"));
        }
        check_trust_domain(td).map_err(fail)?;
        check_path(path).map_err(fail)?;
        Ok(Self {
            id: input.into(),
            path_start: SCHEME.len() + td_end,
        })
    }

    /// The conventional workload ID `spiffe://<td>/ns/<ns>/sa/<sa>`.
    pub fn workload(
        trust_domain: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, InvalidSpiffeId> {
        Self::parse(&format!(
            "{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}"
        ))
    }

    pub fn as_str(&self) -> &str {
        &self.id
    }

    pub fn trust_domain_str(&self) -> &str {
        &self.id[SCHEME.len()..self.path_start]
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.trust_domain_str().into())
    }

    pub fn path(&self) -> &str {
        &self.id[self.path_start..]
    }

    /// True for `spiffe://<td>` with no path: such an ID names a trust
    /// domain, never a workload, and must not authenticate one.
    pub fn is_root(&self) -> bool {
        self.path().is_empty()
    }

    /// `(namespace, service account)` when the path follows the
    /// `/ns/<ns>/sa/<sa>` convention.
    pub fn namespace_and_service_account(&self) -> Option<(&str, &str)> {
        let mut parts = self.path().strip_prefix('/')?.split('/');
        match (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.id)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.id)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.id)
    }
}

impl<'de> serde::Deserialize<'de> for TrustDomain {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

impl serde::Serialize for TrustDomain {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_workload_id_into_its_parts() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        assert_eq!(id.trust_domain_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/shop/sa/orders");
        assert_eq!(id.namespace_and_service_account(), Some(("shop", "orders")));
        assert!(!id.is_root());
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/orders");
    }

    #[test]
    fn a_trust_domain_id_is_a_root_id() {
        let id = SpiffeId::parse("spiffe://example.org").unwrap();
        assert!(id.is_root());
        assert_eq!(id.trust_domain_str(), "example.org");
        assert_eq!(TrustDomain::parse("example.org").unwrap().id(), id);
        assert_eq!(id.namespace_and_service_account(), None);
    }

    #[test]
    fn workload_builds_the_conventional_path() {
        let td = TrustDomain::parse("cluster.local").unwrap();
        let id = SpiffeId::workload(&td, "default", "web").unwrap();
        assert_eq!(id.as_str(), "spiffe://cluster.local/ns/default/sa/web");
        assert!(
            SpiffeId::workload(&td, "bad/ns", "web")
                .is_ok_and(|id| id.namespace_and_service_account().is_none())
        );
        assert!(SpiffeId::workload(&td, "", "web").is_err());
    }

    #[test]
    fn rejects_every_form_the_standard_forbids() {
        let cases = [
            ("http://cluster.local/ns/a/sa/b", "scheme"),
            ("SPIFFE://cluster.local/x", "scheme"),
            ("spiffe://", "empty"),
            ("spiffe:///path", "empty"),
            ("spiffe://Cluster.local/x", "lowercase"),
            ("spiffe://cluster.local:8080/x", "port"),
            ("spiffe://user@cluster.local/x", "userinfo"),
            ("spiffe://cluster.local/x?y=1", "query"),
            ("spiffe://cluster.local/x#frag", "query"),
            ("spiffe://cluster.local/", "trailing"),
            ("spiffe://cluster.local/a//b", "empty segment"),
            ("spiffe://cluster.local/a/./b", "'.'"),
            ("spiffe://cluster.local/a/../b", "'.'"),
            ("spiffe://cluster.local/a%20b", "percent"),
            ("spiffe://cluster.local/a b", "segments may only"),
        ];
        for (input, why) in cases {
            let err = SpiffeId::parse(input).expect_err(input);
            assert!(
                err.reason.contains(why),
                "{input}: {} does not mention {why}",
                err.reason
            );
        }
    }

    #[test]
    fn rejects_ids_longer_than_the_standard_allows() {
        let long = format!("spiffe://td/{}", "a".repeat(MAX_ID_BYTES));
        assert!(SpiffeId::parse(&long).is_err());
        let long_td = format!("spiffe://{}/x", "a".repeat(256));
        assert!(SpiffeId::parse(&long_td).is_err());
    }

    #[test]
    fn path_is_case_sensitive_and_allows_its_full_alphabet() {
        let a = SpiffeId::parse("spiffe://td/Ns/A-b_c.d/0").unwrap();
        let b = SpiffeId::parse("spiffe://td/ns/A-b_c.d/0").unwrap();
        assert_ne!(a, b);
    }
}
