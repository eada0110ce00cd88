//! The controller's discovery index and fan-out at scale, in process:
//! 5,000 Services with 10 endpoints each (50,000 endpoints, 50,000 pods),
//! 1,000 subscribers each following a Service, and EndpointSlices
//! changing at 100 per second for 10 s. Reports the index's resident
//! memory, the CPU time per change, and the lag from a change to each
//! affected subscriber's new answer (median and p99).
//!
//!     cargo bench --bench discovery
//!
//! What it leaves out (docs/performance.md says so with the figures): the
//! API server and kube-rs watches in front, and gRPC encoding behind.
//! Run by `cargo test --all-targets` (without `--bench`), it builds a
//! small cluster and checks that a change reaches its subscriber.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use outrider::controller::discovery::index::{Index, Resolution, Target};
use outrider::controller::discovery::registry::{Registry, Subscription};
use outrider::identity::TrustDomain;
use serde_json::json;

struct Scale {
    services: usize,
    endpoints_per_service: usize,
    subscribers: usize,
    changes_per_second: u32,
    seconds: u32,
}

#[path = "common/addresses.rs"]
mod addresses;
use addresses::{cluster_ip, pod_ip};

fn service(i: usize) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % 50)},
        "spec": {"clusterIPs": [cluster_ip(i)], "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}
    }))
    .unwrap()
}

fn slice(i: usize, endpoints: usize, generation: usize) -> EndpointSlice {
    let endpoints: Vec<_> = (0..endpoints)
        .map(|e| {
            // Every other generation one endpoint is not ready: a change.
            let ready = !(generation % 2 == 1 && e == 0);
            json!({"addresses": [pod_ip(i, e)], "conditions": {"ready": ready}, "zone": "a",
                   "targetRef": {"kind": "Pod", "name": format!("pod-{i}-{e}")}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"name": format!("svc-{i}-abcde"), "namespace": format!("ns-{}", i % 50),
                     "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
        "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}], "endpoints": endpoints
    }))
    .unwrap()
}

fn pod(i: usize, e: usize) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": format!("pod-{i}-{e}"), "namespace": format!("ns-{}", i % 50),
                     "annotations": {"outrider.dev/proxy-version": "0.1.0"}},
        "spec": {"serviceAccountName": format!("sa-{i}"), "containers": []},
        "status": {"podIPs": [{"ip": pod_ip(i, e)}]}
    }))
    .unwrap()
}

/// Resident memory of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at]
}

/// Returns the median and p99 lag and how many answers arrived.
async fn run(scale: Scale) -> (Duration, Duration, usize) {
    let before = rss();
    let registry = Registry::new(Index::new(TrustDomain::parse("cluster.local").unwrap()));
    let built = Instant::now();
    for i in 0..scale.services {
        let svc = service(i);
        registry.update(|index| index.apply_service(&svc));
        for e in 0..scale.endpoints_per_service {
            let p = pod(i, e);
            registry.update(|index| index.apply_pod(&p));
        }
        let s = slice(i, scale.endpoints_per_service, 0);
        registry.update(|index| index.apply_slice(&s));
    }
    let build_time = built.elapsed();
    let index_rss = rss().saturating_sub(before);

    // Subscribers: each follows one Service and records when each answer
    // arrives.
    let (lag_tx, mut lag_rx) = tokio::sync::mpsc::unbounded_channel::<(usize, Instant)>();
    let mut tasks = Vec::new();
    for s in 0..scale.subscribers {
        let service = (s * 7919) % scale.services;
        let target = Target::Addr(format!("{}:80", cluster_ip(service)).parse().unwrap());
        let mut subscription = Subscription::new(registry.clone(), target);
        let lag_tx = lag_tx.clone();
        tasks.push(tokio::spawn(async move {
            let first = subscription.next().await;
            assert!(matches!(first, Resolution::Endpoints(_)));
            loop {
                let _ = subscription.next().await;
                if lag_tx.send((service, Instant::now())).is_err() {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_with_subscribers = rss().saturating_sub(before);

    // Churn: changes to the followed Services at the given rate.
    let followed: Vec<usize> = (0..scale.subscribers)
        .map(|s| (s * 7919) % scale.services)
        .collect();
    let mut changed_at: Vec<(usize, Instant)> = Vec::new();
    let mut cpu = Duration::ZERO;
    let total = (scale.changes_per_second * scale.seconds) as usize;
    let interval = Duration::from_secs(1) / scale.changes_per_second;
    let mut tick = tokio::time::interval(interval);
    for n in 0..total {
        tick.tick().await;
        let service = followed[n % followed.len()];
        let s = slice(service, scale.endpoints_per_service, n + 1);
        let started = Instant::now();
        registry.update(|index| index.apply_slice(&s));
        cpu += started.elapsed();
        changed_at.push((service, started));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(lag_tx);
    let mut lags = Vec::new();
    let mut arrivals: Vec<(usize, Instant)> = Vec::new();
    while let Ok(arrival) = lag_rx.try_recv() {
        arrivals.push(arrival);
    }
    // Each arrival's lag: from the latest change to its Service before it.
    for (service, at) in &arrivals {
        if let Some((_, changed)) = changed_at
            .iter()
            .rev()
            .find(|(s, c)| s == service && c <= at)
        {
            lags.push(at.duration_since(*changed));
        }
    }
    lags.sort();
    for task in tasks {
        task.abort();
    }
    let reached = lags.len();
    if std::env::args().any(|a| a == "--bench") {
        println!(
            "index of {} Services / {} endpoints: built in {:.2} s, {:.1} MiB resident ({:.1} MiB with {} subscribers)",
            scale.services,
            scale.services * scale.endpoints_per_service,
            build_time.as_secs_f64(),
            index_rss as f64 / 1048576.0,
            rss_with_subscribers as f64 / 1048576.0,
            scale.subscribers
        );
        println!(
            "{} changes at {}/s: {:.1} µs CPU per change (index update and wake-ups); {} subscriber answers, lag median {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            total,
            scale.changes_per_second,
            cpu.as_secs_f64() * 1e6 / total as f64,
            reached,
            percentile(&lags, 0.5).as_secs_f64() * 1e3,
            percentile(&lags, 0.99).as_secs_f64() * 1e3,
            lags.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        );
    }
    (percentile(&lags, 0.5), percentile(&lags, 0.99), reached)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let scale = if bench {
        Scale {
            services: 5_000,
            endpoints_per_service: 10,
            subscribers: 1_000,
            changes_per_second: 100,
            seconds: 10,
        }
    } else {
        Scale {
            services: 20,
            endpoints_per_service: 3,
            subscribers: 10,
            changes_per_second: 50,
            seconds: 1,
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (_, _, reached) = runtime.block_on(run(scale));
    assert!(reached > 0, "no subscriber heard a change");
}
