//! `outrider policy check` over the committed examples in
//! `manifests/examples/`: the decisions docs/policy.md describes, and the
//! exit codes CI pipelines rely on (0 allow, 1 deny, 2 bad input).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_outrider");
const SHOP: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/manifests/examples/shop");

fn check(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["policy", "check", "--policies", SHOP, "--namespace", "shop"])
        .args(args)
        .output()
        .unwrap()
}

fn spiffe(sa_path: &str) -> String {
    format!("spiffe://cluster.local/{sa_path}")
}

struct Case {
    what: &'static str,
    labels: &'static str,
    port: &'static str,
    /// `None`: unauthenticated.
    source: Option<&'static str>,
    ip: &'static str,
    http: Option<(&'static str, &'static str)>,
    allowed: bool,
    decided_by: &'static str,
    audit: Option<&'static str>,
}

const CASES: &[Case] = &[
    Case {
        what: "orders may POST a payment",
        labels: "app=payments",
        port: "8080",
        source: Some("ns/shop/sa/orders"),
        ip: "10.1.0.7",
        http: Some(("POST", "/api/payments/42")),
        allowed: true,
        decided_by: "policy shop/payments-from-orders, rules[0]",
        audit: None,
    },
    Case {
        what: "orders may not read payments",
        labels: "app=payments",
        port: "8080",
        source: Some("ns/shop/sa/orders"),
        ip: "10.1.0.7",
        http: Some(("GET", "/api/payments/42")),
        allowed: false,
        decided_by: "ALLOW policies select the workload and none matched",
        audit: None,
    },
    Case {
        what: "orders may not reach the admin API (the DENY guard rail)",
        labels: "app=payments",
        port: "8080",
        source: Some("ns/shop/sa/orders"),
        ip: "10.1.0.7",
        http: Some(("POST", "/api/admin/refunds")),
        allowed: false,
        decided_by: "policy shop/payments-admin-only, rules[0]",
        audit: None,
    },
    Case {
        what: "the admin service account reaches the admin API",
        labels: "app=payments",
        port: "8080",
        source: Some("ns/shop/sa/admin"),
        ip: "10.1.0.9",
        http: Some(("GET", "/api/admin/refunds")),
        allowed: true,
        decided_by: "policy shop/payments-from-orders, rules[1]",
        audit: None,
    },
    Case {
        what: "an admin of another namespace does not",
        labels: "app=payments",
        port: "8080",
        source: Some("ns/ops/sa/admin"),
        ip: "10.1.0.9",
        http: Some(("GET", "/api/admin/refunds")),
        allowed: false,
        decided_by: "policy shop/payments-admin-only, rules[0]",
        audit: None,
    },
    Case {
        what: "the reports trial is audited, not allowed",
        labels: "app=payments",
        port: "8080",
        source: Some("ns/shop/sa/reports"),
        ip: "10.1.0.11",
        http: Some(("GET", "/api/payments/42")),
        allowed: false,
        decided_by: "ALLOW policies select the workload and none matched",
        audit: Some("policy shop/payments-reports-trial, rules[0] matched"),
    },
    Case {
        what: "an opaque connection always matches an HTTP-only DENY",
        labels: "app=payments",
        port: "8080",
        source: Some("ns/shop/sa/orders"),
        ip: "10.1.0.7",
        http: None,
        allowed: false,
        decided_by: "policy shop/payments-admin-only, rules[0]",
        audit: None,
    },
    Case {
        what: "and never matches an HTTP-only ALLOW",
        labels: "app=orders",
        port: "8080",
        source: Some("ns/shop/sa/frontend"),
        ip: "10.1.0.5",
        http: None,
        allowed: false,
        decided_by: "ALLOW policies select the workload and none matched",
        audit: None,
    },
    Case {
        what: "Prometheus scrapes the plaintext metrics port",
        labels: "app=payments",
        port: "9090",
        source: None,
        ip: "10.2.0.3",
        http: Some(("GET", "/metrics")),
        allowed: true,
        decided_by: "policy shop/payments-metrics-scrape, rules[0]",
        audit: None,
    },
    Case {
        what: "but only from the pod network",
        labels: "app=payments",
        port: "9090",
        source: None,
        ip: "192.168.1.20",
        http: Some(("GET", "/metrics")),
        allowed: false,
        decided_by: "ALLOW policies select the workload and none matched",
        audit: None,
    },
    Case {
        what: "plaintext to the API port is refused by STRICT mTLS",
        labels: "app=payments",
        port: "8080",
        source: None,
        ip: "10.2.0.3",
        http: Some(("POST", "/api/payments/42")),
        allowed: false,
        decided_by: "mTLS is STRICT on this port",
        audit: None,
    },
    Case {
        what: "the frontend places orders",
        labels: "app=orders",
        port: "8080",
        source: Some("ns/shop/sa/frontend"),
        ip: "10.1.0.5",
        http: Some(("POST", "/api/orders")),
        allowed: true,
        decided_by: "policy shop/orders-from-frontend, rules[0]",
        audit: None,
    },
    Case {
        what: "but cannot delete them",
        labels: "app=orders",
        port: "8080",
        source: Some("ns/shop/sa/frontend"),
        ip: "10.1.0.5",
        http: Some(("DELETE", "/api/orders/7")),
        allowed: false,
        decided_by: "ALLOW policies select the workload and none matched",
        audit: None,
    },
    Case {
        what: "the ingress reaches the storefront",
        labels: "app=frontend",
        port: "8080",
        source: Some("ns/ingress/sa/ingress-nginx"),
        ip: "10.1.0.2",
        http: Some(("GET", "/")),
        allowed: true,
        decided_by: "policy shop/frontend-from-ingress, rules[0]",
        audit: None,
    },
    Case {
        what: "a workload without its own policy is closed by the default deny",
        labels: "app=inventory",
        port: "8080",
        source: Some("ns/shop/sa/frontend"),
        ip: "10.1.0.5",
        http: Some(("GET", "/")),
        allowed: false,
        decided_by: "ALLOW policies select the workload and none matched",
        audit: None,
    },
];

