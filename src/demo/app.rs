//! The demo's built-in workloads: a tiny HTTP server that answers with the
//! caller identity its sidecar vouched for, and a minimal HTTP client.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::proxy::headers::{CLIENT_ID_HEADER, REQUEST_PRINCIPAL_HEADER};

/// Serves `GET /...` with `<name> saw caller <x-outrider-client-id>` (and
/// ` as <x-outrider-request-principal>` when the request carried a
/// verified token) until the task is dropped; returns the bound address.
pub async fn spawn_identity_app(name: &'static str) -> std::io::Result<SocketAddr> {
    spawn_slow_identity_app(name, Duration::ZERO).await
}

/// [`spawn_identity_app`], taking `delay` to answer each request.
pub async fn spawn_slow_identity_app(
    name: &'static str,
    delay: Duration,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| async move {
                    tokio::time::sleep(delay).await;
                    let caller = req
                        .headers()
                        .get(&CLIENT_ID_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("unauthenticated")
                        .to_string();
                    let on_behalf_of = req
                        .headers()
                        .get(&REQUEST_PRINCIPAL_HEADER)
                        .and_then(|v| v.to_str().ok())
                        .map(|p| format!(" as {p}"))
                        .unwrap_or_default();
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(format!(
                        "{name} saw caller {caller}{on_behalf_of}\n"
                    )))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// One keep-alive HTTP/1.1 connection.
pub struct HttpClient {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connect: {0}")]
    Connect(#[from] std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("bad request: {0}")]
    Request(#[from] http::Error),
}

impl HttpClient {
    pub async fn connect(addr: SocketAddr) -> Result<Self, ClientError> {
        let stream = TcpStream::connect(addr).await?;
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(conn);
        Ok(Self { sender })
    }

    pub async fn get(&mut self, path: &str) -> Result<(StatusCode, String), ClientError> {
        self.request(Method::GET, path).await
    }

    pub async fn request(
        &mut self,
        method: Method,
        path: &str,
    ) -> Result<(StatusCode, String), ClientError> {
        self.send(method, path, None).await
    }

    /// A request, with `Authorization: Bearer <token>` when given one.
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        token: Option<&str>,
    ) -> Result<(StatusCode, String), ClientError> {
        self.sender.ready().await?;
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "backend");
        if let Some(token) = token {
            req = req.header(http::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let req = req.body(Empty::new())?;
        let response = self.sender.send_request(req).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}
