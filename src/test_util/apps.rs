//! Small servers and clients for black-box tests: HTTP/1 and HTTP/2 apps
//! that report what they saw, an upgrade (WebSocket-style) echo, TCP echo
//! and banner servers, and a parser for the Prometheus text format.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::headers::CLIENT_ID_HEADER;

fn describe(req: &Request<Incoming>) -> String {
    let caller = req
        .headers()
        .get(&CLIENT_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("unauthenticated");
    format!(
        "{:?} {} {} caller={caller}",
        req.version(),
        req.method(),
        req.uri().path()
    )
}

async fn bind() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// HTTP/1.1 app answering `<version> <method> <path> caller=<id>`, after
/// `delay` (for in-flight tests). Paths starting `/status/NNN` answer NNN;
/// `/bytes/N` answers N bytes.
pub async fn http1_app(delay: Duration) -> SocketAddr {
    http1_app_at("127.0.0.1:0".parse().expect("addr"), delay).await
}

/// [`http1_app`] on a given address (an app inside a network namespace
/// listens on all addresses, like a pod's).
pub async fn http1_app_at(at: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = TcpListener::bind(at).await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| async move {
                    tokio::time::sleep(delay).await;
                    let status = req
                        .uri()
                        .path()
                        .strip_prefix("/status/")
                        .and_then(|s| s.parse::<u16>().ok())
                        .and_then(|s| StatusCode::from_u16(s).ok())
                        .unwrap_or(StatusCode::OK);
                    let body = match req
                        .uri()
                        .path()
                        .strip_prefix("/bytes/")
                        .and_then(|n| n.parse::<usize>().ok())
                    {
                        Some(n) => Bytes::from(vec![b'x'; n]),
                        None => Bytes::from(describe(&req)),
                    };
                    let mut response = Response::new(Full::new(body));
                    *response.status_mut() = status;
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// HTTP/1.1 app answering with the request headers it received, one
/// `name: value` line each (what an application behind the proxy sees).
pub async fn headers_app() -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| async move {
                    let mut lines: Vec<String> = req
                        .headers()
                        .iter()
                        .map(|(name, value)| {
                            format!("{name}: {}\n", String::from_utf8_lossy(value.as_bytes()))
                        })
                        .collect();
                    lines.sort();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(lines.concat()))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// How a request body ended at [`body_counter_app`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodySeen {
    /// Read to its end: this many bytes.
    Complete(u64),
    /// Broke after this many bytes (the proxy reset it).
    Broken(u64),
}

/// HTTP/1.1 app that reads each request body to its end without keeping
/// it, answers `bytes=N`, and records how every body ended.
pub async fn body_counter_app() -> (
    SocketAddr,
    std::sync::Arc<parking_lot::Mutex<Vec<BodySeen>>>,
) {
    let (listener, addr) = bind().await;
    let seen: std::sync::Arc<parking_lot::Mutex<Vec<BodySeen>>> = Default::default();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| {
                    let record = record.clone();
                    async move {
                        let mut body = req.into_body();
                        let mut count = 0u64;
                        let outcome = loop {
                            match body.frame().await {
                                None => break BodySeen::Complete(count),
                                Some(Ok(frame)) => {
                                    count += frame.data_ref().map_or(0, |d| d.len() as u64)
                                }
                                Some(Err(_)) => break BodySeen::Broken(count),
                            }
                        };
                        record.lock().push(outcome);
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                            "bytes={count}"
                        )))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

/// HTTP/2 (prior knowledge, h2c) app with the same answers.
pub async fn http2_app() -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|req: Request<Incoming>| async move {
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(describe(&req)))))
                });
                let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Accepts `Upgrade: websocket` with 101 and then echoes raw bytes.
