//! The proxy's side of discovery: one HTTP/2 connection to the
//! controller over mTLS (the controller must present exactly its SPIFFE
//! ID; the proxy presents its own SVID), one `Resolve` stream per
//! destination in use, and the last answer of each kept.
//!
//! Failure rules (docs/discovery.md):
//! - a destination already answered keeps its last answer while the
//!   controller is unreachable, and the stream is re-established with
//!   backoff (250 ms doubling to 10 s) — never a weaker answer;
//! - a new destination waits at most `first_answer_timeout` for its first
//!   answer, then the caller is told [`Answer::Unavailable`] (and uses the
//!   original destination, as without discovery);
//! - a destination unused for [`IDLE`] is forgotten and its stream closed.

pub mod policies;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;

use super::TlsRx;
use crate::discovery_api::Http2Channel;
use crate::discovery_api::v1::{self, discovery_client::DiscoveryClient};
use crate::identity::SpiffeId;
use crate::tls::PeerExpectation;

/// A destination nobody resolved for this long is forgotten.
pub const IDLE: Duration = Duration::from_secs(600);
const FIRST_RETRY: Duration = Duration::from_millis(250);
const MAX_RETRY: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the controller's discovery API is, and who it must be.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// `host:port`: an IP address, or a name resolved at each connect
    /// (the Service `outrider-discovery.outrider-system.svc`).
    pub address: String,
    /// The `:authority` of requests (the Service's name).
    pub authority: String,
    pub server_id: SpiffeId,
    pub first_answer_timeout: Duration,
}

/// What discovery says about a destination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Not a Service or pod the controller knows: the original destination.
    Unknown,
    Endpoints(Arc<EndpointSet>),
    /// No answer (yet): discovery is unreachable or slow.
    Unavailable,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointSet {
    /// `namespace/name`, for a Service.
    pub service: Option<String>,
    pub opaque: bool,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// The identity its proxy must present; `None`: the pod is not meshed.
    pub identity: Option<SpiffeId>,
    pub opaque: bool,
    pub terminating: bool,
}

/// Why an answer from the controller was not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidAnswer {
    #[error("no answer in the message")]
    Empty,
    #[error("endpoint address of {0} bytes")]
    Address(usize),
    #[error("endpoint port {0}")]
    Port(u32),
    #[error("endpoint identity {0:?} is not a SPIFFE ID")]
    Identity(String),
}

