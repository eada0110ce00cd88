//! Request authentication by the real binary, against tokens minted by a
//! JWT implementation we did not write (PyJWT, `tests/jwt/mint.py`) and
//! keys served by an HTTPS server the test controls: every row of the
//! semantics table in `docs/policy.md`, key rotation, the provider down
//! at start and later, header hygiene, and authorization on tokens.
//!
//! Needs `OUTRIDER_PYTHON`: a Python with PyJWT and cryptography
//! (`ci/test.sh` makes one in a venv).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use common::jwt::{Minted, mint};
use common::{ProxyProcess, Workload, config, sections, workload};
use http::{HeaderMap, Request, StatusCode};
use http_body_util::Empty;
use outrider::test_util::apps;
use outrider::test_util::certs::TestCa;
use outrider::test_util::jwks_server::JwksServer;
use serde_json::{Value, json};

const ISSUER: &str = "https://idp.example";
const ES_ONLY: &str = "https://es-only.example";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(sub: &str, extra: Value) -> Value {
    let mut c = json!({"iss": ISSUER, "sub": sub, "aud": ["payments"], "exp": now() + 3600,
        "group": "buyers", "groups": ["dev"]});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            c.as_object_mut().unwrap().remove(k);
        } else {
            c[k] = v.clone();
        }
    }
    c
}

/// Every token the table needs, minted in one run.
fn mint_all() -> Minted {
    let token = |name: &str, kid: &str, alg: &str, claims: Value| json!({"name": name, "kid": kid, "alg": alg, "claims": claims});
    mint(json!({
        "keys": [
            {"kid": "rs", "alg": "RS256"}, {"kid": "ps", "alg": "PS256"},
            {"kid": "es", "alg": "ES256"}, {"kid": "ed", "alg": "EdDSA"},
            {"kid": "rogue", "alg": "ES256", "publish": false},
            {"kid": "rotated", "alg": "ES256", "publish": false},
        ],
        "tokens": [
            token("rs256", "rs", "RS256", claims("alice", json!({"groups": ["admin", "dev"]}))),
            token("ps256", "ps", "PS256", claims("alice", json!({}))),
            token("es256", "es", "ES256", claims("alice", json!({}))),
            token("eddsa", "ed", "EdDSA", claims("alice", json!({}))),
            token("bob", "es", "ES256", claims("bob", json!({}))),
            token("fresh", "es", "ES256", claims("carol", json!({}))),
            token("expired", "es", "ES256", claims("alice", json!({"exp": now() - 120}))),
            token("not_yet", "es", "ES256", claims("alice", json!({"nbf": now() + 120}))),
            token("no_exp", "es", "ES256", claims("alice", json!({"exp": null}))),
            token("wrong_aud", "es", "ES256", claims("alice", json!({"aud": "billing"}))),
            token("unknown_iss", "es", "ES256", claims("alice", json!({"iss": "https://evil.example"}))),
            token("rs_for_es_only", "rs", "RS256", claims("alice", json!({"iss": ES_ONLY}))),
            token("es_only", "es", "ES256", claims("erin", json!({"iss": ES_ONLY}))),
            token("rotated", "rotated", "ES256", claims("dave", json!({}))),
            token("unknown_kid", "rogue", "ES256", claims("mallory", json!({}))),
            {"name": "forged", "kid": "rogue", "kid_override": "es", "alg": "ES256",
             "claims": claims("mallory", json!({}))},
            {"name": "confused", "kid": "rs", "alg": "HS256", "secret_from": "rs",
             "claims": claims("mallory", json!({}))},
            {"name": "jku", "kid": "rogue", "alg": "ES256", "claims": claims("mallory", json!({})),
             "headers": {"jku": "https://attacker.example/keys"}},
        ],
    }))
}

