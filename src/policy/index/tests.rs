use super::*;
use crate::policy::model::{Kind, Object};

fn workload(labels: &[(&str, &str)]) -> Workload {
    Workload {
        namespace: "shop".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

fn settings() -> Settings {
    Settings {
        default: DefaultPolicy::AllowAll,
        mtls: MtlsMode::Permissive,
        probes: Vec::new(),
    }
}

fn peer_auth(namespace: &str, name: &str, created: &str, spec: &str) -> PeerAuth {
    PeerAuth::from_object(&Object {
        kind: Kind::PeerAuthentication,
        namespace: namespace.into(),
        name: name.into(),
        created: Some(created.into()),
        spec: crate::yaml::value(spec).unwrap(),
    })
}

#[test]
fn without_peer_authentication_the_mesh_default_applies() {
    let p = compile(
        &workload(&[("app", "payments")]),
        &settings(),
        &[],
        &[],
        true,
    );
    assert_eq!(p.mtls_mode(8080), MtlsMode::Permissive);
}

#[test]
fn a_namespace_wide_peer_authentication_overrides_the_mesh_default() {
    let ns = peer_auth(
        "shop",
        "all",
        "2026-01-01T00:00:00Z",
        "mtls: {mode: STRICT}\n",
    );
    let p = compile(
        &workload(&[("app", "payments")]),
        &settings(),
        &[],
        &[ns],
        true,
    );
    assert_eq!(p.mtls_mode(8080), MtlsMode::Strict);
}

#[test]
fn a_workload_peer_authentication_beats_the_namespace_and_ports_beat_both() {
    let ns = peer_auth(
        "shop",
        "all",
        "2026-01-01T00:00:00Z",
        "mtls: {mode: STRICT}\n",
    );
    let specific = peer_auth(
        "shop",
        "payments",
        "2026-02-01T00:00:00Z",
        "selector: {matchLabels: {app: payments}}\nmtls: {mode: PERMISSIVE}\nportLevelMtls: {\"9090\": {mode: STRICT}}\n",
    );
    let p = compile(
        &workload(&[("app", "payments")]),
        &settings(),
        &[],
        &[ns.clone(), specific.clone()],
        true,
    );
    assert_eq!(p.mtls_mode(8080), MtlsMode::Permissive);
    assert_eq!(p.mtls_mode(9090), MtlsMode::Strict);
    // Another workload only sees the namespace-wide one.
    let p = compile(
        &workload(&[("app", "web")]),
        &settings(),
        &[],
        &[ns, specific],
        true,
    );
    assert_eq!(p.mtls_mode(8080), MtlsMode::Strict);
}

#[test]
fn among_equally_narrow_peer_authentications_the_oldest_wins() {
    let older = peer_auth(
        "shop",
        "b-older",
        "2026-01-01T00:00:00Z",
        "mtls: {mode: STRICT}\n",
    );
    let newer = peer_auth(
        "shop",
        "a-newer",
        "2026-03-01T00:00:00Z",
        "mtls: {mode: PERMISSIVE}\n",
    );
    let p = compile(&workload(&[]), &settings(), &[], &[newer, older], true);
    assert_eq!(p.mtls_mode(1), MtlsMode::Strict);
}

#[test]
fn a_workload_level_peer_authentication_without_a_mode_inherits_the_namespace_one() {
    let ns = peer_auth(
        "shop",
        "all",
        "2026-01-01T00:00:00Z",
        "mtls: {mode: STRICT}\n",
    );
    let ports_only = peer_auth(
        "shop",
        "ports",
        "2026-01-02T00:00:00Z",
        "selector: {matchLabels: {app: payments}}\nportLevelMtls: {\"8080\": {mode: PERMISSIVE}}\n",
    );
    let p = compile(
        &workload(&[("app", "payments")]),
        &settings(),
        &[],
        &[ns, ports_only],
        true,
    );
    assert_eq!(p.mtls_mode(8080), MtlsMode::Permissive);
    assert_eq!(p.mtls_mode(9090), MtlsMode::Strict);
}

#[test]
fn peer_authentications_of_other_namespaces_are_ignored() {
    let other = peer_auth(
        "ops",
        "all",
        "2026-01-01T00:00:00Z",
        "mtls: {mode: STRICT}\n",
    );
    let p = compile(&workload(&[]), &settings(), &[], &[other], true);
    assert_eq!(p.mtls_mode(1), MtlsMode::Permissive);
}

fn request_authn(namespace: &str, name: &str, spec: &str) -> RequestAuthn {
    RequestAuthn::from_object(&Object {
        kind: Kind::RequestAuthentication,
        namespace: namespace.into(),
        name: name.into(),
        created: None,
        spec: crate::yaml::value(spec).unwrap(),
    })
}

#[test]
fn request_authentications_that_select_the_workload_give_one_rule_per_issuer() {
    let authns = [
        request_authn(
            "shop",
            "a",
            "{jwtRules: [{issuer: https://idp, audiences: [x], jwksUri: https://idp/keys, outputClaimToHeaders: [{header: x-group, claim: group}]}]}",
        ),
        // Same issuer again: the first by name wins.
        request_authn(
            "shop",
            "b",
            "{selector: {matchLabels: {app: payments}}, jwtRules: [{issuer: https://idp, audiences: [y], jwksUri: https://other/keys, presence: Required}, {issuer: https://corp, audiences: [y], jwksUri: https://corp/keys}]}",
        ),
        request_authn(
            "shop",
            "c",
            "{selector: {matchLabels: {app: web}}, jwtRules: [{issuer: https://web, audiences: [w], jwksUri: https://web/keys}]}",
        ),
        request_authn(
            "ops",
            "d",
            "{jwtRules: [{issuer: https://ops, audiences: [o], jwksUri: https://ops/keys}]}",
        ),
    ];
    let p = compile(
        &workload(&[("app", "payments")]),
        &settings(),
        &[],
        &[],
        true,
    )
    .with_request_authentication(&workload(&[("app", "payments")]), &authns);
    let issuers: Vec<&str> = p.jwt.rules.iter().map(|r| &*r.issuer).collect();
    assert_eq!(issuers, ["https://idp", "https://corp"]);
    assert_eq!(p.jwt.rules[0].audiences, ["x"]);
    assert!(!p.jwt.required, "b's Required rule for idp lost to a's");
    assert_eq!(p.jwt.claim_headers, ["x-group"]);
    assert!(p.jwt.broken.is_none());
}

#[test]
fn a_broken_request_authentication_refuses_its_workloads_and_no_rule_is_kept() {
    let broken = request_authn(
        "shop",
        "bad",
        "{jwtRules: [{issuer: https://idp, audiences: [x], jwksUri: http://idp/keys}]}",
    );
    assert!(!broken.is_valid());
    let unreadable = request_authn("shop", "worse", "{jwtRules: 7}");
    assert!(!unreadable.is_valid());
    for authn in [broken, unreadable] {
        let id = authn.id.clone();
        let p = compile(&workload(&[]), &settings(), &[], &[], true)
            .with_request_authentication(&workload(&[]), &[authn]);
        assert_eq!(p.jwt.broken, Some(id));
        assert!(p.jwt.rules.is_empty());
        assert!(!p.jwt.is_empty());
    }
}
