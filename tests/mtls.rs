//! mTLS between two real proxies, and every protocol passing through.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{ProxyProcess, config, sections, workload};
use http::Request;
use http_body_util::Empty;
use outrider::test_util::apps;
use outrider::test_util::certs::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A client proxy whose outbound goes to a server proxy in front of `app`.
async fn pair(
    ca: &TestCa,
    tmp: &std::path::Path,
    app: std::net::SocketAddr,
    server_extra: &str,
    client_extra: &str,
) -> (ProxyProcess, ProxyProcess) {
    let server_w = workload(tmp, ca, "shop", "payments");
    let client_w = workload(tmp, ca, "shop", "orders");
    let server = ProxyProcess::start(&config(
        &server_w,
        &sections(Some(app), None, "strict", server_extra),
    ))
    .await;
    let client = ProxyProcess::start(&config(
        &client_w,
        &sections(
            None,
            Some((server.inbound(), &server_w.id)),
            "strict",
            client_extra,
        ),
    ))
    .await;
    (server, client)
}

#[tokio::test]
async fn http1_requests_carry_the_verified_caller_identity_to_the_app() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let (server, client) = pair(&ca, tmp.path(), app, "", "").await;

    let (status, body) = apps::http1_get(client.outbound(), "/orders/42")
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        body,
        "HTTP/1.1 GET /orders/42 caller=spiffe://cluster.local/ns/shop/sa/orders"
    );

    // A caller cannot claim someone else's identity through the header.
    let forged = Request::get("/x")
        .header("host", "test")
        .header(
            "x-outrider-client-id",
            "spiffe://cluster.local/ns/shop/sa/admin",
        )
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (_, _, body) = apps::http1_request(client.outbound(), forged)
        .await
        .unwrap();
    assert!(
        body.ends_with("caller=spiffe://cluster.local/ns/shop/sa/orders"),
        "{body}"
    );

    let inbound = [
        ("direction", "inbound"),
        ("tls", "true"),
        ("peer_id", "spiffe://cluster.local/ns/shop/sa/orders"),
        ("status_code", "200"),
    ];
    assert_eq!(
        server
            .metric("outrider_http_responses_total", &inbound)
            .await,
        2.0
    );
    let outbound = [
        ("direction", "outbound"),
        ("tls", "true"),
        ("peer_id", "spiffe://cluster.local/ns/shop/sa/payments"),
    ];
    assert_eq!(
        client
            .metric("outrider_http_requests_total", &outbound)
            .await,
        2.0
    );
    assert_eq!(
        server
            .metric("outrider_tls_handshakes_total", &[("direction", "inbound")])
            .await,
        1.0,
        "pooled: one handshake"
    );
}

