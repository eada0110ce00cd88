//! An identity provider's key endpoint on loopback, over HTTPS with a
//! web-PKI certificate (`localhost`, `127.0.0.1`) from its own CA: serves
//! the document the test sets at `/keys`, counts fetches, can play dead,
//! redirects `/redirect/<n>` n times to `/keys`, and serves 2 MiB at
//! `/huge`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use parking_lot::Mutex;
use rcgen::{CertificateParams, Issuer, KeyPair};
use rustls_pki_types::CertificateDer;
use tokio::net::TcpListener;

pub struct JwksServer {
    pub addr: SocketAddr,
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
    state: Arc<State>,
}

struct State {
    document: Mutex<Bytes>,
    fetches: AtomicUsize,
    down: AtomicBool,
}

impl JwksServer {
    pub async fn start(document: &str) -> Self {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, &ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let leaf_params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
        let leaf = leaf_params.signed_by(&leaf_key, &issuer).unwrap();
        let config =
            rustls::ServerConfig::builder_with_provider(Arc::new(crate::crypto::provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(
                    vec![leaf.der().clone()],
                    rustls_pki_types::PrivateKeyDer::Pkcs8(leaf_key.serialize_der().into()),
                )
                .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            document: Mutex::new(Bytes::from(document.to_string())),
            fetches: AtomicUsize::new(0),
            down: AtomicBool::new(false),
        });
        let serving = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if serving.down.load(Ordering::SeqCst) {
                    drop(stream);
                    continue;
                }
                let acceptor = acceptor.clone();
                let state = serving.clone();
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let service = service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let state = state.clone();
                        async move { Ok::<_, Infallible>(answer(&state, req.uri().path())) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tls), service)
                        .await;
                });
            }
        });
        Self {
            addr,
            ca_pem: ca_cert.pem(),
            ca_der: ca_cert.der().clone(),
            state,
        }
    }

    /// `https://localhost:<port><path>`: the name is resolved by the
    /// fetcher, as a provider's would be.
    pub fn url(&self, path: &str) -> String {
        format!("https://localhost:{}{path}", self.addr.port())
    }

    pub fn set_document(&self, document: &str) {
        *self.state.document.lock() = Bytes::from(document.to_string());
    }

    /// Fetches of `/keys` answered so far.
    pub fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }

    /// While down, connections are closed as soon as they are accepted.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }
}

fn answer(state: &State, path: &str) -> Response<Full<Bytes>> {
    if path == "/keys" {
        state.fetches.fetch_add(1, Ordering::SeqCst);
        let mut response = Response::new(Full::new(state.document.lock().clone()));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        return response;
    }
    if path == "/huge" {
        return Response::new(Full::new(Bytes::from(vec![b' '; 2 * 1024 * 1024])));
    }
    if let Some(n) = path
        .strip_prefix("/redirect/")
        .and_then(|n| n.parse::<u32>().ok())
    {
        let next = if n <= 1 {
            "/keys".to_string()
        } else {
            format!("/redirect/{}", n - 1)
        };
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::FOUND;
        response.headers_mut().insert(
            http::header::LOCATION,
            http::HeaderValue::from_str(&next).unwrap(),
        );
        return response;
    }
    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::NOT_FOUND;
    response
}
