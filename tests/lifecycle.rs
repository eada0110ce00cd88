//! Start-up, readiness, configuration errors and graceful shutdown of the
//! real binary.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::Command;
use std::time::Duration;

use common::{BIN, ProxyProcess, config, sections, workload};
use outrider::test_util::apps;
use outrider::test_util::certs::{TestCa, write_identity};

#[tokio::test]
async fn sigterm_lets_in_flight_requests_finish_then_exits_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::from_millis(1500)).await;
    let server_w = workload(tmp.path(), &ca, "shop", "payments");
    let client_w = workload(tmp.path(), &ca, "shop", "orders");
    let (mut server, mut client) = common::strict_pair(&server_w, &client_w, app).await;

    let outbound = client.outbound();
    let in_flight: Vec<_> = (0..3)
        .map(|i| {
            tokio::spawn(async move { apps::http1_get(outbound, &format!("/slow/{i}")).await })
        })
        .collect();
    // All three are at the server (its app takes 1.5 s to answer).
    let arrived = common::eventually(Duration::from_secs(5), async || {
        let open = server
            .metric("outrider_tcp_open_connections", &[("direction", "inbound")])
            .await;
        let accepted = client
            .metric(
                "outrider_tcp_open_connections",
                &[("direction", "outbound")],
            )
            .await;
        (open >= 1.0 && accepted >= 3.0).then_some(())
    })
    .await;
    assert!(arrived.is_some(), "requests never reached the server");
    server.sigterm();
    client.sigterm();

    // Draining: no new connections are accepted.
    let refused = common::eventually(Duration::from_secs(5), async || {
        tokio::net::TcpStream::connect(server.inbound())
            .await
            .is_err()
            .then_some(())
    })
    .await;
    assert!(refused.is_some(), "still accepting after SIGTERM");
    let (status, body) = apps::http1_get(server.admin, "/ready").await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (503, "not ready\n"));

    for request in in_flight {
        let (status, body) = request.await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert!(
            body.contains("caller=spiffe://cluster.local/ns/shop/sa/orders"),
            "{body}"
        );
    }
    for proxy in [&mut server, &mut client] {
        let status = proxy.wait_exit(Duration::from_secs(10)).expect("exited");
        assert_eq!(status.code(), Some(0), "logs:\n{}", proxy.logs());
    }
}

#[tokio::test]
async fn not_ready_until_an_identity_is_mounted_then_ready_without_restart() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let dir = tmp.path().join("identity");
    std::fs::create_dir_all(&dir).unwrap();
    let w = common::Workload {
        dir: dir.clone(),
        id: ca.id("shop", "payments"),
    };
    let server = ProxyProcess::spawn(&config(&w, &sections(Some(app), None, "strict", "")));

    let (status, _) = apps::http1_get(server.admin, "/live").await.unwrap();
    assert_eq!(status, 200);
    let (status, _) = apps::http1_get(server.admin, "/ready").await.unwrap();
    assert_eq!(status, 503);

    let svid = ca.issue("shop", "payments");
    write_identity(&dir, &svid.chain_pem, &svid.key_pem, &ca.root_pem);
    let ready = common::eventually(Duration::from_secs(10), async || {
        let (status, _) = apps::http1_get(server.admin, "/ready").await.ok()?;
        (status == 200).then_some(())
    })
    .await;
    assert!(ready.is_some(), "never became ready:\n{}", server.logs());
    assert!(
        server
            .metric("outrider_identity_cert_expiration_timestamp_seconds", &[])
            .await
            > 0.0
    );
}

fn run_with_config(yaml: &str) -> (Option<i32>, String) {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("config.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(BIN)
        .args(["proxy", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn a_bad_config_exits_64_naming_the_field() {
    let id = "identity:\n  id: spiffe://cluster.local/ns/a/sa/b\n";
    let cases = [
        (String::new(), "identity.id"),
        (
            format!("{id}limits:\n  idle_timeout: soon\n"),
            "limits.idle_timeout",
        ),
        (format!("{id}inbound:\n  lisen: 0.0.0.0:1\n"), "lisen"),
        (format!("{id}mtls_mode: sometimes\n"), "mtls_mode"),
        (
            format!("{id}outbound:\n  peer_id: spiffe://cluster.local/ns/x/sa/y\n"),
            "outbound.peer_id",
        ),
        ("identity: [not, a, map]\n".to_string(), "identity"),
    ];
    for (yaml, field) in cases {
        let (code, stderr) = run_with_config(&yaml);
        assert_eq!(code, Some(64), "{yaml:?}: {stderr}");
        assert!(
            stderr.contains(field),
            "{yaml:?}: stderr does not name {field}: {stderr}"
        );
    }
}

#[test]
fn a_bad_flag_or_environment_override_exits_64() {
    let out = Command::new(BIN)
        .args([
            "proxy",
            "--identity-id",
            "spiffe://cluster.local/ns/a/sa/b",
            "--mtls-mode",
            "maybe",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("mtls_mode"));
    let out = Command::new(BIN)
        .args(["proxy", "--identity-id", "spiffe://cluster.local/ns/a/sa/b"])
        .env("OUTRIDER_INBOUND_APP", "localhost")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("inbound.app"));
}

#[test]
fn check_prints_the_effective_configuration() {
    let out = Command::new(BIN)
        .args([
            "proxy",
            "--check",
            "--identity-id",
            "spiffe://cluster.local/ns/a/sa/b",
            "--mtls-mode",
            "STRICT",
        ])
        .env("OUTRIDER_ADMIN_LISTEN", "127.0.0.1:9999")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let printed = String::from_utf8_lossy(&out.stdout);
    assert!(printed.contains("mtls_mode: strict"), "{printed}");
    assert!(printed.contains("listen: 127.0.0.1:9999"), "{printed}");
    assert!(printed.contains("detect_timeout: 1s"), "{printed}");
}

#[tokio::test]
async fn post_shutdown_from_localhost_drains_and_exits_zero_as_a_job_needs() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let w = workload(tmp.path(), &ca, "batch", "report");
    let mut proxy =
        ProxyProcess::start(&config(&w, &sections(Some(app), None, "permissive", ""))).await;
    // A GET does nothing: only POST stops the proxy.
    let (status, _) = apps::http1_get(proxy.admin, "/shutdown").await.unwrap();
    assert_eq!(status, 405);
    assert!(proxy.is_running());
    let request = http::Request::post("/shutdown")
        .body(http_body_util::Empty::new())
        .unwrap();
    let (status, _, body) = apps::http1_request(proxy.admin, request).await.unwrap();
    assert_eq!((status.as_u16(), body.as_str()), (202, "shutting down\n"));
    let exit = proxy.wait_exit(Duration::from_secs(10)).expect("exits");
    assert_eq!(exit.code(), Some(0), "{}", proxy.logs());
}
