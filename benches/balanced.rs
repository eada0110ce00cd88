//! Balancing through discovery, end to end on loopback, and what a proxy
//! holding a large endpoint set costs.
//!
//! 1. **Balanced vs single**: three backend apps behind their inbound
//!    sidecars (on 127.0.0.2-4, as three pods), the controller's discovery
//!    service answering for a Service address in front of them, and one
//!    client sidecar whose route is that address; 16 keep-alive clients
//!    send requests for a fixed time. The same load then goes through a
//!    client sidecar routed straight to one backend (the mesh without
//!    discovery). Reports requests per second of both, their ratio, and
//!    each backend's share, as medians of the repetitions.
//! 2. **Memory with 1,000 endpoints**: `outrider proxy` (as a process of
//!    its own: `OUTRIDER_BIN`, else this build's binary) resolves a
//!    Service of 1,000 meshed endpoints; its resident memory before and
//!    after.
//!
//!     cargo bench --bench balanced
//!
//! Without `--bench` (as `cargo test --all-targets` runs it): one short
//! repetition, checking that every backend is reached and the proxy's
//! memory can be read.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use outrider::app::Sidecar;
use outrider::config::{Config, FileConfig, Overrides};
use outrider::controller::discovery::index::Index;
use outrider::controller::discovery::server;
use outrider::identity::{Credentials, RawCredentials};
use outrider::test_util::certs::{TestCa, write_identity};
use serde_json::json;
use tokio::net::TcpListener;

const SERVICE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 10)), 80);
const BIG_SERVICE: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 11)), 80);
const CLIENTS: usize = 16;
const BIG: usize = 1_000;

/// An app that answers `ok` and counts what it served.
async fn counting_app(at: Ipv4Addr) -> (SocketAddr, Arc<AtomicU64>) {
    let listener = TcpListener::bind((at, 0)).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = service_fn(move |_req: http::Request<Incoming>| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            Bytes::from_static(b"ok"),
                        )))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, served)
}

/// A sidecar config in local mode (strict mTLS).
fn config(dir: &Path, id: &str, overrides: Overrides) -> Config {
    let mut file = FileConfig::default();
    file.apply(&Overrides {
        identity_dir: Some(dir.to_path_buf()),
        identity_id: Some(id.to_string()),
        mtls_mode: Some("strict".into()),
        outbound_listen: Some("127.0.0.1:0".into()),
        admin_listen: Some("127.0.0.1:0".into()),
        log_level: Some("warn".into()),
        ..overrides
    })
    .unwrap();
    file.validate().unwrap()
}

fn pod(name: &str, ip: &str) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "bench",
                     "annotations": {"outrider.dev/proxy-version": "bench"}},
        "spec": {"serviceAccountName": "backend", "containers": []},
        "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}))
    .unwrap()
}

fn service(name: &str, at: SocketAddr) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "bench"},
        "spec": {"clusterIP": at.ip().to_string(), "clusterIPs": [at.ip().to_string()],
                 "ports": [{"name": "http", "port": at.port(), "targetPort": "http"}]}}))
    .unwrap()
}

