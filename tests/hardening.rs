//! Hostile callers against the real binary: identity spoofing through
//! bytes the proxy does not parse, reserved headers in other spellings,
//! h2c smuggling, duplicated Host, broken bodies. Each test failed on the
//! build before issue 9 (run them against another binary with
//! `OUTRIDER_TEST_BIN=path cargo test --test hardening`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{ProxyProcess, Workload, config, sections, workload};
use outrider::test_util::apps::{self, Recorded};
use outrider::test_util::certs::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The identity a hostile caller claims.
const FORGED: &str = "spiffe://cluster.local/ns/shop/sa/admin";
const FAST_DETECTION: &str = "limits:\n  detect_timeout: 200ms\n";
const WAIT: Duration = Duration::from_secs(3);

/// A permissive server proxy in front of a lenient recorder, and a client
/// proxy routed to it: the two ways in (plaintext inbound, and outbound
/// through the mesh).
struct Setup {
    inbound: ProxyProcess,
    outbound: ProxyProcess,
    recorded: Recorded,
    _tmp: tempfile::TempDir,
}

impl Setup {
    async fn new(answer: Option<&'static [u8]>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let ca = TestCa::new("cluster.local");
        let (app, recorded) = apps::lenient_recorder(answer).await;
        let server: Workload = workload(tmp.path(), &ca, "shop", "payments");
        let client: Workload = workload(tmp.path(), &ca, "shop", "orders");
        let inbound = ProxyProcess::start(&config(
            &server,
            &sections(Some(app), None, "permissive", FAST_DETECTION),
        ))
        .await;
        let outbound = ProxyProcess::start(&config(
            &client,
            &sections(
                None,
                Some((inbound.inbound(), &server.id)),
                "permissive",
                FAST_DETECTION,
            ),
        ))
        .await;
        Self {
            inbound,
            outbound,
            recorded,
            _tmp: tmp,
        }
    }

