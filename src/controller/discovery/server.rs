//! The Discovery gRPC service, served over mTLS: the controller presents
//! its own SVID (`spiffe://<td>/ns/<namespace>/sa/outrider-controller`,
//! issued by the mesh CA it holds) and accepts only clients with an SVID
//! of the trust domain, so only meshed proxies can ask. Each `Resolve`
//! is a [`Subscription`] turned into a stream of protobuf answers. Each
//! `WatchPolicies` streams a namespace's policy objects from the
//! [`PolicyStore`] to the proxy of a pod of that namespace, and only when
//! the pod runs as the ServiceAccount of the caller's certificate.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use parking_lot::RwLock;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use super::index::{Endpoint, Resolution, Target};
use super::policies::{PolicyObject, PolicyStore};
use super::registry::{Registry, Subscription};
use crate::controller::metrics::ControllerMetrics;
use crate::discovery_api::v1;
use crate::identity::SpiffeId;
use crate::listener::{Caps, accept_loop};

/// The ServiceAccount whose SVID the controller serves discovery with.
pub const SERVICE_ACCOUNT: &str = "outrider-controller";
/// One connection per proxy; well above any node's pod count times the
/// replicas a proxy may reach, below what the controller's memory allows.
const MAX_CONNECTIONS: usize = 20_000;
/// Resolutions per connection: a proxy resolves each destination once.
const MAX_STREAMS: u32 = 1_024;
/// A client's TLS handshake must finish within this.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// HTTP/2 pings on idle connections, so a vanished proxy's streams end.
const KEEPALIVE: Duration = Duration::from_secs(30);

/// The server's TLS configuration, replaced when its SVID is reissued.
pub type ServerTls = Arc<RwLock<Arc<ServerConfig>>>;

#[derive(Debug, Clone)]
pub struct DiscoveryService {
    registry: Arc<Registry>,
    policies: Arc<PolicyStore>,
    cluster_domain: String,
    metrics: ControllerMetrics,
}

impl DiscoveryService {
    pub fn new(
        registry: Arc<Registry>,
        policies: Arc<PolicyStore>,
        cluster_domain: String,
        metrics: ControllerMetrics,
    ) -> Self {
        Self {
            registry,
            policies,
            cluster_domain,
            metrics,
        }
    }

    /// Whom a policy request may be answered for: the caller's SVID must
    /// name the pod's namespace and the ServiceAccount the pod runs as.
    fn check_policy_request(
        &self,
        caller: Option<&CallerIdentity>,
        request: &v1::PolicyRequest,
    ) -> Result<(), Status> {
        let caller = caller.ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        let (namespace, service_account) = caller
            .0
            .namespace_and_service_account()
            .ok_or_else(|| Status::permission_denied("not a workload identity"))?;
        if namespace != request.namespace {
            return Err(Status::permission_denied(format!(
                "{} may ask only for pods of namespace {namespace}",
                caller.0
            )));
        }
        match self
            .registry
            .service_account_of(&request.namespace, &request.pod)
        {
            None => Err(Status::not_found(format!(
                "no pod {}/{} (yet)",
                request.namespace, request.pod
            ))),
            Some(runs_as) if runs_as != service_account => Err(Status::permission_denied(format!(
                "pod {}/{} runs as {runs_as}, not {service_account}",
                request.namespace, request.pod
            ))),
            Some(_) => Ok(()),
        }
    }
}

/// The SPIFFE ID of the client certificate a request came with, put in
/// each request's extensions by [`serve`].
#[derive(Debug, Clone)]
pub struct CallerIdentity(pub SpiffeId);

type ResolveStream = Pin<Box<dyn Stream<Item = Result<v1::Resolution, Status>> + Send>>;
type PolicyStream = Pin<Box<dyn Stream<Item = Result<v1::PolicySet, Status>> + Send>>;

#[tonic::async_trait]
impl v1::discovery_server::Discovery for DiscoveryService {
    type ResolveStream = ResolveStream;
    type WatchPoliciesStream = PolicyStream;

