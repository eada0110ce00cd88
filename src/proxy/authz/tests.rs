//! The callers' shared views: one per caller however many connections it
//! has, bounded in total, and never deciding differently from the rules.

use super::*;
use crate::policy::index::{Settings, Workload, compile};
use crate::policy::model::{Kind, MtlsMode, Object, Policy};
use crate::policy::{Decider, DefaultPolicy};

/// A workload with an ALLOW policy of `rules` rules, the last one letting
/// anyone `GET /open`.
fn policy_with_rules(rules: usize) -> Arc<WorkloadPolicy> {
    let mut yaml = String::from("action: ALLOW\nrules:\n");
    for i in 1..rules {
        yaml += &format!("  - to: [{{methods: [POST], paths: [\"/only/{i}\"]}}]\n");
    }
    yaml += "  - to: [{methods: [GET], paths: [\"/open\"]}]\n";
    let policy = Policy::from_object(&Object {
        kind: Kind::AuthorizationPolicy,
        namespace: "shop".into(),
        name: "allow".into(),
        created: None,
        spec: crate::yaml::value(&yaml).unwrap(),
    });
    assert!(policy.is_valid(), "{:?}", policy.problems);
    let workload = Workload {
        namespace: "shop".into(),
        labels: Default::default(),
    };
    let settings = Settings {
        default: DefaultPolicy::AllowAll,
        mtls: MtlsMode::Permissive,
        probes: Vec::new(),
    };
    Arc::new(compile(
        &workload,
        &settings,
        &[Arc::new(policy)],
        &[],
        true,
    ))
}

fn enforcer(policy: Arc<WorkloadPolicy>, budget: usize) -> Arc<Enforcer> {
    let (_tx, rx) = tokio::sync::watch::channel(policy);
    let metrics = Metrics::new(&prometheus::Registry::new()).unwrap();
    let fetcher = crate::proxy::jwks::Fetcher::new(
        rustls::RootCertStore::empty(),
        std::time::Duration::from_secs(1),
    )
    .unwrap();
    let keys = crate::proxy::jwks::KeyStore::with_fetcher(fetcher, metrics.jwks.clone());
    let authn = crate::proxy::authn::Authenticator::new(keys, metrics.authn_outcomes.clone());
    let mut enforcer = Enforcer::new(rx, metrics, authn);
    enforcer.views.budget = budget;
    Arc::new(enforcer)
}

fn caller(source: &str) -> Caller {
    Caller {
        peer: Some(SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap()),
        source: source.parse().unwrap(),
        port: 8080,
    }
}

fn cached(connection: &ConnectionAuthz) -> Option<Arc<SharedView>> {
    match connection.view.lock().clone() {
        Some(CachedView::Shared(view)) => Some(view),
        _ => None,
    }
}

#[test]
fn connections_of_one_caller_share_one_view_and_other_callers_get_their_own() {
    let enforcer = enforcer(policy_with_rules(100), VIEWS_BUDGET);
    let connections: Vec<ConnectionAuthz> = (0..50)
        .map(|_| ConnectionAuthz::new(enforcer.clone(), caller("10.0.0.1")))
        .collect();
    for connection in &connections {
        assert!(connection.check_http("GET", "/open", None).is_ok());
    }
    let first = cached(&connections[0]).unwrap();
    for connection in &connections {
        assert!(Arc::ptr_eq(&cached(connection).unwrap(), &first));
    }
    let held_by_one = enforcer.views.held.load(Ordering::Relaxed);
    assert_eq!(held_by_one, first.bytes);

    let elsewhere = ConnectionAuthz::new(enforcer.clone(), caller("10.0.0.2"));
    assert!(elsewhere.check_http("GET", "/open", None).is_ok());
    assert!(!Arc::ptr_eq(&cached(&elsewhere).unwrap(), &first));
    assert_eq!(enforcer.views.held.load(Ordering::Relaxed), 2 * held_by_one);
}

#[test]
fn a_view_is_given_back_to_the_budget_when_its_last_connection_closes() {
    let enforcer = enforcer(policy_with_rules(100), VIEWS_BUDGET);
    let first = ConnectionAuthz::new(enforcer.clone(), caller("10.0.0.1"));
    let second = ConnectionAuthz::new(enforcer.clone(), caller("10.0.0.1"));
    assert!(first.check_http("GET", "/open", None).is_ok());
    assert!(second.check_http("GET", "/open", None).is_ok());
    assert!(enforcer.views.held.load(Ordering::Relaxed) > 0);
    drop(first);
    assert!(enforcer.views.held.load(Ordering::Relaxed) > 0);
    drop(second);
    assert_eq!(enforcer.views.held.load(Ordering::Relaxed), 0);
}

#[test]
fn past_the_budget_requests_are_judged_rule_by_rule_with_the_same_outcomes() {
    let policy = policy_with_rules(1000);
    let roomy = enforcer(policy.clone(), VIEWS_BUDGET);
    let full = enforcer(policy, 0);
    let with_view = ConnectionAuthz::new(roomy.clone(), caller("10.0.0.1"));
    let without = ConnectionAuthz::new(full.clone(), caller("10.0.0.1"));
    for (method, path) in [
        ("GET", "/open"),
        ("POST", "/only/7"),
        ("POST", "/only/999"),
        ("GET", "/only/7"),
        ("DELETE", "/open"),
    ] {
        assert_eq!(
            with_view.check_http(method, path, None),
            without.check_http(method, path, None),
            "{method} {path}"
        );
    }
    assert!(cached(&with_view).is_some());
    assert!(
        cached(&without).is_none(),
        "a view was built past the budget"
    );
    assert!(
        matches!(*without.view.lock(), Some(CachedView::OverBudget(_))),
        "the connection would look for a view again on its next request"
    );
    assert_eq!(full.views.held.load(Ordering::Relaxed), 0);
    assert_eq!(
        without.check_http("GET", "/nowhere", None).unwrap_err().by,
        Decider::NoAllowMatched
    );
}

#[test]
fn a_large_policy_costs_a_caller_about_twenty_bytes_per_rule_it_could_still_match() {
    let policy = policy_with_rules(10_000);
    let view = CallerPolicy::new(
        policy,
        CallerFacts {
            peer: None,
            source: "10.0.0.1".parse().unwrap(),
            port: 8080,
        },
    )
    .unwrap();
    // Every rule stays possible (they name no source or port): 20 bytes
    // for the rule, 4 for its one operation.
    let per_rule = view.bytes() as f64 / 10_000.0;
    assert!(per_rule <= 25.0, "{per_rule} bytes per rule");
}