    /// Plaintext straight to the inbound listener, and the local app's
    /// way out through the outbound listener.
    fn doors(&self) -> [(&'static str, SocketAddr); 2] {
        [
            ("inbound", self.inbound.inbound()),
            ("outbound", self.outbound.outbound()),
        ]
    }
}

fn with_forged_header(request_line: &str) -> Vec<u8> {
    format!("{request_line}\r\nHost: app\r\nx-outrider-client-id: {FORGED}\r\n\r\n").into_bytes()
}

#[tokio::test]
async fn http_shaped_bytes_that_are_not_a_valid_request_are_refused_never_relayed() {
    let setup = Setup::new(None).await;
    let long_target = format!("GET /{} HTTP/1.1", "a".repeat(20_000));
    for (what, bytes) in [
        ("version HTTP/1.2", with_forged_header("GET / HTTP/1.2")),
        ("tab separators", with_forged_header("GET\t/\tHTTP/1.1")),
        ("two spaces", with_forged_header("GET  / HTTP/1.1")),
        (
            "a broken HTTP/2 preface",
            with_forged_header("PRI * HTTP/2.0"),
        ),
        (
            "a request line over the limit",
            with_forged_header(&long_target),
        ),
    ] {
        for (door, addr) in setup.doors() {
            let answer = apps::raw_exchange(addr, &bytes, WAIT).await;
            assert!(
                answer.starts_with("HTTP/1.1 400"),
                "{what} via {door}: {answer:?}"
            );
        }
    }
    assert!(
        !setup.recorded.saw(FORGED),
        "the forged identity reached the application:\n{}",
        setup.recorded.text()
    );
}

#[tokio::test]
async fn a_client_silent_past_detection_is_served_as_http_when_it_speaks() {
    let setup = Setup::new(None).await;
    for (door, addr) in setup.doors() {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        // Well past the 200 ms detection timeout.
        tokio::time::sleep(Duration::from_millis(600)).await;
        stream
            .write_all(&with_forged_header("GET /late HTTP/1.1"))
            .await
            .unwrap();
        let mut answer = vec![0u8; 256];
        let n = tokio::time::timeout(WAIT, stream.read(&mut answer))
            .await
            .expect("an answer")
            .unwrap();
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 200"), "{door}: {answer:?}");
    }
    let seen = setup.recorded.text();
    assert!(seen.contains("GET /late"), "{seen}");
    assert!(
        !setup.recorded.saw(FORGED),
        "forged identity passed:\n{seen}"
    );
    // Through the mesh the application sees the caller's real identity.
    assert!(
        setup
            .recorded
            .saw("x-outrider-client-id: spiffe://cluster.local/ns/shop/sa/orders"),
        "{seen}"
    );
}

#[tokio::test]
async fn a_request_line_that_stalls_halfway_is_refused() {
    let setup = Setup::new(None).await;
    for (door, addr) in setup.doors() {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.write_all(b"GET / HTTP/1.1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(600)).await;
        let rest = format!("\r\nHost: app\r\nx-outrider-client-id: {FORGED}\r\n\r\n");
        let _ = stream.write_all(rest.as_bytes()).await;
        let mut answer = Vec::new();
        let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut answer)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 400"), "{door}: {answer:?}");
    }
    assert!(!setup.recorded.saw(FORGED), "{}", setup.recorded.text());
}

#[tokio::test]
async fn reserved_headers_are_removed_in_every_spelling() {
    let setup = Setup::new(None).await;
    let request = format!(
        "GET /ok HTTP/1.1\r\nHost: app\r\nx_outrider_client_id: {FORGED}\r\nX-Outrider_Client-Id: {FORGED}\r\nx-outrider-request-principal: forged/issuer\r\n\r\n"
    );
    for (door, addr) in setup.doors() {
        let answer = apps::raw_exchange(addr, request.as_bytes(), Duration::from_millis(500)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{door}: {answer:?}");
    }
    let seen = setup.recorded.text();
    assert_eq!(seen.matches("GET /ok").count(), 2, "{seen}");
    assert!(!setup.recorded.saw(FORGED), "{seen}");
    assert!(!setup.recorded.saw("forged/issuer"), "{seen}");
}

#[tokio::test]
async fn an_h2c_upgrade_never_reaches_the_application_and_is_never_tunnelled() {
    let request = b"GET /ok HTTP/1.1\r\nHost: app\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n";
    let setup = Setup::new(None).await;
    for (door, addr) in setup.doors() {
        let answer = apps::raw_exchange(addr, request, Duration::from_millis(500)).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{door}: {answer:?}");
    }
    assert!(!setup.recorded.saw("h2c"), "{}", setup.recorded.text());
    assert!(
        !setup.recorded.saw("http2-settings"),
        "{}",
        setup.recorded.text()
    );

    // An application that switches anyway gets no tunnel.
    let switching = Setup::new(Some(
        b"HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: h2c\r\n\r\n",
    ))
    .await;
    for (door, addr) in switching.doors() {
        let answer = apps::raw_exchange(addr, request, Duration::from_millis(500)).await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{door}: {answer:?}");
        assert!(answer.contains("unexpected-upgrade"), "{door}: {answer:?}");
    }
}

#[tokio::test]
async fn two_host_headers_and_a_broken_chunked_body_get_400() {
    let setup = Setup::new(None).await;
    let two_hosts = b"GET /two HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n";
    let broken_body = b"POST /body HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n";
    for (door, addr) in setup.doors() {
        let answer = apps::raw_exchange(addr, two_hosts, Duration::from_millis(500)).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "two Host via {door}: {answer:?}"
        );
        let answer = apps::raw_exchange(addr, broken_body, Duration::from_millis(500)).await;
        assert!(
            answer.starts_with("HTTP/1.1 400"),
            "broken body via {door}: {answer:?}"
        );
    }
    assert!(!setup.recorded.saw("GET /two"), "{}", setup.recorded.text());
}

/// A raw HTTP/1.1 request from a given loopback source address.
async fn request_from(source: &str, to: SocketAddr, request: &str) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let Ok(mut stream) = socket.connect(to).await else {
        return String::new();
    };
    let _ = stream.write_all(request.as_bytes()).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn kubelet_probes_keep_working_while_a_neighbour_holds_admin_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let w = workload(tmp.path(), &ca, "shop", "payments");
    let proxy = ProxyProcess::start(&config(&w, &sections(Some(app), None, "strict", ""))).await;
    let admin = proxy.admin;
    // A neighbour pod (127.0.0.2) holds a hundred idle connections.
    let mut held = Vec::new();
    for _ in 0..100 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(stream) = socket.connect(admin).await {
            held.push(stream);
        }
    }
    // The kubelet (127.0.0.3) probes twenty times: every probe answered.
    let probe = "GET /live HTTP/1.1\r\nHost: pod\r\nConnection: close\r\n\r\n";
    let mut answered = 0;
    for _ in 0..20 {
        if request_from("127.0.0.3", admin, probe)
            .await
            .starts_with("HTTP/1.1 200")
        {
            answered += 1;
        }
    }
    assert_eq!(
        answered, 20,
        "probes failed while a neighbour held connections"
    );
    // And the neighbour's idle connections do not stay: each is closed
    // within a few seconds.
    let mut still_open = 0;
    for stream in &mut held {
        let mut byte = [0u8; 1];
        if let Err(_elapsed) =
            tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await
        {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "idle admin connections were kept");
}

