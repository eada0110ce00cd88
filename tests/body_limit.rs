//! `limits.max_request_body` on the real binary: a declared length over
//! it never reaches the application, a streamed body that grows past it
//! is cut (the application sees a reset request, never a truncated one
//! as complete) and the client gets 413, and a 1 GiB upload under the
//! limit streams through without the proxy's memory growing.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{ProxyProcess, config, sections, workload};
use outrider::test_util::apps::{self, BodySeen};
use outrider::test_util::certs::TestCa;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn proxy_with_limit(app: SocketAddr, limit: &str) -> (tempfile::TempDir, ProxyProcess) {
    let tmp = tempfile::tempdir().unwrap();
    let ca = TestCa::new("cluster.local");
    let w = workload(tmp.path(), &ca, "shop", "payments");
    let proxy = ProxyProcess::start(&config(
        &w,
        &sections(
            Some(app),
            None,
            "permissive",
            &format!("limits:\n  max_request_body: {limit}\n"),
        ),
    ))
    .await;
    (tmp, proxy)
}

/// Streams `total` bytes as a chunked upload, then reads the answer.
/// Writing stops early if the proxy stops reading (it answered already).
async fn chunked_upload(addr: SocketAddr, total: u64, chunk: usize) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nhost: payments\r\ntransfer-encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let data = vec![b'x'; chunk];
    let mut sent = 0u64;
    let header = format!("{chunk:x}\r\n");
    while sent < total {
        let write = async {
            stream.write_all(header.as_bytes()).await?;
            stream.write_all(&data).await?;
            stream.write_all(b"\r\n").await
        };
        if write.await.is_err() {
            break;
        }
        sent += chunk as u64;
    }
    let _ = stream.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), async {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
            if answer.windows(4).any(|w| w == b"\r\n\r\n") && answer.len() > 12 {
                let text = String::from_utf8_lossy(&answer);
                if text.contains("bytes=") || text.contains("outrider:") {
                    break;
                }
            }
        }
    })
    .await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn a_declared_length_over_the_limit_gets_413_and_never_reaches_the_application() {
    let (app, seen) = apps::body_counter_app().await;
    let (_tmp, proxy) = proxy_with_limit(app, "1Mi").await;
    let answer = apps::raw_exchange(
        proxy.inbound(),
        b"POST /upload HTTP/1.1\r\nhost: payments\r\ncontent-length: 2000000\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("x-outrider-error: body-too-large"),
        "{answer}"
    );
    assert!(
        seen.lock().is_empty(),
        "the application saw {:?}",
        seen.lock()
    );
    // Under the limit, the same request goes through.
    let answer = chunked_upload(proxy.inbound(), 512 * 1024, 64 * 1024).await;
    assert!(answer.contains("bytes=524288"), "{answer}");
    assert_eq!(
        proxy
            .metric("outrider_http_request_body_too_large_total", &[])
            .await,
        1.0
    );
}

#[tokio::test]
async fn a_streamed_body_growing_past_the_limit_is_reset_upstream_and_answered_413() {
    let (app, seen) = apps::body_counter_app().await;
    let (_tmp, proxy) = proxy_with_limit(app, "1Mi").await;
    let answer = chunked_upload(proxy.inbound(), 8 * 1024 * 1024, 64 * 1024).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    let outcome = common::eventually(Duration::from_secs(5), async || {
        seen.lock().first().cloned()
    })
    .await
    .expect("the application never saw the request");
    match outcome {
        BodySeen::Broken(n) => assert!(n <= 1024 * 1024, "{n} bytes got through"),
        BodySeen::Complete(n) => panic!("a truncated body of {n} bytes looked complete"),
    }
}

#[tokio::test]
async fn a_one_gib_upload_under_the_limit_streams_without_growing_the_proxy() {
    let (app, seen) = apps::body_counter_app().await;
    let (_tmp, proxy) = proxy_with_limit(app, "2Gi").await;
    // Warm up: one small upload, so buffers that exist anyway are counted.
    chunked_upload(proxy.inbound(), 1024 * 1024, 256 * 1024).await;
    let before = common::status_kib(proxy.pid(), "VmHWM");
    let gib = 1024 * 1024 * 1024;
    let answer = chunked_upload(proxy.inbound(), gib, 256 * 1024).await;
    assert!(answer.contains(&format!("bytes={gib}")), "{answer}");
    assert_eq!(seen.lock().last(), Some(&BodySeen::Complete(gib)));
    let growth_mib = (common::status_kib(proxy.pid(), "VmHWM") - before) / 1024;
    assert!(
        growth_mib < 16,
        "peak RSS grew {growth_mib} MiB for a 1 GiB upload"
    );
}
