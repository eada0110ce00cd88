//! Compiles the policies of a namespace into what applies to one workload.
//!
//! The proxy reads a [`WorkloadPolicy`] from a `watch` channel per
//! connection or request; a source rebuilds and republishes it whenever
//! objects, the workload's labels or the settings change.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::header::HeaderName;

use super::jwt::{JwtRule, TokenLocation, locations};
use super::limits::RateLimitPolicy;
use super::model::{Action, DefaultPolicy, MtlsMode, PeerAuth, Policy, RequestAuthn, Selector};

/// A kubelet probe that is always allowed from unauthenticated callers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Probe {
    pub port: u16,
    /// An exact HTTP path (`GET`/`HEAD` only). Without a path the port is
    /// open to unauthenticated TCP connections (tcpSocket probes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

impl std::str::FromStr for Probe {
    type Err = String;

    /// `PORT` (any connection) or `PORT/path` (that HTTP path), the form
    /// of `--probe` and `OUTRIDER_POLICY_PROBES`.
    fn from_str(text: &str) -> Result<Self, String> {
        let (port, path) = match text.split_once('/') {
            Some((port, path)) => (port, Some(format!("/{path}"))),
            None => (text, None),
        };
        match port.parse::<u16>() {
            Ok(port) if port > 0 => Ok(Probe { port, path }),
            _ => Err(format!("{text:?} is not PORT or PORT/path")),
        }
    }
}

/// Who the workload is.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Workload {
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
}

/// Mesh-wide settings that policies refine.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub default: DefaultPolicy,
    pub mtls: MtlsMode,
    pub probes: Vec<Probe>,
}

/// Everything that decides for one workload.
#[derive(Debug, Clone)]
pub struct WorkloadPolicy {
    pub namespace: String,
    pub deny: Vec<Arc<Policy>>,
    /// ALLOW policies that select the workload, broken ones included (they
    /// match nothing but still make the workload deny-by-default).
    pub allow: Vec<Arc<Policy>>,
    pub audit: Vec<Arc<Policy>>,
    pub default: DefaultPolicy,
    pub probes: Vec<Probe>,
    pub mtls: MtlsMode,
    pub port_mtls: BTreeMap<u16, MtlsMode>,
    /// Deciding policies with HTTP conditions, which cannot be evaluated on
    /// opaque connections (reported when that happens).
    pub http_only_rules: Vec<Arc<str>>,
    /// The RequestAuthentications in force.
    pub jwt: JwtPolicy,
    /// The LocalRateLimitPolicies that select the workload, by name.
    pub rate_limits: Vec<Arc<RateLimitPolicy>>,
    /// False until the source has delivered its first complete state.
    pub synced: bool,
}

/// The request authentication in force for a workload: the JWT rules of
/// every RequestAuthentication that selects it (one per issuer, the
/// first by `namespace/name` when two name the same issuer).
#[derive(Debug, Clone, Default)]
pub struct JwtPolicy {
    pub rules: Vec<Arc<JwtRule>>,
    /// A broken RequestAuthentication selects the workload: every request
    /// is refused (it may have been meant to require tokens).
    pub broken: Option<Arc<str>>,
    /// Where the rules look for tokens.
    pub locations: Vec<TokenLocation>,
    /// Headers some rule copies a claim into: removed from every incoming
    /// request before anything is copied.
    pub claim_headers: Vec<HeaderName>,
    /// Some rule says `presence: Required`.
    pub required: bool,
}

impl JwtPolicy {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.broken.is_none()
    }
}

impl WorkloadPolicy {
    /// Adds the RequestAuthentications of the namespace that select the
    /// workload.
    pub fn with_request_authentication(
        mut self,
        workload: &Workload,
        request_authns: &[RequestAuthn],
    ) -> Self {
        let prefix = format!("{}/", workload.namespace);
        let mut selected: Vec<&RequestAuthn> = request_authns
            .iter()
            .filter(|r| r.id.starts_with(&prefix) && r.selector.selects(&workload.labels))
            .collect();
        selected.sort_by(|a, b| a.id.cmp(&b.id));
        let mut jwt = JwtPolicy::default();
        for authn in selected {
            if !authn.is_valid() {
                jwt.broken.get_or_insert_with(|| authn.id.clone());
                continue;
            }
            for rule in &authn.rules {
                if jwt.rules.iter().all(|r| r.issuer != rule.issuer) {
                    jwt.rules.push(rule.clone());
                }
            }
        }
        jwt.locations = locations(&jwt.rules);
        for rule in &jwt.rules {
            for (header, _) in &rule.claim_headers {
                if !jwt.claim_headers.contains(header) {
                    jwt.claim_headers.push(header.clone());
                }
            }
        }
        jwt.required = jwt.rules.iter().any(|r| r.required);
        self.jwt = jwt;
        self
    }

