//! Conversion of objects into policies, and above all the fail-safe forms
//! of broken ones.

use super::*;
use crate::policy::model::Kind;

fn object(kind: Kind, name: &str, spec: &str) -> Object {
    Object {
        kind,
        namespace: "shop".into(),
        name: name.into(),
        created: None,
        spec: crate::yaml::value(spec).unwrap(),
    }
}

fn policy(spec: &str) -> Policy {
    Policy::from_object(&object(Kind::AuthorizationPolicy, "p", spec))
}

#[test]
fn patterns_parse_by_wildcard_position() {
    assert_eq!(Pattern::parse("*").unwrap(), Pattern::Any);
    assert_eq!(
        Pattern::parse("/api/*").unwrap(),
        Pattern::Prefix("/api/".into())
    );
    assert_eq!(
        Pattern::parse("*.png").unwrap(),
        Pattern::Suffix(".png".into())
    );
    assert_eq!(Pattern::parse("/x").unwrap(), Pattern::Exact("/x".into()));
    for bad in ["", "/a*b", "**", "*a*", "a**"] {
        assert!(Pattern::parse(bad).is_err(), "{bad}");
    }
    assert!(!Pattern::Any.matches(""), "'*' needs a value");
}

#[test]
fn a_valid_policy_has_no_problems_and_keeps_its_rules() {
    let p = policy(
        "selector: {matchLabels: {app: payments}}\naction: ALLOW\nrules:\n- from: [{namespaces: [shop]}]\n",
    );
    assert!(p.is_valid(), "{:?}", p.problems);
    assert_eq!(p.id.as_ref(), "shop/p");
    assert_eq!(p.rules.len(), 1);
    assert_eq!(
        p.selector,
        Selector::Labels([("app".into(), "payments".into())].into())
    );
}

#[test]
fn a_broken_allow_still_selects_but_matches_nothing() {
    let p = policy(
        "selector: {matchLabels: {app: payments}}\naction: ALLOW\nrules:\n- from: [{principals: [\"spiffe://x/*/y\"]}]\n- {}\n",
    );
    assert!(!p.is_valid());
    assert_eq!(p.action, Action::Allow);
    assert!(p.rules.is_empty(), "a broken ALLOW must match nothing");
    assert!(matches!(p.selector, Selector::Labels(_)));
}

#[test]
fn a_bad_value_in_a_deny_widens_what_it_denies() {
    let p = policy(
        r#"
action: DENY
rules:
- from: [{ipBlocks: ["10.0.0.0/8", "not-a-cidr"], notPrincipals: ["spiffe://cluster.local/ns/ops/sa/admin", "a*b*c"]}]
  to: [{paths: ["/admin/*"]}]
"#,
    );
    assert_eq!(p.problems.len(), 2, "{:?}", p.problems);
    let source = &p.rules[0].from[0];
    assert_eq!(
        source.ip_blocks.any_of, None,
        "an unreadable positive field matches everything"
    );
    assert_eq!(
        source.principals.none_of.len(),
        1,
        "an unreadable exclusion is dropped"
    );
    assert_eq!(
        p.rules[0].to[0].paths.any_of,
        Some(vec![Pattern::Prefix("/admin/".into())])
    );
}

#[test]
fn an_unreadable_deny_denies_everything_to_its_selection_or_the_namespace() {
    let p =
        policy("selector: {matchLabels: {app: payments}}\naction: DENY\nrules: \"not a list\"\n");
    assert_eq!(p.action, Action::Deny);
    assert_eq!(
        p.rules,
        vec![Rule::default()],
        "one empty rule matches everything"
    );
    assert!(matches!(p.selector, Selector::Labels(_)));

    let p = policy("selector: [broken]\naction: DENY\n");
    assert_eq!(p.selector, Selector::All);
    assert_eq!(p.rules, vec![Rule::default()]);

    let p = policy("action: SOMETIMES\nrules: [{}]\n");
    assert_eq!(
        p.action,
        Action::Deny,
        "an unknown action is treated as DENY"
    );
}

#[test]
fn an_unreadable_allow_or_audit_matches_nothing() {
    let p = policy("action: ALLOW\nrules: 7\n");
    assert_eq!((p.action, p.rules.len()), (Action::Allow, 0));
    let p = policy("action: AUDIT\nrules: 7\n");
    assert_eq!((p.action, p.rules.len()), (Action::Audit, 0));
}

#[test]
fn exact_principals_must_be_spiffe_ids() {
    let p = policy(
        "action: ALLOW\nrules:\n- from: [{principals: [\"spiffe://Cluster.local/ns/a/sa/b\"]}]\n",
    );
    assert!(!p.is_valid());
    let p =
        policy("action: ALLOW\nrules:\n- from: [{principals: [\"cluster.local/ns/a/sa/b\"]}]\n");
    assert!(p.is_valid(), "{:?}", p.problems);
}

#[test]
fn peer_authentication_reads_modes_and_port_overrides() {
    let pa = PeerAuth::from_object(&object(
        Kind::PeerAuthentication,
        "pa",
        "mtls: {mode: STRICT}\nportLevelMtls: {\"8080\": {mode: PERMISSIVE}}\n",
    ));
    assert!(pa.problems.is_empty());
    assert_eq!(pa.mode, Some(MtlsMode::Strict));
    assert_eq!(pa.ports.get(&8080), Some(&MtlsMode::Permissive));
}

#[test]
fn an_unreadable_peer_authentication_is_strict() {
    let pa = PeerAuth::from_object(&object(
        Kind::PeerAuthentication,
        "pa",
        "mtls: {mode: LOOSE}\n",
    ));
    assert_eq!(pa.mode, Some(MtlsMode::Strict));
    assert!(!pa.problems.is_empty());
    let pa = PeerAuth::from_object(&object(
        Kind::PeerAuthentication,
        "pa",
        "mtls: {mode: PERMISSIVE}\nportLevelMtls: {\"http\": {mode: PERMISSIVE}}\n",
    ));
    assert_eq!(
        pa.mode,
        Some(MtlsMode::Strict),
        "an unreadable port key makes the workload strict"
    );
}

#[test]
fn a_misspelt_field_makes_the_policy_unreadable_instead_of_dropping_the_constraint() {
    // `principal` for `principals`: ignoring it would open the ALLOW rule
    // to every caller.
    let p = policy(
        "action: ALLOW\nrules:\n- from: [{principal: [\"cluster.local/ns/shop/sa/orders\"]}]\n",
    );
    assert_eq!((p.action, p.rules.len()), (Action::Allow, 0));
    assert!(
        p.problems.iter().any(|m| m.contains("principal")),
        "{:?}",
        p.problems
    );
    let p = policy("action: DENY\nrules:\n- to: [{path: [\"/admin/*\"]}]\n");
    assert_eq!(p.rules, vec![Rule::default()], "the DENY covers everything");
    let pa = PeerAuth::from_object(&object(
        Kind::PeerAuthentication,
        "pa",
        "mtls: {mode: PERMISSIVE}\nportLevelMtl: {\"8080\": {mode: PERMISSIVE}}\n",
    ));
    assert_eq!(pa.mode, Some(MtlsMode::Strict));
}

#[test]
fn a_type_error_names_the_field() {
    let p = policy("action: ALLOW\nrules:\n- to: [{ports: [\"8080\"]}]\n");
    assert!(
        p.problems
            .iter()
            .any(|m| m.contains("rules[0].to[0].ports[0]")),
        "{:?}",
        p.problems
    );
}
