//! Outbound peer verification, the permissive plaintext fallback, and the
//! limits that protect the proxy from misbehaving peers.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::{ProxyProcess, config, sections, workload};
use http::Request;
use http_body_util::Empty;
use outrider::test_util::apps;
use outrider::test_util::certs::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn closed_within(stream: &mut TcpStream, timeout: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(timeout, stream.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

#[tokio::test]
async fn outbound_refuses_a_peer_presenting_another_identity_than_the_route_names() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let impostor = workload(tmp.path(), &ca, "shop", "impostor");
    let client_w = workload(tmp.path(), &ca, "shop", "orders");
    let server = ProxyProcess::start(&config(
        &impostor,
        &sections(Some(app), None, "permissive", ""),
    ))
    .await;
    let expected = ca.id("shop", "payments");
    // Permissive, yet a route that names its peer never falls back.
    let client = ProxyProcess::start(&config(
        &client_w,
        &sections(None, Some((server.inbound(), &expected)), "permissive", ""),
    ))
    .await;
    let req = Request::get("/")
        .header("host", "test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (status, headers, _) = apps::http1_request(client.outbound(), req).await.unwrap();
    assert_eq!(status, 502);
    assert_eq!(headers["x-outrider-error"], "upstream_tls_failed");
    assert_eq!(
        client
            .metric(
                "outrider_tls_handshake_failures_total",
                &[("reason", "wrong_identity")]
            )
            .await,
        1.0
    );
    assert_eq!(
        client
            .metric("outrider_outbound_plaintext_fallbacks_total", &[])
            .await,
        0.0
    );
}

/// Outbound to a destination without a proxy: a plain HTTP app.
async fn unmeshed_route(mode: &str) -> (ProxyProcess, tempfile::TempDir) {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let plain_app = apps::http1_app(Duration::ZERO).await;
    let client_w = workload(tmp.path(), &ca, "shop", "orders");
    let yaml = config(&client_w, &sections(None, None, mode, "")).replace(
        "outbound:\n  listen: 127.0.0.1:0\n",
        &format!("outbound:\n  listen: 127.0.0.1:0\n  peer: {plain_app}\n"),
    );
    (ProxyProcess::start(&yaml).await, tmp)
}

#[tokio::test]
async fn permissive_mode_falls_back_to_plaintext_for_a_destination_without_a_proxy_and_remembers_it()
 {
    let (client, _tmp) = unmeshed_route("permissive").await;
    for _ in 0..3 {
        let (status, body) = apps::http1_get(client.outbound(), "/legacy").await.unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, "HTTP/1.1 GET /legacy caller=unauthenticated");
    }
    // One failed handshake taught it; later connections go straight to plaintext.
    assert_eq!(
        client
            .metric(
                "outrider_tls_handshake_failures_total",
                &[("direction", "outbound")]
            )
            .await,
        1.0
    );
    let labels = [
        ("direction", "outbound"),
        ("tls", "false"),
        ("no_tls_reason", "peer_not_meshed"),
    ];
    assert!(client.metric("outrider_tcp_open_total", &labels).await >= 1.0);
    assert!(
        client
            .metric("outrider_outbound_plaintext_fallbacks_total", &[])
            .await
            >= 1.0
    );
}

#[tokio::test]
async fn strict_mode_refuses_a_destination_without_a_proxy() {
    let (client, _tmp) = unmeshed_route("strict").await;
    let req = Request::get("/")
        .header("host", "test")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (status, headers, _) = apps::http1_request(client.outbound(), req).await.unwrap();
    assert_eq!(status, 502);
    assert_eq!(headers["x-outrider-error"], "upstream_tls_failed");
    assert_eq!(
        client
            .metric("outrider_outbound_plaintext_fallbacks_total", &[])
            .await,
        0.0
    );
}

#[tokio::test]
async fn a_peer_that_never_answers_the_handshake_times_out_and_is_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    // Accepts TCP, never speaks.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let _keep = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            held.push(s);
        }
    });
    let client_w = workload(tmp.path(), &ca, "shop", "orders");
    let peer_id = ca.id("shop", "payments");
    let client = ProxyProcess::start(&config(
        &client_w,
        &sections(
            None,
            Some((silent_addr, &peer_id)),
            "strict",
            "tls:\n  handshake_timeout: 300ms\n",
        ),
    ))
    .await;
    let started = std::time::Instant::now();
    let (status, _) = apps::http1_get(client.outbound(), "/").await.unwrap();
    assert_eq!(status, 502);
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(
        client
            .metric(
                "outrider_tls_handshake_failures_total",
                &[("reason", "timeout")]
            )
            .await,
        1.0
    );
}

