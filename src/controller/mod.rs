//! `outrider controller`: the mesh CA, the identity Secrets it keeps, and
//! the injection webhook, with leader election so two replicas are safe.
//!
//! Every replica loads the CA and serves the webhook (the webhook is
//! stateless); only the Lease holder writes: identity Secrets, the policy
//! reader bindings and the webhook configuration's `caBundle`. The
//! decisions live in pure modules ([`identities`], [`lease`],
//! [`webhook::review`], [`crate::ca::secret`]); this module wires them:
//! [`ca`] loads the CA Secret, [`reconcile`] runs the caches and the
//! writes, [`rbac`] binds the policy readers.

pub mod ca;
mod conflicts;
pub mod discovery;
pub mod identities;
pub mod lease;
pub mod metrics;
pub mod ownership;
mod rbac;
mod reconcile;
pub mod webhook;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::coordination::v1::Lease;
use kube::Client;
use kube::api::Api;
use parking_lot::Mutex;
use prometheus::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::lease::LeaseTiming;
use self::metrics::ControllerMetrics;
use crate::ca::secret::CaMaterial;
use crate::identity::TrustDomain;
use crate::inject::InjectConfig;

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "outrider-controller";

/// Create and replace carry our field manager too, so `managedFields`
/// names us for every object we write, not `unknown`.
fn write_params() -> kube::api::PostParams {
    kube::api::PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..kube::api::PostParams::default()
    }
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// The control-plane namespace (the CA Secret, the Lease).
    pub namespace: String,
    pub kubeconfig: Option<PathBuf>,
    pub trust_domain: TrustDomain,
    /// Create the CA Secret if it is absent.
    pub bootstrap: bool,
    pub anchor_lifetime: Duration,
    pub issuer_lifetime: Duration,
    pub identity_lifetime: Duration,
    /// Warn when the issuer or an anchor expires within this.
    pub expiry_warning: Duration,
    pub admin_listen: SocketAddr,
    pub webhook_listen: SocketAddr,
    /// The Service in front of the webhook (its DNS names go into the
    /// serving certificate).
    pub webhook_service: String,
    /// The MutatingWebhookConfiguration whose caBundle we keep current.
    pub webhook_config: String,
    pub webhook_cert_lifetime: Duration,
    pub inject: InjectConfig,
    pub lease_name: String,
    /// This replica's name in the Lease (the pod name).
    pub identity: String,
    pub lease: LeaseTiming,
    /// Look at everything at least this often, events or not.
    pub resync: Duration,
    /// The discovery gRPC server's address.
    pub discovery_listen: SocketAddr,
    /// The cluster's DNS domain (`name.namespace.svc.<domain>` targets).
    pub cluster_domain: String,
    /// Whether the discovery server offers the post-quantum hybrid key
    /// exchange (the same mesh-wide switch as the proxies').
    pub post_quantum: bool,
    /// What the webhook does with a pod its namespace's enforced Pod
    /// Security level would reject once injected.
    pub pod_security: crate::inject::pod_security::Response,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Client(#[from] crate::kube_client::Error),
    #[error(transparent)]
    AdminBind(#[from] crate::admin::Error),
    #[error("cannot listen on {addr}: {source}")]
    WebhookBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error(transparent)]
    Ca(#[from] crate::ca::secret::Error),
    #[error("cannot issue: {0}")]
    Issue(#[from] crate::ca::issuer::IssueError),
    #[error(transparent)]
    Id(#[from] crate::identity::InvalidSpiffeId),
    #[error(
        "Secret {namespace}/{name} is gone; keeping the CA in use (restore the Secret, see docs/operations.md)"
    )]
    CaSecretGone { namespace: String, name: String },
    #[error(
        "Secret {namespace}/{name} does not exist and bootstrapping is off (see docs/install.md)"
    )]
    CaSecretMissing { namespace: String, name: String },
    #[error("Secret {name} is unusable (unchanged since it was refused)")]
    CaUnusable { name: String },
    #[error("cannot load the webhook certificate: {0}")]
    ServingKey(#[from] webhook::KeyError),
    #[error("cannot issue the webhook's serving certificate (see the log)")]
    NoServingCert,
    #[error("a controller task ended unexpectedly (see the log)")]
    TaskEnded,
    #[error("cannot build the object to write: {0}")]
    Encode(serde_json::Error),
    #[error("cannot set up the discovery server's TLS: {0}")]
    DiscoveryTls(String),
    #[error("cannot listen on {addr}: {source}")]
    DiscoveryBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl Error {
    /// A bounded label for the failure counters.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Client(_) => "client",
            Self::AdminBind(_) | Self::WebhookBind { .. } => "bind",
            Self::Metrics(_) => "metrics",
            Self::Kube(kube::Error::Api(e)) if e.code == 409 => "conflict",
            Self::Kube(_) => "api",
            Self::Ca(_) | Self::CaUnusable { .. } => "ca_invalid",
            Self::CaSecretGone { .. } | Self::CaSecretMissing { .. } => "ca_missing",
            Self::Issue(_) | Self::Id(_) => "issue",
            Self::ServingKey(_) | Self::NoServingCert => "serving_cert",
            Self::TaskEnded => "task_ended",
            Self::Encode(_) => "encode",
            Self::DiscoveryTls(_) => "serving_cert",
            Self::DiscoveryBind { .. } => "bind",
        }
    }
}

