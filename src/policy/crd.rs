//! The policy CRDs as Kubernetes sees them: `AuthorizationPolicy` and
//! `PeerAuthentication` in `security.outrider.dev/v1alpha1`.
//!
//! These types define the schema (`outrider crds` prints it, and the
//! committed YAML under `manifests/crds/` is generated from it) and are the
//! wire format both policy sources read. They carry no behaviour: objects
//! are turned into the kube-free model in `model.rs`, which is where values
//! are judged. Every field's doc comment becomes its `kubectl explain`
//! text; CEL rules reject what the API server can catch.

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub const GROUP: &str = "security.outrider.dev";
pub const VERSION: &str = "v1alpha1";

/// A wildcard may only start or end a pattern (`spiffe://cluster.local/ns/shop/*`,
/// `*/sa/admin`); `*` alone matches everything.
pub(crate) const PATTERN_RULE: &str = "self.all(p, size(p) > 0 && (p == '*' || !p.contains('*') || (p.startsWith('*') && !p.substring(1).contains('*')) || (p.endsWith('*') && !p.substring(0, size(p) - 1).contains('*'))))";
pub(crate) const PATTERN_MESSAGE: &str =
    "patterns must be non-empty, with '*' only as the first or last character";
pub(crate) const PORT_RULE: &str = "self.all(p, p >= 1 && p <= 65535)";
const CIDR_RULE: &str = "self.all(c, c.matches('^[0-9]{1,3}(\\\\.[0-9]{1,3}){3}(/[0-9]{1,2})?$') || c.matches('^[0-9a-fA-F:]*:[0-9a-fA-F:.]*(/[0-9]{1,3})?$'))";
pub(crate) const METHOD_RULE: &str = "self.all(m, m.matches('^[A-Z]+$'))";
const NAMESPACE_RULE: &str = "self.all(n, n.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?$'))";

mod rate_limit;
mod request_authentication;
pub use rate_limit::{
    LocalRateLimitPolicy, LocalRateLimitPolicySpec, Rate, RateLimit, RateLimitMatch, RateLimitMode,
    RateOverride,
};
pub use request_authentication::{
    ClaimToHeader, JwtAlgorithm, JwtHeader, JwtRule, Presence, RequestAuthentication,
    RequestAuthenticationSpec,
};

/// A `when` key: a claim of the verified token (`request.auth.claims[groups]`,
/// nested as `request.auth.claims[a][b]`) or its audiences.
const WHEN_KEY_RULE: &str = "self.matches('^request\\\\.auth\\\\.claims(\\\\[[^\\\\[\\\\]]+\\\\])+$') || self == 'request.auth.audiences'";

/// Who may talk to which workloads, and how. Semantics follow Istio's
/// AuthorizationPolicy: any matching DENY denies; if any ALLOW policy
/// selects a workload, a request must match one of them; otherwise the
/// mesh default applies. AUDIT policies only log and count their matches.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.outrider.dev",
    version = "v1alpha1",
    kind = "AuthorizationPolicy",
    namespaced,
    doc = "An outrider AuthorizationPolicy: who may call the selected workloads.",
    shortname = "opa",
    category = "outrider",
    printcolumn = r#"{"name":"Action","type":"string","jsonPath":".spec.action"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationPolicySpec {
    /// The workloads in this namespace the policy applies to. Omitted or
    /// empty, it applies to every workload in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// ALLOW, DENY or AUDIT. AUDIT never changes a decision: it logs and
    /// counts what it matched, so a policy can be trialled safely.
    pub action: Action,
    /// A request matches the policy when it matches any rule. No rules:
    /// the policy matches nothing (an ALLOW policy with no rules therefore
    /// denies everything to the workloads it selects). An empty rule `{}`
    /// matches everything.
    #[schemars(length(max = 128))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<AuthorizationRule>,
}

/// Selects workloads by their pod labels.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSelector {
    /// Pods whose labels include all of these are selected.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// What a policy does with the requests it matches.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum Action {
    #[default]
    Allow,
    Deny,
    Audit,
}

