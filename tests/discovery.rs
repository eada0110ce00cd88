//! The controller's discovery API end to end: `outrider controller`
//! against the fake API server holding a Service, its EndpointSlice and
//! Pods, a gRPC client over mTLS with a mesh SVID, `Resolve` answered and
//! updated as the cluster changes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::controller::ControllerProcess;
use outrider::discovery_api::Http2Channel;
use outrider::discovery_api::v1::discovery_client::DiscoveryClient;
use outrider::discovery_api::v1::{EndpointSet, ResolveRequest, resolution};
use outrider::identity::{Credentials, SpiffeId};
use outrider::test_util::eventually;
use outrider::test_util::fake_apiserver::FakeApiServer;
use outrider::tls::{KxGroup, MeshTls, PeerExpectation, TlsSettings};
use serde_json::{Value, json};

const AUTHORITY: &str = "outrider-discovery.outrider-system.svc:8090";
const CONTROLLER_ID: &str = "spiffe://cluster.local/ns/outrider-system/sa/outrider-controller";

fn endpoint(ip: &str, pod: &str) -> Value {
    json!({"addresses": [ip], "conditions": {"ready": true},
           "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}})
}

fn slice(endpoints: Vec<Value>) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "web-abc", "namespace": "shop",
                        "labels": {"kubernetes.io/service-name": "web"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": 8080}],
           "endpoints": endpoints})
}

