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
