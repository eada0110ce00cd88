//! The kube-free policy model, and the conversion from CRD objects into it.
//!
//! Objects arrive as JSON values (from files or the API server). Each is
//! judged here, once: values are parsed into typed matchers, and anything
//! invalid is turned into its fail-safe form, so that a broken object never
//! widens access:
//!
//! - a broken ALLOW policy still selects its workloads (so they become
//!   deny-by-default) but matches nothing;
//! - in a DENY policy, an unparseable value in a positive field makes that
//!   field match everything, and one in a `not` field is dropped, so the
//!   rule denies at least what was meant; a DENY (or unknown-action) policy
//!   whose spec cannot be read at all denies everything to the workloads it
//!   selects, or to the whole namespace if even its selector is unreadable;
//! - a broken AUDIT policy is ignored (it never decides anything);
//! - a PeerAuthentication that cannot be read makes its workloads STRICT.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::crd;
use crate::identity::SpiffeId;

/// Whether plaintext is accepted from, and sent to, workloads without a
/// proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MtlsMode {
    #[serde(alias = "STRICT")]
    Strict,
    #[serde(alias = "PERMISSIVE")]
    Permissive,
}

impl MtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Strict => "strict",
            Self::Permissive => "permissive",
        }
    }
}

/// What applies when no ALLOW policy selects a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DefaultPolicy {
    AllowAll,
    /// Any caller with a mesh identity.
    AllowAuthenticated,
    /// Callers whose identity is in the workload's own namespace.
    AllowSameNamespace,
    Deny,
}

impl DefaultPolicy {
    pub const ALL: [Self; 4] = [
        Self::AllowAll,
        Self::AllowAuthenticated,
        Self::AllowSameNamespace,
        Self::Deny,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AllowAll => "allow-all",
            Self::AllowAuthenticated => "allow-authenticated",
            Self::AllowSameNamespace => "allow-same-namespace",
            Self::Deny => "deny",
        }
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// Which workloads of the namespace an object applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selector {
    /// Every workload in the namespace.
    All,
    Labels(BTreeMap<String, String>),
}

impl Selector {
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        match self {
            Self::All => true,
            Self::Labels(wanted) => wanted.iter().all(|(k, v)| labels.get(k) == Some(v)),
        }
    }

    fn from_crd(selector: Option<&crd::WorkloadSelector>) -> Self {
        match selector {
            Some(s) if !s.match_labels.is_empty() => Self::Labels(s.match_labels.clone()),
            _ => Self::All,
        }
    }

    /// Reads `spec.selector.matchLabels` out of a spec that failed to
    /// parse as a whole; `None` when even that is unreadable.
    fn salvage(spec: &Value) -> Option<Self> {
        match spec.get("selector") {
            None | Some(Value::Null) => Some(Self::All),
            Some(selector) => match selector.get("matchLabels") {
                None | Some(Value::Null) => Some(Self::All),
                Some(labels) => {
                    let labels: BTreeMap<String, String> =
                        serde_json::from_value(labels.clone()).ok()?;
                    Some(if labels.is_empty() {
                        Self::All
                    } else {
                        Self::Labels(labels)
                    })
                }
            },
        }
    }
}

/// `*`, `exact`, `prefix*` or `*suffix`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// Matches any non-empty value.
    Any,
    Exact(String),
    Prefix(String),
    Suffix(String),
}

impl Pattern {
    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("empty pattern".into());
        }
        if s == "*" {
            return Ok(Self::Any);
        }
        let inner_star = |t: &str| t.contains('*');
        if let Some(rest) = s.strip_prefix('*') {
            if inner_star(rest) {
                return Err(format!("{s:?}: '*' only as the first or last character"));
            }
            return Ok(Self::Suffix(rest.to_string()));
        }
        if let Some(rest) = s.strip_suffix('*') {
            if inner_star(rest) {
                return Err(format!("{s:?}: '*' only as the first or last character"));
            }
            return Ok(Self::Prefix(rest.to_string()));
        }
        if inner_star(s) {
            return Err(format!("{s:?}: '*' only as the first or last character"));
        }
        Ok(Self::Exact(s.to_string()))
    }

    pub fn matches(&self, value: &str) -> bool {
        match self {
            Self::Any => !value.is_empty(),
            Self::Exact(e) => value == e,
            Self::Prefix(p) => value.starts_with(p.as_str()),
            Self::Suffix(s) => value.ends_with(s.as_str()),
        }
    }
}