#[tokio::test]
async fn shutdown_from_ipv4_loopback_works_when_the_admin_port_is_dual_stack() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let w = workload(tmp.path(), &ca, "shop", "payments");
    let yaml = config(&w, &sections(Some(app), None, "strict", "")).replace(
        "admin:\n  listen: 127.0.0.1:0",
        "admin:\n  listen: \"[::]:0\"",
    );
    let mut proxy = ProxyProcess::start(&yaml).await;
    let port = proxy.admin.port();
    let answer = request_from(
        "127.0.0.1",
        SocketAddr::from(([127, 0, 0, 1], port)),
        "POST /shutdown HTTP/1.1\r\nHost: pod\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 202"), "{answer:?}");
    let status = proxy.wait_exit(Duration::from_secs(10)).expect("exited");
    assert_eq!(status.code(), Some(0));
}

/// Runs `outrider ARGS`, killing it after `timeout` if it has not exited.
fn exit_of(args: &[&str], timeout: Duration) -> (Option<i32>, String) {
    let mut child = std::process::Command::new(common::bin())
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut pipe, &mut stderr);
    }
    let _ = child.wait();
    (status.and_then(|s| s.code()), stderr)
}

#[test]
fn extreme_numbers_exit_64_naming_the_field_instead_of_panicking_later() {
    let tmp = tempfile::tempdir().unwrap();
    let id = "identity:\n  id: spiffe://cluster.local/ns/a/sa/b\n";
    let listen = "inbound:\n  listen: 127.0.0.1:0\noutbound:\n  listen: 127.0.0.1:0\nadmin:\n  listen: 127.0.0.1:0\n";
    for (extra, field) in [
        (
            "limits:\n  detect_timeout: 18446744073709551615s\n",
            "limits.detect_timeout",
        ),
        (
            "limits:\n  max_connections: 18446744073709551615\n",
            "limits.max_connections",
        ),
        ("limits:\n  idle_timeout: 300000d\n", "limits.idle_timeout"),
        (
            "identity:\n  id: spiffe://cluster.local/ns/a/sa/b\n  reload_poll_interval: 1ms\n",
            "identity.reload_poll_interval",
        ),
    ] {
        let yaml = if extra.starts_with("identity:") {
            format!("{extra}{listen}")
        } else {
            format!("{id}{listen}{extra}")
        };
        let path = tmp.path().join("config.yaml");
        std::fs::write(&path, &yaml).unwrap();
        let (code, stderr) = exit_of(
            &["proxy", "--config", path.to_str().unwrap()],
            Duration::from_secs(5),
        );
        assert_eq!(code, Some(64), "{field}: {stderr}");
        assert!(stderr.contains(field), "{field}: {stderr}");
    }
    let (code, stderr) = exit_of(
        &[
            "proxy",
            "--identity-id",
            "spiffe://cluster.local/ns/a/sa/b",
            "--inbound-app",
            "127.0.0.1:0",
        ],
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("inbound.app"), "{stderr}");
    let (code, stderr) = exit_of(
        &[
            "controller",
            "--kubeconfig",
            "/nonexistent",
            "--expiry-warning",
            "99999999999d",
        ],
        Duration::from_secs(5),
    );
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("--expiry-warning"), "{stderr}");
}

