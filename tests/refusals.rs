//! What the inbound side refuses, and what permissive mode lets through.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{ProxyProcess, config, sections, workload};
use outrider::test_util::apps;
use outrider::test_util::certs::{LeafPem, TestCa};
use outrider::test_util::tls::{client_config, mesh_request};

struct Server {
    proxy: ProxyProcess,
    ca: TestCa,
    _tmp: tempfile::TempDir,
}

async fn server(mode: &str) -> Server {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let w = workload(tmp.path(), &ca, "shop", "payments");
    let proxy = ProxyProcess::start(&config(&w, &sections(Some(app), None, mode, ""))).await;
    Server {
        proxy,
        ca,
        _tmp: tmp,
    }
}

/// Presents `leaf` to the server and expects a refusal counted under
/// `reason`.
async fn assert_refused(server: &Server, leaf: Option<&LeafPem>, reason: &str) {
    let before = server
        .proxy
        .metric(
            "outrider_tls_handshake_failures_total",
            &[("reason", reason)],
        )
        .await;
    let client = client_config(
        &server.ca.root_pem,
        leaf.map(|l| (l.chain_pem.as_str(), l.key_pem.as_str())),
    );
    let result = mesh_request(server.proxy.inbound(), client).await;
    assert!(
        result.is_err(),
        "served a client it should refuse ({reason}): {result:?}"
    );
    let counted = common::eventually(Duration::from_secs(5), async || {
        let now = server
            .proxy
            .metric(
                "outrider_tls_handshake_failures_total",
                &[("reason", reason)],
            )
            .await;
        (now == before + 1.0).then_some(())
    })
    .await;
    assert!(
        counted.is_some(),
        "failure not counted as {reason}:\n{}",
        server.proxy.metrics().await
    );
}

#[tokio::test]
async fn a_valid_client_is_served_as_a_baseline() {
    let s = server("strict").await;
    let svid = s.ca.issue("shop", "orders");
    let leaf = LeafPem {
        chain_pem: svid.chain_pem,
        key_pem: svid.key_pem,
    };
    let reply = mesh_request(
        s.proxy.inbound(),
        client_config(&s.ca.root_pem, Some((&leaf.chain_pem, &leaf.key_pem))),
    )
    .await
    .unwrap();
    assert!(
        reply.contains("caller=spiffe://cluster.local/ns/shop/sa/orders"),
        "{reply}"
    );
}

#[tokio::test]
async fn refuses_a_client_without_a_certificate() {
    let s = server("strict").await;
    assert_refused(&s, None, "no_client_cert").await;
}

#[tokio::test]
async fn refuses_a_certificate_from_a_foreign_ca() {
    let s = server("strict").await;
    let foreign = TestCa::new("cluster.local");
    let svid = foreign.issue("shop", "orders");
    assert_refused(
        &s,
        Some(&LeafPem {
            chain_pem: svid.chain_pem,
            key_pem: svid.key_pem,
        }),
        "unknown_ca",
    )
    .await;
}

#[tokio::test]
async fn refuses_expired_and_not_yet_valid_certificates() {
    let s = server("strict").await;
    assert_refused(&s, Some(&s.ca.leaf_expired("shop", "orders")), "expired").await;
    assert_refused(
        &s,
        Some(&s.ca.leaf_not_yet_valid("shop", "orders")),
        "not_yet_valid",
    )
    .await;
}

#[tokio::test]
async fn refuses_a_leaf_with_two_uri_sans() {
    let s = server("strict").await;
    assert_refused(
        &s,
        Some(&s.ca.leaf_with_two_uris("shop", "orders")),
        "not_svid",
    )
    .await;
}

#[tokio::test]
async fn refuses_a_leaf_marked_ca() {
    let s = server("strict").await;
    assert_refused(
        &s,
        Some(&s.ca.leaf_marked_ca("shop", "orders")),
        "bad_leaf_usage",
    )
    .await;
}

#[tokio::test]
async fn refuses_another_trust_domain_even_from_our_ca() {
    let s = server("strict").await;
    let leaf =
        s.ca.leaf_with(&["spiffe://evil.example/ns/shop/sa/orders"], |_| {});
    assert_refused(&s, Some(&leaf), "wrong_trust_domain").await;
}

#[tokio::test]
async fn strict_mode_refuses_plaintext() {
    let s = server("strict").await;
    let result = apps::http1_get(s.proxy.inbound(), "/").await;
    assert!(result.is_err(), "plaintext was served: {result:?}");
    let counted = common::eventually(Duration::from_secs(5), async || {
        let n = s
            .proxy
            .metric(
                "outrider_connection_errors_total",
                &[("reason", "plaintext_refused")],
            )
            .await;
        (n == 1.0).then_some(())
    })
    .await;
    assert!(counted.is_some());
}

