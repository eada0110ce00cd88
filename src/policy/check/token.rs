//! The request token of `outrider policy check`: a real JWT verified as
//! the proxy would (the RequestAuthentications selecting the workload,
//! keys from a JWKS file instead of the provider), or one described by
//! its principal and claims.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::super::index::{Settings, Workload, compile};
use super::super::jwt::{self, KeySet, VerifiedToken};
use super::super::model::{Kind, RequestAuthn};
use super::super::objects::ObjectSet;

/// Verifies `token` against the rule of its issuer among the
/// RequestAuthentications that select `workload`, with `jwks` as the
/// issuer's keys. The error says what the proxy would answer and why.
pub fn verify(
    objects: &ObjectSet,
    workload: &Workload,
    settings: &Settings,
    token: &str,
    jwks: &[u8],
) -> Result<VerifiedToken, String> {
    let authns: Vec<RequestAuthn> = objects
        .values()
        .filter(|o| o.kind == Kind::RequestAuthentication && o.namespace == workload.namespace)
        .map(RequestAuthn::from_object)
        .collect();
    let policy =
        compile(workload, settings, &[], &[], true).with_request_authentication(workload, &authns);
    if let Some(id) = &policy.jwt.broken {
        return Err(format!(
            "503: RequestAuthentication {id} is invalid; every request is refused"
        ));
    }
    let keys = KeySet::parse(jwks).map_err(|e| format!("--jwks: {e}"))?;
    let token = token.trim();
    let refused = |e: jwt::TokenError| format!("401 invalid_token: {e} ({})", e.as_str());
    let unverified = jwt::peek(token).map_err(refused)?;
    let rule = jwt::rule_for(&policy.jwt.rules, &unverified.issuer).ok_or_else(|| {
        format!(
            "401 invalid_token: no RequestAuthentication selecting the workload accepts issuer {:?}",
            unverified.issuer
        )
    })?;
    jwt::verify(token, &unverified, rule, &keys).map_err(refused)
}

/// A token described on the command line: `--request-principal` and
/// `--claim name=value` (the value read as JSON when it parses, so
/// `groups=["a","b"]` is a list; else as a string; `aud` also sets the
/// audiences).
pub fn described(principal: Option<&str>, claims: &[String]) -> Result<VerifiedToken, String> {
    let mut map = Map::new();
    for claim in claims {
        let (name, value) = claim
            .split_once('=')
            .ok_or_else(|| format!("--claim {claim:?}: expected name=value"))?;
        let value = serde_json::from_str(value).unwrap_or_else(|_| Value::String(value.into()));
        map.insert(name.to_string(), value);
    }
    let audiences = match map.get("aud") {
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(many)) => many
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            .collect(),
        _ => Vec::new(),
    };
    let issuer: Arc<str> = principal
        .and_then(|p| p.rsplit_once('/'))
        .map_or("", |(iss, _)| iss)
        .into();
    Ok(VerifiedToken {
        issuer,
        principal: principal.map(String::from),
        audiences,
        claims: map,
        expires: u64::MAX,
    })
}
