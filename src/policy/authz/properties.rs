//! Property tests for the invariants of the decision, over random policies
//! and requests drawn from a small vocabulary (so that matches are common).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use proptest::prelude::*;
use proptest::sample::select;

use super::super::*;
use crate::policy::crd;
use crate::policy::index::{Settings, Workload, compile};
use crate::policy::jwt::VerifiedToken;
use crate::policy::model::MtlsMode;

const PRINCIPALS: &[&str] = &[
    "spiffe://cluster.local/ns/shop/sa/orders",
    "spiffe://cluster.local/ns/ops/sa/admin",
    "*",
    "*/sa/orders",
    "spiffe://cluster.local/ns/shop/*",
];
const NAMESPACES: &[&str] = &["shop", "ops", "web"];
const CIDRS: &[&str] = &["10.0.0.0/8", "192.168.0.0/16", "10.1.2.3"];
const PORTS: &[u32] = &[80, 8080, 9090];
const METHODS: &[&str] = &["GET", "POST", "DELETE"];
const PATHS: &[&str] = &["/api/*", "/admin/*", "/healthz", "*.png"];

const REQUEST_PRINCIPALS: &[&str] = &["https://idp/alice", "https://idp/*", "*", "*/bob"];
const WHEN_KEYS: &[&str] = &[
    "request.auth.claims[groups]",
    "request.auth.audiences",
    "request.auth.claims[org][team]",
];
const WHEN_VALUES: &[&str] = &["admin", "dev*", "api", "*", "payments"];

/// The verified tokens requests may carry (`Req::token` indexes them).
fn tokens() -> &'static [VerifiedToken] {
    static TOKENS: std::sync::LazyLock<Vec<VerifiedToken>> = std::sync::LazyLock::new(|| {
        let token = |principal: Option<&str>, audiences: &[&str], claims: serde_json::Value| {
            VerifiedToken {
                issuer: "https://idp".into(),
                principal: principal.map(String::from),
                audiences: audiences.iter().map(|a| a.to_string()).collect(),
                claims: claims.as_object().cloned().unwrap_or_default(),
                expires: u64::MAX,
            }
        };
        vec![
            token(
                Some("https://idp/alice"),
                &["api"],
                serde_json::json!({"groups": ["admin", "dev"], "org": {"team": "payments"}}),
            ),
            token(
                Some("https://idp/bob"),
                &["web", "api"],
                serde_json::json!({"groups": "devops"}),
            ),
            token(None, &["web"], serde_json::json!({"groups": 7})),
        ]
    });
    &TOKENS
}

fn condition() -> impl Strategy<Value = crd::Condition> {
    (
        select(WHEN_KEYS),
        strings(WHEN_VALUES),
        strings(WHEN_VALUES),
    )
        .prop_filter("a condition has values", |(_, v, nv)| {
            !v.is_empty() || !nv.is_empty()
        })
        .prop_map(|(key, values, not_values)| crd::Condition {
            key: key.to_string(),
            values: (!values.is_empty()).then_some(values),
            not_values: (!not_values.is_empty()).then_some(not_values),
        })
}

const PEERS: &[Option<&str>] = &[
    None,
    Some("spiffe://cluster.local/ns/shop/sa/orders"),
    Some("spiffe://cluster.local/ns/ops/sa/admin"),
    Some("spiffe://cluster.local/ns/web/sa/guest"),
    Some("spiffe://cluster.local/ns/shop/sa/other"),
];
const SOURCES: &[&str] = &["10.1.2.3", "10.9.9.9", "192.168.1.1", "172.16.0.1"];
const REQUEST_PATHS: &[&str] = &["/api/x", "/admin/y", "/healthz", "/img.png", "/"];

fn some_of<T: Clone + std::fmt::Debug + 'static>(
    values: &'static [T],
) -> impl Strategy<Value = Vec<T>> {
    prop_oneof![
        Just(Vec::new()),
        proptest::sample::subsequence(values.to_vec(), 1..=2)
    ]
}

fn strings(values: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
    some_of(values).prop_map(|v| v.into_iter().map(String::from).collect())
}

fn source() -> impl Strategy<Value = crd::Source> {
    (
        strings(PRINCIPALS),
        strings(PRINCIPALS),
        strings(NAMESPACES),
        strings(NAMESPACES),
        strings(CIDRS),
        strings(CIDRS),
        prop_oneof![Just(None), Just(Some(true)), Just(Some(false))],
        (strings(REQUEST_PRINCIPALS), strings(REQUEST_PRINCIPALS)),
    )
        .prop_map(
            |(p, np, n, nn, i, ni, authenticated, (rp, nrp))| crd::Source {
                principals: p,
                not_principals: np,
                namespaces: n,
                not_namespaces: nn,
                ip_blocks: i,
                not_ip_blocks: ni,
                authenticated,
                request_principals: rp,
                not_request_principals: nrp,
            },
        )
}

