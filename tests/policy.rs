//! Authorization policies enforced by the real binary: live file updates,
//! cutting opaque connections, invalid files that must not widen access,
//! PeerAuthentication, gRPC denials, kubelet probes, and the Kubernetes
//! source through a fake API server.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{ProxyProcess, Workload, config, sections, workload};
use http::Request;
use http_body_util::Empty;
use outrider::test_util::apps;
use outrider::test_util::certs::TestCa;
use outrider::test_util::fake_apiserver::FakeApiServer;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

fn policy_yaml(name: &str, action: &str, rules: &str) -> String {
    format!(
        "apiVersion: security.outrider.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\nspec:\n  selector: {{matchLabels: {{app: payments}}}}\n  action: {action}\n  rules:\n{rules}"
    )
}

/// A payments proxy whose policies come from `dir`.
fn server_config(w: &Workload, app: SocketAddr, dir: &Path, mode: &str, extra: &str) -> String {
    config(
        w,
        &sections(
            Some(app),
            None,
            mode,
            &format!(
                "workload:\n  labels: {{app: payments}}\npolicy:\n  source: files\n  dir: {}\n  reload_debounce: 50ms\n  poll_interval: 500ms\n{extra}",
                dir.display()
            ),
        ),
    )
}

struct Setup {
    _tmp: tempfile::TempDir,
    _ca: TestCa,
    dir: std::path::PathBuf,
    server_w: Workload,
    client_w: Workload,
}

fn setup() -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let dir = tmp.path().join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    let server_w = workload(tmp.path(), &ca, "shop", "payments");
    let client_w = workload(tmp.path(), &ca, "shop", "orders");
    Setup {
        _tmp: tmp,
        _ca: ca,
        dir,
        server_w,
        client_w,
    }
}

async fn client_for(s: &Setup, server: &ProxyProcess, extra: &str) -> ProxyProcess {
    ProxyProcess::start(&config(
        &s.client_w,
        &sections(
            None,
            Some((server.inbound(), &s.server_w.id)),
            "strict",
            extra,
        ),
    ))
    .await
}

async fn status(addr: SocketAddr, path: &str) -> u16 {
    apps::http1_get(addr, path)
        .await
        .map(|(s, _)| s.as_u16())
        .unwrap_or(0)
}