/// What the controller's tasks share.
struct Controller {
    config: ControllerConfig,
    client: Client,
    metrics: ControllerMetrics,
    ca: watch::Sender<Option<Arc<CaMaterial>>>,
    /// The CA Secret's data as last loaded, to notice changes.
    ca_data: Mutex<Option<BTreeMap<String, ByteString>>>,
    /// When each meshed namespace's policy-reader binding was last applied.
    bound: Mutex<BTreeMap<String, tokio::time::Instant>>,
    /// Foreign objects under our names.
    conflicts: conflicts::Conflicts,
}

/// Runs until `shutdown` resolves.
pub async fn run(
    config: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let client = crate::kube_client::client(config.kubeconfig.as_deref(), "controller").await?;
    let registry = Registry::new();
    let metrics = ControllerMetrics::new(&registry)?;
    let ready = Arc::new(AtomicBool::new(false));
    let ready_check = ready.clone();
    let admin = crate::admin::Admin::bind(
        config.admin_listen,
        registry,
        Arc::new(move || ready_check.load(Ordering::Relaxed)),
    )
    .await?;
    let webhook_listener = TcpListener::bind(config.webhook_listen)
        .await
        .map_err(|source| Error::WebhookBind {
            addr: config.webhook_listen,
            source,
        })?;
    let discovery_listener =
        TcpListener::bind(config.discovery_listen)
            .await
            .map_err(|source| Error::DiscoveryBind {
                addr: config.discovery_listen,
                source,
            })?;
    tracing::info!(
        admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        webhook = %webhook_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        discovery = %discovery_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        namespace = %config.namespace,
        "Controller listening"
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(admin.run());

    let (ca_tx, ca_rx) = watch::channel(None);
    let controller = Arc::new(Controller {
        config: config.clone(),
        client: client.clone(),
        metrics: metrics.clone(),
        ca: ca_tx,
        ca_data: Mutex::new(None),
        bound: Mutex::new(BTreeMap::new()),
        conflicts: conflicts::Conflicts::new(
            client.clone(),
            &config.identity,
            metrics.clone(),
            config.resync,
        ),
    });

    // The CA first: nothing else can work without it (not ready until
    // then; a stop request is still honoured).
    let mut shutdown = std::pin::pin!(shutdown);
    let mut delay = Duration::from_millis(200);
    loop {
        match controller.load_ca().await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(%error, "CA not available yet; retrying");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }

    // The caches, which the webhook reads too (namespace labels).
    let changed = Arc::new(tokio::sync::Notify::new());
    let caches = reconcile::start_caches(&client, changed.clone());

    // The webhook, with a serving certificate kept fresh.
    let first_key = controller.serving_key()?;
    let serving = webhook::ServingCert::new(first_key);
    let namespaces = caches.namespaces.clone();
    let gate = webhook::PodSecurityGate {
        response: config.pod_security,
        // Unknown until the cache has the namespace: PodSecurity itself
        // still judges the pod, with its own message.
        levels: Box::new(move |name| {
            let namespace = namespaces.get(&kube::runtime::reflector::ObjectRef::new(name))?;
            Some(crate::inject::pod_security::enforced(
                namespace.metadata.labels.as_ref()?,
            ))
        }),
    };
    tasks.spawn(webhook::serve(
        webhook_listener,
        serving.clone(),
        Arc::new(config.inject.clone()),
        Arc::new(gate),
        metrics.clone(),
    ));
    tasks.spawn(ca::refresh_serving_cert(
        controller.clone(),
        serving,
        ca_rx.clone(),
    ));

    // Discovery: the index fed by its watches, served over mTLS.
    let registry = discovery::registry::Registry::awaiting(
        discovery::index::Index::new(config.trust_domain.clone()),
        &discovery::watch::SOURCES,
    );
    discovery::watch::start(&client, &registry, &metrics, &mut tasks);
    let policies = discovery::policies::PolicyStore::new();
    discovery::policies::start(&client, &policies, &mut tasks);
    let discovery_tls = Arc::new(parking_lot::RwLock::new(controller.discovery_tls()?));
    tasks.spawn(discovery::server::serve(
        discovery_listener,
        discovery_tls.clone(),
        discovery::server::DiscoveryService::new(
            registry,
            policies,
            config.cluster_domain.clone(),
            metrics.clone(),
        ),
    ));
    tasks.spawn(ca::refresh_discovery_tls(
        controller.clone(),
        discovery_tls,
        ca_rx.clone(),
    ));
    ready.store(true, Ordering::Relaxed);

    // Leadership, released when we stop (see `lease::run`).
    let (leading_tx, leading_rx) = watch::channel(false);
    let (stop_leading, mut stopping) = watch::channel(false);
    let mut leadership = tokio::spawn(lease::run(
        Api::<Lease>::namespaced(client.clone(), &config.namespace),
        config.lease_name.clone(),
        config.identity.clone(),
        config.lease,
        leading_tx,
        async move {
            let _ = stopping.wait_for(|stop| *stop).await;
        },
    ));

    tasks.spawn(reconcile::reconcile_forever(
        controller, caches, changed, leading_rx,
    ));
    tokio::select! {
        _ = &mut shutdown => {}
        result = &mut leadership => {
            tracing::error!(?result, "The leadership task ended unexpectedly");
            return Err(Error::TaskEnded);
        }
        Some(result) = tasks.join_next() => {
            // Exit non-zero so the restart is visible, not a clean stop.
            tracing::error!(?result, "A controller task ended unexpectedly");
            return Err(Error::TaskEnded);
        }
    }
    // Stop reconciling first, so nothing is written once another replica
    // may lead; then hand the Lease over.
    tasks.shutdown().await;
    let _ = stop_leading.send(true);
    let _ = leadership.await;
    Ok(())
}