/// Reads an answer; an endpoint that is malformed makes the whole answer
/// unusable (the last good one stays), never an endpoint with a weaker
/// identity check.
pub fn from_proto(message: &v1::Resolution) -> Result<Answer, InvalidAnswer> {
    let set = match message.answer.as_ref().ok_or(InvalidAnswer::Empty)? {
        v1::resolution::Answer::Unknown(_) => return Ok(Answer::Unknown),
        v1::resolution::Answer::Endpoints(set) => set,
    };
    let endpoints = set
        .endpoints
        .iter()
        .map(|e| {
            let ip = match e.ip.len() {
                4 => IpAddr::from(
                    <[u8; 4]>::try_from(e.ip.as_slice()).map_err(|_| InvalidAnswer::Address(4))?,
                ),
                16 => IpAddr::from(
                    <[u8; 16]>::try_from(e.ip.as_slice())
                        .map_err(|_| InvalidAnswer::Address(16))?,
                ),
                n => return Err(InvalidAnswer::Address(n)),
            };
            let port = u16::try_from(e.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or(InvalidAnswer::Port(e.port))?;
            let identity = match e.identity.as_str() {
                "" => None,
                text => {
                    Some(SpiffeId::parse(text).map_err(|_| InvalidAnswer::Identity(text.into()))?)
                }
            };
            Ok(Endpoint {
                addr: SocketAddr::new(ip, port),
                identity,
                opaque: e.opaque,
                terminating: e.terminating,
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Answer::Endpoints(Arc::new(EndpointSet {
        service: (!set.service.is_empty()).then(|| set.service.clone()),
        opaque: set.opaque,
        endpoints,
    })))
}

struct Destination {
    answers: watch::Receiver<Option<Answer>>,
    last_used: Mutex<tokio::time::Instant>,
    follower: tokio::task::AbortHandle,
}

impl Drop for Destination {
    fn drop(&mut self) {
        self.follower.abort();
    }
}

/// The resolver's own metrics (bounded: no destination is a label).
#[derive(Debug, Clone)]
pub struct ResolverMetrics {
    streams_open: prometheus::IntGauge,
    destinations: prometheus::IntGauge,
    answers: prometheus::IntCounterVec,
    stream_failures: prometheus::IntCounter,
}

impl ResolverMetrics {
    pub fn new(registry: &prometheus::Registry) -> prometheus::Result<Self> {
        let streams_open = prometheus::IntGauge::new(
            "discovery_streams_open",
            "Resolve streams to the controller currently open.",
        )?;
        let destinations = prometheus::IntGauge::new(
            "discovery_destinations",
            "Destinations followed through discovery (answered or waiting).",
        )?;
        let answers = prometheus::IntCounterVec::new(
            prometheus::Opts::new(
                "discovery_answers_received_total",
                "Answers from the controller: used, or refused as malformed (the last good one kept).",
            ),
            &["result"],
        )?;
        let stream_failures = prometheus::IntCounter::new(
            "discovery_stream_failures_total",
            "Resolve streams that could not be opened or ended; each is retried with backoff.",
        )?;
        registry.register(Box::new(streams_open.clone()))?;
        registry.register(Box::new(destinations.clone()))?;
        registry.register(Box::new(answers.clone()))?;
        registry.register(Box::new(stream_failures.clone()))?;
        Ok(Self {
            streams_open,
            destinations,
            answers,
            stream_failures,
        })
    }
}

/// Counts a Resolve stream as open while it lives.
struct OpenStream(Option<ResolverMetrics>);

impl OpenStream {
    fn new(metrics: Option<ResolverMetrics>) -> Self {
        if let Some(m) = &metrics {
            m.streams_open.inc();
        }
        Self(metrics)
    }
}

impl Drop for OpenStream {
    fn drop(&mut self) {
        if let Some(m) = &self.0 {
            m.streams_open.dec();
            m.stream_failures.inc();
        }
    }
}

struct Inner {
    config: DiscoveryConfig,
    tls: TlsRx,
    metrics: Option<ResolverMetrics>,
    channel: tokio::sync::Mutex<Option<Http2Channel>>,
    destinations: Mutex<HashMap<SocketAddr, Arc<Destination>>>,
}

/// Resolves destinations through the controller. Cheap to clone.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

impl Resolver {
    pub fn new(config: DiscoveryConfig, tls: TlsRx) -> Self {
        Self::build(config, tls, None)
    }

    /// A resolver that reports into `metrics`.
    pub fn with_metrics(config: DiscoveryConfig, tls: TlsRx, metrics: ResolverMetrics) -> Self {
        Self::build(config, tls, Some(metrics))
    }

    fn build(config: DiscoveryConfig, tls: TlsRx, metrics: Option<ResolverMetrics>) -> Self {
        Self {
            inner: Arc::new(Inner {
                config,
                tls,
                metrics,
                channel: tokio::sync::Mutex::new(None),
                destinations: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The current answer for `dst`, waiting for the first one at most
    /// the configured time.
    pub async fn resolve(&self, dst: SocketAddr) -> Answer {
        let mut answers = self.follow(dst);
        let known = answers.borrow().clone();
        if let Some(answer) = known {
            return answer;
        }
        let waited = tokio::time::timeout(
            self.inner.config.first_answer_timeout,
            answers.wait_for(Option::is_some),
        )
        .await;
        match waited {
            Ok(Ok(answer)) => answer.clone().unwrap_or(Answer::Unavailable),
            _ => Answer::Unavailable,
        }
    }

    /// The answers for `dst` as they change (`None` until the first).
    pub fn follow(&self, dst: SocketAddr) -> watch::Receiver<Option<Answer>> {
        let now = tokio::time::Instant::now();
        let mut destinations = self.inner.destinations.lock();
        if let Some(destination) = destinations.get(&dst) {
            *destination.last_used.lock() = now;
            return destination.answers.clone();
        }
        // A new destination: forget the ones nobody asked about lately.
        destinations.retain(|_, d| now.duration_since(*d.last_used.lock()) < IDLE);
        let (tx, rx) = watch::channel(None);
        let follower = tokio::spawn(follow(Arc::downgrade(&self.inner), dst, tx)).abort_handle();
        destinations.insert(
            dst,
            Arc::new(Destination {
                answers: rx.clone(),
                last_used: Mutex::new(now),
                follower,
            }),
        );
        if let Some(m) = &self.inner.metrics {
            m.destinations.set(destinations.len() as i64);
        }
        rx
    }

    /// The answer for `dst` if one is already at hand; never waits and
    /// never starts following it.
    pub fn known(&self, dst: SocketAddr) -> Option<Answer> {
        let destination = self.inner.destinations.lock().get(&dst)?.clone();
        destination.answers.borrow().clone()
    }

    /// Destinations currently followed.
    pub fn destinations(&self) -> usize {
        self.inner.destinations.lock().len()
    }
}

/// Keeps `tx` current for `dst` until the resolver is gone.
async fn follow(inner: Weak<Inner>, dst: SocketAddr, tx: watch::Sender<Option<Answer>>) {
    let mut retry = FIRST_RETRY;
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let stream = match strong.client().await {
            Ok(mut client) => client
                .resolve(v1::ResolveRequest {
                    target: dst.to_string(),
                })
                .await
                .map_err(|status| status.to_string()),
            Err(error) => Err(error),
        };
        let metrics = strong.metrics.clone();
        drop(strong);
        match stream {
            Ok(response) => {
                let _open = OpenStream::new(metrics.clone());
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(message)) => match from_proto(&message) {
                            Ok(answer) => {
                                if let Some(m) = &metrics {
                                    m.answers.with_label_values(&["used"]).inc();
                                }
                                retry = FIRST_RETRY;
                                tx.send_if_modified(|current| {
                                    let changed = current.as_ref() != Some(&answer);
                                    *current = Some(answer);
                                    changed
                                });
                            }
                            Err(error) => {
                                if let Some(m) = &metrics {
                                    m.answers.with_label_values(&["refused"]).inc();
                                }
                                tracing::warn!(%dst, %error, "Unusable discovery answer; keeping the last one");
                            }
                        },
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%dst, %status, "Discovery stream ended");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                if let Some(m) = &metrics {
                    m.stream_failures.inc();
                }
                tracing::debug!(%dst, %error, "Cannot resolve through discovery");
            }
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

impl Inner {
    /// A client on the shared connection, connecting when there is none
    /// or it has closed.
    async fn client(&self) -> Result<DiscoveryClient<Http2Channel>, String> {
        let mut channel = self.channel.lock().await;
        if let Some(existing) = channel.as_ref()
            && !existing.is_closed()
        {
            return existing
                .clone()
                .discovery_client(&self.config.authority)
                .map_err(|e| e.to_string());
        }
        let fresh = self.connect().await?;
        *channel = Some(fresh.clone());
        fresh
            .discovery_client(&self.config.authority)
            .map_err(|e| e.to_string())
    }

    async fn connect(&self) -> Result<Http2Channel, String> {
        let mesh = self.tls.borrow().clone().ok_or("no identity loaded yet")?;
        let expected = PeerExpectation::Id(self.config.server_id.clone());
        let mut config = (*mesh.client_config(&expected).map_err(|e| e.to_string())?).clone();
        config.alpn_protocols = vec![b"h2".to_vec()];
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let connect = async {
            let tcp = tokio::net::TcpStream::connect(self.config.address.as_str())
                .await
                .map_err(|e| format!("connect {}: {e}", self.config.address))?;
            let _ = tcp.set_nodelay(true);
            // The name is not checked (the SPIFFE ID is) and not sent.
            let name = rustls_pki_types::ServerName::try_from("outrider-discovery")
                .map_err(|e| e.to_string())?;
            let tls = connector
                .connect(name, tcp)
                .await
                .map_err(|e| format!("TLS with discovery: {e}"))?;
            let group = crate::tls::negotiated_group(tls.get_ref().1);
            tracing::info!(
                address = %self.config.address,
                key_exchange = group.map_or("other", crate::tls::KxGroup::name),
                "Connected to discovery"
            );
            let (sender, connection) =
                hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .timer(hyper_util::rt::TokioTimer::new())
                    .keep_alive_interval(Duration::from_secs(30))
                    .keep_alive_timeout(Duration::from_secs(10))
                    .handshake(hyper_util::rt::TokioIo::new(tls))
                    .await
                    .map_err(|e| e.to_string())?;
            tokio::spawn(connection);
            Ok::<_, String>(Http2Channel::new(sender))
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| {
                format!(
                    "connecting to discovery at {} timed out",
                    self.config.address
                )
            })?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(ip: Vec<u8>, port: u32, identity: &str) -> v1::Endpoint {
        v1::Endpoint {
            ip,
            port,
            identity: identity.into(),
            ..v1::Endpoint::default()
        }
    }

    fn set(endpoints: Vec<v1::Endpoint>) -> v1::Resolution {
        v1::Resolution {
            answer: Some(v1::resolution::Answer::Endpoints(v1::EndpointSet {
                service: "shop/web".into(),
                opaque: false,
                endpoints,
            })),
        }
    }

    #[test]
    fn answers_are_read_with_their_identities_and_malformed_ones_are_refused_whole() {
        let good = set(vec![
            endpoint(
                vec![10, 0, 0, 1],
                8080,
                "spiffe://cluster.local/ns/shop/sa/web",
            ),
            endpoint(
                vec![0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
                8080,
                "",
            ),
        ]);
        let Ok(Answer::Endpoints(read)) = from_proto(&good) else {
            panic!("not read")
        };
        assert_eq!(read.service.as_deref(), Some("shop/web"));
        assert_eq!(read.endpoints[0].addr.to_string(), "10.0.0.1:8080");
        assert_eq!(
            read.endpoints[0]
                .identity
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("spiffe://cluster.local/ns/shop/sa/web")
        );
        assert_eq!(read.endpoints[1].addr.to_string(), "[fd00::1]:8080");
        assert_eq!(read.endpoints[1].identity, None);
        let unknown = v1::Resolution {
            answer: Some(v1::resolution::Answer::Unknown(v1::Unknown {})),
        };
        assert_eq!(from_proto(&unknown), Ok(Answer::Unknown));
        for (bad, error) in [
            (v1::Resolution { answer: None }, InvalidAnswer::Empty),
            (
                set(vec![endpoint(vec![10, 0, 0], 80, "")]),
                InvalidAnswer::Address(3),
            ),
            (
                set(vec![endpoint(vec![10, 0, 0, 1], 0, "")]),
                InvalidAnswer::Port(0),
            ),
            (
                set(vec![endpoint(vec![10, 0, 0, 1], 70_000, "")]),
                InvalidAnswer::Port(70_000),
            ),
            (
                set(vec![endpoint(vec![10, 0, 0, 1], 80, "web.shop")]),
                InvalidAnswer::Identity("web.shop".into()),
            ),
        ] {
            assert_eq!(from_proto(&bad), Err(error));
        }
    }
}