#[tokio::test]
async fn identity_files_gone_for_good_are_counted_and_logged() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let w = workload(tmp.path(), &ca, "shop", "payments");
    let proxy = ProxyProcess::start(&config(&w, &sections(Some(app), None, "strict", ""))).await;
    std::fs::remove_dir_all(&w.dir).unwrap();
    // The config polls every second; three polls make it more than a swap.
    let counted = common::eventually(Duration::from_secs(10), async || {
        let n = proxy
            .metric(
                "outrider_identity_reload_failures_total",
                &[("reason", "missing")],
            )
            .await;
        (n >= 1.0).then_some(())
    })
    .await;
    assert!(counted.is_some(), "logs:\n{}", proxy.logs());
    assert!(
        proxy.logs().contains("Rejected identity update"),
        "{}",
        proxy.logs()
    );
    // Still serving on the last good credentials.
    let (status, _) = apps::http1_get(proxy.admin, "/ready").await.unwrap();
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_pathological_policy_file_is_refused_without_stalling_traffic() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let w = workload(tmp.path(), &ca, "shop", "payments");
    let policies = tmp.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(
        policies.join("deny.yaml"),
        "apiVersion: security.outrider.dev/v1alpha1\nkind: AuthorizationPolicy\n\
         metadata: {name: no-admin}\nspec:\n  action: DENY\n  rules: [{to: [{paths: [\"/admin\"]}]}]\n",
    )
    .unwrap();
    let extra = format!(
        "policy:\n  source: files\n  dir: {}\n  reload_debounce: 50ms\n  poll_interval: 500ms\n",
        policies.display()
    );
    let proxy = ProxyProcess::start(&config(
        &w,
        &sections(Some(app), None, "permissive", &extra),
    ))
    .await;
    let inbound = proxy.inbound();
    let denied = apps::http1_get(inbound, "/admin").await.unwrap().0;
    assert_eq!(denied, 403);

    // Traffic the whole time: every request must be answered promptly.
    let traffic = tokio::spawn(async move {
        let mut slowest = Duration::ZERO;
        let mut failed = 0;
        let until = std::time::Instant::now() + Duration::from_secs(4);
        while std::time::Instant::now() < until {
            let started = std::time::Instant::now();
            match tokio::time::timeout(WAIT, apps::http1_get(inbound, "/ok")).await {
                Ok(Ok((status, _))) if status == 200 => {}
                _ => failed += 1,
            }
            slowest = slowest.max(started.elapsed());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        (slowest, failed)
    });
    // 200 KB of nested brackets (once 19.5 s of CPU), and 6 MB of YAML
    // (once 754 MB of memory).
    let depth = 100_000;
    std::fs::write(
        policies.join("nested.yaml"),
        format!("{}{}", "[".repeat(depth), "]".repeat(depth)),
    )
    .unwrap();
    std::fs::write(
        policies.join("huge.yaml"),
        "- [a, b, c, d, e, f, g]\n".repeat(250_000),
    )
    .unwrap();
    let refused = common::eventually(Duration::from_secs(10), async || {
        let malformed = proxy
            .metric(
                "outrider_policy_source_errors_total",
                &[("source", "files"), ("reason", "unparseable_file")],
            )
            .await;
        let too_large = proxy
            .metric(
                "outrider_policy_source_errors_total",
                &[("source", "files"), ("reason", "too_large")],
            )
            .await;
        (malformed >= 1.0 && too_large >= 1.0).then_some(())
    })
    .await;
    assert!(refused.is_some(), "logs:\n{}", proxy.logs());
    let (slowest, failed) = traffic.await.unwrap();
    assert_eq!(failed, 0, "requests failed while the files were read");
    assert!(
        slowest < Duration::from_secs(1),
        "a request waited {slowest:?}"
    );
    // The policy in force before is still in force.
    assert_eq!(apps::http1_get(inbound, "/admin").await.unwrap().0, 403);
}

