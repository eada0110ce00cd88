//! `RequestAuthentication`: which JSON Web Tokens the selected workloads
//! accept, from which issuers, verified against which keys. Schema only;
//! [`crate::policy::jwt`] holds the rules as the proxy applies them.

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::WorkloadSelector;

/// An HTTP header name (RFC 9110 token), lower or upper case.
const HEADER_NAME_RULE: &str = "self.matches('^[A-Za-z0-9!#$%&\\'*+.^_`|~-]+$')";

/// Request authentication with JSON Web Tokens. Each selected workload's
/// proxy verifies a token it finds against the keys of the token's issuer
/// (fetched from `jwksUri`, or given inline), at every hop. A request
/// with a token that fails is refused with 401 and never reaches the
/// application; a request without a token goes on without a request
/// principal unless a rule says `presence: Required`. Who may call is
/// then said by AuthorizationPolicy `requestPrincipals` and `when`.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "security.outrider.dev",
    version = "v1alpha1",
    kind = "RequestAuthentication",
    namespaced,
    doc = "An outrider RequestAuthentication: the JWTs the selected workloads accept.",
    shortname = "oreqauth",
    category = "outrider",
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// The workloads in this namespace it applies to; omitted or empty,
    /// every workload in the namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// One rule per accepted issuer. A token is verified by the rule
    /// naming its `iss`; a token from any other issuer is refused.
    #[schemars(length(min = 1, max = 16))]
    pub jwt_rules: Vec<JwtRule>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = kube::core::Rule::new("has(self.jwksUri) != has(self.jwks)").message("exactly one of jwksUri and jwks"))]
pub struct JwtRule {
    /// The token's `iss` claim, exactly.
    #[schemars(length(min = 1, max = 1024))]
    pub issuer: String,
    /// The token's `aud` must name at least one of these.
    #[schemars(length(min = 1, max = 32), inner(length(min = 1, max = 1024)))]
    pub audiences: Vec<String>,
    /// Where the issuer publishes its keys (a JWKS document), over HTTPS.
    /// The proxy fetches it, refreshes it every 10 minutes, and once more
    /// (at most every 10 s) when a token names a key id it does not have.
    #[schemars(length(max = 2048))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new("self.startsWith('https://')").message("jwksUri must be an https:// URL"))]
    pub jwks_uri: Option<String>,
    /// The keys themselves, as a JWKS JSON document.
    #[schemars(length(max = 65536))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Where to find the token. Omitted: `Authorization: Bearer <token>`.
    #[schemars(length(max = 8))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Whether the token travels on to the application (and so to the
    /// next hop). Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forward_original_token: Option<bool>,
    /// Claims copied into request headers for the application. Headers of
    /// these names are removed from incoming requests first.
    #[schemars(length(max = 16))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Optional (default): a request without a token goes on with no
    /// request principal. Required: it is refused with 401.
    #[serde(default)]
    pub presence: Presence,
    /// Signature algorithms accepted; omitted, all of them. Only
    /// asymmetric ones exist: shared-secret (HS*) and `none` tokens are
    /// always refused.
    #[schemars(length(max = 8))]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub algorithms: Vec<JwtAlgorithm>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct JwtHeader {
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = kube::core::Rule::new(HEADER_NAME_RULE).message("name must be an HTTP header name"))]
    pub name: String,
    /// Stripped from the header's value before the token (`Bearer `).
    #[schemars(length(max = 64))]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClaimToHeader {
    #[schemars(length(min = 1, max = 256))]
    #[x_kube(validation = kube::core::Rule::new(HEADER_NAME_RULE).message("header must be an HTTP header name"))]
    #[x_kube(validation = kube::core::Rule::new("!self.matches('^[xX][-_][oO][uU][tT][rR][iI][dD][eE][rR][-_]')").message("x-outrider- headers are the proxy's own"))]
    pub header: String,
    /// A top-level claim; strings, numbers and booleans are copied.
    #[schemars(length(min = 1, max = 256))]
    pub claim: String,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Presence {
    #[default]
    Optional,
    Required,
}

#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JwtAlgorithm {
    RS256,
    RS384,
    RS512,
    PS256,
    PS384,
    PS512,
    ES256,
    ES384,
    EdDSA,
}