fn operation() -> impl Strategy<Value = crd::Operation> {
    (
        some_of(PORTS),
        some_of(PORTS),
        strings(METHODS),
        strings(METHODS),
        strings(PATHS),
        strings(PATHS),
    )
        .prop_map(
            |(ports, not_ports, methods, not_methods, paths, not_paths)| crd::Operation {
                ports,
                not_ports,
                methods,
                not_methods,
                paths,
                not_paths,
            },
        )
}

fn rule() -> impl Strategy<Value = crd::AuthorizationRule> {
    (
        proptest::collection::vec(source(), 0..2),
        proptest::collection::vec(operation(), 0..2),
        proptest::collection::vec(condition(), 0..2),
    )
        .prop_map(|(from, to, when)| crd::AuthorizationRule { from, to, when })
}

fn spec(action: crd::Action) -> impl Strategy<Value = crd::AuthorizationPolicySpec> {
    proptest::collection::vec(rule(), 0..3).prop_map(move |rules| crd::AuthorizationPolicySpec {
        selector: None,
        action,
        rules,
    })
}

fn any_spec() -> impl Strategy<Value = crd::AuthorizationPolicySpec> {
    prop_oneof![
        spec(crd::Action::Allow),
        spec(crd::Action::Deny),
        spec(crd::Action::Audit)
    ]
}

#[derive(Debug, Clone)]
struct Req {
    peer: Option<SpiffeId>,
    source: IpAddr,
    port: u16,
    http: Option<(&'static str, &'static str)>,
    /// Index into [`tokens`]; `None`: no token.
    token: Option<usize>,
}

fn request() -> impl Strategy<Value = Req> {
    (
        select(PEERS),
        select(SOURCES),
        select(PORTS),
        prop_oneof![
            Just(None),
            (select(METHODS), select(REQUEST_PATHS)).prop_map(Some)
        ],
        prop_oneof![Just(None), (0usize..3).prop_map(Some)],
    )
        .prop_map(|(peer, source, port, http, token)| Req {
            peer: peer.map(|p| SpiffeId::parse(p).unwrap()),
            source: source.parse().unwrap(),
            port: port as u16,
            http,
            token,
        })
}

fn as_request(r: &Req) -> Request<'_> {
    Request {
        peer: r.peer.as_ref(),
        source: r.source,
        port: r.port,
        http: r.http.map(|(method, path)| Http {
            method,
            path,
            token: r.token.and_then(|i| tokens().get(i)),
        }),
    }
}

fn policies(specs: &[crd::AuthorizationPolicySpec]) -> Vec<Arc<Policy>> {
    specs
        .iter()
        .enumerate()
        .map(|(i, s)| Arc::new(Policy::from_spec(format!("shop/p{i}").into(), s)))
        .collect()
}

fn compiled(default: DefaultPolicy, policies: &[Arc<Policy>]) -> WorkloadPolicy {
    let workload = Workload {
        namespace: "shop".into(),
        labels: BTreeMap::new(),
    };
    let settings = Settings {
        default,
        mtls: MtlsMode::Permissive,
        probes: Vec::new(),
    };
    compile(&workload, &settings, policies, &[], true)
}

/// Like [`compiled`], with kubelet probes, a mesh mTLS mode, and possibly
/// not yet synced.
fn compiled_with_probes(
    default: DefaultPolicy,
    policies: &[Arc<Policy>],
    mtls: MtlsMode,
    synced: bool,
) -> WorkloadPolicy {
    let workload = Workload {
        namespace: "shop".into(),
        labels: BTreeMap::new(),
    };
    let settings = Settings {
        default,
        mtls,
        probes: vec![
            crate::policy::Probe {
                port: 8080,
                path: Some("/healthz".into()),
            },
            crate::policy::Probe {
                port: 9090,
                path: None,
            },
        ],
    };
    compile(&workload, &settings, policies, &[], synced)
}