fn policies(dir: &Path, jwks_url: &str, presence: &str) {
    std::fs::write(
        dir.join("authn.yaml"),
        format!(
            "apiVersion: security.outrider.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: idp}}\nspec:\n  selector: {{matchLabels: {{app: payments}}}}\n  jwtRules:\n  - issuer: {ISSUER}\n    audiences: [payments]\n    jwksUri: {jwks_url}\n    presence: {presence}\n    outputClaimToHeaders: [{{header: x-user-group, claim: group}}]\n  - issuer: {ES_ONLY}\n    audiences: [payments]\n    jwksUri: {jwks_url}\n    algorithms: [ES256]\n    forwardOriginalToken: false\n"
        ),
    )
    .unwrap();
    // /admin/*: a token is required, and it must carry the admin group.
    std::fs::write(
        dir.join("admins.yaml"),
        "apiVersion: security.outrider.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: admins}\nspec:\n  selector: {matchLabels: {app: payments}}\n  action: DENY\n  rules:\n  - from: [{notRequestPrincipals: [\"*\"]}]\n    to: [{paths: [\"/admin/*\"]}]\n  - to: [{paths: [\"/admin/*\"]}]\n    when: [{key: \"request.auth.claims[groups]\", notValues: [admin]}]\n",
    )
    .unwrap();
}

struct Setup {
    _tmp: tempfile::TempDir,
    _ca: TestCa,
    dir: std::path::PathBuf,
    server_w: Workload,
    ca_file: std::path::PathBuf,
}

fn setup(provider: &JwksServer) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let dir = tmp.path().join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    let ca_file = tmp.path().join("idp-ca.pem");
    std::fs::write(&ca_file, &provider.ca_pem).unwrap();
    let server_w = workload(tmp.path(), &ca, "shop", "payments");
    Setup {
        _tmp: tmp,
        _ca: ca,
        dir,
        server_w,
        ca_file,
    }
}

async fn payments(s: &Setup, app: SocketAddr) -> ProxyProcess {
    ProxyProcess::start(&config(
        &s.server_w,
        &sections(
            Some(app),
            None,
            "permissive",
            &format!(
                "workload:\n  labels: {{app: payments}}\npolicy:\n  source: files\n  dir: {}\n  reload_debounce: 50ms\n  poll_interval: 500ms\njwt:\n  extra_ca_file: {}\n",
                s.dir.display(),
                s.ca_file.display()
            ),
        ),
    ))
    .await
}