fn slice(service: &str, name: &str, endpoints: &[(String, String)], port: u16) -> EndpointSlice {
    let endpoints: Vec<_> = endpoints
        .iter()
        .map(|(pod, ip)| {
            json!({"addresses": [ip], "conditions": {"ready": true},
                   "targetRef": {"kind": "Pod", "name": pod, "namespace": "bench"}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": "bench",
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": port}],
        "endpoints": endpoints}))
    .unwrap()
}

/// Requests per second through `outbound` from `CLIENTS` keep-alive
/// clients for `duration`.
async fn load(outbound: SocketAddr, duration: Duration) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..CLIENTS {
        let (stop, done) = (stop.clone(), done.clone());
        clients.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(outbound).await.unwrap();
            stream.set_nodelay(true).unwrap();
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .unwrap();
            tokio::spawn(conn);
            while !stop.load(Ordering::Relaxed) {
                let request = http::Request::get("/")
                    .header("host", "backend.bench")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let Ok(response) = sender.send_request(request).await else {
                    break;
                };
                let ok = response.status() == 200;
                let _ = response.into_body().collect().await;
                if ok {
                    done.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let elapsed = started.elapsed();
    for client in clients {
        let _ = client.await;
    }
    done.load(Ordering::Relaxed) as f64 / elapsed.as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn run(reps: usize, duration: Duration, dir: &Path) {
    let ca = TestCa::new("cluster.local");
    let identity = |name: &str, ns: &str, sa: &str| {
        let path = dir.join(name);
        let svid = ca.issue(ns, sa);
        write_identity(&path, &svid.chain_pem, &svid.key_pem, &ca.root_pem);
        (path, svid.id.to_string())
    };
    let (backend_dir, backend_id) = identity("backend", "bench", "backend");
    let (client_dir, client_id) = identity("client", "bench", "client");

    // Three backends, as three pods.
    let mut index = Index::new(ca.trust_domain.clone());
    index.apply_service(&service("backend", SERVICE));
    let mut backends = Vec::new();
    let mut sidecars = Vec::new();
    for i in 0..3u8 {
        let ip = Ipv4Addr::new(127, 0, 0, 2 + i);
        let (app, served) = counting_app(ip).await;
        let sidecar = Sidecar::start(&config(
            &backend_dir,
            &backend_id,
            Overrides {
                inbound_listen: Some(format!("{ip}:0")),
                inbound_app: Some(app.to_string()),
                ..Overrides::default()
            },
        ))
        .await
        .unwrap();
        let inbound = sidecar.inbound.unwrap();
        let name = format!("backend-{i}");
        index.apply_pod(&pod(&name, &ip.to_string()));
        index.apply_slice(&slice(
            "backend",
            &name,
            &[(name.clone(), ip.to_string())],
            inbound.port(),
        ));
        backends.push((inbound, served));
        sidecars.push(sidecar);
    }
    // A Service of 1,000 endpoints nobody serves, for the memory figure.
    index.apply_service(&service("big", BIG_SERVICE));
    let big: Vec<(String, String)> = (0..BIG)
        .map(|i| {
            let ip = format!("127.1.{}.{}", i / 250, 1 + i % 250);
            index.apply_pod(&pod(&format!("big-{i}"), &ip));
            (format!("big-{i}"), ip)
        })
        .collect();
    index.apply_slice(&slice("big", "big-1", &big, 9));

    let (controller_dir, controller_id) =
        identity("controller", "outrider-system", "outrider-controller");
    let credentials = Credentials::from_raw(
        &RawCredentials::read_dir(&controller_dir).unwrap(),
        &outrider::identity::SpiffeId::parse(&controller_id).unwrap(),
        rustls_pki_types::UnixTime::now(),
        Duration::from_secs(60),
    )
    .unwrap();
    let (discovery, _server) = server::serve_index(
        index,
        server::server_tls(Arc::new(credentials), true).unwrap(),
    )
    .await
    .unwrap();

    let balanced = Sidecar::start(&config(
        &client_dir,
        &client_id,
        Overrides {
            outbound_peer: Some(SERVICE.to_string()),
            discovery_address: Some(discovery.to_string()),
            inbound_listen: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        },
    ))
    .await
    .unwrap();
    let single = Sidecar::start(&config(
        &client_dir,
        &client_id,
        Overrides {
            outbound_peer: Some(backends[0].0.to_string()),
            outbound_peer_id: Some(backend_id.clone()),
            inbound_listen: Some("127.0.0.1:0".into()),
            ..Overrides::default()
        },
    ))
    .await
    .unwrap();

    let (mut balanced_rates, mut single_rates) = (Vec::new(), Vec::new());
    let mut shares = vec![Vec::new(); backends.len()];
    for _ in 0..reps {
        let before: Vec<u64> = backends
            .iter()
            .map(|(_, s)| s.load(Ordering::Relaxed))
            .collect();
        balanced_rates.push(load(balanced.outbound.unwrap(), duration).await);
        let served: Vec<u64> = backends
            .iter()
            .zip(&before)
            .map(|((_, s), b)| s.load(Ordering::Relaxed) - b)
            .collect();
        let total: u64 = served.iter().sum();
        for (share, n) in shares.iter_mut().zip(&served) {
            share.push(*n as f64 / total.max(1) as f64);
        }
        single_rates.push(load(single.outbound.unwrap(), duration).await);
    }
    let (b, s) = (median(balanced_rates), median(single_rates));
    println!("balanced over 3 backends: {b:.0} req/s (median of {reps})");
    println!("one backend, no discovery: {s:.0} req/s");
    println!("ratio balanced/single: {:.2}", b / s);
    for (i, share) in shares.into_iter().enumerate() {
        let share = median(share);
        println!("backend-{i} share: {:.1} %", share * 100.0);
        assert!(share > 0.05, "backend-{i} barely reached: {share}");
    }

    // A proxy process of its own resolves the 1,000-endpoint Service.
    let config_file = dir.join("big.yaml");
    let outbound = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap()
    };
    std::fs::write(
        &config_file,
        format!(
            "identity:\n  dir: {}\n  id: {client_id}\n\
             inbound:\n  enabled: false\n\
             outbound:\n  listen: {outbound}\n  peer: {BIG_SERVICE}\n\
             admin:\n  listen: 127.0.0.1:0\n\
             discovery:\n  address: {discovery}\n\
             log:\n  level: error\n",
            client_dir.display()
        ),
    )
    .unwrap();
    // OUTRIDER_BIN: the shipped (static, symbol-ordered) build, whose
    // memory is the one that counts; else this build's binary.
    let binary =
        std::env::var("OUTRIDER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_outrider").into());
    let mut proxy = std::process::Command::new(binary)
        .args(["proxy", "--config"])
        .arg(&config_file)
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut connected = None;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if let Ok(stream) = tokio::net::TcpStream::connect(outbound).await {
            connected = Some(stream);
            break;
        }
    }
    drop(connected.expect("the proxy listens"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = rss_kib(proxy.id());
    // One request: the Service is resolved (1,000 endpoints in the answer
    // and in the balancer), an endpoint picked, refused, another tried.
    for _ in 0..3 {
        let stream = tokio::net::TcpStream::connect(outbound).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let request = http::Request::get("/")
            .header("host", "big.bench")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let _ = response.into_body().collect().await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let resolved = rss_kib(proxy.id());
    let _ = proxy.kill();
    let _ = proxy.wait();
    println!(
        "proxy RSS: {:.1} MiB idle, {:.1} MiB with {BIG} endpoints resolved",
        idle as f64 / 1024.0,
        resolved as f64 / 1024.0
    );

    balanced.shutdown().await;
    single.shutdown().await;
    for sidecar in sidecars {
        sidecar.shutdown().await;
    }
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let (reps, duration) = if bench {
        (5, Duration::from_secs(5))
    } else {
        (1, Duration::from_millis(300))
    };
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(reps, duration, dir.path()));
}
