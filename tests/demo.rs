//! `outrider demo`, the embedded default, runs every step and exits 0.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;
use std::time::{Duration, Instant};

#[test]
fn the_demo_passes_every_step_well_under_a_minute() {
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_outrider"))
        .arg("demo")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "took {:?}",
        started.elapsed()
    );
    for expected in [
        "backend saw caller spiffe://cluster.local/ns/demo/sa/frontend",
        "key exchange between the sidecars: X25519MLKEM768 (post-quantum hybrid)",
        "with a certificate from another CA: refused",
        "rotation 3: new handshakes get serial",
        ", 0 failed",
        "GET /api/orders      -> 200 OK",
        "DELETE /api/orders/7 -> 403 Forbidden",
        "outrider_authz_decisions_total{decision=\"deny\",direction=\"inbound\",kind=\"http\"",
        "/metrics",
        "replica-1: ",
        "replica-3: ",
        "one keep-alive connection, spread per request",
        "GET /api/private/report, no token      -> 403 Forbidden",
        "as https://issuer.demo.outrider/alice",
        "GET /api/orders, an expired token      -> 401 Unauthorized",
        "got 429",
        "All steps passed",
    ] {
        assert!(
            stdout.contains(expected),
            "missing {expected:?} in:\n{stdout}"
        );
    }
}