#[tokio::test]
async fn a_policy_file_change_flips_a_live_client_to_denied_within_a_second() {
    let s = setup();
    let app = apps::http1_app(Duration::ZERO).await;
    let server = ProxyProcess::start(&server_config(&s.server_w, app, &s.dir, "strict", "")).await;
    let client = client_for(&s, &server, "").await;
    let outbound = client.outbound();

    // A client sending continuously; every answer is timestamped.
    let seen: Arc<Mutex<Vec<(Instant, u16)>>> = Arc::default();
    let recorder = {
        let seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let code = status(outbound, "/api/pay").await;
                seen.lock().push((Instant::now(), code));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let written = Instant::now();
    std::fs::write(
        s.dir.join("deny.yaml"),
        policy_yaml(
            "no-orders",
            "DENY",
            &format!("  - from: [{{principals: [\"{ORDERS}\"]}}]\n"),
        ),
    )
    .unwrap();
    let flipped = common::eventually(Duration::from_secs(5), async || {
        seen.lock()
            .iter()
            .find(|(at, code)| *at > written && *code == 403)
            .map(|(at, _)| *at)
    })
    .await
    .expect("never denied");
    tokio::time::sleep(Duration::from_millis(100)).await;
    recorder.abort();
    let seen = seen.lock().clone();
    assert!(
        seen.iter().any(|(at, code)| *at < written && *code == 200),
        "was allowed before"
    );
    assert!(
        flipped.duration_since(written) < Duration::from_secs(1),
        "took {:?}",
        flipped.duration_since(written)
    );
    assert!(
        seen.iter()
            .filter(|(at, _)| *at > flipped)
            .all(|(_, code)| *code == 403),
        "stayed denied"
    );
    let denied = server
        .metric(
            "outrider_authz_decisions_total",
            &[
                ("kind", "http"),
                ("decision", "deny"),
                ("policy", "shop/no-orders"),
            ],
        )
        .await;
    assert!(denied >= 1.0, "deny not counted");
}

#[tokio::test]
async fn an_opaque_connection_is_cut_when_a_new_deny_covers_it() {
    let s = setup();
    let echo = apps::tcp_echo().await;
    let server = ProxyProcess::start(&server_config(&s.server_w, echo, &s.dir, "strict", "")).await;
    let client = common::opaque_client(&s.client_w, &server, &s.server_w.id).await;
    let mut stream = tokio::net::TcpStream::connect(client.outbound())
        .await
        .unwrap();
    stream.write_all(b"\x00hello").await.unwrap();
    let mut echo_buf = [0u8; 6];
    stream.read_exact(&mut echo_buf).await.unwrap();

    std::fs::write(
        s.dir.join("cut.yaml"),
        policy_yaml(
            "cut",
            "DENY",
            &format!("  - from: [{{principals: [\"{ORDERS}\"]}}]\n"),
        ),
    )
    .unwrap();
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
        .await
        .expect("not cut in time");
    assert!(matches!(closed, Ok(0) | Err(_)), "still open: {closed:?}");
    let cut = common::eventually(Duration::from_secs(5), async || {
        (server
            .metric("outrider_authz_terminated_total", &[("policy", "shop/cut")])
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    assert!(cut.is_some(), "termination not counted");
    // New connections are refused at once.
    let mut again = tokio::net::TcpStream::connect(client.outbound())
        .await
        .unwrap();
    let _ = again.write_all(b"\x00again").await;
    let refused = tokio::time::timeout(Duration::from_secs(3), again.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(refused, Ok(0) | Err(_)));
}

#[tokio::test]
async fn http_rules_never_allow_an_opaque_connection_and_say_so() {
    let s = setup();
    std::fs::write(
        s.dir.join("api.yaml"),
        policy_yaml(
            "api-only",
            "ALLOW",
            &format!(
                "  - from: [{{principals: [\"{ORDERS}\"]}}]\n    to: [{{paths: [\"/api/*\"]}}]\n"
            ),
        ),
    )
    .unwrap();
    let echo = apps::tcp_echo().await;
    let server = ProxyProcess::start(&server_config(&s.server_w, echo, &s.dir, "strict", "")).await;
    let client = common::opaque_client(&s.client_w, &server, &s.server_w.id).await;
    let mut stream = tokio::net::TcpStream::connect(client.outbound())
        .await
        .unwrap();
    let _ = stream.write_all(b"\x00hello").await;
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf))
        .await
        .expect("neither echoed nor closed");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the ALLOW matched: {read:?}"
    );
    let counted = common::eventually(Duration::from_secs(5), async || {
        (server
            .metric(
                "outrider_authz_http_rules_on_opaque_total",
                &[("policy", "shop/api-only")],
            )
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    assert!(counted.is_some(), "not counted");
    assert!(
        server.logs().contains("Policy has HTTP conditions"),
        "{}",
        server.logs()
    );
}

#[tokio::test]
async fn an_invalid_policy_file_never_widens_access() {
    let s = setup();
    let app = apps::http1_app(Duration::ZERO).await;
    let file = s.dir.join("policies.yaml");
    std::fs::write(
        &file,
        policy_yaml("admin-only", "DENY", "  - to: [{paths: [\"/admin/*\"]}]\n"),
    )
    .unwrap();
    let server = ProxyProcess::start(&server_config(&s.server_w, app, &s.dir, "strict", "")).await;
    let client = client_for(&s, &server, "").await;
    let out = client.outbound();
    assert_eq!(status(out, "/admin/x").await, 403);
    assert_eq!(status(out, "/ok").await, 200);

    // A typo that breaks the YAML keeps the DENY in force.
    std::fs::write(
        &file,
        "apiVersion: security.outrider.dev/v1alpha1\nkind: [broken",
    )
    .unwrap();
    let counted = common::eventually(Duration::from_secs(5), async || {
        (server
            .metric(
                "outrider_policy_source_errors_total",
                &[("reason", "unparseable_file")],
            )
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    assert!(counted.is_some());
    assert_eq!(status(out, "/admin/x").await, 403);

    // A DENY with an unreadable value denies more, not less.
    std::fs::write(
        &file,
        policy_yaml("admin-only", "DENY", "  - from: [{ipBlocks: [\"10.0.0.0/8\", \"bogus\"]}]\n    to: [{paths: [\"/admin/*\"]}]\n"),
    )
    .unwrap();
    let invalid = common::eventually(Duration::from_secs(5), async || {
        (server
            .metric(
                "outrider_policy_invalid_total",
                &[("kind", "AuthorizationPolicy")],
            )
            .await
            >= 1.0)
            .then_some(())
    })
    .await;
    assert!(invalid.is_some());
    assert_eq!(
        status(out, "/admin/x").await,
        403,
        "the loopback caller is not in 10/8, yet denied"
    );
    assert_eq!(status(out, "/ok").await, 200);

    // A broken ALLOW still selects the workload and matches nothing.
    std::fs::write(
        &file,
        policy_yaml(
            "allow-broken",
            "ALLOW",
            "  - from: [{principals: [\"spiffe://a/*/b\"]}]\n",
        ),
    )
    .unwrap();
    let denied = common::eventually(Duration::from_secs(5), async || {
        (status(out, "/ok").await == 403).then_some(())
    })
    .await;
    assert!(
        denied.is_some(),
        "a broken ALLOW must not fall back to allow-all"
    );
}

#[tokio::test]
async fn peer_authentication_makes_a_port_strict() {
    let s = setup();
    let app = apps::http1_app(Duration::ZERO).await;
    let server =
        ProxyProcess::start(&server_config(&s.server_w, app, &s.dir, "permissive", "")).await;
    assert_eq!(
        status(server.inbound(), "/plain").await,
        200,
        "permissive before"
    );
    std::fs::write(
        s.dir.join("pa.yaml"),
        format!(
            "apiVersion: security.outrider.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {{name: strict-app}}\nspec:\n  selector: {{matchLabels: {{app: payments}}}}\n  portLevelMtls:\n    \"{}\": {{mode: STRICT}}\n",
            app.port()
        ),
    )
    .unwrap();
    let strict = common::eventually(Duration::from_secs(5), async || {
        (status(server.inbound(), "/plain").await == 0).then_some(())
    })
    .await;
    assert!(strict.is_some(), "plaintext still accepted");
    let client = client_for(&s, &server, "").await;
    assert_eq!(
        status(client.outbound(), "/mesh").await,
        200,
        "mesh traffic still flows"
    );
}

#[tokio::test]
async fn a_denied_grpc_call_gets_permission_denied() {
    let s = setup();
    let app = apps::http2_app().await;
    std::fs::write(
        s.dir.join("deny.yaml"),
        policy_yaml(
            "no-grpc",
            "DENY",
            "  - to: [{paths: [\"/pay.Payments/*\"]}]\n",
        ),
    )
    .unwrap();
    let server = ProxyProcess::start(&server_config(&s.server_w, app, &s.dir, "strict", "")).await;
    let client = client_for(&s, &server, "").await;
    let req = Request::post("http://payments/pay.Payments/Charge")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (status, headers, body) = apps::http2_request(client.outbound(), req).await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["grpc-status"], "7");
    assert!(body.is_empty());
    let req = Request::post("http://payments/pay.Payments/Charge")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (status, _, body) = apps::http2_request(client.outbound(), req).await.unwrap();
    assert_eq!(status, 403);
    assert!(
        !body.contains("no-grpc"),
        "the body must not name the policy: {body}"
    );
}

#[tokio::test]
async fn kubelet_probes_pass_a_deny_default() {
    let s = setup();
    let app = apps::http1_app(Duration::ZERO).await;
    let extra = format!(
        "  default: deny\n  probes:\n  - port: {}\n    path: /healthz\n",
        app.port()
    );
    let server = ProxyProcess::start(&server_config(
        &s.server_w,
        app,
        &s.dir,
        "permissive",
        &extra,
    ))
    .await;
    assert_eq!(status(server.inbound(), "/healthz").await, 200);
    assert_eq!(status(server.inbound(), "/other").await, 403);
    let client = client_for(&s, &server, "").await;
    assert_eq!(
        status(client.outbound(), "/healthz").await,
        403,
        "a mesh caller is not the kubelet"
    );
    assert_eq!(
        server
            .metric(
                "outrider_authz_decisions_total",
                &[("decision", "allow"), ("policy", "probe")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn strict_mtls_lets_kubelet_probes_through_and_nothing_else() {
    let s = setup();
    let app = apps::http1_app(Duration::ZERO).await;
    let extra = format!("  probes:\n  - port: {}\n    path: /healthz\n", app.port());
    let server =
        ProxyProcess::start(&server_config(&s.server_w, app, &s.dir, "strict", &extra)).await;
    assert_eq!(status(server.inbound(), "/healthz").await, 200, "the probe");
    assert_eq!(
        status(server.inbound(), "/api/orders").await,
        403,
        "plaintext that is not the probe"
    );
    assert_eq!(
        server
            .metric(
                "outrider_authz_decisions_total",
                &[("decision", "deny"), ("policy", "mtls-strict")]
            )
            .await,
        1.0
    );
    let client = client_for(&s, &server, "").await;
    assert_eq!(
        status(client.outbound(), "/api/orders").await,
        200,
        "mesh traffic"
    );

    // A strict port without a probe refuses plaintext outright.
    let other_app = apps::http1_app(Duration::ZERO).await;
    let other_dir = s.dir.join("other");
    std::fs::create_dir(&other_dir).unwrap();
    let other = ProxyProcess::start(&server_config(
        &s.server_w,
        other_app,
        &other_dir,
        "strict",
        "",
    ))
    .await;
    assert_eq!(status(other.inbound(), "/healthz").await, 0);
}

fn k8s_policy(name: &str, action: &str, rules: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "security.outrider.dev/v1alpha1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": "shop", "creationTimestamp": "2026-11-29T00:00:00Z"},
           "spec": {"selector": {"matchLabels": {"app": "payments"}}, "action": action, "rules": rules}})
}

#[tokio::test]
async fn the_kubernetes_source_follows_watch_events_through_410_and_an_outage() {
    let s = setup();
    let api = FakeApiServer::start().await;
    api.apply(
        "authorizationpolicies",
        k8s_policy(
            "no-admin",
            "DENY",
            json!([{"to": [{"paths": ["/admin/*"]}]}]),
        ),
    );
    let kubeconfig = s.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let labels = s.dir.join("labels");
    std::fs::write(&labels, "app=\"payments\"\n").unwrap();
    let app = apps::http1_app(Duration::ZERO).await;
    let server = ProxyProcess::start(&config(
        &s.server_w,
        &sections(
            Some(app),
            None,
            "strict",
            &format!(
                "workload:\n  labels_file: {}\npolicy:\n  source: kubernetes\n  kubeconfig: {}\n  poll_interval: 500ms\n",
                labels.display(),
                kubeconfig.display()
            ),
        ),
    ))
    .await;
    let client = client_for(&s, &server, "").await;
    let out = client.outbound();
    assert_eq!(status(out, "/admin/x").await, 403, "listed policy applies");
    assert_eq!(status(out, "/api/x").await, 200);

    let within_a_second = async |path: &str, want: u16| {
        let started = Instant::now();
        let done = common::eventually(Duration::from_secs(5), async || {
            (status(out, path).await == want).then_some(())
        })
        .await;
        assert!(done.is_some(), "{path} never became {want}");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{path} took {:?}",
            started.elapsed()
        );
    };
    api.apply(
        "authorizationpolicies",
        k8s_policy("no-api", "DENY", json!([{"to": [{"paths": ["/api/*"]}]}])),
    );
    within_a_second("/api/x", 403).await;
    api.bookmark();
    api.delete("authorizationpolicies", "no-api");
    within_a_second("/api/x", 200).await;

    // 410 Gone forces a relist that picks up what changed meanwhile.
    api.expire_versions();
    api.delete("authorizationpolicies", "no-admin");
    let relisted = common::eventually(Duration::from_secs(10), async || {
        (status(out, "/admin/x").await == 200).then_some(())
    })
    .await;
    assert!(relisted.is_some(), "relist after 410 not applied");

    // The API server vanishes: the last policies stay in force.
    api.apply(
        "authorizationpolicies",
        k8s_policy("no-api", "DENY", json!([{"to": [{"paths": ["/api/*"]}]}])),
    );
    within_a_second("/api/x", 403).await;
    api.vanish();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        status(out, "/api/x").await,
        403,
        "policies dropped during the outage"
    );
    assert_eq!(status(out, "/other").await, 200);
    let (ready, _) = apps::http1_get(server.admin, "/ready").await.unwrap();
    assert_eq!(
        ready, 200,
        "an outage after the first sync does not make the proxy unready"
    );
    api.delete("authorizationpolicies", "no-api");
    api.come_back().await;
    let recovered = common::eventually(Duration::from_secs(15), async || {
        (status(out, "/api/x").await == 200).then_some(())
    })
    .await;
    assert!(
        recovered.is_some(),
        "did not converge after the API server came back"
    );
    assert!(
        server
            .metric(
                "outrider_policy_source_errors_total",
                &[("source", "kubernetes")]
            )
            .await
            >= 1.0
    );

    // The workload's labels change: the policy no longer selects it.
    api.apply(
        "authorizationpolicies",
        k8s_policy("no-api", "DENY", json!([{"to": [{"paths": ["/api/*"]}]}])),
    );
    within_a_second("/api/x", 403).await;
    std::fs::write(&labels, "app=\"payments-v2\"\n").unwrap();
    let reselected = common::eventually(Duration::from_secs(5), async || {
        (status(out, "/api/x").await == 200).then_some(())
    })
    .await;
    assert!(reselected.is_some(), "label change not applied");
}

#[tokio::test]
async fn before_the_first_sync_the_proxy_is_unready_and_denies() {
    let s = setup();
    let api = FakeApiServer::start().await;
    api.vanish();
    let kubeconfig = s.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let app = apps::http1_app(Duration::ZERO).await;
    let server = ProxyProcess::spawn(&config(
        &s.server_w,
        &sections(
            Some(app),
            None,
            "permissive",
            &format!(
                "policy:\n  source: kubernetes\n  kubeconfig: {}\n",
                kubeconfig.display()
            ),
        ),
    ));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ready, _) = apps::http1_get(server.admin, "/ready").await.unwrap();
    assert_eq!(ready, 503);
    assert_eq!(
        status(server.inbound(), "/x").await,
        403,
        "nothing is allowed before the first sync"
    );
    api.come_back().await;
    let synced = common::eventually(Duration::from_secs(15), async || {
        let (ready, _) = apps::http1_get(server.admin, "/ready").await.ok()?;
        (ready == 200).then_some(())
    })
    .await;
    assert!(synced.is_some(), "never synced");
    assert_eq!(status(server.inbound(), "/x").await, 200);
}