#[tokio::test]
async fn clients_that_stop_reading_do_not_stall_other_requests_to_the_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let app = apps::http1_app(Duration::ZERO).await;
    let server_w = workload(tmp.path(), &ca, "shop", "payments");
    let client_w = workload(tmp.path(), &ca, "shop", "orders");
    let (_server, client) = common::strict_pair(&server_w, &client_w, app).await;
    let outbound = client.outbound();
    // Four clients ask for 32 MiB each and never read a byte of it.
    let mut stalled = Vec::new();
    for i in 0..4 {
        let mut stream = tokio::net::TcpStream::connect(outbound).await.unwrap();
        let request = format!("GET /bytes/33554432?{i} HTTP/1.1\r\nHost: app\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        stalled.push(stream);
    }
    // Let their responses fill every buffer they can.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut completed = 0;
    for _ in 0..10 {
        if let Ok(Ok((status, _))) =
            tokio::time::timeout(Duration::from_secs(2), apps::http1_get(outbound, "/small")).await
            && status == 200
        {
            completed += 1;
        }
    }
    assert_eq!(
        completed, 10,
        "requests stalled behind readers that stopped reading"
    );
    drop(stalled);
}

/// A request head as a hostile client might write one: a tchar method,
/// odd separators and versions, smuggling headers, and the reserved
/// header in some spelling carrying a forged identity, somewhere.
fn hostile_head() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    use proptest::sample::select;
    let line = (
        select(vec![
            "GET", "POST", "HEAD", "OPTIONS", "M-SEARCH", "G3T", "PRI",
        ]),
        select(vec![" ", " ", "\t", "  ", "\x0b"]),
        select(vec!["/", "/a?b=c", "*", "http://app/x", "/%00", "/\u{7f}"]),
        select(vec![" ", " ", "\t"]),
        select(vec![
            "HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/1.2", "HTTP/2.0", "http/1.1",
        ]),
    )
        .prop_map(|(m, s1, t, s2, v)| format!("{m}{s1}{t}{s2}{v}"));
    let header = select(vec![
        "Host: app",
        "Host: other",
        "Upgrade: h2c",
        "Upgrade: websocket",
        "Connection: Upgrade, HTTP2-Settings",
        "HTTP2-Settings: AAMAAABkAAQAAP__",
        "Content-Length: 0",
        "Te: trailers",
        "X-Forwarded-For: 10.0.0.1",
    ]);
    let forged_name = select(vec![
        "x-outrider-client-id",
        "X-Outrider-Client-Id",
        "x_outrider_client_id",
        "X_OUTRIDER_CLIENT_ID",
        "x-outrider-client_id",
        "x-outrider-client-id ",
        " x-outrider-client-id",
        "\tx-outrider-client-id",
    ]);
    (
        line,
        proptest::collection::vec(header, 0..5),
        forged_name,
        any::<prop::sample::Index>(),
        select(vec!["\r\n", "\r\n", "\n"]),
    )
        .prop_map(|(line, mut headers, name, at, eol)| {
            let forged = format!("{name}: {FORGED}");
            let position = at.index(headers.len() + 1);
            let mut lines = vec![line];
            lines.extend(headers.drain(..position).map(String::from));
            lines.push(forged);
            lines.extend(headers.into_iter().map(String::from));
            // Answered at once, and the connection closed after it.
            lines.push("Connection: close".into());
            (lines.join(eol) + eol + eol).into_bytes()
        })
}

#[tokio::test]
async fn hostile_request_heads_never_deliver_a_forged_identity_nor_stop_the_proxy() {
    use proptest::strategy::{Strategy, ValueTree};
    let setup = Setup::new(None).await;
    // The same 400 heads every run, so a failure reproduces.
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = hostile_head();
    for _ in 0..400 {
        let head = strategy.new_tree(&mut runner).unwrap().current();
        for (door, addr) in setup.doors() {
            let answer = apps::raw_exchange(addr, &head, Duration::from_secs(1)).await;
            assert!(
                answer.is_empty() || answer.starts_with("HTTP/1."),
                "{:?} via {door} got {answer:?}",
                String::from_utf8_lossy(&head)
            );
            assert!(
                !setup.recorded.saw(FORGED),
                "{:?} via {door} delivered the forged identity:\n{}",
                String::from_utf8_lossy(&head),
                setup.recorded.text()
            );
        }
    }
    // Both proxies still serve an ordinary request.
    for (door, addr) in setup.doors() {
        let answer = apps::raw_exchange(
            addr,
            b"GET / HTTP/1.1\r\nHost: app\r\nConnection: close\r\n\r\n",
            WAIT,
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{door}: {answer:?}");
    }
}
