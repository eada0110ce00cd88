//! Token conditions in decisions: request principals, `when` on claims
//! and audiences, requests without a token, opaque connections, and the
//! fail-safe forms of conditions that cannot be read.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;

use crate::policy::DefaultPolicy;
use crate::policy::authz::tests::policy;
use crate::policy::authz::{Http, Request, authorize};
use crate::policy::index::{Settings, Workload, WorkloadPolicy, compile};
use crate::policy::jwt::VerifiedToken;
use crate::policy::model::{MtlsMode, Policy};

fn compiled(policies: &[Arc<Policy>]) -> WorkloadPolicy {
    let workload = Workload {
        namespace: "shop".into(),
        labels: BTreeMap::new(),
    };
    let settings = Settings {
        default: DefaultPolicy::AllowAll,
        mtls: MtlsMode::Permissive,
        probes: Vec::new(),
    };
    compile(&workload, &settings, policies, &[], true)
}

fn token(sub: &str, claims: serde_json::Value, audiences: &[&str]) -> VerifiedToken {
    VerifiedToken {
        issuer: "https://idp".into(),
        principal: Some(format!("https://idp/{sub}")),
        audiences: audiences.iter().map(|a| a.to_string()).collect(),
        claims: claims.as_object().cloned().unwrap_or_default(),
        expires: u64::MAX,
    }
}

/// Allowed? `token`: `None` for no token; `http: false` for opaque.
fn allowed(policy: &WorkloadPolicy, http: bool, token: Option<&VerifiedToken>) -> bool {
    let req = Request {
        peer: None,
        source: "10.0.0.1".parse().unwrap(),
        port: 80,
        http: http.then_some(Http {
            method: "GET",
            path: "/",
            token,
        }),
    };
    authorize(policy, &req).is_ok()
}

#[test]
fn request_principals_match_the_token_s_issuer_and_subject() {
    let p = compiled(&[policy(
        "allow",
        r#"{action: ALLOW, rules: [{from: [{requestPrincipals: ["https://idp/alice", "*/bob"]}]}]}"#,
    )]);
    let alice = token("alice", json!({}), &[]);
    let bob = token("bob", json!({}), &[]);
    let carol = token("carol", json!({}), &[]);
    assert!(allowed(&p, true, Some(&alice)));
    assert!(allowed(&p, true, Some(&bob)));
    assert!(!allowed(&p, true, Some(&carol)));
    assert!(!allowed(&p, true, None), "no token, no principal");
    assert!(!allowed(&p, false, None), "opaque: an ALLOW never matches");
}

#[test]
fn not_request_principals_star_matches_exactly_the_requests_without_a_token() {
    let p = compiled(&[policy(
        "deny",
        r#"{action: DENY, rules: [{from: [{notRequestPrincipals: ["*"]}]}]}"#,
    )]);
    assert!(!allowed(&p, true, None));
    assert!(allowed(&p, true, Some(&token("alice", json!({}), &[]))));
    assert!(!allowed(&p, false, None), "opaque: a DENY always matches");
}

#[test]
fn when_looks_at_string_list_and_nested_claims_and_at_audiences() {
    let p = compiled(&[policy(
        "allow",
        r#"{action: ALLOW, rules: [{when: [
            {key: "request.auth.claims[groups]", values: ["admin", "ops-*"]},
            {key: "request.auth.claims[org][team]", notValues: ["interns"]},
            {key: "request.auth.audiences", values: ["payments"]}]}]}"#,
    )]);
    let ok = token(
        "a",
        json!({"groups": ["dev", "ops-eu"], "org": {"team": "core"}}),
        &["web", "payments"],
    );
    assert!(allowed(&p, true, Some(&ok)));
    let string_claim = token("a", json!({"groups": "admin"}), &["payments"]);
    assert!(
        allowed(&p, true, Some(&string_claim)),
        "a string claim is one value"
    );
    let intern = token(
        "a",
        json!({"groups": ["admin"], "org": {"team": "interns"}}),
        &["payments"],
    );
    assert!(!allowed(&p, true, Some(&intern)));
    let other_audience = token("a", json!({"groups": ["admin"]}), &["web"]);
    assert!(!allowed(&p, true, Some(&other_audience)));
    let no_groups = token("a", json!({}), &["payments"]);
    assert!(!allowed(&p, true, Some(&no_groups)));
    assert!(!allowed(&p, true, None));
    assert!(!allowed(&p, false, None));
}

#[test]
fn an_unreadable_when_key_breaks_an_allow_and_widens_a_deny() {
    let broken_allow = policy(
        "allow",
        r#"{action: ALLOW, rules: [{when: [{key: "request.headers[x-user]", values: ["admin"]}]}]}"#,
    );
    assert!(!broken_allow.is_valid());
    let p = compiled(&[broken_allow]);
    let admin = token("a", json!({"groups": ["admin"]}), &[]);
    assert!(
        !allowed(&p, true, Some(&admin)),
        "a broken ALLOW matches nothing"
    );

    let broken_deny = policy(
        "deny",
        r#"{action: DENY, rules: [{to: [{paths: ["/admin"]}], when: [{key: "source.ip", values: ["1.2.3.4"]}]}]}"#,
    );
    assert!(!broken_deny.is_valid());
    let p = compiled(&[broken_deny]);
    let req = |path: &'static str| Request {
        peer: None,
        source: "10.0.0.1".parse().unwrap(),
        port: 80,
        http: Some(Http {
            method: "GET",
            path,
            token: None,
        }),
    };
    assert!(
        authorize(&p, &req("/admin")).is_err(),
        "the condition is dropped: denies more"
    );
    assert!(
        authorize(&p, &req("/other")).is_ok(),
        "the rest of the rule still holds"
    );
}

#[test]
fn a_condition_without_values_is_broken() {
    let p = policy(
        "allow",
        r#"{action: ALLOW, rules: [{when: [{key: "request.auth.claims[groups]", values: []}]}]}"#,
    );
    assert!(!p.is_valid());
    assert!(p.rules.is_empty());
}