/// A field with values that may match (`None`: not constrained) and
/// values that must not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match<T> {
    pub any_of: Option<Vec<T>>,
    pub none_of: Vec<T>,
}

impl<T> Default for Match<T> {
    fn default() -> Self {
        Self {
            any_of: None,
            none_of: Vec::new(),
        }
    }
}

impl<T> Match<T> {
    pub fn check(&self, hit: impl Fn(&T) -> bool) -> bool {
        self.any_of.as_ref().is_none_or(|any| any.iter().any(&hit)) && !self.none_of.iter().any(hit)
    }

    pub fn is_constrained(&self) -> bool {
        self.any_of.is_some() || !self.none_of.is_empty()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Source {
    pub principals: Match<Pattern>,
    pub namespaces: Match<String>,
    pub ip_blocks: Match<IpNet>,
    pub authenticated: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Operation {
    pub ports: Match<u16>,
    pub methods: Match<String>,
    pub paths: Match<Pattern>,
}

impl Operation {
    /// Whether the operation says anything only HTTP can answer.
    pub fn is_http_only(&self) -> bool {
        self.methods.is_constrained() || self.paths.is_constrained()
    }
}

/// Matches when any source and any operation match (empty: anything).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Rule {
    pub from: Vec<Source>,
    pub to: Vec<Operation>,
}

impl Rule {
    pub fn has_http_conditions(&self) -> bool {
        self.to.iter().any(Operation::is_http_only)
    }
}

/// An AuthorizationPolicy, judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    /// `namespace/name`: the label value in metrics and logs.
    pub id: Arc<str>,
    pub action: Action,
    pub selector: Selector,
    /// No rules: matches nothing.
    pub rules: Vec<Rule>,
    /// What was wrong with the object; empty when valid.
    pub problems: Vec<String>,
}

/// A PeerAuthentication, judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAuth {
    pub id: Arc<str>,
    pub selector: Selector,
    /// For choosing among several: creation time, then name.
    pub order_key: (String, String),
    pub mode: Option<MtlsMode>,
    pub ports: BTreeMap<u16, MtlsMode>,
    pub problems: Vec<String>,
}

/// A policy object as a source delivers it.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub kind: Kind,
    pub namespace: String,
    pub name: String,
    pub created: Option<String>,
    pub spec: Value,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    AuthorizationPolicy,
    PeerAuthentication,
}

impl Kind {
    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "AuthorizationPolicy" => Some(Self::AuthorizationPolicy),
            "PeerAuthentication" => Some(Self::PeerAuthentication),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::PeerAuthentication => "PeerAuthentication",
        }
    }
}

// === AuthorizationPolicy conversion ===

/// Collects problems while converting one field of one policy.
struct Field<'a> {
    action: Action,
    problems: &'a mut Vec<String>,
    broken: &'a mut bool,
}

impl Field<'_> {
    /// Parses every value, recording each bad one; true if any was bad.
    fn parse_each<T>(
        &mut self,
        name: &str,
        values: &[impl AsRef<str>],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> (Vec<T>, bool) {
        let mut out = Vec::with_capacity(values.len());
        let mut bad = false;
        for v in values {
            match parse(v.as_ref()) {
                Ok(t) => out.push(t),
                Err(e) => {
                    self.problems.push(format!("{name}: {e}"));
                    bad = true;
                }
            }
        }
        (out, bad)
    }

    /// Parses a positive field. In a DENY policy a bad value makes the
    /// whole field unconstrained (match everything); elsewhere it breaks
    /// the policy.
    fn any_of<T>(
        &mut self,
        name: &str,
        values: &[impl AsRef<str>],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        if values.is_empty() {
            return None;
        }
        let (out, bad) = self.parse_each(name, values, parse);
        if bad {
            if self.action == Action::Deny {
                return None;
            }
            *self.broken = true;
        }
        Some(out)
    }

    /// Parses a `not` field. In a DENY policy a bad value is dropped (the
    /// rule excludes less, so denies more); elsewhere it breaks the policy.
    fn none_of<T>(
        &mut self,
        name: &str,
        values: &[impl AsRef<str>],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        let (out, bad) = self.parse_each(name, values, parse);
        if bad && self.action != Action::Deny {
            *self.broken = true;
        }
        out
    }
}

