//! Discovery end to end at scale: `outrider controller` as a process of
//! its own, fed by the fake API server (in this process) holding 5,000
//! Services of 10 endpoints each (50,000 pods, 5,000 EndpointSlices), and
//! 1,000 `Resolve` streams over mTLS (20 connections, as 20 proxies
//! following 50 Services each) while EndpointSlices change at 100 per
//! second for 10 s. Reports the controller's resident memory, its CPU time
//! per change, and the lag from the API server's write to each affected
//! stream's new answer (median, p99).
//!
//!     cargo bench --bench discovery_cluster
//!
//! What it includes that benches/discovery.rs leaves out: the watch
//! events from an API server, kube-rs decoding them, gRPC encoding and the
//! mTLS connections. What it leaves out: a real API server's own latency
//! (the fake answers from memory). Without `--bench` (as `cargo test
//! --all-targets` runs it) the cluster is small and the run short.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use outrider::discovery_api::Http2Channel;
use outrider::discovery_api::v1::ResolveRequest;
use outrider::discovery_api::v1::discovery_client::DiscoveryClient;
use outrider::identity::{Credentials, SpiffeId};
use outrider::test_util::certs::TestCa;
use outrider::test_util::fake_apiserver::FakeApiServer;
use outrider::tls::{KxGroup, MeshTls, PeerExpectation, TlsSettings};
use parking_lot::Mutex;
use serde_json::{Value, json};

struct Scale {
    services: usize,
    endpoints: usize,
    connections: usize,
    subscribed: usize,
    changes_per_second: u32,
    seconds: u32,
}

#[path = "common/addresses.rs"]
mod addresses;
use addresses::{cluster_ip, pod_ip};

/// The slice of `service` with endpoint 0 ready or not.
fn slice(service: usize, endpoints: usize, first_ready: bool) -> Value {
    let endpoints: Vec<Value> = (0..endpoints)
        .map(|e| {
            json!({"addresses": [pod_ip(service, e)],
                   "conditions": {"ready": e != 0 || first_ready},
                   "targetRef": {"kind": "Pod", "name": format!("s{service}-{e}"), "namespace": "bench"}})
        })
        .collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": format!("s{service}-x"), "namespace": "bench",
                        "labels": {"kubernetes.io/service-name": format!("s{service}")}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
           "endpoints": endpoints})
}