#[tokio::test]
async fn http2_prior_knowledge_passes_through_as_http2() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http2_app().await;
    let (server, client) = pair(&ca, tmp.path(), app, "", "").await;
    for i in 0..3 {
        let (status, body) = apps::http2_get(client.outbound(), &format!("/grpc.Service/Call{i}"))
            .await
            .unwrap();
        assert_eq!(status, 200);
        assert_eq!(
            body,
            format!(
                "HTTP/2.0 GET /grpc.Service/Call{i} caller=spiffe://cluster.local/ns/shop/sa/orders"
            )
        );
    }
    assert_eq!(
        server
            .metric(
                "outrider_protocol_detections_total",
                &[("direction", "inbound"), ("protocol", "http2")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_websocket_style_upgrade_becomes_a_byte_tunnel() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::upgrade_echo_app().await;
    let (_server, client) = pair(&ca, tmp.path(), app, "", "").await;

    let mut stream = TcpStream::connect(client.outbound()).await.unwrap();
    stream
        .write_all(b"GET /chat HTTP/1.1\r\nhost: test\r\nconnection: Upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        .await
        .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
    for message in [&b"frame one"[..], b"frame two"] {
        stream.write_all(message).await.unwrap();
        let mut echo = vec![0u8; message.len()];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, message);
    }
}

#[tokio::test]
async fn opaque_tcp_is_relayed_with_half_close() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::tcp_echo().await;
    let (server, client) = pair(&ca, tmp.path(), app, "", "").await;

    let mut stream = TcpStream::connect(client.outbound()).await.unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    stream.write_all(&[0, 1, 2, 3]).await.unwrap(); // not HTTP, not TLS
    stream.write_all(&payload).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).await.unwrap();
    assert_eq!(echoed.len(), 4 + payload.len() + 3);
    assert_eq!(&echoed[4..4 + payload.len()], &payload[..]);
    assert!(
        echoed.ends_with(b"bye"),
        "the app saw our half-close and still answered"
    );
    assert_eq!(
        server
            .metric(
                "outrider_protocol_detections_total",
                &[("direction", "inbound"), ("protocol", "opaque")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_server_speaks_first_protocol_on_an_opaque_port_has_no_detection_delay() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::banner_server(b"220 mail.example ESMTP ready\r\n").await;
    let server_w = workload(tmp.path(), &ca, "shop", "mail");
    let client_w = workload(tmp.path(), &ca, "shop", "orders");
    // A long detection timeout: if the proxies waited for the client to
    // speak, the banner would take 5 s.
    let slow_detect = "limits:\n  detect_timeout: 5s\n";
    let server = ProxyProcess::start(&config(
        &server_w,
        &sections(
            Some(app),
            None,
            "strict",
            &format!("{slow_detect}opaque_ports: [{}]\n", app.port()),
        ),
    ))
    .await;
    let client = ProxyProcess::start(&config(
        &client_w,
        &sections(
            None,
            Some((server.inbound(), &server_w.id)),
            "strict",
            &format!("{slow_detect}opaque_ports: [{}]\n", server.inbound().port()),
        ),
    ))
    .await;

    let started = Instant::now();
    let mut stream = TcpStream::connect(client.outbound()).await.unwrap();
    let mut banner = vec![0u8; 30];
    stream.read_exact(&mut banner).await.unwrap();
    assert_eq!(&banner, b"220 mail.example ESMTP ready\r\n");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "banner took {:?}",
        started.elapsed()
    );
    stream.write_all(b"EHLO client\r\n").await.unwrap();
    let mut echo = vec![0u8; 13];
    stream.read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"EHLO client\r\n");
    assert_eq!(
        client
            .metric("outrider_protocol_detect_timeouts_total", &[])
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_silent_client_on_a_detected_port_falls_back_to_opaque_after_the_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::banner_server(b"hello\n").await;
    let detect = "limits:\n  detect_timeout: 300ms\n";
    let (server, client) = pair(&ca, tmp.path(), app, detect, detect).await;
    let mut stream = TcpStream::connect(client.outbound()).await.unwrap();
    let mut banner = vec![0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut banner))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&banner, b"hello\n");
    assert_eq!(
        client
            .metric(
                "outrider_protocol_detect_timeouts_total",
                &[("direction", "outbound")]
            )
            .await,
        1.0
    );
    assert_eq!(
        server
            .metric(
                "outrider_protocol_detect_timeouts_total",
                &[("direction", "inbound")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn an_unreachable_app_gives_a_502_naming_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    // Bind and drop to get a port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (_server, client) = pair(&ca, tmp.path(), dead, "", "").await;
    let req = Request::get("/")
        .header("host", "test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (status, headers, _) = apps::http1_request(client.outbound(), req).await.unwrap();
    assert_eq!(status, 502);
    assert_eq!(headers["x-outrider-error"], "connect_refused");
}

#[tokio::test]
async fn a_burst_of_concurrent_requests_shares_one_mesh_connection() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::from_millis(50)).await;
    let (server, client) = pair(&ca, tmp.path(), app, "", "").await;
    let outbound = client.outbound();
    let burst: Vec<_> = (0..32)
        .map(|i| {
            tokio::spawn(async move { apps::http1_get(outbound, &format!("/burst/{i}")).await })
        })
        .collect();
    for request in burst {
        let (status, body) = request.await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert!(body.starts_with("HTTP/1.1 GET /burst/"), "{body}");
    }
    assert_eq!(
        server
            .metric("outrider_tls_handshakes_total", &[("direction", "inbound")])
            .await,
        1.0
    );
    assert_eq!(
        client
            .metric("outrider_tcp_open_total", &[("direction", "outbound")])
            .await,
        1.0
    );
}

/// Handshakes a proxy counted, by direction and key-exchange group.
async fn handshakes(proxy: &ProxyProcess, direction: &str, group: &str) -> f64 {
    proxy
        .metric(
            "outrider_tls_handshakes_total",
            &[("direction", direction), ("group", group)],
        )
        .await
}

#[tokio::test]
async fn two_proxies_agree_on_the_post_quantum_hybrid_and_count_it_by_group() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let (server, client) = pair(&ca, tmp.path(), app, "", "").await;
    let (status, _) = apps::http1_get(client.outbound(), "/pq").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(handshakes(&server, "inbound", "x25519mlkem768").await, 1.0);
    assert_eq!(handshakes(&client, "outbound", "x25519mlkem768").await, 1.0);
    assert_eq!(handshakes(&server, "inbound", "x25519").await, 0.0);
}

#[tokio::test]
async fn a_proxy_with_post_quantum_off_and_one_with_it_on_talk_over_x25519() {
    let off = "tls:\n  post_quantum: false\n";
    for (server_extra, client_extra) in [("", off), (off, "")] {
        let tmp = tempfile::tempdir().unwrap();
        let ca = TestCa::new("cluster.local");
        let app = apps::http1_app(Duration::ZERO).await;
        let (server, client) = pair(&ca, tmp.path(), app, server_extra, client_extra).await;
        let (status, _) = apps::http1_get(client.outbound(), "/x").await.unwrap();
        assert_eq!(
            status, 200,
            "server {server_extra:?} client {client_extra:?}"
        );
        assert_eq!(handshakes(&server, "inbound", "x25519").await, 1.0);
        assert_eq!(handshakes(&client, "outbound", "x25519").await, 1.0);
        assert_eq!(handshakes(&server, "inbound", "x25519mlkem768").await, 0.0);
    }
}