fn pod(name: &str, ip: &str, sa: &str, meshed: bool) -> Value {
    let annotations = if meshed {
        json!({"outrider.dev/proxy-version": "0.1.0"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": "shop", "annotations": annotations},
           "spec": {"serviceAccountName": sa, "containers": [{"name": "app", "image": "app"}]},
           "status": {"podIP": ip, "podIPs": [{"ip": ip}]}})
}

struct Cluster {
    api: FakeApiServer,
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

async fn cluster() -> Cluster {
    let api = FakeApiServer::start().await;
    for ns in ["outrider-system", "shop"] {
        api.apply(
            "namespaces",
            json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}),
        );
    }
    api.apply(
        "services",
        json!({"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                        "ports": [{"name": "http", "port": 80, "targetPort": "http"}]}}),
    );
    api.apply(
        "endpointslices",
        slice(vec![
            endpoint("10.0.0.1", "web-1"),
            endpoint("10.0.0.2", "web-2"),
        ]),
    );
    api.apply("pods", pod("web-1", "10.0.0.1", "web", true));
    api.apply("pods", pod("web-2", "10.0.0.2", "legacy", false));
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    Cluster {
        api,
        _dir: dir,
        kubeconfig,
    }
}

/// A proxy's credentials for `shop/client`, issued by the controller's CA.
async fn client_credentials(api: &FakeApiServer) -> Arc<Credentials> {
    credentials_for(api, "client").await
}

/// A proxy's credentials for `shop/<service_account>`.
async fn credentials_for(api: &FakeApiServer, service_account: &str) -> Arc<Credentials> {
    let secret = eventually(Duration::from_secs(10), async || {
        api.get("secrets", "outrider-system", "outrider-ca")
    })
    .await
    .expect("the CA Secret");
    let ca = outrider::test_util::certs::TestCa::from_ca_secret(
        &outrider::test_util::secret_data(&secret),
        "cluster.local",
    );
    Arc::new(ca.credentials("shop", service_account))
}

fn settings() -> TlsSettings {
    TlsSettings {
        clock_skew: Duration::from_secs(60),
        resumption: false,
        key_exchange: vec![KxGroup::X25519],
    }
}

/// A gRPC client over mTLS that expects the server to be `expected`.
async fn connect(
    controller: &ControllerProcess,
    credentials: &Arc<Credentials>,
    expected: &str,
) -> Result<DiscoveryClient<Http2Channel>, String> {
    let mesh = MeshTls::new(credentials.clone(), &settings()).unwrap();
    let expectation = PeerExpectation::Id(SpiffeId::parse(expected).unwrap());
    let mut config = (*mesh.client_config(&expectation).unwrap()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    dial(controller, config).await
}

/// A TLS connection to the controller's discovery server made with
/// `config`.
async fn tls_to(
    controller: &ControllerProcess,
    config: rustls::ClientConfig,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(controller.discovery)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("outrider-discovery").unwrap();
    connector
        .connect(name, tcp)
        .await
        .map_err(|e| e.to_string())
}

/// A gRPC client on a connection made with `config`.
async fn dial(
    controller: &ControllerProcess,
    config: rustls::ClientConfig,
) -> Result<DiscoveryClient<Http2Channel>, String> {
    let tls = tls_to(controller, config).await?;
    let (sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    Http2Channel::new(sender)
        .discovery_client(AUTHORITY)
        .map_err(|e| e.to_string())
}

/// The first answer on `stream` with `count` endpoints, within `within`.
async fn with_endpoints(
    stream: &mut tonic::Streaming<outrider::discovery_api::v1::Resolution>,
    count: usize,
    within: Duration,
) -> Option<EndpointSet> {
    // A stream that goes quiet must fail the wait, not hang it.
    let wanted = async {
        loop {
            let answer = stream.message().await.ok()??;
            if let Some(resolution::Answer::Endpoints(set)) = answer.answer
                && set.endpoints.len() == count
            {
                return Some(set);
            }
        }
    };
    tokio::time::timeout(within, wanted).await.ok().flatten()
}

fn endpoints(set: &EndpointSet) -> Vec<(String, String)> {
    set.endpoints
        .iter()
        .map(|e| {
            let octets: [u8; 4] = e.ip.as_slice().try_into().unwrap();
            (
                format!("{}:{}", std::net::Ipv4Addr::from(octets), e.port),
                e.identity.clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_resolves_a_cluster_ip_to_its_endpoints_and_identities_and_hears_every_change() {
    let c = cluster().await;
    let controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    let credentials = client_credentials(&c.api).await;
    let mut client = connect(&controller, &credentials, CONTROLLER_ID)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", controller.logs()));

    let mut stream = client
        .resolve(ResolveRequest {
            target: "10.96.0.10:80".into(),
        })
        .await
        .expect("a stream")
        .into_inner();
    // The watches may still be filling the index: the first answers can
    // be unknown or partial; wait for the full one.
    let first = with_endpoints(&mut stream, 2, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no endpoints:\n{}", controller.logs()));
    assert_eq!(first.service, "shop/web");
    assert_eq!(
        endpoints(&first),
        [
            (
                "10.0.0.1:8080".into(),
                "spiffe://cluster.local/ns/shop/sa/web".into()
            ),
            // No sidecar: no identity to expect.
            ("10.0.0.2:8080".into(), String::new()),
        ]
    );

    // A third replica: the stream says so, in well under a second.
    c.api.apply("pods", pod("web-3", "10.0.0.3", "web", true));
    c.api.apply(
        "endpointslices",
        slice(vec![
            endpoint("10.0.0.1", "web-1"),
            endpoint("10.0.0.2", "web-2"),
            endpoint("10.0.0.3", "web-3"),
        ]),
    );
    let started = std::time::Instant::now();
    let third = with_endpoints(&mut stream, 3, Duration::from_secs(5))
        .await
        .expect("the update");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(endpoints(&third)[2].0, "10.0.0.3:8080");

    // An address nobody has: unknown (the proxy uses the original
    // destination). A pod IP: that pod.
    let mut unknown = client
        .resolve(ResolveRequest {
            target: "10.9.9.9:80".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let answer = unknown.message().await.unwrap().unwrap();
    assert!(matches!(
        answer.answer,
        Some(resolution::Answer::Unknown(_))
    ));
    let mut by_pod = client
        .resolve(ResolveRequest {
            target: "10.0.0.1:8080".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let Some(resolution::Answer::Endpoints(pod_set)) =
        by_pod.message().await.unwrap().unwrap().answer
    else {
        panic!("the pod is known")
    };
    assert_eq!(pod_set.service, "");
    assert_eq!(pod_set.endpoints[0].pod, "shop/web-1");

    // Nonsense is refused with the reason.
    let refused = client
        .resolve(ResolveRequest {
            target: "web.shop:80".into(),
        })
        .await
        .expect_err("not a target");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("not a target"), "{refused:?}");

    // Counted, with bounded labels.
    let metrics = controller.metrics().await;
    let value = |name: &str, labels: &[(&str, &str)]| {
        outrider::test_util::apps::metric(&metrics, name, labels)
    };
    assert_eq!(
        value("outrider_controller_discovery_streams", &[]),
        3.0,
        "{metrics}"
    );
    assert!(
        value(
            "outrider_controller_discovery_answers_total",
            &[("answer", "endpoints")]
        ) >= 3.0
    );
    assert_eq!(
        value(
            "outrider_controller_discovery_answers_total",
            &[("answer", "unknown")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "outrider_controller_discovery_refused_total",
            &[("reason", "invalid_target")]
        ),
        1.0
    );
    assert!(
        value(
            "outrider_controller_discovery_changes_total",
            &[("kind", "EndpointSlice")]
        ) >= 2.0
    );
    // A closed stream is no longer counted.
    drop((stream, unknown, by_pod));
    let closed = eventually(Duration::from_secs(5), async || {
        let m = controller.metrics().await;
        (outrider::test_util::apps::metric(&m, "outrider_controller_discovery_streams", &[]) == 0.0)
            .then_some(())
    })
    .await;
    assert!(closed.is_some(), "streams still counted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_is_served_to_mesh_identities_only_by_the_controller_s_own_identity() {
    let c = cluster().await;
    let controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    let credentials = client_credentials(&c.api).await;
    // A client expecting another identity refuses the server.
    let wrong = connect(
        &controller,
        &credentials,
        "spiffe://cluster.local/ns/outrider-system/sa/someone-else",
    )
    .await;
    assert!(wrong.is_err(), "accepted a server of another identity");
    // A client that presents no certificate (but checks the server as a
    // proxy does) gets no answer; the same client with its certificate
    // does.
    let mesh = MeshTls::new(credentials.clone(), &settings()).unwrap();
    let expectation = PeerExpectation::Id(SpiffeId::parse(CONTROLLER_ID).unwrap());
    let mut config = (*mesh.client_config(&expectation).unwrap()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    assert!(
        answered(&controller, config.clone()).await,
        "{}",
        controller.logs()
    );
    config.client_auth_cert_resolver = Arc::new(NoCertificate);
    assert!(
        !answered(&controller, config).await,
        "a client without a certificate was answered"
    );
}

/// Whether a Resolve over a connection made with `config` is answered.
async fn answered(controller: &ControllerProcess, config: rustls::ClientConfig) -> bool {
    let Ok(mut client) = dial(controller, config).await else {
        return false;
    };
    let attempt = async {
        let mut stream = client
            .resolve(ResolveRequest {
                target: "10.96.0.10:80".into(),
            })
            .await
            .ok()?
            .into_inner();
        stream.message().await.ok()?
    };
    attempt.await.is_some()
}

#[derive(Debug)]
struct NoCertificate;

impl rustls::client::ResolvesClientCert for NoCertificate {
    fn resolve(
        &self,
        _: &[&[u8]],
        _: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        None
    }

    fn has_certs(&self) -> bool {
        false
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_resolver_follows_changes_and_keeps_its_last_answers_when_the_controller_goes() {
    use outrider::proxy::discover::{Answer, DiscoveryConfig, Resolver};
    let c = cluster().await;
    let mut controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    let credentials = client_credentials(&c.api).await;
    let mesh = Arc::new(MeshTls::new(credentials, &settings()).unwrap());
    let (_tls_tx, tls) = tokio::sync::watch::channel(Some(mesh));
    let config = |server_id: &str| DiscoveryConfig {
        address: controller.discovery.to_string(),
        authority: AUTHORITY.into(),
        server_id: SpiffeId::parse(server_id).unwrap(),
        first_answer_timeout: Duration::from_secs(2),
    };
    let resolver = Resolver::new(config(CONTROLLER_ID), tls.clone());
    let service: std::net::SocketAddr = "10.96.0.10:80".parse().unwrap();
    let count = |answer: &Answer| match answer {
        Answer::Endpoints(set) => set.endpoints.len(),
        _ => 0,
    };
    let two = eventually(Duration::from_secs(10), async || {
        let answer = resolver.resolve(service).await;
        (count(&answer) == 2).then_some(answer)
    })
    .await
    .unwrap_or_else(|| panic!("not resolved:\n{}", controller.logs()));
    let Answer::Endpoints(set) = two else {
        unreachable!()
    };
    assert_eq!(
        set.endpoints[0]
            .identity
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/web")
    );
    assert_eq!(set.endpoints[1].identity, None);
    assert_eq!(
        resolver.resolve("10.9.9.9:80".parse().unwrap()).await,
        Answer::Unknown
    );

    // A change arrives on the followed destination.
    let mut follower = resolver.follow(service);
    c.api.apply("pods", pod("web-3", "10.0.0.3", "web", true));
    c.api.apply(
        "endpointslices",
        slice(vec![
            endpoint("10.0.0.1", "web-1"),
            endpoint("10.0.0.2", "web-2"),
            endpoint("10.0.0.3", "web-3"),
        ]),
    );
    // `wait_for` hands back a read guard on the answers: keeping it (as
    // this test once did, in the timeout's result) blocks the resolver's
    // next update, and the worker thread with it, for as long as it is
    // held. It is dropped on this line.
    let three = tokio::time::timeout(
        Duration::from_secs(1),
        follower.wait_for(|a| a.as_ref().is_some_and(|a| count(a) == 3)),
    )
    .await
    .is_ok_and(|seen| seen.is_ok());
    assert!(three, "no update within a second");

    // The controller goes: known destinations keep their last answer; a
    // new one gives up after the configured wait.
    controller.terminate().await.expect("stops");
    assert_eq!(count(&resolver.resolve(service).await), 3);
    let started = std::time::Instant::now();
    assert_eq!(
        resolver.resolve("10.8.8.8:80".parse().unwrap()).await,
        Answer::Unavailable
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(1900) && waited < Duration::from_secs(4),
        "{waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_resolver_refuses_a_discovery_server_of_another_identity() {
    use outrider::proxy::discover::{Answer, DiscoveryConfig, Resolver};
    let c = cluster().await;
    let controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    let credentials = client_credentials(&c.api).await;
    let mesh = Arc::new(MeshTls::new(credentials, &settings()).unwrap());
    let (_tls_tx, tls) = tokio::sync::watch::channel(Some(mesh));
    let resolver = Resolver::new(
        DiscoveryConfig {
            address: controller.discovery.to_string(),
            authority: AUTHORITY.into(),
            server_id: SpiffeId::parse("spiffe://cluster.local/ns/outrider-system/sa/impostor")
                .unwrap(),
            first_answer_timeout: Duration::from_secs(1),
        },
        tls,
    );
    assert_eq!(
        resolver.resolve("10.96.0.10:80".parse().unwrap()).await,
        Answer::Unavailable
    );
}

// === Policies over the API ===

fn deny_policy(name: &str) -> Value {
    json!({"apiVersion": "security.outrider.dev/v1alpha1", "kind": "AuthorizationPolicy",
           "metadata": {"name": name, "namespace": "shop"},
           "spec": {"action": "DENY", "rules": [{"to": [{"paths": ["/admin"]}]}]}})
}

/// The names of the objects in the next set on `stream`, within `within`.
async fn next_set(
    stream: &mut tonic::Streaming<outrider::discovery_api::v1::PolicySet>,
    within: Duration,
) -> Option<Vec<String>> {
    let set = tokio::time::timeout(within, stream.message())
        .await
        .ok()?
        .ok()??;
    let mut names: Vec<String> = set
        .objects
        .iter()
        .map(|o| {
            let value: Value = serde_json::from_slice(&o.json).unwrap();
            format!("{}/{}", o.kind, value["metadata"]["name"].as_str().unwrap())
        })
        .collect();
    names.sort();
    Some(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_gets_its_pod_s_policies_only_as_that_pod_s_service_account() {
    use outrider::discovery_api::v1::PolicyRequest;
    let c = cluster().await;
    c.api
        .apply("authorizationpolicies", deny_policy("no-admin"));
    let controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    // web-1 runs as `web`; `client` asks for it.
    let impostor = client_credentials(&c.api).await;
    let mut client = connect(&controller, &impostor, CONTROLLER_ID)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", controller.logs()));
    let ask = |namespace: &str, pod: &str| PolicyRequest {
        namespace: namespace.into(),
        pod: pod.into(),
    };
    let refused = eventually(Duration::from_secs(10), async || {
        match client.watch_policies(ask("shop", "web-1")).await {
            Err(status) if status.code() == tonic::Code::PermissionDenied => Some(status),
            // The controller may not have seen the pod yet.
            _ => None,
        }
    })
    .await
    .unwrap_or_else(|| panic!("never refused:\n{}", controller.logs()));
    assert!(refused.message().contains("runs as web"), "{refused:?}");
    let other_namespace = client.watch_policies(ask("kube-system", "x")).await;
    assert_eq!(
        other_namespace.err().map(|s| s.code()),
        Some(tonic::Code::PermissionDenied)
    );

    // As `web`: the namespace's set, and every change within a second.
    let web = credentials_for(&c.api, "web").await;
    let mut client = connect(&controller, &web, CONTROLLER_ID).await.unwrap();
    let mut stream = client
        .watch_policies(ask("shop", "web-1"))
        .await
        .expect("a policy stream")
        .into_inner();
    let first = next_set(&mut stream, Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no first set:\n{}", controller.logs()));
    assert_eq!(first, ["AuthorizationPolicy/no-admin"]);
    c.api.apply(
        "peerauthentications",
        json!({"apiVersion": "security.outrider.dev/v1alpha1", "kind": "PeerAuthentication",
               "metadata": {"name": "strict", "namespace": "shop"},
               "spec": {"mtls": {"mode": "STRICT"}}}),
    );
    let started = std::time::Instant::now();
    let second = next_set(&mut stream, Duration::from_secs(5))
        .await
        .expect("the update");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        second,
        ["AuthorizationPolicy/no-admin", "PeerAuthentication/strict"]
    );
    // Another namespace's policy is not this proxy's business.
    let mut elsewhere = deny_policy("elsewhere");
    elsewhere["metadata"]["namespace"] = "outrider-system".into();
    c.api.apply("authorizationpolicies", elsewhere);
    assert_eq!(
        next_set(&mut stream, Duration::from_millis(500)).await,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_controller_never_leaves_a_proxy_without_its_policies() {
    use outrider::policy::publish::Update;
    use outrider::proxy::discover::{DiscoveryConfig, Resolver};
    let c = cluster().await;
    c.api
        .apply("authorizationpolicies", deny_policy("no-admin"));
    let mut controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    let web = credentials_for(&c.api, "web").await;
    let mesh = Arc::new(MeshTls::new(web, &settings()).unwrap());
    let (_tls_tx, tls) = tokio::sync::watch::channel(Some(mesh));
    let resolver = Resolver::new(
        DiscoveryConfig {
            address: controller.discovery.to_string(),
            authority: AUTHORITY.into(),
            server_id: SpiffeId::parse(CONTROLLER_ID).unwrap(),
            first_answer_timeout: Duration::from_secs(1),
        },
        tls,
    );
    let registry = prometheus::Registry::new();
    let metrics = outrider::policy::publish::Metrics::new(&registry).unwrap();
    let (tx, mut updates) = tokio::sync::mpsc::channel(16);
    tokio::spawn(outrider::proxy::discover::policies::run(
        resolver,
        "shop".into(),
        "web-1".into(),
        metrics,
        tx,
    ));
    let names = |update: Option<Update>| match update {
        Some(Update::Objects(set)) => set.keys().map(|(_, _, name)| name.clone()).collect(),
        other => panic!("{other:?}"),
    };
    let first: Vec<String> = names(
        tokio::time::timeout(Duration::from_secs(10), updates.recv())
            .await
            .unwrap_or_else(|_| panic!("no policies:\n{}", controller.logs())),
    );
    assert_eq!(first, ["no-admin"]);

    // Stopped: nothing replaces the set in force (the publisher keeps it).
    let port = controller.discovery.port();
    controller.terminate().await.expect("controller stopped");
    let quiet = tokio::time::timeout(Duration::from_secs(2), updates.recv()).await;
    assert!(quiet.is_err(), "{quiet:?}");
    // Back on the same port: the first set it sends is complete again,
    // never the empty set of a controller still reading its watches.
    let restarted = ControllerProcess::spawn(
        &c.kubeconfig,
        &["--discovery-listen", &format!("127.0.0.1:{port}")],
    );
    let again: Vec<String> = names(
        tokio::time::timeout(Duration::from_secs(15), updates.recv())
            .await
            .unwrap_or_else(|_| panic!("no policies after the restart:\n{}", restarted.logs())),
    );
    assert_eq!(again, ["no-admin"]);
}

/// The key-exchange group a proxy offering `offered` agrees with the
/// controller's discovery server.
async fn agreed_with_controller(
    controller: &ControllerProcess,
    credentials: &Arc<Credentials>,
    offered: &[KxGroup],
) -> Option<KxGroup> {
    let settings = TlsSettings {
        key_exchange: offered.to_vec(),
        ..settings()
    };
    let mesh = MeshTls::new(credentials.clone(), &settings).unwrap();
    let expectation = PeerExpectation::Id(SpiffeId::parse(CONTROLLER_ID).unwrap());
    let mut config = (*mesh.client_config(&expectation).unwrap()).clone();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tls = tls_to(controller, config)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", controller.logs()));
    outrider::tls::negotiated_group(tls.get_ref().1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_controller_agrees_the_post_quantum_hybrid_with_proxies_unless_it_is_turned_off() {
    let c = cluster().await;
    // The controller bootstraps the CA the credentials come from.
    let controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    let credentials = client_credentials(&c.api).await;
    assert_eq!(
        agreed_with_controller(&controller, &credentials, &KxGroup::DEFAULT).await,
        Some(KxGroup::X25519Mlkem768)
    );
    // A proxy without the hybrid is served over X25519.
    assert_eq!(
        agreed_with_controller(&controller, &credentials, &[KxGroup::X25519]).await,
        Some(KxGroup::X25519)
    );
    drop(controller);

    let controller = ControllerProcess::spawn(&c.kubeconfig, &["--tls-post-quantum=false"]);
    assert_eq!(
        agreed_with_controller(&controller, &credentials, &KxGroup::DEFAULT).await,
        Some(KxGroup::X25519)
    );
}
