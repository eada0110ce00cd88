//! `LocalRateLimitPolicy`: request rates the selected workloads' proxies
//! accept, in total and per caller. Schema only; [`crate::policy::limits`]
//! holds the limits as the proxy applies them.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{METHOD_RULE, PATTERN_MESSAGE, PATTERN_RULE, PORT_RULE, WorkloadSelector};

/// Local (per-pod) rate limits on inbound HTTP requests. Checked after
/// authentication and authorization: a request over a limit is answered
/// 429 with `Retry-After` (gRPC: RESOURCE_EXHAUSTED) and never reaches
/// the application. A caller is its mesh identity, else its verified
/// token's principal, else its source address; its own budget is checked
/// before the shared one, so a caller over its limit does not spend the
/// budget of others.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.outrider.dev",
    version = "v1alpha1",
    kind = "LocalRateLimitPolicy",
    namespaced,
    doc = "An outrider LocalRateLimitPolicy: request rate limits for the selected workloads.",
    shortname = "oratelimit",
    category = "outrider",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mode"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct LocalRateLimitPolicySpec {
    /// The workloads in this namespace it applies to; omitted or empty,
    /// every workload in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Enforce (default): refuse requests over a limit. DryRun: only
    /// count them (`rate_limited_total{mode="dry-run"}`).
    #[serde(default)]
    pub mode: RateLimitMode,
    /// Every limit whose `match` a request meets applies to it.
    #[schemars(length(min = 1, max = 64))]
    pub limits: Vec<RateLimit>,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RateLimitMode {
    #[default]
    Enforce,
    DryRun,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.total) || has(self.perClient) || has(self.overrides)").message("a limit needs total, perClient or overrides"))]
pub struct RateLimit {
    /// Which requests the limit counts; omitted, all of them.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "match")]
    pub matches: Option<RateLimitMatch>,
    /// The workload's budget, shared by every caller.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<Rate>,
    /// Each caller's own budget.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_client: Option<Rate>,
    /// Callers with a budget of their own instead of `perClient`.
    #[schemars(length(max = 64))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub overrides: Vec<RateOverride>,
}

/// Requests a limit counts: all set fields must match, any value within
/// a field.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitMatch {
    /// Destination ports of the workload.
    #[schemars(length(max = 64))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PORT_RULE).message("ports must be between 1 and 65535"))]
    pub ports: Vec<u32>,
    /// HTTP methods.
    #[schemars(length(max = 16), inner(length(max = 32)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(METHOD_RULE).message("methods must be upper-case tokens"))]
    pub methods: Vec<String>,
    /// HTTP paths: exact, `prefix*` or `*suffix`.
    #[schemars(length(max = 64), inner(length(max = 1024)))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(validation = kube::core::Rule::new(PATTERN_RULE).message(PATTERN_MESSAGE))]
    pub paths: Vec<String>,
}

/// A budget: `requestsPerSecond` on average, with bursts of up to `burst`
/// requests (default: one second's worth).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Rate {
    #[schemars(range(min = 1, max = 1_000_000))]
    pub requests_per_second: u32,
    #[schemars(range(min = 1, max = 1_000_000))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u32>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct RateOverride {
    /// Callers, exactly as identified: a SPIFFE ID, a token principal
    /// (`<iss>/<sub>`) or a source IP address.
    #[schemars(length(min = 1, max = 64), inner(length(min = 1, max = 1024)))]
    pub clients: Vec<String>,
    #[serde(flatten)]
    pub rate: Rate,
}