#[tokio::test]
async fn permissive_mode_serves_plaintext_as_unauthenticated() {
    let s = server("permissive").await;
    let (status, body) = apps::http1_get(s.proxy.inbound(), "/open").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "HTTP/1.1 GET /open caller=unauthenticated");
    let labels = [
        ("direction", "inbound"),
        ("tls", "false"),
        ("no_tls_reason", "not_provided_by_remote"),
    ];
    assert_eq!(
        s.proxy.metric("outrider_tcp_open_total", &labels).await,
        1.0
    );
    // Mesh clients are still verified in permissive mode.
    let foreign = TestCa::new("cluster.local").issue("shop", "orders");
    assert_refused(
        &s,
        Some(&LeafPem {
            chain_pem: foreign.chain_pem,
            key_pem: foreign.key_pem,
        }),
        "unknown_ca",
    )
    .await;
}

#[tokio::test]
async fn garbage_and_silent_peers_are_closed_while_others_are_served() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let s = server("strict").await;
    // A TLS record header announcing a ClientHello, then garbage.
    let mut garbage = tokio::net::TcpStream::connect(s.proxy.inbound())
        .await
        .unwrap();
    garbage
        .write_all(&[
            0x16, 0x03, 0x01, 0x00, 0x10, 0x01, 0x00, 0x00, 0x0c, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9, 9,
            9,
        ])
        .await
        .unwrap();
    // A client that connects and never speaks.
    let mut silent = tokio::net::TcpStream::connect(s.proxy.inbound())
        .await
        .unwrap();

    let svid = s.ca.issue("shop", "orders");
    let client = client_config(&s.ca.root_pem, Some((&svid.chain_pem, &svid.key_pem)));
    for _ in 0..3 {
        mesh_request(s.proxy.inbound(), client.clone())
            .await
            .unwrap();
    }
    let mut buf = [0u8; 16];
    let closed = tokio::time::timeout(Duration::from_secs(5), garbage.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "garbage peer still open: {closed:?}"
    );
    // The silent one is closed once the detection timeout (1 s) passes.
    let closed = tokio::time::timeout(Duration::from_secs(5), silent.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "silent peer still open: {closed:?}"
    );
}

#[tokio::test]
async fn strict_mode_authenticates_a_spiffe_client_that_offers_no_alpn() {
    let s = server("strict").await;
    let svid = s.ca.issue("shop", "orders");
    let mut config =
        (*client_config(&s.ca.root_pem, Some((&svid.chain_pem, &svid.key_pem)))).clone();
    config.alpn_protocols.clear();
    let reply = mesh_request(s.proxy.inbound(), std::sync::Arc::new(config.clone()))
        .await
        .unwrap();
    assert!(
        reply.contains("caller=spiffe://cluster.local/ns/shop/sa/orders"),
        "{reply}"
    );
    // Without a certificate the same client is refused.
    let mut anonymous = (*client_config(&s.ca.root_pem, None)).clone();
    anonymous.alpn_protocols.clear();
    assert!(
        mesh_request(s.proxy.inbound(), std::sync::Arc::new(anonymous))
            .await
            .is_err()
    );
}

#[tokio::test]
async fn permissive_mode_passes_application_tls_through_untouched() {
    // The app speaks its own TLS; an unmeshed client offering `h2` must
    // reach it rather than our mTLS.
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let echo = apps::tcp_echo().await;
    let w = workload(tmp.path(), &ca, "shop", "payments");
    let proxy =
        ProxyProcess::start(&config(&w, &sections(Some(echo), None, "permissive", ""))).await;
    let mut app_tls = (*client_config(&ca.root_pem, None)).clone();
    app_tls.alpn_protocols = vec![b"h2".to_vec()];
    // The echo app reflects the ClientHello, which the client cannot parse
    // as a ServerHello: the handshake fails, but on the app's side, which
    // shows the proxy did not terminate it.
    let result = mesh_request(proxy.inbound(), std::sync::Arc::new(app_tls)).await;
    assert!(result.is_err());
    let labels = [("direction", "inbound"), ("protocol", "opaque")];
    let relayed = common::eventually(Duration::from_secs(5), async || {
        (proxy
            .metric("outrider_protocol_detections_total", &labels)
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    assert!(
        relayed.is_some(),
        "application TLS was not relayed as opaque"
    );
    assert_eq!(
        proxy
            .metric("outrider_tls_handshake_failures_total", &[])
            .await,
        0.0
    );
}