fn parse_principal(s: &str) -> Result<Pattern, String> {
    // Istio writes principals without the scheme; accept both forms.
    let full = if s.starts_with("spiffe://") || s.starts_with('*') {
        s.to_string()
    } else {
        format!("spiffe://{s}")
    };
    let pattern = Pattern::parse(&full)?;
    if let Pattern::Exact(id) = &pattern {
        SpiffeId::parse(id).map_err(|e| e.to_string())?;
    }
    Ok(pattern)
}

fn parse_namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a namespace name"))
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{s} is not a port (1-65535)"))
}

fn parse_method(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not an upper-case HTTP method"))
    }
}

fn parse_path(s: &str) -> Result<Pattern, String> {
    Pattern::parse(s)
}

/// Deserialises a spec, naming the field that does not fit
/// (`rules[0].to[0].ports[0]: invalid type ...`). A field this version
/// does not know is an error too: `principal:` for `principals:` would
/// otherwise be dropped silently and an ALLOW rule would open to everyone.
/// (The API server prunes unknown fields, so this bites in file mode and
/// with a newer CRD than the proxy, where a constraint we cannot see must
/// not be ignored either.)
fn read_spec<T: serde::de::DeserializeOwned>(spec: &Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let mut note_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let parsed =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(spec, &mut note_unknown))
            .map_err(|error| {
                let path = error.path().to_string();
                if path == "." {
                    error.into_inner().to_string()
                } else {
                    format!("{path}: {}", error.into_inner())
                }
            })?;
    if unknown.is_empty() {
        Ok(parsed)
    } else {
        Err(format!("unknown field {}", unknown.join(", ")))
    }
}

impl Policy {
    /// Judges an AuthorizationPolicy object. Never fails: what cannot be
    /// read takes its fail-safe form (see the module docs).
    pub fn from_object(object: &Object) -> Self {
        let id: Arc<str> = format!("{}/{}", object.namespace, object.name).into();
        match read_spec::<crd::AuthorizationPolicySpec>(&object.spec) {
            Ok(spec) => Self::from_spec(id, &spec),
            Err(error) => Self::unreadable(id, &object.spec, error),
        }
    }