fn default_policy() -> impl Strategy<Value = DefaultPolicy> {
    select(&[
        DefaultPolicy::AllowAll,
        DefaultPolicy::AllowAuthenticated,
        DefaultPolicy::AllowSameNamespace,
        DefaultPolicy::Deny,
    ])
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn adding_a_deny_never_widens_access(
        existing in proptest::collection::vec(any_spec(), 0..4),
        deny in spec(crd::Action::Deny),
        default in default_policy(),
        req in request(),
    ) {
        let before = policies(&existing);
        let mut with_deny = existing.clone();
        with_deny.push(deny);
        let after = policies(&with_deny);
        let allowed_after = authorize(&compiled(default, &after), &as_request(&req)).is_ok();
        let allowed_before = authorize(&compiled(default, &before), &as_request(&req)).is_ok();
        prop_assert!(!allowed_after || allowed_before);
    }

    #[test]
    fn a_first_allow_grants_nothing_beyond_itself(
        existing in proptest::collection::vec(prop_oneof![spec(crd::Action::Deny), spec(crd::Action::Audit)], 0..3),
        allow in spec(crd::Action::Allow),
        default in default_policy(),
        req in request(),
    ) {
        let mut specs = existing.clone();
        specs.push(allow);
        let all = policies(&specs);
        let allow_id = all.last().unwrap().id.clone();
        if let Ok(permit) = authorize(&compiled(default, &all), &as_request(&req)) {
            prop_assert!(
                matches!(&permit.by, Decider::Policy { id, .. } if *id == allow_id),
                "allowed by {:?}, not by the only ALLOW",
                permit.by
            );
        }
    }

    #[test]
    fn not_fields_are_the_complement_of_the_plain_fields(
        field in 0usize..6,
        pick in 0usize..10,
        req in request(),
    ) {
        let source_field = |not: bool| {
            let mut s = crd::Source::default();
            match field {
                0 => { let v = vec![PRINCIPALS[pick % PRINCIPALS.len()].to_string()]; if not { s.not_principals = v } else { s.principals = v } }
                1 => { let v = vec![NAMESPACES[pick % NAMESPACES.len()].to_string()]; if not { s.not_namespaces = v } else { s.namespaces = v } }
                _ => { let v = vec![CIDRS[pick % CIDRS.len()].to_string()]; if not { s.not_ip_blocks = v } else { s.ip_blocks = v } }
            }
            crd::AuthorizationRule { from: vec![s], to: Vec::new(), when: Vec::new() }
        };
        let op_field = |not: bool| {
            let mut o = crd::Operation::default();
            match field {
                3 => { let v = vec![PORTS[pick % PORTS.len()]]; if not { o.not_ports = v } else { o.ports = v } }
                4 => { let v = vec![METHODS[pick % METHODS.len()].to_string()]; if not { o.not_methods = v } else { o.methods = v } }
                _ => { let v = vec![PATHS[pick % PATHS.len()].to_string()]; if not { o.not_paths = v } else { o.paths = v } }
            }
            crd::AuthorizationRule { from: Vec::new(), to: vec![o], when: Vec::new() }
        };
        let rule = |not: bool| if field < 3 { source_field(not) } else { op_field(not) };
        // HTTP-only fields say nothing about opaque connections.
        prop_assume!(field < 4 || req.http.is_some());
        let matches = |not: bool| {
            let spec = crd::AuthorizationPolicySpec { selector: None, action: crd::Action::Allow, rules: vec![rule(not)] };
            let policy = Policy::from_spec("shop/p".into(), &spec);
            matching_rule(&policy, &as_request(&req)).is_some()
        };
        prop_assert_ne!(matches(false), matches(true));
    }

    #[test]
    fn a_callers_view_decides_exactly_like_authorize(
        specs in proptest::collection::vec(any_spec(), 0..5),
        default in default_policy(),
        synced in prop_oneof![9 => Just(true), 1 => Just(false)],
        mtls in select(&[MtlsMode::Permissive, MtlsMode::Strict]),
        req in request(),
        more in proptest::collection::vec(
            (
                prop_oneof![Just(None), (select(METHODS), select(REQUEST_PATHS)).prop_map(Some)],
                prop_oneof![Just(None), (0usize..3).prop_map(Some)],
            ),
            0..4,
        ),
    ) {
        let policy = Arc::new(compiled_with_probes(default, &policies(&specs), mtls, synced));
        let view = CallerPolicy::new(
            policy.clone(),
            CallerFacts { peer: req.peer.as_ref(), source: req.source, port: req.port },
        )
        .expect("a small policy always has a view");
        // Several requests on one connection, as keep-alive would send them.
        for (http, token) in std::iter::once((req.http, req.token)).chain(more) {
            let one = Req { http, token, ..req.clone() };
            let http = as_request(&one).http;
            prop_assert_eq!(view.decide(http), authorize(&policy, &as_request(&one)));
        }
    }
}