/// Matches requests whose source matches any `from` entry and whose
/// target matches any `to` entry. An omitted or empty list matches
/// anything.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AuthorizationRule {
    /// Sources; any may match.
    #[schemars(length(max = 16))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<Source>,
    /// Targets on this workload; any may match.
    #[schemars(length(max = 16))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to: Vec<Operation>,
    /// Conditions on the request's verified token (see
    /// RequestAuthentication); all must hold.
    #[schemars(length(max = 16))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub when: Vec<Condition>,
}

/// A condition on the verified token: `key` is
/// `request.auth.claims[<name>]` (nested: `request.auth.claims[a][b]`) or
/// `request.auth.audiences`. A claim holding a list matches when any of
/// its elements does. Without a verified token a condition with `values`
/// never holds. On a connection that is not HTTP the condition never lets
/// an ALLOW match and always lets a DENY match.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.values) || has(self.notValues)").message("a condition needs values or notValues"))]
pub struct Condition {
    /// `request.auth.claims[<name>]` (nested: `request.auth.claims[a][b]`)
    /// or `request.auth.audiences`.
    #[schemars(length(max = 256))]
    #[x_kube(validation = kube::core::Rule::new(WHEN_KEY_RULE).message("key must be request.auth.claims[<name>] or request.auth.audiences"))]
    pub key: String,
    /// Values that match (same patterns as principals).
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new(PATTERN_RULE).message(PATTERN_MESSAGE))]
    pub values: Option<Vec<String>>,
    /// Values that must not match.
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new(PATTERN_RULE).message(PATTERN_MESSAGE))]
    pub not_values: Option<Vec<String>>,
}

/// Who is calling. All fields that are set must match; within a field any
/// value may match; a `not` field excludes its values.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// Caller SPIFFE IDs, such as
    /// `spiffe://cluster.local/ns/shop/sa/orders`. A `*` may start or end
    /// a pattern (`spiffe://cluster.local/ns/shop/*`); `*` alone means any
    /// authenticated caller. Requires mutual TLS.
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PATTERN_RULE).message(PATTERN_MESSAGE))]
    pub principals: Vec<String>,
    /// Caller SPIFFE IDs that must not match (same patterns).
    #[schemars(length(max = 64), inner(length(max = 512)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PATTERN_RULE).message(PATTERN_MESSAGE))]
    pub not_principals: Vec<String>,
    /// Namespaces of the caller's identity (`/ns/<namespace>/` in its
    /// SPIFFE ID). Requires mutual TLS.
    #[schemars(length(max = 64), inner(length(max = 63)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(NAMESPACE_RULE).message("namespaces must be DNS labels"))]
    pub namespaces: Vec<String>,
    /// Namespaces the caller's identity must not be in.
    #[schemars(length(max = 64), inner(length(max = 63)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(NAMESPACE_RULE).message("namespaces must be DNS labels"))]
    pub not_namespaces: Vec<String>,
    /// Source IP addresses, as CIDRs (`10.0.0.0/8`) or single addresses.
    #[schemars(length(max = 64), inner(length(max = 64)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(CIDR_RULE).message("ipBlocks must be IP addresses or CIDRs"))]
    pub ip_blocks: Vec<String>,
    /// Source IP addresses that must not match.
    #[schemars(length(max = 64), inner(length(max = 64)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(CIDR_RULE).message("notIpBlocks must be IP addresses or CIDRs"))]
    pub not_ip_blocks: Vec<String>,
    /// Verified token principals, `<iss>/<sub>` (see RequestAuthentication),
    /// with the same `*` patterns; `*` alone means any verified token. On a
    /// connection that is not HTTP it never lets an ALLOW match and always
    /// lets a DENY match.
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PATTERN_RULE).message(PATTERN_MESSAGE))]
    pub request_principals: Vec<String>,
    /// Token principals that must not match.
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PATTERN_RULE).message(PATTERN_MESSAGE))]
    pub not_request_principals: Vec<String>,
    /// `true`: the caller has a mesh identity (mutual TLS); `false`: it has
    /// none (plaintext from outside the mesh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authenticated: Option<bool>,
}