    pub fn from_spec(id: Arc<str>, spec: &crd::AuthorizationPolicySpec) -> Self {
        let action = match spec.action {
            crd::Action::Allow => Action::Allow,
            crd::Action::Deny => Action::Deny,
            crd::Action::Audit => Action::Audit,
        };
        let mut problems = Vec::new();
        let mut broken = false;
        let mut field = Field {
            action,
            problems: &mut problems,
            broken: &mut broken,
        };
        let port_strings = |ports: &[u32]| ports.iter().map(u32::to_string).collect::<Vec<_>>();
        let rules = spec
            .rules
            .iter()
            .map(|rule| Rule {
                from: rule
                    .from
                    .iter()
                    .map(|s| Source {
                        principals: Match {
                            any_of: field.any_of("principals", &s.principals, parse_principal),
                            none_of: field.none_of(
                                "notPrincipals",
                                &s.not_principals,
                                parse_principal,
                            ),
                        },
                        namespaces: Match {
                            any_of: field.any_of("namespaces", &s.namespaces, parse_namespace),
                            none_of: field.none_of(
                                "notNamespaces",
                                &s.not_namespaces,
                                parse_namespace,
                            ),
                        },
                        ip_blocks: Match {
                            any_of: field.any_of("ipBlocks", &s.ip_blocks, parse_cidr),
                            none_of: field.none_of("notIpBlocks", &s.not_ip_blocks, parse_cidr),
                        },
                        authenticated: s.authenticated,
                    })
                    .collect(),
                to: rule
                    .to
                    .iter()
                    .map(|o| Operation {
                        ports: Match {
                            any_of: field.any_of("ports", &port_strings(&o.ports), parse_port),
                            none_of: field.none_of(
                                "notPorts",
                                &port_strings(&o.not_ports),
                                parse_port,
                            ),
                        },
                        methods: Match {
                            any_of: field.any_of("methods", &o.methods, parse_method),
                            none_of: field.none_of("notMethods", &o.not_methods, parse_method),
                        },
                        paths: Match {
                            any_of: field.any_of("paths", &o.paths, parse_path),
                            none_of: field.none_of("notPaths", &o.not_paths, parse_path),
                        },
                    })
                    .collect(),
            })
            .collect();
        Self {
            id,
            action,
            selector: Selector::from_crd(spec.selector.as_ref()),
            // A broken ALLOW or AUDIT policy keeps its selector but
            // matches nothing.
            rules: if broken { Vec::new() } else { rules },
            problems,
        }
    }

    /// The fail-safe stand-in for a policy whose spec does not parse.
    fn unreadable(id: Arc<str>, spec: &Value, error: String) -> Self {
        let action = match spec.get("action").and_then(Value::as_str) {
            Some("ALLOW") => Action::Allow,
            Some("AUDIT") => Action::Audit,
            // DENY, or an action we cannot read: deny.
            _ => Action::Deny,
        };
        let selector = Selector::salvage(spec);
        let problems = vec![format!("spec does not parse: {error}")];
        let (selector, rules) = match (action, selector) {
            (Action::Deny, Some(selector)) => (selector, vec![Rule::default()]),
            // Cannot even tell whom it was for: the whole namespace.
            (Action::Deny, None) => (Selector::All, vec![Rule::default()]),
            (_, selector) => (selector.unwrap_or(Selector::All), Vec::new()),
        };
        Self {
            id,
            action,
            selector,
            rules,
            problems,
        }
    }

    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }
}

// === PeerAuthentication conversion ===

impl PeerAuth {
    pub fn from_object(object: &Object) -> Self {
        let id: Arc<str> = format!("{}/{}", object.namespace, object.name).into();
        let order_key = (
            object.created.clone().unwrap_or_default(),
            object.name.clone(),
        );
        let mode = |m: crd::PeerAuthMode| match m {
            crd::PeerAuthMode::Strict => MtlsMode::Strict,
            crd::PeerAuthMode::Permissive => MtlsMode::Permissive,
        };
        match read_spec::<crd::PeerAuthenticationSpec>(&object.spec) {
            Ok(spec) => {
                let mut problems = Vec::new();
                let mut ports = BTreeMap::new();
                for (port, settings) in &spec.port_level_mtls {
                    match parse_port(port) {
                        Ok(p) => {
                            ports.insert(p, mode(settings.mode));
                        }
                        Err(e) => problems.push(format!("portLevelMtls: {e}")),
                    }
                }
                // An unreadable port key cannot be honoured per port; make
                // the whole workload strict rather than guess.
                let workload_mode = if problems.is_empty() {
                    spec.mtls.as_ref().map(|m| mode(m.mode))
                } else {
                    Some(MtlsMode::Strict)
                };
                Self {
                    id,
                    selector: Selector::from_crd(spec.selector.as_ref()),
                    order_key,
                    mode: workload_mode,
                    ports,
                    problems,
                }
            }
            Err(error) => Self {
                id,
                selector: Selector::salvage(&object.spec).unwrap_or(Selector::All),
                order_key,
                mode: Some(MtlsMode::Strict),
                ports: BTreeMap::new(),
                problems: vec![format!("spec does not parse: {error}")],
            },
        }
    }
}

#[cfg(test)]
mod tests;