    async fn watch_policies(
        &self,
        request: Request<v1::PolicyRequest>,
    ) -> Result<Response<Self::WatchPoliciesStream>, Status> {
        if let Err(status) =
            self.check_policy_request(request.extensions().get(), request.get_ref())
        {
            self.metrics.discovery_refused(match status.code() {
                tonic::Code::NotFound => "unknown_pod",
                _ => "wrong_identity",
            });
            return Err(status);
        }
        let namespace = request.into_inner().namespace;
        let changes = self.policies.subscribe();
        let state = (
            self.policies.clone(),
            changes,
            namespace,
            None::<Vec<PolicyObject>>,
        );
        let stream = futures_util::stream::unfold(
            state,
            |(store, mut changes, namespace, mut last)| async move {
                loop {
                    changes.borrow_and_update();
                    if let Some(set) = store.namespace(&namespace)
                        && last.as_ref() != Some(&set)
                    {
                        let message = v1::PolicySet {
                            objects: set
                                .iter()
                                .map(|(kind, json)| v1::PolicyObject {
                                    kind: (*kind).to_string(),
                                    json: json.as_ref().clone(),
                                })
                                .collect(),
                        };
                        last = Some(set);
                        return Some((Ok(message), (store, changes, namespace, last)));
                    }
                    changes.changed().await.ok()?;
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn resolve(
        &self,
        request: Request<v1::ResolveRequest>,
    ) -> Result<Response<Self::ResolveStream>, Status> {
        let target = match Target::parse(&request.get_ref().target, &self.cluster_domain) {
            Ok(target) => target,
            Err(error) => {
                self.metrics.discovery_refused("invalid_target");
                return Err(Status::invalid_argument(error.to_string()));
            }
        };
        let subscription = Subscription::new(self.registry.clone(), target);
        let state = (
            subscription,
            self.metrics.clone(),
            self.metrics.discovery_stream(),
        );
        let stream =
            futures_util::stream::unfold(state, |(mut subscription, metrics, open)| async move {
                let answer = subscription.next().await;
                metrics.discovery_answer(match answer {
                    Resolution::Unknown => "unknown",
                    Resolution::Endpoints(_) => "endpoints",
                });
                Some((Ok(to_proto(&answer)), (subscription, metrics, open)))
            });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// The protobuf form of an answer.
pub fn to_proto(resolution: &Resolution) -> v1::Resolution {
    let answer = match resolution {
        Resolution::Unknown => v1::resolution::Answer::Unknown(v1::Unknown {}),
        Resolution::Endpoints(set) => v1::resolution::Answer::Endpoints(v1::EndpointSet {
            service: set
                .service
                .as_ref()
                .map(|(ns, name)| format!("{ns}/{name}"))
                .unwrap_or_default(),
            opaque: set.opaque,
            endpoints: set.endpoints.iter().map(endpoint_to_proto).collect(),
        }),
    };
    v1::Resolution {
        answer: Some(answer),
    }
}

fn endpoint_to_proto(endpoint: &Endpoint) -> v1::Endpoint {
    let ip = match endpoint.addr.ip() {
        std::net::IpAddr::V4(ip) => ip.octets().to_vec(),
        std::net::IpAddr::V6(ip) => ip.octets().to_vec(),
    };
    v1::Endpoint {
        ip,
        port: u32::from(endpoint.addr.port()),
        identity: endpoint
            .identity
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
        opaque: endpoint.opaque,
        terminating: endpoint.terminating,
        zone: endpoint.zone.clone().unwrap_or_default(),
        pod: endpoint
            .pod
            .as_ref()
            .map(|(ns, name)| format!("{ns}/{name}"))
            .unwrap_or_default(),
    }
}

/// The discovery server's TLS from the controller's credentials: client
/// certificates of the trust domain required, HTTP/2 only (gRPC); the
/// mesh's key-exchange groups, the post-quantum hybrid first unless
/// `post_quantum` is off.
pub fn server_tls(
    credentials: Arc<crate::identity::Credentials>,
    post_quantum: bool,
) -> Result<Arc<ServerConfig>, crate::tls::Error> {
    use crate::tls::{KxGroup, MeshTls, TlsSettings};
    let settings = TlsSettings {
        clock_skew: Duration::from_secs(60),
        resumption: false,
        key_exchange: KxGroup::offered(&KxGroup::DEFAULT, post_quantum),
    };
    let mesh = MeshTls::new(credentials, &settings)?;
    let mut config = (*mesh.server_config()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Serves a fixed index (and no policies) on a loopback port, for local
/// mode: `outrider demo` and the benchmarks, where no API server feeds
/// the index.
pub async fn serve_index(
    index: super::index::Index,
    tls: Arc<ServerConfig>,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let registry = prometheus::Registry::new();
    let metrics = ControllerMetrics::new(&registry).map_err(std::io::Error::other)?;
    let service = DiscoveryService::new(
        Registry::new(index),
        PolicyStore::new(),
        "cluster.local".into(),
        metrics,
    );
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let tls = Arc::new(RwLock::new(tls));
    Ok((addr, tokio::spawn(serve(listener, tls, service))))
}

/// Serves discovery until the task is dropped.
pub async fn serve(listener: TcpListener, tls: ServerTls, service: DiscoveryService) {
    let grpc = v1::discovery_server::DiscoveryServer::new(service);
    accept_loop(
        listener,
        Caps::total(MAX_CONNECTIONS),
        std::future::pending(),
        |_refused| {},
        move |stream: tokio::net::TcpStream, peer: SocketAddr| {
            // Answers are small writes (headers, then a frame): with Nagle
            // each waited for the previous one's delayed ACK, 40 ms — every
            // stream's first answer and every update (measured in
            // benches/discovery_cluster.rs: p99 35 ms, 43 s to open 1,000
            // streams one after another).
            let _ = stream.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.read().clone());
            let grpc = grpc.clone();
            async move {
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(error)) => {
                            tracing::debug!(%peer, %error, "Discovery handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                // The verifier accepted the chain; its leaf names the caller.
                let caller = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first())
                    .and_then(|leaf| crate::identity::svid::parse_leaf(leaf).ok())
                    .map(|leaf| CallerIdentity(leaf.id));
                let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                builder
                    .timer(hyper_util::rt::TokioTimer::new())
                    .max_concurrent_streams(MAX_STREAMS)
                    .keep_alive_interval(KEEPALIVE)
                    .keep_alive_timeout(KEEPALIVE);
                let service = TowerToHyperService::new(tower_service_fn(grpc, caller));
                if let Err(error) = builder.serve_connection(TokioIo::new(tls), service).await {
                    tracing::debug!(%peer, %error, "Discovery connection ended");
                }
            }
        },
    )
    .await;
}

/// `grpc` with the caller's identity added to every request.
fn tower_service_fn<S>(grpc: S, caller: Option<CallerIdentity>) -> WithCaller<S> {
    WithCaller { grpc, caller }
}

#[derive(Clone)]
struct WithCaller<S> {
    grpc: S,
    caller: Option<CallerIdentity>,
}

impl<S, B> tower_service::Service<http::Request<B>> for WithCaller<S>
where
    S: tower_service::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.grpc.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(caller) = &self.caller {
            request.extensions_mut().insert(caller.clone());
        }
        self.grpc.call(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::certs::TestCa;

    fn groups(post_quantum: bool) -> Vec<rustls::NamedGroup> {
        let credentials =
            TestCa::new("cluster.local").credentials("outrider-system", SERVICE_ACCOUNT);
        let config = server_tls(Arc::new(credentials), post_quantum).unwrap();
        config
            .crypto_provider()
            .kx_groups
            .iter()
            .map(|group| group.name())
            .collect()
    }

    #[test]
    fn the_discovery_server_prefers_the_post_quantum_hybrid_unless_it_is_turned_off() {
        use rustls::NamedGroup as N;
        assert_eq!(groups(true), [N::X25519MLKEM768, N::X25519, N::secp256r1]);
        assert_eq!(groups(false), [N::X25519, N::secp256r1]);
    }
}