pub async fn upgrade_echo_app() -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|mut req: Request<Incoming>| async move {
                    let upgrade = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(upgraded) = upgrade.await {
                            let mut io = TokioIo::new(upgraded);
                            let mut buf = [0u8; 1024];
                            while let Ok(n) = io.read(&mut buf).await {
                                if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                    break;
                                }
                            }
                        }
                    });
                    let mut response = Response::new(Full::new(Bytes::new()));
                    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                    response
                        .headers_mut()
                        .insert("upgrade", "websocket".parse().expect("value"));
                    response
                        .headers_mut()
                        .insert("connection", "upgrade".parse().expect("value"));
                    Ok::<_, Infallible>(response)
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .with_upgrades()
                    .await;
            });
        }
    });
    addr
}

/// Echoes bytes; on EOF from the client, writes `bye` and closes (so a
/// half-close is observable).
pub async fn tcp_echo() -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) => {
                            let _ = stream.write_all(b"bye").await;
                            break;
                        }
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        Err(_) => break,
                    }
                }
            });
        }
    });
    addr
}

/// A server-speaks-first protocol: sends `banner` on connect, then echoes.
pub async fn banner_server(banner: &'static [u8]) -> SocketAddr {
    let (listener, addr) = bind().await;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                if stream.write_all(banner).await.is_err() {
                    return;
                }
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

/// Everything a [`lenient_recorder`] received, every connection's bytes
/// in order of arrival.
#[derive(Clone, Default)]
pub struct Recorded(std::sync::Arc<parking_lot::Mutex<Vec<u8>>>);

impl Recorded {
    /// What arrived, lossily as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock()).into_owned()
    }

    /// Whether `needle` arrived, compared ignoring ASCII case (a lenient
    /// server folds header names).
    pub fn saw(&self, needle: &str) -> bool {
        self.text()
            .to_ascii_lowercase()
            .contains(&needle.to_ascii_lowercase())
    }
}

/// A deliberately lenient application server, the attacker's friend: it
/// records every byte it receives, and answers every blank line it sees
/// with `answer` (by default `200 ok`), whatever came before it. A header
/// that reaches it in any spelling, on any path, shows in [`Recorded`].
pub async fn lenient_recorder(answer: Option<&'static [u8]>) -> (SocketAddr, Recorded) {
    let (listener, addr) = bind().await;
    let recorded = Recorded::default();
    let sink = recorded.clone();
    let answer = answer
        .unwrap_or(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: keep-alive\r\n\r\nok");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let sink = sink.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let mut pending: Vec<u8> = Vec::new();
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    sink.0.lock().extend_from_slice(&buf[..n]);
                    pending.extend_from_slice(&buf[..n]);
                    while let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
                        pending.drain(..end + 4);
                        if stream.write_all(answer).await.is_err() {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, recorded)
}

/// Writes `bytes` on a new connection to `addr` and reads until the peer
/// closes or `timeout` passes; returns what came back.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8], timeout: Duration) -> String {
    let Ok(mut stream) = TcpStream::connect(addr).await else {
        return String::new();
    };
    let _ = stream.write_all(bytes).await;
    let mut got = Vec::new();
    let _ = tokio::time::timeout(timeout, stream.read_to_end(&mut got)).await;
    String::from_utf8_lossy(&got).into_owned()
}

/// One HTTP/1.1 request on a new connection.
pub async fn http1_request(
    addr: SocketAddr,
    req: Request<Empty<Bytes>>,
) -> Result<(StatusCode, http::HeaderMap, String), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

pub async fn http1_get(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), String> {
    let req = Request::get(path)
        .header("host", "test")
        .body(Empty::new())
        .map_err(|e| e.to_string())?;
    http1_request(addr, req).await.map(|(s, _, b)| (s, b))
}

/// One HTTP/2 (prior knowledge) request on a new connection.
pub async fn http2_get(addr: SocketAddr, path: &str) -> Result<(StatusCode, String), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let req = Request::get(format!("http://test{path}"))
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Sums every sample of `name` whose labels include all of `labels`.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (series_name, series_labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if series_name != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| series_labels.contains(&format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// One HTTP/2 (prior knowledge) request on a new connection, returning the
/// status, headers (trailers-only responses carry grpc-status here) and body.
pub async fn http2_request(
    addr: SocketAddr,
    req: Request<Empty<Bytes>>,
) -> Result<(StatusCode, http::HeaderMap, String), String> {
    let stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let response = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}