#[tokio::test]
async fn connections_beyond_the_limit_are_closed_and_counted_while_admitted_ones_work() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::tcp_echo().await;
    let w = workload(tmp.path(), &ca, "shop", "payments");
    let proxy = ProxyProcess::start(&config(
        &w,
        &sections(
            Some(app),
            None,
            "permissive",
            // Both kinds of place: the total is what is tested here.
            "limits:\n  max_connections: 2\n  max_plaintext_connections: 2\n",
        ),
    ))
    .await;
    let mut admitted = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(proxy.inbound()).await.unwrap();
        s.write_all(b"\x00hold").await.unwrap();
        let mut echo = [0u8; 5];
        s.read_exact(&mut echo).await.unwrap();
        admitted.push(s);
    }
    let mut rejected = TcpStream::connect(proxy.inbound()).await.unwrap();
    assert!(
        closed_within(&mut rejected, Duration::from_secs(2)).await,
        "third connection was kept"
    );
    assert_eq!(
        proxy
            .metric(
                "outrider_connection_errors_total",
                &[("reason", "max_connections")]
            )
            .await,
        1.0
    );
    admitted[0].write_all(b"\x00more").await.unwrap();
    let mut echo = [0u8; 5];
    admitted[0].read_exact(&mut echo).await.unwrap();
    assert_eq!(&echo, b"\x00more");
    drop(admitted);
    // Capacity comes back once the held connections close.
    let back = common::eventually(Duration::from_secs(5), async || {
        let mut s = TcpStream::connect(proxy.inbound()).await.ok()?;
        s.write_all(b"\x00back").await.ok()?;
        let mut echo = [0u8; 5];
        tokio::time::timeout(Duration::from_millis(500), s.read_exact(&mut echo))
            .await
            .ok()?
            .ok()?;
        (&echo == b"\x00back").then_some(())
    })
    .await;
    assert!(back.is_some());
}

#[tokio::test]
async fn oversized_request_headers_are_rejected_without_harming_other_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let w = workload(tmp.path(), &ca, "shop", "payments");
    let proxy = ProxyProcess::start(&config(
        &w,
        &sections(
            Some(app),
            None,
            "permissive",
            "limits:\n  max_header_bytes: 8KiB\n",
        ),
    ))
    .await;
    let huge = "x".repeat(32 * 1024);
    let req = Request::get("/")
        .header("host", "test")
        .header("x-huge", huge)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let (status, _, _) = apps::http1_request(proxy.inbound(), req).await.unwrap();
    assert_eq!(status, 431);
    let (status, _) = apps::http1_get(proxy.inbound(), "/fine").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_idle_opaque_connection_is_closed_after_the_idle_timeout() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::tcp_echo().await;
    let w = workload(tmp.path(), &ca, "shop", "payments");
    let proxy = ProxyProcess::start(&config(
        &w,
        &sections(
            Some(app),
            None,
            "permissive",
            "limits:\n  idle_timeout: 500ms\n",
        ),
    ))
    .await;
    let mut s = TcpStream::connect(proxy.inbound()).await.unwrap();
    s.write_all(b"\x00ping").await.unwrap();
    let mut echo = [0u8; 5];
    s.read_exact(&mut echo).await.unwrap();
    let started = std::time::Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed too early: {:?}",
        started.elapsed()
    );
    let closed = common::eventually(Duration::from_secs(5), async || {
        let n = proxy
            .metric("outrider_tcp_close_total", &[("result", "idle_timeout")])
            .await;
        (n == 1.0).then_some(())
    })
    .await;
    assert!(closed.is_some());
}
