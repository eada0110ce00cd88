//! LocalRateLimitPolicy on the real binary: a burst's refusals match the
//! configured rate, one caller flooding does not stop another within its
//! own budget, and a dry run refuses nothing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{ProxyProcess, Workload, config, sections, workload};
use http::Request;
use http_body_util::Empty;
use outrider::test_util::apps;
use outrider::test_util::certs::TestCa;

struct Setup {
    tmp: tempfile::TempDir,
    ca: TestCa,
    dir: std::path::PathBuf,
    server_w: Workload,
}

fn setup(policy: &str) -> Setup {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let dir = tmp.path().join("policies");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("limits.yaml"), policy).unwrap();
    let server_w = workload(tmp.path(), &ca, "shop", "payments");
    Setup {
        tmp,
        ca,
        dir,
        server_w,
    }
}

fn limits(mode: &str, limit: &str) -> String {
    format!(
        "apiVersion: security.outrider.dev/v1alpha1\nkind: LocalRateLimitPolicy\nmetadata: {{name: limits}}\nspec:\n  mode: {mode}\n  limits:\n  - {limit}\n"
    )
}

async fn payments(s: &Setup, app: SocketAddr) -> ProxyProcess {
    ProxyProcess::start(&config(
        &s.server_w,
        &sections(
            Some(app),
            None,
            "permissive",
            &format!(
                "policy:\n  source: files\n  dir: {}\n  reload_debounce: 50ms\n",
                s.dir.display()
            ),
        ),
    ))
    .await
}

/// `n` requests to `addr` as fast as 8 keep-alive connections carry
/// them; the status codes and how long it took.
async fn burst(addr: SocketAddr, n: usize) -> (Vec<u16>, Duration) {
    const WORKERS: usize = 8;
    let start = Instant::now();
    let tasks: Vec<_> = (0..WORKERS)
        .map(|w| {
            let count = n / WORKERS + usize::from(w < n % WORKERS);
            tokio::spawn(async move {
                let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
                let (mut sender, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await
                        .unwrap();
                tokio::spawn(conn);
                let mut codes = Vec::new();
                for _ in 0..count {
                    let req = Request::get("/api")
                        .header("host", "payments")
                        .body(Empty::<Bytes>::new())
                        .unwrap();
                    let response = sender.send_request(req).await.unwrap();
                    let status = response.status();
                    if status == 429 {
                        assert_eq!(response.headers()["x-outrider-error"], "rate-limited");
                        let retry: u64 = response.headers()["retry-after"]
                            .to_str()
                            .unwrap()
                            .parse()
                            .unwrap();
                        assert!(retry >= 1);
                    }
                    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
                    codes.push(status.as_u16());
                }
                codes
            })
        })
        .collect();
    let mut codes = Vec::new();
    for task in tasks {
        codes.extend(task.await.unwrap());
    }
    (codes, start.elapsed())
}

#[tokio::test]
async fn a_burst_is_refused_beyond_the_burst_and_the_rate() {
    let s = setup(&limits(
        "Enforce",
        "total: {requestsPerSecond: 50, burst: 50}",
    ));
    let proxy = payments(&s, apps::http1_app(Duration::ZERO).await).await;
    let (codes, elapsed) = burst(proxy.inbound(), 300).await;
    let passed = codes.iter().filter(|c| **c == 200).count() as f64;
    let limited = codes.iter().filter(|c| **c == 429).count();
    assert_eq!(passed as usize + limited, 300, "{codes:?}");
    // The bucket holds 50 and refills at 50/s while the burst lasts.
    let expected = 50.0 + 50.0 * elapsed.as_secs_f64();
    assert!(
        (passed - expected).abs() <= expected * 0.1 + 1.0,
        "{passed} passed, {expected:.1} expected over {elapsed:?}"
    );
    let counted = proxy
        .metric(
            "outrider_rate_limited_total",
            &[("policy", "shop/limits"), ("mode", "enforce")],
        )
        .await;
    assert_eq!(counted, limited as f64);
}

#[tokio::test]
async fn one_caller_flooding_does_not_stop_another_within_its_own_limit() {
    let s = setup(&limits(
        "Enforce",
        "{total: {requestsPerSecond: 1000}, perClient: {requestsPerSecond: 20, burst: 20}}",
    ));
    let server = payments(&s, apps::http1_app(Duration::ZERO).await).await;
    let client = |sa: &str| {
        let w = workload(s.tmp.path(), &s.ca, "shop", sa);
        let server_id = s.server_w.id.clone();
        let inbound = server.inbound();
        async move {
            ProxyProcess::start(&config(
                &w,
                &sections(None, Some((inbound, &server_id)), "permissive", ""),
            ))
            .await
        }
    };
    let flooder = client("flooder").await;
    let polite = client("polite").await;
    let flood = {
        let outbound = flooder.outbound();
        tokio::spawn(async move {
            let mut codes = Vec::new();
            for _ in 0..4 {
                codes.extend(burst(outbound, 100).await.0);
            }
            codes
        })
    };
    let mut polite_codes = Vec::new();
    for _ in 0..10 {
        polite_codes.extend(burst(polite.outbound(), 1).await.0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let flood_codes = flood.await.unwrap();
    assert!(
        polite_codes.iter().all(|c| *c == 200),
        "the polite caller was refused: {polite_codes:?}"
    );
    let flooder_passed = flood_codes.iter().filter(|c| **c == 200).count();
    assert!(
        (20..=60).contains(&flooder_passed),
        "the flooder passed {flooder_passed} of 400"
    );
}

#[tokio::test]
async fn a_dry_run_refuses_nothing_and_counts_what_it_would_have() {
    let s = setup(&limits("DryRun", "total: {requestsPerSecond: 5, burst: 5}"));
    let proxy = payments(&s, apps::http1_app(Duration::ZERO).await).await;
    let (codes, _) = burst(proxy.inbound(), 50).await;
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    let counted = proxy
        .metric(
            "outrider_rate_limited_total",
            &[("policy", "shop/limits"), ("mode", "dry-run")],
        )
        .await;
    assert!(counted >= 40.0, "{counted}");
}