/// One plaintext HTTP/1.1 request to the inbound proxy.
async fn send(
    proxy: &ProxyProcess,
    path: &str,
    headers: &[(&str, &str)],
) -> (StatusCode, HeaderMap, String) {
    let mut req = Request::get(path).header("host", "payments");
    for (name, value) in headers {
        req = req.header(*name, *value);
    }
    apps::http1_request(proxy.inbound(), req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap()
}

async fn with_token(
    proxy: &ProxyProcess,
    path: &str,
    token: &str,
) -> (StatusCode, HeaderMap, String) {
    send(
        proxy,
        path,
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
}

#[tokio::test]
async fn every_row_of_the_semantics_table_holds_against_pyjwt_tokens() {
    let minted = mint_all();
    let provider = JwksServer::start(&minted.jwks).await;
    let s = setup(&provider);
    policies(&s.dir, &provider.url("/keys"), "Optional");
    let app = apps::headers_app().await;
    let proxy = payments(&s, app).await;
    let started = Instant::now();

    // No token, Optional: through, without a principal.
    let (status, _, seen) = send(&proxy, "/", &[]).await;
    assert_eq!(status, 200);
    assert!(!seen.contains("x-outrider-request-principal"), "{seen}");

    // Good tokens of every algorithm: through, with the principal; the
    // token travels on; the claim header is set and a spoofed one gone.
    for name in ["rs256", "ps256", "es256", "eddsa"] {
        let (status, _, seen) = send(
            &proxy,
            "/",
            &[
                ("authorization", &format!("Bearer {}", minted.token(name))),
                ("x-user-group", "spoofed-admins"),
                ("x-outrider-request-principal", "https://idp.example/root"),
            ],
        )
        .await;
        assert_eq!(status, 200, "{name}: {seen}");
        assert!(
            seen.contains("x-outrider-request-principal: https://idp.example/alice\n"),
            "{name}: {seen}"
        );
        assert!(seen.contains("x-user-group: buyers\n"), "{name}: {seen}");
        assert!(
            !seen.contains("spoofed") && !seen.contains("/root"),
            "{name}: {seen}"
        );
        assert!(
            seen.contains(&format!("authorization: Bearer {}\n", minted.token(name))),
            "{name}: token not forwarded"
        );
    }

    // A rule that does not forward: verified, then kept from the app.
    let (status, _, seen) = with_token(&proxy, "/", minted.token("es_only")).await;
    assert_eq!(status, 200, "{seen}");
    assert!(
        seen.contains("x-outrider-request-principal: https://es-only.example/erin\n"),
        "{seen}"
    );
    assert!(
        !seen.contains("authorization:"),
        "forwardOriginalToken: false: {seen}"
    );

    // Every kind of bad token: 401 invalid_token, never the application.
    for name in [
        "expired",
        "not_yet",
        "no_exp",
        "wrong_aud",
        "unknown_iss",
        "rs_for_es_only",
        "forged",
        "confused",
        "jku",
    ] {
        let (status, headers, seen) = with_token(&proxy, "/", minted.token(name)).await;
        assert_eq!(status, 401, "{name}: {seen}");
        assert_eq!(
            headers["www-authenticate"], "Bearer error=\"invalid_token\"",
            "{name}"
        );
        assert_eq!(headers["x-outrider-error"], "invalid-token", "{name}");
    }
    for garbage in [
        "x.y.z",
        "not-a-jwt",
        "eyJhbGciOiJub25lIn0.eyJpc3MiOiJodHRwczovL2lkcC5leGFtcGxlIn0.",
    ] {
        let (status, _, _) = with_token(&proxy, "/", garbage).await;
        assert_eq!(status, 401, "{garbage}");
    }
    // Two different tokens: refused rather than guessed between.
    let (status, _, _) = send(
        &proxy,
        "/",
        &[
            (
                "authorization",
                &format!("Bearer {}", minted.token("es256")),
            ),
            ("authorization", &format!("Bearer {}", minted.token("bob"))),
        ],
    )
    .await;
    assert_eq!(status, 401);

    // gRPC callers get UNAUTHENTICATED.
    let req = Request::post("http://payments/pkg.Svc/Call")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header(
            "authorization",
            format!("Bearer {}", minted.token("expired")),
        )
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (_, headers, _) = apps::http2_request(proxy.inbound(), req).await.unwrap();
    assert_eq!(headers["grpc-status"], "16");

    // Authorization on the token: /admin/* needs a token with the admin
    // group (403, not 401: the token, or its absence, is valid).
    assert_eq!(send(&proxy, "/admin/x", &[]).await.0, 403);
    assert_eq!(
        with_token(&proxy, "/admin/x", minted.token("bob")).await.0,
        403
    );
    assert_eq!(
        with_token(&proxy, "/admin/x", minted.token("rs256"))
            .await
            .0,
        200
    );

    // An unknown key id: no refetch within 10 s of the last fetch...
    assert_eq!(
        with_token(&proxy, "/", minted.token("rotated")).await.0,
        401
    );
    assert_eq!(provider.fetches(), 1);
    // ...then the provider rotates, and one refetch picks the key up
    // without a restart.
    provider.set_document(&minted.every_key);
    tokio::time::sleep(
        Duration::from_secs(10).saturating_sub(started.elapsed()) + Duration::from_millis(500),
    )
    .await;
    let (status, _, seen) = with_token(&proxy, "/", minted.token("rotated")).await;
    assert_eq!(status, 200, "{seen}");
    assert!(seen.contains("https://idp.example/dave"));
    assert_eq!(provider.fetches(), 2);
    // A flood of unknown key ids right after costs the provider nothing.
    for _ in 0..20 {
        let _ = with_token(&proxy, "/", minted.token("unknown_kid")).await;
    }
    assert_eq!(provider.fetches(), 2, "refetches are at most one per 10 s");

    // The provider goes down: the last good keys keep verifying tokens
    // never seen before.
    provider.set_down(true);
    assert_eq!(with_token(&proxy, "/", minted.token("fresh")).await.0, 200);

    // Presence: Required refuses a request without a token.
    policies(&s.dir, &provider.url("/keys"), "Required");
    let required = common::eventually(Duration::from_secs(5), async || {
        let (status, headers, _) = send(&proxy, "/", &[]).await;
        (status == 401).then_some(headers)
    })
    .await
    .expect("Required never applied");
    assert_eq!(required["www-authenticate"], "Bearer");

    for (labels, least) in [
        (vec![("outcome", "verified"), ("reason", "")], 4.0),
        (vec![("outcome", "refused"), ("reason", "expired")], 1.0),
        (
            vec![("outcome", "refused"), ("reason", "bad_signature")],
            1.0,
        ),
        (
            vec![("outcome", "refused"), ("reason", "unknown_key_id")],
            1.0,
        ),
        (vec![("outcome", "refused"), ("reason", "missing")], 1.0),
    ] {
        let value = proxy.metric("outrider_request_authn_total", &labels).await;
        assert!(value >= least, "{labels:?}: {value}");
    }
    let ok = proxy
        .metric("outrider_jwks_fetches_total", &[("result", "ok")])
        .await;
    assert_eq!(ok, 2.0);
}

#[tokio::test]
async fn a_provider_down_at_start_gets_503_then_tokens_pass_once_it_answers() {
    let minted = mint(json!({
        "keys": [{"kid": "es", "alg": "ES256"}],
        "tokens": [{"name": "good", "kid": "es", "alg": "ES256", "claims": claims("alice", json!({}))}],
    }));
    let provider = JwksServer::start(&minted.jwks).await;
    provider.set_down(true);
    let s = setup(&provider);
    policies(&s.dir, &provider.url("/keys"), "Optional");
    let proxy = payments(&s, apps::headers_app().await).await;
    let (status, headers, _) = with_token(&proxy, "/", minted.token("good")).await;
    assert_eq!(status, 503);
    assert_eq!(headers["x-outrider-error"], "jwks-unavailable");
    // Requests without a token are not held hostage by the provider.
    assert_eq!(send(&proxy, "/", &[]).await.0, 200);
    provider.set_down(false);
    let passed = common::eventually(Duration::from_secs(15), async || {
        (with_token(&proxy, "/", minted.token("good")).await.0 == 200).then_some(())
    })
    .await;
    assert!(
        passed.is_some(),
        "keys never fetched once the provider answered"
    );
}

#[tokio::test]
async fn a_token_travels_on_to_the_next_hop_and_is_verified_there_too() {
    let minted = mint(json!({
        "keys": [{"kid": "es", "alg": "ES256"}],
        "tokens": [
            {"name": "good", "kid": "es", "alg": "ES256", "claims": claims("alice", json!({}))},
            {"name": "expired", "kid": "es", "alg": "ES256", "claims": claims("alice", json!({"exp": now() - 300}))},
        ],
    }));
    let provider = JwksServer::start(&minted.jwks).await;
    let s = setup(&provider);
    policies(&s.dir, &provider.url("/keys"), "Optional");
    let server = payments(&s, apps::headers_app().await).await;
    let orders = workload(s._tmp.path(), &s._ca, "shop", "orders");
    let client = ProxyProcess::start(&config(
        &orders,
        &sections(None, Some((server.inbound(), &s.server_w.id)), "strict", ""),
    ))
    .await;
    let get = |token: &'static str| {
        let outbound = client.outbound();
        async move {
            let req = Request::get("/")
                .header("host", "payments")
                .header("authorization", format!("Bearer {token}"))
                .body(Empty::<Bytes>::new())
                .unwrap();
            apps::http1_request(outbound, req).await.unwrap()
        }
    };
    let good: &'static str = Box::leak(minted.token("good").to_string().into_boxed_str());
    let expired: &'static str = Box::leak(minted.token("expired").to_string().into_boxed_str());
    let (status, _, seen) = get(good).await;
    assert_eq!(status, 200);
    assert!(seen.contains("x-outrider-client-id: spiffe://cluster.local/ns/shop/sa/orders"));
    assert!(seen.contains("x-outrider-request-principal: https://idp.example/alice"));
    assert_eq!(get(expired).await.0, 401);
}
