//! Identity and trust-anchor rotation while traffic flows, and bad updates
//! that must change nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use common::{ProxyProcess, Workload, config, sections, workload};
use outrider::test_util::apps;
use outrider::test_util::certs::{TestCa, write_identity};
use outrider::test_util::tls::{client_config, mesh_request, served_serial};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Requests sent continuously through two client proxies: one pooled HTTP
/// path, and one opaque path where every request is a new connection and
/// therefore a new mTLS handshake with the server.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    errors: Arc<parking_lot::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(pooled: SocketAddr, per_connection: SocketAddr) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(parking_lot::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for per_conn in [false, true, false, true] {
            let (stop, ok, failed, errors) =
                (stop.clone(), ok.clone(), failed.clone(), errors.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let result = if per_conn {
                        one_shot(per_connection).await
                    } else {
                        apps::http1_get(pooled, "/load").await.and_then(|(s, _)| {
                            if s == 200 {
                                Ok(())
                            } else {
                                Err(format!("status {s}"))
                            }
                        })
                    };
                    match result {
                        Ok(()) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            errors.lock().push(e);
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            }));
        }
        Self {
            stop,
            ok,
            failed,
            errors,
            tasks,
        }
    }

    async fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        let errors = self.errors.lock().clone();
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
            errors,
        )
    }
}

/// HTTP over a fresh TCP connection through an opaque outbound listener.
async fn one_shot(addr: SocketAddr) -> Result<(), String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET /fresh HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut reply = Vec::new();
    stream
        .read_to_end(&mut reply)
        .await
        .map_err(|e| e.to_string())?;
    if reply.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(format!("reply {:?}", String::from_utf8_lossy(&reply)))
    }
}

struct Mesh {
    _tmp: tempfile::TempDir,
    server_w: Workload,
    client_w: Workload,
    server: ProxyProcess,
    pooled: ProxyProcess,
    opaque: ProxyProcess,
}

async fn mesh(ca: &TestCa) -> Mesh {
    let tmp = tempfile::tempdir().unwrap();
    let app = apps::http1_app(Duration::ZERO).await;
    let server_w = workload(tmp.path(), ca, "shop", "payments");
    let client_w = workload(tmp.path(), ca, "shop", "orders");
    let server =
        ProxyProcess::start(&config(&server_w, &sections(Some(app), None, "strict", ""))).await;
    let peer = Some((server.inbound(), &server_w.id));
    let pooled = ProxyProcess::start(&config(&client_w, &sections(None, peer, "strict", ""))).await;
    let opaque = ProxyProcess::start(&config(
        &client_w,
        &common::opaque_outbound(&sections(None, peer, "strict", "")),
    ))
    .await;
    Mesh {
        _tmp: tmp,
        server_w,
        client_w,
        server,
        pooled,
        opaque,
    }
}

async fn wait_for(timeout_secs: u64, what: &str, check: impl AsyncFnMut() -> Option<()>) {
    let done = common::eventually(Duration::from_secs(timeout_secs), check).await;
    assert!(done.is_some(), "timed out waiting for {what}");
}

#[tokio::test]
async fn five_rotations_under_load_fail_no_request_and_serve_each_new_serial() {
    let ca = TestCa::new("cluster.local");
    let m = mesh(&ca).await;
    let pid = m.server.pid();
    let probe_leaf = ca.issue("shop", "probe");
    let probe = client_config(
        &ca.root_pem,
        Some((&probe_leaf.chain_pem, &probe_leaf.key_pem)),
    );
    let load = Load::start(m.pooled.outbound(), m.opaque.outbound());

    for round in 1..=5 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        let svid = ca.issue("shop", "payments");
        write_identity(
            &m.server_w.dir,
            &svid.chain_pem,
            &svid.key_pem,
            &ca.root_pem,
        );
        let addr = m.server.inbound();
        wait_for(
            10,
            &format!("rotation {round} to serve serial {}", svid.serial),
            async || (served_serial(addr, probe.clone()).await.ok()? == svid.serial).then_some(()),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 50, "too little load to prove anything: {ok}");
    assert_eq!(m.server.pid(), pid);
    assert_eq!(
        m.server
            .metric("outrider_identity_reloads_total", &[])
            .await,
        6.0
    );
    let handshakes = m.server.metric("outrider_tls_handshakes_total", &[]).await;
    assert!(
        handshakes > 20.0,
        "the opaque path should handshake per request: {handshakes}"
    );
}

