//! What one authorization decision costs, in nanoseconds: `authorize` (a
//! connection's first decision) and `CallerPolicy::decide` (each HTTP
//! request on an established connection), over the 50-rule policy of
//! `bench/policy-cost.sh` (allowed by its last rule) and over no policy.
//!
//!     cargo bench --bench authorize
//!
//! A plain harness (no criterion, to keep the build lean): 31 batches of
//! 200,000 decisions each; prints the median and the spread per decision.
//! Run by `cargo test --all-targets` (without `--bench`), it only checks
//! that every measured decision allows, with one short batch each.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use outrider::identity::SpiffeId;
use outrider::policy::authz::{CallerFacts, CallerPolicy};
use outrider::policy::model::{Kind, PeerAuth, Policy};
use outrider::policy::objects::parse_documents;
use outrider::policy::{
    DefaultPolicy, Http, MtlsMode, Request, Settings, Workload, WorkloadPolicy, authorize,
};

const BATCHES: usize = 31;
const PER_BATCH: u32 = 200_000;

fn bench_policy_yaml() -> String {
    let mut yaml = String::from(
        "apiVersion: security.outrider.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bench-deny}\nspec:\n  selector: {matchLabels: {app: server}}\n  action: DENY\n  rules:\n",
    );
    for i in 1..=10 {
        yaml += &format!(
            "  - from: [{{principals: [\"spiffe://cluster.local/ns/attackers/sa/a{i}\"], notNamespaces: [default]}}]\n    to: [{{ports: [18000], methods: [DELETE, PUT], paths: [\"/admin/{i}/*\"]}}]\n"
        );
    }
    yaml += "---\napiVersion: security.outrider.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bench-allow}\nspec:\n  selector: {matchLabels: {app: server}}\n  action: ALLOW\n  rules:\n";
    for i in 1..=39 {
        yaml += &format!(
            "  - from: [{{principals: [\"spiffe://cluster.local/ns/default/sa/svc-{i}\", \"spiffe://cluster.local/ns/other/*\"], ipBlocks: [\"10.{i}.0.0/16\"]}}]\n    to: [{{ports: [18000], methods: [GET, POST], paths: [\"/api/v{i}/*\", \"*.json\"]}}]\n"
        );
    }
    yaml += "  - from: [{principals: [\"spiffe://cluster.local/ns/default/sa/client\"], ipBlocks: [\"127.0.0.0/8\"]}]\n    to: [{ports: [18000], methods: [GET], paths: [\"/\", \"/api/*\"]}]\n";
    yaml
}

fn compiled(yaml: &str) -> WorkloadPolicy {
    let mut policies = Vec::new();
    let mut peer_auths: Vec<PeerAuth> = Vec::new();
    for object in parse_documents(yaml, "default").unwrap() {
        match object.kind {
            Kind::AuthorizationPolicy => {
                let policy = Policy::from_object(&object);
                assert!(policy.is_valid(), "{:?}", policy.problems);
                policies.push(Arc::new(policy));
            }
            Kind::PeerAuthentication => peer_auths.push(PeerAuth::from_object(&object)),
            Kind::RequestAuthentication | Kind::LocalRateLimitPolicy => {}
        }
    }
    let workload = Workload {
        namespace: "default".into(),
        labels: [("app".to_string(), "server".to_string())].into(),
    };
    let settings = Settings {
        default: DefaultPolicy::AllowAll,
        mtls: MtlsMode::Strict,
        probes: Vec::new(),
    };
    outrider::policy::index::compile(&workload, &settings, &policies, &peer_auths, true)
}

fn measure(name: &str, decide: impl Fn() -> bool) {
    assert!(decide(), "{name}: not allowed");
    if !std::env::args().any(|a| a == "--bench") {
        println!("{name}: allowed (run `cargo bench` to measure)");
        return;
    }
    let mut per_decision: Vec<f64> = (0..BATCHES)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..PER_BATCH {
                black_box(decide());
            }
            started.elapsed().as_nanos() as f64 / f64::from(PER_BATCH)
        })
        .collect();
    per_decision.sort_by(f64::total_cmp);
    println!(
        "{name:<44} median {:>7.1} ns   (min {:.1}, max {:.1}; {BATCHES} batches of {PER_BATCH})",
        per_decision[BATCHES / 2],
        per_decision[0],
        per_decision[BATCHES - 1],
    );
}

fn main() {
    let client = SpiffeId::parse("spiffe://cluster.local/ns/default/sa/client").unwrap();
    let http = Http {
        method: "GET",
        path: "/",
        token: None,
    };
    let request = Request {
        peer: Some(&client),
        source: "127.0.0.1".parse().unwrap(),
        port: 18000,
        http: Some(http),
    };
    let caller = CallerFacts {
        peer: Some(&client),
        source: request.source,
        port: request.port,
    };
    for (name, yaml) in [
        ("no policy", String::new()),
        ("50 rules", bench_policy_yaml()),
    ] {
        let policy = Arc::new(compiled(&yaml));
        measure(&format!("{name}: authorize"), || {
            authorize(black_box(&policy), black_box(&request)).is_ok()
        });
        let view = CallerPolicy::new(policy.clone(), caller).unwrap();
        println!("{name}: the caller's view holds {} bytes", view.bytes());
        measure(&format!("{name}: CallerPolicy::decide"), || {
            black_box(&view).decide(black_box(Some(http))).is_ok()
        });
        measure(&format!("{name}: CallerPolicy::new"), || {
            CallerPolicy::new(black_box(policy.clone()), caller)
                .is_some_and(|view| view.policy().synced)
        });
    }
}