#[test]
fn every_example_decision_matches_the_documented_outcome() {
    for case in CASES {
        let mut args = vec![
            "--labels".to_string(),
            case.labels.into(),
            "--port".into(),
            case.port.into(),
            "--ip".into(),
            case.ip.into(),
        ];
        match case.source {
            Some(path) => args.extend(["--source".into(), spiffe(path)]),
            None => args.push("--unauthenticated".into()),
        }
        if let Some((method, path)) = case.http {
            args.extend([
                "--method".into(),
                method.into(),
                "--path".into(),
                path.into(),
            ]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = check(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        let context = format!(
            "{}: {stdout}{}",
            case.what,
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            out.status.code(),
            Some(if case.allowed { 0 } else { 1 }),
            "{context}"
        );
        let verdict = if case.allowed { "ALLOW\n" } else { "DENY\n" };
        assert!(stdout.starts_with(verdict), "{context}");
        assert!(
            stdout.contains(&format!("decided by: {}", case.decided_by)),
            "{context}"
        );
        match case.audit {
            Some(audit) => assert!(stdout.contains(&format!("audit: {audit}")), "{context}"),
            None => assert!(!stdout.contains("audit:"), "{context}"),
        }
        assert!(
            !stdout.contains("warning"),
            "the examples are all valid: {context}"
        );
    }
}

#[test]
fn bad_input_exits_2_with_a_reason() {
    let base = ["--labels", "app=payments", "--port", "8080"];
    let cases: &[(&[&str], &str)] = &[
        (&["--source", "orders"], "--source"),
        (&["--unauthenticated", "--method", "GET"], "--path"),
        (&[], "--unauthenticated"),
        (
            &["--unauthenticated", "--default", "sometimes"],
            "--default",
        ),
        (&["--unauthenticated", "--probe", "http"], "--probe"),
    ];
    for (extra, named) in cases {
        let out = check(&[&base[..], extra].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {stderr}");
        assert!(stderr.contains(named), "{extra:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{extra:?}");
    }
    let out = Command::new(BIN)
        .args(["policy", "check", "--policies", "/nonexistent/policies"])
        .args(["--namespace", "shop", "--port", "80", "--unauthenticated"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/policies"));
}

#[test]
fn an_invalid_policy_is_explained_fail_safe_or_rejected_with_strict() {
    let dir = tempfile::tempdir().unwrap();
    // `principal` is a typo for `principals`: read leniently it would let
    // everyone in.
    std::fs::write(
        dir.path().join("typo.yaml"),
        "apiVersion: security.outrider.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: payments-typo}
spec:
  selector: {matchLabels: {app: payments}}
  action: ALLOW
  rules:
  - from: [{principal: [cluster.local/ns/shop/sa/orders]}]
",
    )
    .unwrap();
    let run = |extra: &[&str]| {
        Command::new(BIN)
            .args(["policy", "check", "--policies"])
            .arg(dir.path())
            .args([
                "--namespace",
                "shop",
                "--labels",
                "app=payments",
                "--port",
                "8080",
            ])
            .args(["--source", "spiffe://cluster.local/ns/shop/sa/intruder"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("warning: shop/payments-typo is invalid"),
        "{stdout}"
    );
    assert!(stdout.contains("principal"), "{stdout}");

    let out = run(&["--strict"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("shop/payments-typo"));
}

/// The admin service account calling payouts, with whatever token flags.
fn payouts(token_args: &[&str]) -> Output {
    let admin = spiffe("ns/shop/sa/admin");
    let mut args = vec![
        "--labels",
        "app=payments",
        "--port",
        "8080",
        "--ip",
        "10.1.0.9",
        "--source",
        &admin,
        "--method",
        "POST",
        "--path",
        "/api/admin/payouts/7",
    ];
    args.extend_from_slice(token_args);
    check(&args)
}

#[test]
fn token_conditions_are_explained_from_a_described_token() {
    let out = payouts(&[
        "--request-principal",
        "https://idp.shop.example/ann",
        "--claim",
        r#"groups=["finance","staff"]"#,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("decided by: policy shop/payments-from-orders, rules[1]"),
        "{stdout}"
    );
    let out = payouts(&["--claim", r#"groups=["staff"]"#]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("decided by: policy shop/payments-payouts-need-finance, rules[0]"),
        "{stdout}"
    );
    // No token at all: the claim is absent, the DENY holds.
    assert_eq!(payouts(&[]).status.code(), Some(1));
}

#[test]
fn a_real_token_is_verified_as_the_proxy_would_before_the_decision() {
    use serde_json::json;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = |exp: u64| {
        json!({"iss": "https://idp.shop.example", "sub": "ann", "aud": "payments",
            "exp": exp, "groups": ["finance"]})
    };
    let minted = common::jwt::mint(json!({
        "keys": [{"kid": "k1", "alg": "ES256"}],
        "tokens": [
            {"name": "good", "kid": "k1", "alg": "ES256", "claims": claims(now + 600)},
            {"name": "expired", "kid": "k1", "alg": "ES256", "claims": claims(now - 600)},
        ],
    }));
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, &minted.jwks).unwrap();
    let file = |name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, minted.token(name)).unwrap();
        path.to_string_lossy().into_owned()
    };
    let (good, expired) = (file("good"), file("expired"));
    let jwks = jwks.to_string_lossy().into_owned();
    let out = payouts(&["--jwt", &good, "--jwks", &jwks]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.starts_with("token: verified, principal https://idp.shop.example/ann\nALLOW"),
        "{stdout}"
    );
    let out = payouts(&["--jwt", &expired, "--jwks", &jwks]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("401 invalid_token") && stdout.contains("(expired)"),
        "{stdout}"
    );
}