    /// Adds the LocalRateLimitPolicies of the namespace that select the
    /// workload (broken ones have no limits and add nothing).
    pub fn with_rate_limits(
        mut self,
        workload: &Workload,
        policies: &[Arc<RateLimitPolicy>],
    ) -> Self {
        let prefix = format!("{}/", workload.namespace);
        self.rate_limits = policies
            .iter()
            .filter(|p| {
                p.id.starts_with(&prefix)
                    && p.selector.selects(&workload.labels)
                    && !p.limits.is_empty()
            })
            .cloned()
            .collect();
        self.rate_limits.sort_by(|a, b| a.id.cmp(&b.id));
        self
    }
}

impl WorkloadPolicy {
    /// No policies: the settings alone decide.
    pub fn unsynced(workload: &Workload, settings: &Settings) -> Self {
        compile(workload, settings, &[], &[], false)
    }

    /// The mTLS mode on `port`.
    pub fn mtls_mode(&self, port: u16) -> MtlsMode {
        self.port_mtls.get(&port).copied().unwrap_or(self.mtls)
    }
}

/// Selects what applies to `workload` out of a namespace's objects.
pub fn compile(
    workload: &Workload,
    settings: &Settings,
    policies: &[Arc<Policy>],
    peer_auths: &[PeerAuth],
    synced: bool,
) -> WorkloadPolicy {
    let prefix = format!("{}/", workload.namespace);
    let selected = policies
        .iter()
        .filter(|p| p.id.starts_with(&prefix) && p.selector.selects(&workload.labels));
    let (mut deny, mut allow, mut audit) = (Vec::new(), Vec::new(), Vec::new());
    for policy in selected {
        match policy.action {
            Action::Deny => deny.push(policy.clone()),
            Action::Allow => allow.push(policy.clone()),
            Action::Audit => audit.push(policy.clone()),
        }
    }
    // Stable evaluation order, whatever order the source listed them in.
    for list in [&mut deny, &mut allow, &mut audit] {
        list.sort_by(|a, b| a.id.cmp(&b.id));
    }
    let http_only_rules = deny
        .iter()
        .chain(&allow)
        .filter(|p| p.rules.iter().any(|r| r.has_http_conditions()))
        .map(|p| p.id.clone())
        .collect();
    let (mtls, port_mtls) = peer_authentication(workload, settings.mtls, peer_auths);
    WorkloadPolicy {
        namespace: workload.namespace.clone(),
        deny,
        allow,
        audit,
        default: settings.default,
        probes: settings.probes.clone(),
        mtls,
        port_mtls,
        http_only_rules,
        jwt: JwtPolicy::default(),
        rate_limits: Vec::new(),
        synced,
    }
}

/// The narrowest PeerAuthentication wins: one selecting the workload by
/// labels over a namespace-wide one; among equals, the oldest.
fn peer_authentication(
    workload: &Workload,
    mesh_default: MtlsMode,
    peer_auths: &[PeerAuth],
) -> (MtlsMode, BTreeMap<u16, MtlsMode>) {
    let prefix = format!("{}/", workload.namespace);
    let in_namespace = peer_auths.iter().filter(|p| p.id.starts_with(&prefix));
    let specific = in_namespace
        .clone()
        .filter(|p| {
            matches!(p.selector, Selector::Labels(_)) && p.selector.selects(&workload.labels)
        })
        .min_by(|a, b| a.order_key.cmp(&b.order_key));
    let namespace_wide = in_namespace
        .filter(|p| p.selector == Selector::All)
        .min_by(|a, b| a.order_key.cmp(&b.order_key));
    let base = namespace_wide.and_then(|p| p.mode).unwrap_or(mesh_default);
    match specific {
        Some(p) => (p.mode.unwrap_or(base), p.ports.clone()),
        None => (
            base,
            namespace_wide.map(|p| p.ports.clone()).unwrap_or_default(),
        ),
    }
}

#[cfg(test)]
mod tests;