fn load_cluster(api: &FakeApiServer, scale: &Scale) {
    for ns in ["bench", "outrider-system"] {
        api.apply(
            "namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        );
    }
    for s in 0..scale.services {
        api.apply(
            "services",
            json!({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": format!("s{s}"), "namespace": "bench"},
                   "spec": {"clusterIP": cluster_ip(s), "clusterIPs": [cluster_ip(s)],
                            "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
        );
        for e in 0..scale.endpoints {
            let ip = pod_ip(s, e);
            api.apply(
                "pods",
                json!({"apiVersion": "v1", "kind": "Pod",
                       "metadata": {"name": format!("s{s}-{e}"), "namespace": "bench",
                                    "annotations": {"outrider.dev/proxy-version": "bench"}},
                       "spec": {"serviceAccountName": format!("sa{s}"), "containers": []},
                       "status": {"podIP": ip, "podIPs": [{"ip": ip}]}}),
            );
        }
        api.apply("endpointslices", slice(s, scale.endpoints, true));
    }
}

/// `(utime + stime)` of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which is in parentheses.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    ticks / 100.0
}

fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

async fn client(
    discovery: SocketAddr,
    credentials: &Arc<Credentials>,
) -> DiscoveryClient<Http2Channel> {
    let settings = TlsSettings {
        clock_skew: Duration::from_secs(60),
        resumption: false,
        key_exchange: vec![KxGroup::X25519],
    };
    let mesh = MeshTls::new(credentials.clone(), &settings).unwrap();
    let expected = PeerExpectation::Id(
        SpiffeId::parse("spiffe://cluster.local/ns/outrider-system/sa/outrider-controller")
            .unwrap(),
    );
    let mut config = (*mesh.client_config(&expected).unwrap()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = tokio::net::TcpStream::connect(discovery).await.unwrap();
    // As the proxy's resolver does.
    tcp.set_nodelay(true).unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(
            rustls_pki_types::ServerName::try_from("outrider-discovery").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let (sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(connection);
    Http2Channel::new(sender)
        .discovery_client("outrider-discovery.outrider-system.svc:8090")
        .unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

async fn run(scale: Scale) {
    let api = FakeApiServer::start().await;
    let loading = Instant::now();
    load_cluster(&api, &scale);
    println!(
        "fake API server: {} Services, {} pods, {} EndpointSlices (loaded in {:.1} s)",
        scale.services,
        scale.services * scale.endpoints,
        scale.services,
        loading.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    let mut controller = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .arg("controller")
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .args(["--admin-listen", "127.0.0.1:0"])
        .args(["--webhook-listen", "127.0.0.1:0"])
        .args(["--discovery-listen", "127.0.0.1:0"])
        .args(["--log-format", "json", "--log-level", "warn,outrider=info"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = controller.id();
    let stderr = controller.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("\"Controller listening\"") {
                let _ = tx.send(line);
            }
        }
    });
    let line = rx.recv_timeout(Duration::from_secs(60)).unwrap();
    let event: Value = serde_json::from_str(&line).unwrap();
    let discovery: SocketAddr = event["discovery"].as_str().unwrap().parse().unwrap();

    // Proxies' credentials from the controller's CA.
    let mut secret = None;
    for _ in 0..600 {
        secret = api.get("secrets", "outrider-system", "outrider-ca");
        if secret.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ca = TestCa::from_ca_secret(
        &outrider::test_util::secret_data(&secret.expect("the CA Secret")),
        "cluster.local",
    );
    let credentials = Arc::new(ca.credentials("bench", "client"));

    // Subscribers: `subscribed` Services, each followed by one stream,
    // spread over `connections` connections. A stream is ready once it
    // has seen its Service's full set.
    let pending: Arc<Mutex<HashMap<usize, Instant>>> = Arc::default();
    let lags: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let (ready_tx, mut ready_rx) = tokio::sync::mpsc::channel(scale.subscribed);
    let started = Instant::now();
    println!(
        "CA Secret found after {:.1} s",
        loading.elapsed().as_secs_f64()
    );
    for c in 0..scale.connections {
        let mut client = client(discovery, &credentials).await;
        for s in (c..scale.subscribed).step_by(scale.connections) {
            let mut stream = client
                .resolve(ResolveRequest {
                    target: format!("{}:80", cluster_ip(s)),
                })
                .await
                .unwrap()
                .into_inner();
            let (pending, lags, ready_tx) = (pending.clone(), lags.clone(), ready_tx.clone());
            let full = scale.endpoints;
            tokio::spawn(async move {
                let mut ready = false;
                while let Ok(Some(message)) = stream.message().await {
                    let count = match message.answer {
                        Some(outrider::discovery_api::v1::resolution::Answer::Endpoints(set)) => {
                            set.endpoints.len()
                        }
                        _ => 0,
                    };
                    if !ready && count == full {
                        ready = true;
                        let _ = ready_tx.send(()).await;
                    }
                    if let Some(at) = pending.lock().remove(&s) {
                        lags.lock().push(at.elapsed());
                    }
                }
            });
        }
    }
    println!(
        "{} streams opened after {:.1} s",
        scale.subscribed,
        started.elapsed().as_secs_f64()
    );
    for _ in 0..scale.subscribed {
        tokio::time::timeout(Duration::from_secs(900), ready_rx.recv())
            .await
            .expect("every stream gets its Service's endpoints")
            .unwrap();
    }
    println!(
        "{} streams over {} connections answered in full after {:.1} s",
        scale.subscribed,
        scale.connections,
        started.elapsed().as_secs_f64()
    );
    let synced_rss = status_kib(pid, "VmRSS:");

    // Churn: flip endpoint 0 of a random followed Service.
    let mut rng = fastrand::Rng::with_seed(7);
    let mut first_ready = vec![true; scale.services];
    let changes = scale.changes_per_second * scale.seconds;
    let every = Duration::from_secs(1) / scale.changes_per_second;
    let cpu_before = cpu_seconds(pid);
    let mut tick = tokio::time::interval(every);
    for _ in 0..changes {
        tick.tick().await;
        let s = rng.usize(..scale.subscribed);
        first_ready[s] = !first_ready[s];
        pending.lock().entry(s).or_insert_with(Instant::now);
        api.apply("endpointslices", slice(s, scale.endpoints, first_ready[s]));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu = cpu_seconds(pid) - cpu_before;
    let (rss, hwm) = (status_kib(pid, "VmRSS:"), status_kib(pid, "VmHWM:"));
    let _ = controller.kill();
    let _ = controller.wait();

    let mut lags = lags.lock().clone();
    lags.sort();
    let unanswered = pending.lock().len();
    println!(
        "controller RSS: {:.1} MiB once synced, {:.1} MiB after the churn (peak {:.1} MiB)",
        synced_rss as f64 / 1024.0,
        rss as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
    println!(
        "CPU per change (API event, index, fan-out, gRPC): {:.0} µs ({changes} changes in {} s)",
        cpu * 1e6 / f64::from(changes),
        scale.seconds
    );
    assert!(!lags.is_empty(), "no change reached a subscriber");
    println!(
        "lag from the API write to the stream's answer: median {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} measured, {unanswered} unanswered)",
        percentile(&lags, 0.5).as_secs_f64() * 1e3,
        percentile(&lags, 0.99).as_secs_f64() * 1e3,
        lags[lags.len() - 1].as_secs_f64() * 1e3,
        lags.len()
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let scale = if bench {
        Scale {
            // DISCOVERY_BENCH_SERVICES: a smaller cluster, to see how the
            // figures grow with it.
            services: std::env::var("DISCOVERY_BENCH_SERVICES")
                .ok()
                .and_then(|n| n.parse().ok())
                .unwrap_or(5_000),
            endpoints: 10,
            connections: 20,
            subscribed: 1_000,
            changes_per_second: 100,
            seconds: 10,
        }
    } else {
        Scale {
            services: 30,
            endpoints: 3,
            connections: 2,
            subscribed: 10,
            changes_per_second: 20,
            seconds: 1,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(run(scale));
}
