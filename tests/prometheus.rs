//! A real Prometheus server (Debian's `prometheus` package) scrapes the
//! proxy, and `promtool` accepts the exposition format. Both binaries
//! must be installed (`ci/test.sh` does it); this test fails, it does not
//! skip, when they are missing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::workload;
use outrider::test_util::apps;
use outrider::test_util::certs::TestCa;

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn require(binary: &str) {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {binary}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "`{binary}` is not installed: run ci/test.sh, or apt-get install prometheus"
    );
}

#[tokio::test]
async fn prometheus_scrapes_the_request_counter_and_promtool_accepts_the_exposition() {
    require("prometheus");
    require("promtool");
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let server_w = workload(tmp.path(), &ca, "shop", "payments");
    let client_w = workload(tmp.path(), &ca, "shop", "orders");
    let (server, client) = common::strict_pair(&server_w, &client_w, app).await;
    for _ in 0..7 {
        let (status, _) = apps::http1_get(client.outbound(), "/").await.unwrap();
        assert_eq!(status, 200);
    }

    // promtool lints the exposition exactly as served.
    let exposition = server.metrics().await;
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let linted = promtool.wait_with_output().unwrap();
    assert!(
        linted.status.success(),
        "promtool rejected the exposition:\n{}{}",
        String::from_utf8_lossy(&linted.stdout),
        String::from_utf8_lossy(&linted.stderr)
    );

    let web = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    std::fs::write(
        tmp.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: outrider\n    metrics_path: /metrics\n    static_configs:\n      - targets: ['{}', '{}']\n",
            server.admin, client.admin
        ),
    )
    .unwrap();
    let _prometheus = KillOnDrop(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                tmp.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                tmp.path().join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let query =
        "/api/v1/query?query=sum(outrider_http_requests_total%7Bdirection%3D%22inbound%22%7D)";
    let value = common::eventually(Duration::from_secs(30), async || {
        let (status, body) = apps::http1_get(web, query).await.ok()?;
        if status != 200 {
            return None;
        }
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        let sample = json["data"]["result"][0]["value"][1].as_str()?;
        sample.parse::<f64>().ok()
    })
    .await;
    assert_eq!(
        value,
        Some(7.0),
        "Prometheus never reported the request counter"
    );

    let up = "/api/v1/query?query=sum(up%7Bjob%3D%22outrider%22%7D)";
    let both_up = common::eventually(Duration::from_secs(30), async || {
        let (_, body) = apps::http1_get(web, up).await.ok()?;
        body.contains("\"2\"").then_some(())
    })
    .await;
    assert!(both_up.is_some(), "Prometheus never saw both proxies up");
}
