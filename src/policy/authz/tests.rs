//! Table tests for every rule of the decision, over policies written as
//! YAML the way operators write them.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::policy::index::{Probe, Settings, Workload, compile};
use crate::policy::model::{Kind, MtlsMode, Object};

pub(crate) fn policy(name: &str, yaml: &str) -> Arc<Policy> {
    let spec: serde_json::Value = crate::yaml::value(yaml).unwrap();
    Arc::new(Policy::from_object(&Object {
        kind: Kind::AuthorizationPolicy,
        namespace: "shop".into(),
        name: name.into(),
        created: None,
        spec,
    }))
}

fn workload() -> Workload {
    Workload {
        namespace: "shop".into(),
        labels: BTreeMap::from([("app".into(), "payments".into())]),
    }
}

fn settings(default: DefaultPolicy) -> Settings {
    Settings {
        default,
        mtls: MtlsMode::Permissive,
        probes: vec![
            Probe {
                port: 8080,
                path: Some("/healthz".into()),
            },
            Probe {
                port: 9000,
                path: None,
            },
        ],
    }
}

fn compiled(default: DefaultPolicy, policies: &[Arc<Policy>]) -> WorkloadPolicy {
    compile(&workload(), &settings(default), policies, &[], true)
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://cluster.local/{s}")).unwrap()
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// One case: who calls (None = plaintext), from where, which port, which
/// method and path (None = opaque), and whether it must be allowed.
struct Case {
    peer: Option<&'static str>,
    source: &'static str,
    port: u16,
    http: Option<(&'static str, &'static str)>,
    allowed: bool,
    by: &'static str,
}

fn run(policy: &WorkloadPolicy, cases: &[Case]) {
    for (n, c) in cases.iter().enumerate() {
        let peer = c.peer.map(id);
        let req = Request {
            peer: peer.as_ref(),
            source: ip(c.source),
            port: c.port,
            http: c.http.map(|(method, path)| Http {
                method,
                path,
                token: None,
            }),
        };
        let outcome = authorize(policy, &req);
        let (allowed, by) = match &outcome {
            Ok(p) => (true, p.by.label().to_string()),
            Err(d) => (false, d.by.label().to_string()),
        };
        assert_eq!(allowed, c.allowed, "case {n}: {outcome:?}");
        assert_eq!(by, c.by, "case {n}");
    }
}

const ORDERS: Option<&str> = Some("ns/shop/sa/orders");
const ADMIN: Option<&str> = Some("ns/ops/sa/admin");
const GUEST: Option<&str> = Some("ns/web/sa/guest");

#[test]
fn the_mesh_defaults_apply_when_no_allow_policy_selects_the_workload() {
    let cases = |default| {
        let p = compiled(default, &[]);
        let decide = |peer: Option<&str>| {
            let peer = peer.map(id);
            authorize(
                &p,
                &Request {
                    peer: peer.as_ref(),
                    source: ip("10.0.0.1"),
                    port: 80,
                    http: None,
                },
            )
            .is_ok()
        };
        (decide(None), decide(ORDERS), decide(GUEST))
    };
    assert_eq!(cases(DefaultPolicy::AllowAll), (true, true, true));
    assert_eq!(
        cases(DefaultPolicy::AllowAuthenticated),
        (false, true, true)
    );
    assert_eq!(
        cases(DefaultPolicy::AllowSameNamespace),
        (false, true, false)
    );
    assert_eq!(cases(DefaultPolicy::Deny), (false, false, false));
}

#[test]
fn orders_may_post_payments_and_nothing_else_once_an_allow_selects_the_workload() {
    let allow = policy(
        "orders-pay",
        r#"
selector: {matchLabels: {app: payments}}
action: ALLOW
rules:
- from: [{principals: ["spiffe://cluster.local/ns/shop/sa/orders"]}]
  to: [{ports: [8080], methods: [POST], paths: ["/api/payments/*"]}]
"#,
    );
    let p = compiled(DefaultPolicy::AllowAll, &[allow]);
    run(
        &p,
        &[
            Case {
                peer: ORDERS,
                source: "10.0.0.5",
                port: 8080,
                http: Some(("POST", "/api/payments/42")),
                allowed: true,
                by: "shop/orders-pay",
            },
            Case {
                peer: ORDERS,
                source: "10.0.0.5",
                port: 8080,
                http: Some(("GET", "/api/payments/42")),
                allowed: false,
                by: "no-allow-matched",
            },
            Case {
                peer: ORDERS,
                source: "10.0.0.5",
                port: 8080,
                http: Some(("POST", "/api/refunds")),
                allowed: false,
                by: "no-allow-matched",
            },
            Case {
                peer: ORDERS,
                source: "10.0.0.5",
                port: 9090,
                http: Some(("POST", "/api/payments/1")),
                allowed: false,
                by: "no-allow-matched",
            },
            Case {
                peer: GUEST,
                source: "10.0.0.5",
                port: 8080,
                http: Some(("POST", "/api/payments/1")),
                allowed: false,
                by: "no-allow-matched",
            },
            Case {
                peer: None,
                source: "10.0.0.5",
                port: 8080,
                http: Some(("POST", "/api/payments/1")),
                allowed: false,
                by: "no-allow-matched",
            },
            // HTTP conditions cannot match an opaque connection in an ALLOW.
            Case {
                peer: ORDERS,
                source: "10.0.0.5",
                port: 8080,
                http: None,
                allowed: false,
                by: "no-allow-matched",
            },
        ],
    );
}

#[test]
fn any_matching_deny_wins_over_allows_and_defaults() {
    let allow = policy("allow-all", "action: ALLOW\nrules: [{}]\n");
    let deny = policy(
        "no-admin-from-outside",
        r#"
action: DENY
rules:
- from: [{notNamespaces: [ops]}]
  to: [{paths: ["/api/admin/*"]}]
"#,
    );
    let p = compiled(DefaultPolicy::AllowAll, &[allow, deny]);
    run(
        &p,
        &[
            Case {
                peer: ADMIN,
                source: "10.0.0.5",
                port: 80,
                http: Some(("GET", "/api/admin/users")),
                allowed: true,
                by: "shop/allow-all",
            },
            Case {
                peer: ORDERS,
                source: "10.0.0.5",
                port: 80,
                http: Some(("GET", "/api/admin/users")),
                allowed: false,
                by: "shop/no-admin-from-outside",
            },
            Case {
                peer: None,
                source: "10.0.0.5",
                port: 80,
                http: Some(("GET", "/api/admin/users")),
                allowed: false,
                by: "shop/no-admin-from-outside",
            },
            Case {
                peer: ORDERS,
                source: "10.0.0.5",
                port: 80,
                http: Some(("GET", "/api/other")),
                allowed: true,
                by: "shop/allow-all",
            },
            // A DENY with HTTP conditions matches every opaque connection it
            // could otherwise match.
            Case {
                peer: ORDERS,
                source: "10.0.0.5",
                port: 80,
                http: None,
                allowed: false,
                by: "shop/no-admin-from-outside",
            },
            Case {
                peer: ADMIN,
                source: "10.0.0.5",
                port: 80,
                http: None,
                allowed: true,
                by: "shop/allow-all",
            },
        ],
    );
}

#[test]
fn fields_and_within_a_rule_values_or_within_a_field_rules_or() {
    let allow = policy(
        "mixed",
        r#"
action: ALLOW
rules:
- from: [{namespaces: [shop, ops], ipBlocks: ["10.0.0.0/8"]}]
- from: [{ipBlocks: ["192.168.1.7"]}]
  to: [{ports: [9090]}]
"#,
    );
    let p = compiled(DefaultPolicy::Deny, &[allow]);
    run(
        &p,
        &[
            Case {
                peer: ORDERS,
                source: "10.1.2.3",
                port: 80,
                http: None,
                allowed: true,
                by: "shop/mixed",
            },
            Case {
                peer: ADMIN,
                source: "10.1.2.3",
                port: 80,
                http: None,
                allowed: true,
                by: "shop/mixed",
            },
            Case {
                peer: ORDERS,
                source: "172.16.0.1",
                port: 80,
                http: None,
                allowed: false,
                by: "no-allow-matched",
            },
            Case {
                peer: GUEST,
                source: "10.1.2.3",
                port: 80,
                http: None,
                allowed: false,
                by: "no-allow-matched",
            },
            Case {
                peer: None,
                source: "192.168.1.7",
                port: 9090,
                http: None,
                allowed: true,
                by: "shop/mixed",
            },
            Case {
                peer: None,
                source: "192.168.1.7",
                port: 80,
                http: None,
                allowed: false,
                by: "no-allow-matched",
            },
        ],
    );
}

#[test]
fn not_fields_exclude_and_authenticated_splits_callers() {
    let allow = policy(
        "mesh-but-guests",
        r#"
action: ALLOW
rules:
- from: [{authenticated: true, notPrincipals: ["*/sa/guest"]}]
  to: [{notPorts: [9090], notMethods: [DELETE], notPaths: ["/internal/*"]}]
- from: [{authenticated: false}]
  to: [{paths: ["/public"]}]
"#,
    );
    let p = compiled(DefaultPolicy::Deny, &[allow]);
    run(
        &p,
        &[
            Case {
                peer: ORDERS,
                source: "10.0.0.1",
                port: 80,
                http: Some(("GET", "/x")),
                allowed: true,
                by: "shop/mesh-but-guests",
            },
            Case {
                peer: GUEST,
                source: "10.0.0.1",
                port: 80,
                http: Some(("GET", "/x")),
                allowed: false,
                by: "no-allow-matched",
            },
            Case {
                peer: ORDERS,
                source: "10.0.0.1",
                port: 9090,
                http: Some(("GET", "/x")),
                allowed: false,
                by: "no-allow-matched",
            },
            Case {
                peer: ORDERS,
                source: "10.0.0.1",
                port: 80,
                http: Some(("DELETE", "/x")),
                allowed: false,
                by: "no-allow-matched",
            },
            Case {
                peer: ORDERS,
                source: "10.0.0.1",
                port: 80,
                http: Some(("GET", "/internal/a")),
                allowed: false,
                by: "no-allow-matched",
            },
            Case {
                peer: None,
                source: "10.0.0.1",
                port: 80,
                http: Some(("GET", "/public")),
                allowed: true,
                by: "shop/mesh-but-guests",
            },
            Case {
                peer: None,
                source: "10.0.0.1",
                port: 80,
                http: Some(("GET", "/x")),
                allowed: false,
                by: "no-allow-matched",
            },
        ],
    );
}

#[test]
fn principal_patterns_match_prefixes_suffixes_and_istio_style_ids() {
    let allow = policy(
        "patterns",
        r#"
action: ALLOW
rules:
- from: [{principals: ["spiffe://cluster.local/ns/ops/*", "*/sa/orders", "cluster.local/ns/web/sa/guest"]}]
"#,
    );
    let p = compiled(DefaultPolicy::Deny, &[allow]);
    for peer in [ORDERS, ADMIN, GUEST] {
        run(
            &p,
            &[Case {
                peer,
                source: "10.0.0.1",
                port: 80,
                http: None,
                allowed: true,
                by: "shop/patterns",
            }],
        );
    }
    run(
        &p,
        &[Case {
            peer: Some("ns/shop/sa/other"),
            source: "10.0.0.1",
            port: 80,
            http: None,
            allowed: false,
            by: "no-allow-matched",
        }],
    );
}

#[test]
fn an_allow_policy_without_rules_denies_everything_to_its_workloads() {
    let p = compiled(
        DefaultPolicy::AllowAll,
        &[policy("allow-nothing", "action: ALLOW\n")],
    );
    run(
        &p,
        &[Case {
            peer: ORDERS,
            source: "10.0.0.1",
            port: 80,
            http: None,
            allowed: false,
            by: "no-allow-matched",
        }],
    );
    let p = compiled(
        DefaultPolicy::AllowAll,
        &[policy("deny-nothing", "action: DENY\n")],
    );
    run(
        &p,
        &[Case {
            peer: ORDERS,
            source: "10.0.0.1",
            port: 80,
            http: None,
            allowed: true,
            by: "default:allow-all",
        }],
    );
}

#[test]
fn audit_policies_never_decide_but_report_their_matches() {
    let audit = policy(
        "trial",
        "action: AUDIT\nrules:\n- to: [{paths: [\"/api/*\"]}]\n",
    );
    let p = compiled(DefaultPolicy::AllowAll, &[audit]);
    let peer = id("ns/shop/sa/orders");
    let req = Request {
        peer: Some(&peer),
        source: ip("10.0.0.1"),
        port: 80,
        http: Some(Http {
            method: "GET",
            path: "/api/x",
            token: None,
        }),
    };
    let permit = authorize(&p, &req).unwrap();
    assert_eq!(permit.by, Decider::Default(DefaultPolicy::AllowAll));
    assert_eq!(
        permit.audits,
        vec![AuditMatch {
            id: "shop/trial".into(),
            rule: 0
        }]
    );
    let p = compiled(
        DefaultPolicy::Deny,
        &[policy("trial", "action: AUDIT\nrules: [{}]\n")],
    );
    let denied = authorize(&p, &req).unwrap_err();
    assert_eq!(denied.audits.len(), 1, "audits are reported on denials too");
}

#[test]
fn probes_are_allowed_from_unauthenticated_callers_even_under_deny() {
    let deny_all = policy("deny-all", "action: DENY\nrules: [{}]\n");
    let p = compiled(DefaultPolicy::Deny, &[deny_all]);
    run(
        &p,
        &[
            Case {
                peer: None,
                source: "10.0.0.1",
                port: 8080,
                http: Some(("GET", "/healthz")),
                allowed: true,
                by: "probe",
            },
            Case {
                peer: None,
                source: "10.0.0.1",
                port: 8080,
                http: Some(("GET", "/healthz?verbose=1")),
                allowed: true,
                by: "probe",
            },
            Case {
                peer: None,
                source: "10.0.0.1",
                port: 8080,
                http: Some(("POST", "/healthz")),
                allowed: false,
                by: "shop/deny-all",
            },
            Case {
                peer: None,
                source: "10.0.0.1",
                port: 8080,
                http: Some(("GET", "/healthz/x")),
                allowed: false,
                by: "shop/deny-all",
            },
            Case {
                peer: None,
                source: "10.0.0.1",
                port: 9000,
                http: None,
                allowed: true,
                by: "probe",
            },
            // A mesh caller is not a kubelet.
            Case {
                peer: ORDERS,
                source: "10.0.0.1",
                port: 8080,
                http: Some(("GET", "/healthz")),
                allowed: false,
                by: "shop/deny-all",
            },
        ],
    );
}

#[test]
fn under_strict_mtls_an_unauthenticated_caller_reaches_only_probes() {
    let allow_anyone = policy("anyone", "action: ALLOW\nrules: [{}]\n");
    let mut strict_settings = settings(DefaultPolicy::AllowAll);
    strict_settings.mtls = MtlsMode::Strict;
    let p = compile(&workload(), &strict_settings, &[allow_anyone], &[], true);
    run(
        &p,
        &[
            Case {
                peer: None,
                source: "10.0.0.1",
                port: 8080,
                http: Some(("GET", "/healthz")),
                allowed: true,
                by: "probe",
            },
            Case {
                peer: None,
                source: "10.0.0.1",
                port: 8080,
                http: Some(("GET", "/api/orders")),
                allowed: false,
                by: "mtls-strict",
            },
            Case {
                peer: None,
                source: "10.0.0.1",
                port: 9000,
                http: None,
                allowed: true,
                by: "probe",
            },
            Case {
                peer: ORDERS,
                source: "10.0.0.1",
                port: 8080,
                http: Some(("GET", "/api/orders")),
                allowed: true,
                by: "shop/anyone",
            },
        ],
    );
}

#[test]
fn before_the_first_sync_only_probes_pass() {
    let p = WorkloadPolicy::unsynced(&workload(), &settings(DefaultPolicy::AllowAll));
    run(
        &p,
        &[
            Case {
                peer: ORDERS,
                source: "10.0.0.1",
                port: 80,
                http: None,
                allowed: false,
                by: "not-synced",
            },
            Case {
                peer: None,
                source: "10.0.0.1",
                port: 8080,
                http: Some(("GET", "/healthz")),
                allowed: true,
                by: "probe",
            },
        ],
    );
}

#[test]
fn policies_for_other_workloads_or_namespaces_do_not_apply() {
    let other_app = policy(
        "other",
        "selector: {matchLabels: {app: web}}\naction: DENY\nrules: [{}]\n",
    );
    let mut other_ns = (*policy("elsewhere", "action: DENY\nrules: [{}]\n")).clone();
    other_ns.id = "ops/elsewhere".into();
    let p = compiled(DefaultPolicy::AllowAll, &[other_app, Arc::new(other_ns)]);
    run(
        &p,
        &[Case {
            peer: ORDERS,
            source: "10.0.0.1",
            port: 80,
            http: None,
            allowed: true,
            by: "default:allow-all",
        }],
    );
}

#[path = "properties.rs"]
mod properties;
