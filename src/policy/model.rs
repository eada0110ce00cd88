//! The kube-free policy model: what a judged AuthorizationPolicy or
//! PeerAuthentication is, the patterns and matchers its rules are made
//! of, and the mesh settings. No I/O and no CRD types: objects become
//! these in [`super::judge`], which also holds the fail-safe rules.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

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
    /// `<iss>/<sub>` of the request's verified token: known per request,
    /// never per connection.
    pub request_principals: Match<Pattern>,
}

impl Source {
    /// Whether the source says anything only a request's token can answer.
    pub fn has_token_conditions(&self) -> bool {
        self.request_principals.is_constrained()
    }
}

/// What a `when` condition looks at in the verified token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenKey {
    /// `request.auth.claims[a][b]...`: the path into the claims.
    Claim(Vec<String>),
    /// `request.auth.audiences`.
    Audiences,
}

impl TokenKey {
    /// `request.auth.claims[<name>]` (nested with more brackets) or
    /// `request.auth.audiences`.
    pub fn parse(key: &str) -> Result<Self, String> {
        if key == "request.auth.audiences" {
            return Ok(Self::Audiences);
        }
        let bad =
            || format!("{key:?} is not request.auth.claims[<name>] or request.auth.audiences");
        let mut rest = key.strip_prefix("request.auth.claims").ok_or_else(bad)?;
        let mut path = Vec::new();
        while !rest.is_empty() {
            let inner = rest.strip_prefix('[').ok_or_else(bad)?;
            let (name, after) = inner.split_once(']').ok_or_else(bad)?;
            if name.is_empty() || name.contains('[') {
                return Err(bad());
            }
            path.push(name.to_string());
            rest = after;
        }
        if path.is_empty() {
            return Err(bad());
        }
        Ok(Self::Claim(path))
    }
}

/// A `when` entry: the token's values under `key` against patterns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub key: TokenKey,
    pub values: Match<Pattern>,
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
    /// All must hold.
    pub when: Vec<Condition>,
}

impl Rule {
    /// Whether the rule says anything only an HTTP request can answer
    /// (methods, paths, or the request's token).
    pub fn has_http_conditions(&self) -> bool {
        self.to.iter().any(Operation::is_http_only)
            || self.from.iter().any(Source::has_token_conditions)
            || !self.when.is_empty()
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

/// A RequestAuthentication, judged.
#[derive(Debug, Clone)]
pub struct RequestAuthn {
    pub id: Arc<str>,
    pub selector: Selector,
    pub rules: Vec<Arc<super::jwt::JwtRule>>,
    /// What was wrong with the object; empty when valid. A broken object
    /// has no rules and refuses every request to the workloads it selects
    /// (never fail open: it may have been meant to require tokens).
    pub problems: Vec<String>,
}

impl RequestAuthn {
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    AuthorizationPolicy,
    PeerAuthentication,
    RequestAuthentication,
    LocalRateLimitPolicy,
}

impl Kind {
    pub fn from_kind(kind: &str) -> Option<Self> {
        match kind {
            "AuthorizationPolicy" => Some(Self::AuthorizationPolicy),
            "PeerAuthentication" => Some(Self::PeerAuthentication),
            "RequestAuthentication" => Some(Self::RequestAuthentication),
            "LocalRateLimitPolicy" => Some(Self::LocalRateLimitPolicy),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::AuthorizationPolicy => "AuthorizationPolicy",
            Self::PeerAuthentication => "PeerAuthentication",
            Self::RequestAuthentication => "RequestAuthentication",
            Self::LocalRateLimitPolicy => "LocalRateLimitPolicy",
        }
    }
}

impl Policy {
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }
}
