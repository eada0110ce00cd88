//! Judging a RequestAuthentication object into [`RequestAuthn`]. Any
//! problem breaks the whole object, and a broken object refuses every
//! request to the workloads it selects: it may have been meant to
//! require tokens, and a rule we cannot read must not let requests
//! through unauthenticated.

use std::sync::Arc;

use http::header::HeaderName;
use jsonwebtoken::Algorithm;

use super::read_spec;
use crate::policy::crd;
use crate::policy::jwt::{ASYMMETRIC, JwtRule, KeySet, KeySource, TokenLocation};
use crate::policy::model::{Object, RequestAuthn, Selector};

impl RequestAuthn {
    pub fn from_object(object: &Object) -> Self {
        let id: Arc<str> = format!("{}/{}", object.namespace, object.name).into();
        match read_spec::<crd::RequestAuthenticationSpec>(&object.spec) {
            Ok(spec) => Self::from_spec(id, &spec),
            Err(error) => Self {
                id,
                selector: Selector::salvage(&object.spec).unwrap_or(Selector::All),
                rules: Vec::new(),
                problems: vec![format!("spec does not parse: {error}")],
            },
        }
    }

    pub fn from_spec(id: Arc<str>, spec: &crd::RequestAuthenticationSpec) -> Self {
        let mut problems = Vec::new();
        let mut rules = Vec::new();
        for (i, rule) in spec.jwt_rules.iter().enumerate() {
            match judge_rule(&id, rule) {
                Ok(rule) => rules.push(Arc::new(rule)),
                Err(problem) => problems.push(format!("jwtRules[{i}]: {problem}")),
            }
        }
        if spec.jwt_rules.is_empty() {
            problems.push("jwtRules is empty".into());
        }
        let mut issuers: Vec<&str> = spec.jwt_rules.iter().map(|r| r.issuer.as_str()).collect();
        issuers.sort_unstable();
        if issuers.windows(2).any(|w| w[0] == w[1]) {
            problems.push("two jwtRules name the same issuer".into());
        }
        Self {
            id,
            selector: Selector::from_crd(spec.selector.as_ref()),
            rules: if problems.is_empty() {
                rules
            } else {
                Vec::new()
            },
            problems,
        }
    }
}

fn judge_rule(policy: &Arc<str>, rule: &crd::JwtRule) -> Result<JwtRule, String> {
    if rule.issuer.is_empty() {
        return Err("issuer is empty".into());
    }
    if rule.audiences.is_empty() || rule.audiences.iter().any(String::is_empty) {
        return Err("audiences must be non-empty".into());
    }
    let keys = match (&rule.jwks_uri, &rule.jwks) {
        (Some(uri), None) if uri.starts_with("https://") && uri.parse::<http::Uri>().is_ok() => {
            KeySource::Uri(uri.as_str().into())
        }
        (Some(uri), None) => return Err(format!("jwksUri {uri:?} is not an https:// URL")),
        (None, Some(inline)) => KeySource::Inline(Arc::new(
            KeySet::parse(inline.as_bytes()).map_err(|e| format!("jwks: {e}"))?,
        )),
        _ => return Err("exactly one of jwksUri and jwks".into()),
    };
    let locations = if rule.from_headers.is_empty() {
        vec![TokenLocation::bearer()]
    } else {
        rule.from_headers
            .iter()
            .map(|h| {
                Ok(TokenLocation {
                    header: header_name(&h.name)?,
                    prefix: h.prefix.clone().unwrap_or_default(),
                })
            })
            .collect::<Result<_, String>>()?
    };
    let claim_headers = rule
        .output_claim_to_headers
        .iter()
        .map(|c| {
            let header = header_name(&c.header)?;
            if crate::policy::jwt::is_reserved_header(&header) {
                return Err(format!("{} is one of the proxy's own headers", c.header));
            }
            Ok((header, c.claim.clone()))
        })
        .collect::<Result<_, String>>()?;
    let algorithms = if rule.algorithms.is_empty() {
        ASYMMETRIC.to_vec()
    } else {
        rule.algorithms.iter().map(|a| algorithm(*a)).collect()
    };
    Ok(JwtRule {
        policy: policy.clone(),
        issuer: rule.issuer.as_str().into(),
        audiences: rule.audiences.clone(),
        keys,
        locations,
        forward: rule.forward_original_token.unwrap_or(true),
        claim_headers,
        required: rule.presence == crd::Presence::Required,
        algorithms,
    })
}

fn header_name(name: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("{name:?} is not a header name"))
}

fn algorithm(a: crd::JwtAlgorithm) -> Algorithm {
    match a {
        crd::JwtAlgorithm::RS256 => Algorithm::RS256,
        crd::JwtAlgorithm::RS384 => Algorithm::RS384,
        crd::JwtAlgorithm::RS512 => Algorithm::RS512,
        crd::JwtAlgorithm::PS256 => Algorithm::PS256,
        crd::JwtAlgorithm::PS384 => Algorithm::PS384,
        crd::JwtAlgorithm::PS512 => Algorithm::PS512,
        crd::JwtAlgorithm::ES256 => Algorithm::ES256,
        crd::JwtAlgorithm::ES384 => Algorithm::ES384,
        crd::JwtAlgorithm::EdDSA => Algorithm::EdDSA,
    }
}