/// What is being called on the selected workload.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// Destination ports of the workload.
    #[schemars(length(max = 64))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PORT_RULE).message("ports must be between 1 and 65535"))]
    pub ports: Vec<u32>,
    /// Destination ports that must not match.
    #[schemars(length(max = 64))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PORT_RULE).message("notPorts must be between 1 and 65535"))]
    pub not_ports: Vec<u32>,
    /// HTTP methods (`GET`, `POST`, ...). On a connection that is not HTTP
    /// a rule with methods never matches an ALLOW policy and always
    /// matches a DENY policy.
    #[schemars(length(max = 16), inner(length(max = 32)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(METHOD_RULE).message("methods must be upper-case tokens"))]
    pub methods: Vec<String>,
    /// HTTP methods that must not match.
    #[schemars(length(max = 16), inner(length(max = 32)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(METHOD_RULE).message("notMethods must be upper-case tokens"))]
    pub not_methods: Vec<String>,
    /// HTTP paths: exact (`/healthz`), prefix (`/api/*`) or suffix
    /// (`*.png`). Same rule as methods on non-HTTP connections.
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PATTERN_RULE).message(PATTERN_MESSAGE))]
    pub paths: Vec<String>,
    /// HTTP paths that must not match.
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PATTERN_RULE).message(PATTERN_MESSAGE))]
    pub not_paths: Vec<String>,
}

/// Whether the selected workloads accept plaintext. The narrowest policy
/// wins: one that selects the workload over a namespace-wide one (no
/// selector); a port-level mode over the workload-level mode.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.outrider.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    doc = "An outrider PeerAuthentication: whether the selected workloads accept plaintext.",
    shortname = "opeerauth",
    category = "outrider",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct PeerAuthenticationSpec {
    /// The workloads in this namespace it applies to; omitted or empty,
    /// every workload in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mutual-TLS mode for the selected workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MtlsSettings>,
    /// Modes for single ports of the selected workloads, keyed by port
    /// number; these override `mtls` on those ports.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[x_kube(validation = kube::core::Rule::new("self.all(k, k.matches('^[0-9]+$') && int(k) >= 1 && int(k) <= 65535)").message("portLevelMtls keys must be port numbers"))]
    pub port_level_mtls: BTreeMap<String, MtlsSettings>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MtlsSettings {
    /// STRICT: only mutual TLS from the mesh is accepted. PERMISSIVE:
    /// plaintext from workloads without a proxy is accepted too, as
    /// unauthenticated.
    pub mode: PeerAuthMode,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(rename_all = "UPPERCASE")]
pub enum PeerAuthMode {
    #[default]
    Strict,
    Permissive,
}

/// Each CRD as `(file name, YAML)`, the layout of `manifests/crds/` and
/// of a Helm chart's `crds/`.
pub fn crd_files() -> Result<Vec<(String, String)>, crate::yaml::Error> {
    use kube::CustomResourceExt;
    let generated = "# Generated by `outrider crds`; do not edit.\n";
    [
        AuthorizationPolicy::crd(),
        PeerAuthentication::crd(),
        RequestAuthentication::crd(),
        LocalRateLimitPolicy::crd(),
    ]
    .into_iter()
    .map(|crd| {
        let name = crd.metadata.name.clone().unwrap_or_default();
        Ok((
            format!("{name}.yaml"),
            format!("{generated}{}", crate::yaml::to_string(&crd)?),
        ))
    })
    .collect()
}

/// The CRDs as one multi-document YAML stream, as `kubectl apply` takes it.
pub fn crds_yaml() -> Result<String, crate::yaml::Error> {
    Ok(crd_files()?
        .into_iter()
        .map(|(_, yaml)| yaml)
        .collect::<Vec<_>>()
        .join("---\n"))
}

#[cfg(test)]
mod tests;