#[tokio::test]
async fn the_trust_anchor_rotates_without_restarts_or_failed_requests() {
    let old = TestCa::new("cluster.local");
    let new = TestCa::new("cluster.local");
    let m = mesh(&old).await;
    let pids = [m.server.pid(), m.pooled.pid(), m.opaque.pid()];
    let load = Load::start(m.pooled.outbound(), m.opaque.outbound());
    let both = format!("{}{}", old.root_pem, new.root_pem);
    let proxies = [&m.server, &m.pooled, &m.opaque];

    async fn all_have(proxies: &[&ProxyProcess], reloads: f64, roots: f64) {
        for p in proxies {
            wait_for(
                10,
                &format!("reload #{reloads} with {roots} roots"),
                async || {
                    let text = p.metrics().await;
                    let ok = apps::metric(&text, "outrider_identity_reloads_total", &[]) >= reloads
                        && apps::metric(&text, "outrider_identity_trust_bundle_roots", &[])
                            == roots;
                    ok.then_some(())
                },
            )
            .await;
        }
    }

    // 1. Everyone trusts both roots, still holding leaves from the old one.
    for (w, sa) in [(&m.server_w, "payments"), (&m.client_w, "orders")] {
        let svid = old.issue("shop", sa);
        write_identity(&w.dir, &svid.chain_pem, &svid.key_pem, &both);
    }
    all_have(&proxies, 2.0, 2.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 2. Leaves are reissued from the new root.
    for (w, sa) in [(&m.server_w, "payments"), (&m.client_w, "orders")] {
        let svid = new.issue("shop", sa);
        write_identity(&w.dir, &svid.chain_pem, &svid.key_pem, &both);
    }
    all_have(&proxies, 3.0, 2.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    // 3. The old root is dropped.
    for (w, sa) in [(&m.server_w, "payments"), (&m.client_w, "orders")] {
        let svid = new.issue("shop", sa);
        write_identity(&w.dir, &svid.chain_pem, &svid.key_pem, &new.root_pem);
    }
    all_have(&proxies, 4.0, 1.0).await;
    tokio::time::sleep(Duration::from_millis(200)).await;

    let (ok, failed, errors) = load.finish().await;
    assert_eq!(failed, 0, "failed requests: {errors:?}");
    assert!(ok > 50, "too little load: {ok}");
    assert_eq!(
        [m.server.pid(), m.pooled.pid(), m.opaque.pid()],
        pids,
        "a proxy restarted"
    );

    // The old root is really gone: its leaves are refused now, new ones served.
    let stale = old.issue("shop", "orders");
    let refused = mesh_request(
        m.server.inbound(),
        client_config(&new.root_pem, Some((&stale.chain_pem, &stale.key_pem))),
    )
    .await;
    assert!(
        refused.is_err(),
        "a leaf from the dropped root was accepted"
    );
    let fresh = new.issue("shop", "orders");
    mesh_request(
        m.server.inbound(),
        client_config(&new.root_pem, Some((&fresh.chain_pem, &fresh.key_pem))),
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn bad_updates_keep_the_old_identity_serving_and_are_counted() {
    let ca = TestCa::new("cluster.local");
    let tmp = tempfile::tempdir().unwrap();
    let app = apps::http1_app(Duration::ZERO).await;
    let w = workload(tmp.path(), &ca, "shop", "payments");
    let server = ProxyProcess::start(&config(&w, &sections(Some(app), None, "strict", ""))).await;
    let probe_leaf = ca.issue("shop", "probe");
    let probe = client_config(
        &ca.root_pem,
        Some((&probe_leaf.chain_pem, &probe_leaf.key_pem)),
    );
    let original = served_serial(server.inbound(), probe.clone())
        .await
        .unwrap();

    let other = ca.issue("shop", "payments");
    let wrong_id = ca.issue("shop", "impostor");
    let foreign = TestCa::new("cluster.local").issue("shop", "payments");
    let bad_updates: [(&str, String, String, String); 5] = [
        (
            "malformed_pem",
            "this is not PEM at all\n".into(),
            other.key_pem.clone(),
            ca.root_pem.clone(),
        ),
        (
            "malformed_certificate",
            "-----BEGIN CERTIFICATE-----\ngarbage\n-----END CERTIFICATE-----\n".into(),
            other.key_pem.clone(),
            ca.root_pem.clone(),
        ),
        (
            "key_mismatch",
            other.chain_pem.clone(),
            wrong_id.key_pem.clone(),
            ca.root_pem.clone(),
        ),
        (
            "wrong_identity",
            wrong_id.chain_pem.clone(),
            wrong_id.key_pem.clone(),
            ca.root_pem.clone(),
        ),
        (
            "unknown_ca",
            foreign.chain_pem.clone(),
            foreign.key_pem.clone(),
            ca.root_pem.clone(),
        ),
    ];
    for (reason, chain, key, bundle) in bad_updates {
        write_identity(&w.dir, &chain, &key, &bundle);
        wait_for(
            10,
            &format!("a {reason} failure to be counted"),
            async || {
                let n = server
                    .metric(
                        "outrider_identity_reload_failures_total",
                        &[("reason", reason)],
                    )
                    .await;
                (n == 1.0).then_some(())
            },
        )
        .await;
        assert_eq!(
            served_serial(server.inbound(), probe.clone())
                .await
                .unwrap(),
            original,
            "after {reason}"
        );
        mesh_request(server.inbound(), probe.clone()).await.unwrap();
    }
    assert_eq!(
        server.metric("outrider_identity_reloads_total", &[]).await,
        1.0
    );

    // A good update after the bad ones is picked up.
    write_identity(&w.dir, &other.chain_pem, &other.key_pem, &ca.root_pem);
    let addr = server.inbound();
    wait_for(10, "the good update", async || {
        (served_serial(addr, probe.clone()).await.ok()? == other.serial).then_some(())
    })
    .await;
}

#[tokio::test]
async fn established_connections_outlive_rotations_of_both_identities() {
    let ca = TestCa::new("cluster.local");
    let tmp = tempfile::tempdir().unwrap();
    let echo = apps::tcp_echo().await;
    let server_w = workload(tmp.path(), &ca, "shop", "payments");
    let client_w = workload(tmp.path(), &ca, "shop", "orders");
    let server = ProxyProcess::start(&config(
        &server_w,
        &sections(Some(echo), None, "strict", ""),
    ))
    .await;
    let client = common::opaque_client(&client_w, &server, &server_w.id).await;
    let mut stream = tokio::net::TcpStream::connect(client.outbound())
        .await
        .unwrap();
    let mut round_trip = async |msg: &[u8]| {
        stream.write_all(msg).await.unwrap();
        let mut echo = vec![0u8; msg.len()];
        stream.read_exact(&mut echo).await.unwrap();
        assert_eq!(echo, msg);
    };
    round_trip(b"before").await;
    for round in 2..=3 {
        for (w, sa) in [(&server_w, "payments"), (&client_w, "orders")] {
            let svid = ca.issue("shop", sa);
            write_identity(&w.dir, &svid.chain_pem, &svid.key_pem, &ca.root_pem);
        }
        for p in [&server, &client] {
            wait_for(10, "both proxies to reload", async || {
                (p.metric("outrider_identity_reloads_total", &[]).await == f64::from(round))
                    .then_some(())
            })
            .await;
        }
        round_trip(format!("after rotation {round}").as_bytes()).await;
    }
    assert_eq!(
        server.metric("outrider_tcp_close_total", &[]).await,
        0.0,
        "the connection was cut"
    );
    assert_eq!(
        server.metric("outrider_tls_handshakes_total", &[]).await,
        1.0
    );
}
