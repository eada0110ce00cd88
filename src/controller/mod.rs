//! `outrider controller`: the mesh CA, the identity Secrets it keeps, and
//! the injection webhook, with leader election so two replicas are safe.
//!
//! Every replica loads the CA and serves the webhook (the webhook is
//! stateless); only the Lease holder writes: identity Secrets and the
//! webhook configuration's `caBundle`. The decisions live in pure modules
//! ([`identities`], [`lease`], [`webhook::review`], [`ca`]); this module
//! wires them to kube-rs caches and writes.

pub mod ca;
pub mod identities;
pub mod lease;
pub mod metrics;
pub mod webhook;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use prometheus::Registry;
use time::OffsetDateTime;
use tokio::net::TcpListener;
use tokio::sync::{Notify, watch};

use self::ca::{CA_SECRET, CaMaterial};
use self::identities::{Action, IDENTITY_LABEL, IdentitySecret, ServiceAccountRef};
use self::lease::LeaseTiming;
use self::metrics::ControllerMetrics;
use crate::identity::{SpiffeId, TrustDomain};
use crate::inject::InjectConfig;
use crate::inject::config::INJECT;

/// The field manager of every server-side apply.
pub const FIELD_MANAGER: &str = "outrider-controller";

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
}

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Client(#[from] crate::policy::source::kube::Error),
    #[error(transparent)]
    Bind(#[from] crate::admin::BindError),
    #[error("cannot listen on {addr}: {source}")]
    WebhookBind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("cannot issue the webhook's serving certificate (see the log)")]
    NoServingCert,
    #[error("a controller task ended unexpectedly (see the log)")]
    TaskEnded,
}

/// What the controller shares between its tasks.
struct Shared {
    config: ControllerConfig,
    client: Client,
    metrics: ControllerMetrics,
    ca: watch::Sender<Option<Arc<CaMaterial>>>,
    /// The CA Secret's data as last loaded, to notice changes.
    ca_data: std::sync::Mutex<Option<BTreeMap<String, ByteString>>>,
    /// When each meshed namespace's policy-reader binding was last applied.
    bound: std::sync::Mutex<BTreeMap<String, tokio::time::Instant>>,
}

/// The ClusterRole (from the chart) that lets proxies read policies, and
/// the RoleBinding that grants it in each meshed namespace.
pub const POLICY_READER: &str = "outrider-policy-reader";
/// The reconciler looks at everything at most this often.
const MIN_PASS_INTERVAL: Duration = Duration::from_secs(1);
/// Re-apply bindings this often, so a deleted one comes back.
const REBIND_EVERY: Duration = Duration::from_secs(600);

/// Runs until the process is stopped.
pub async fn run(
    config: ControllerConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ControllerError> {
    let client = crate::policy::source::kube::client(config.kubeconfig.as_deref()).await?;
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
        .map_err(|source| ControllerError::WebhookBind {
            addr: config.webhook_listen,
            source,
        })?;
    tracing::info!(
        admin = %admin.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        webhook = %webhook_listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        namespace = %config.namespace,
        "Controller listening"
    );
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(admin.run());

    let (ca_tx, ca_rx) = watch::channel(None);
    let shared = Arc::new(Shared {
        config: config.clone(),
        client: client.clone(),
        metrics: metrics.clone(),
        ca: ca_tx,
        ca_data: std::sync::Mutex::new(None),
        bound: std::sync::Mutex::new(BTreeMap::new()),
    });

    // The CA first: nothing else can work without it (not ready until
    // then; a stop request is still honoured).
    let mut shutdown = std::pin::pin!(shutdown);
    let mut delay = Duration::from_millis(200);
    loop {
        match shared.load_ca().await {
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

    // The webhook, with a serving certificate kept fresh.
    let Some(first_key) = shared.serving_key() else {
        return Err(ControllerError::NoServingCert);
    };
    let serving = webhook::ServingCert::new(first_key);
    tasks.spawn(webhook::serve(
        webhook_listener,
        serving.clone(),
        Arc::new(config.inject.clone()),
        metrics.clone(),
    ));
    tasks.spawn(refresh_serving_cert(shared.clone(), serving, ca_rx.clone()));
    ready.store(true, Ordering::Relaxed);

    // Leadership.
    let (leading_tx, leading_rx) = watch::channel(false);
    tasks.spawn(lease::run(
        Api::<Lease>::namespaced(client.clone(), &config.namespace),
        config.lease_name.clone(),
        config.identity.clone(),
        config.lease,
        leading_tx,
    ));

    tasks.spawn(reconcile_forever(shared, leading_rx));
    tokio::select! {
        _ = &mut shutdown => {}
        Some(result) = tasks.join_next() => {
            // Exit non-zero so the restart is visible, not a clean stop.
            tracing::error!(?result, "A controller task ended unexpectedly");
            return Err(ControllerError::TaskEnded);
        }
    }
    Ok(())
}

impl Shared {
    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }

    /// Reads (or bootstraps) the CA Secret; a changed Secret that fails
    /// its checks is refused and the last good CA kept.
    async fn load_ca(&self) -> Result<(), String> {
        let api = self.secrets();
        let secret = match api.get_opt(CA_SECRET).await.map_err(|e| e.to_string())? {
            Some(secret) => secret,
            // Deleted while we hold a CA: a new anchor now would cut every
            // proxy off from its peers until all had the new bundle. Keep
            // the last good CA; recreating it is the operator's call.
            None if self.current_ca().is_some() => {
                self.metrics.ca_load_failure();
                return Err(format!(
                    "Secret {}/{CA_SECRET} is gone; keeping the CA in use (restore the Secret, see docs/operations.md)",
                    self.config.namespace
                ));
            }
            None if self.config.bootstrap => {
                let data = CaMaterial::bootstrap(
                    &self.config.trust_domain,
                    self.config.anchor_lifetime,
                    self.config.issuer_lifetime,
                    OffsetDateTime::now_utc(),
                )
                .map_err(|e| e.to_string())?;
                let secret = Secret {
                    metadata: kube::api::ObjectMeta {
                        name: Some(CA_SECRET.into()),
                        labels: Some(BTreeMap::from([(
                            "app.kubernetes.io/managed-by".to_string(),
                            "outrider".to_string(),
                        )])),
                        ..Default::default()
                    },
                    type_: Some("kubernetes.io/tls".into()),
                    data: Some(
                        data.into_iter()
                            .map(|(k, v)| (k, ByteString(v.into_bytes())))
                            .collect(),
                    ),
                    ..Default::default()
                };
                match api.create(&PostParams::default(), &secret).await {
                    Ok(created) => {
                        tracing::info!(
                            secret = CA_SECRET,
                            namespace = %self.config.namespace,
                            "Bootstrapped a new trust anchor and issuer"
                        );
                        created
                    }
                    // Another replica won the race: use theirs.
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        api.get(CA_SECRET).await.map_err(|e| e.to_string())?
                    }
                    Err(e) => return Err(e.to_string()),
                }
            }
            None => {
                return Err(format!(
                    "Secret {}/{CA_SECRET} does not exist and bootstrapping is off (see docs/install.md)",
                    self.config.namespace
                ));
            }
        };
        let data = secret.data.clone().unwrap_or_default();
        if self.ca_data.lock().ok().and_then(|d| d.clone()).as_ref() == Some(&data) {
            // Unchanged: fine if it was good, still refused if it was not.
            return match self.current_ca() {
                Some(_) => Ok(()),
                None => Err(format!("Secret {CA_SECRET} is unusable (unchanged)")),
            };
        }
        let bytes: BTreeMap<String, Vec<u8>> =
            data.iter().map(|(k, v)| (k.clone(), v.0.clone())).collect();
        match CaMaterial::from_secret_data(
            &bytes,
            &self.config.trust_domain,
            OffsetDateTime::now_utc(),
        ) {
            Ok(material) => {
                tracing::info!(
                    issuer_expires = %crate::units::format_utc(material.issuer_not_after.unix_timestamp()),
                    anchor_expires = %crate::units::format_utc(material.anchor_not_after.unix_timestamp()),
                    "Loaded the CA"
                );
                self.metrics
                    .set_ca_expiry(material.issuer_not_after, material.anchor_not_after);
                if let Ok(mut last) = self.ca_data.lock() {
                    *last = Some(data);
                }
                self.ca.send_replace(Some(Arc::new(material)));
                Ok(())
            }
            Err(error) => {
                self.metrics.ca_load_failure();
                // Remember it so the same bad data is not re-checked (and
                // re-logged) every pass; the last good CA stays in force.
                if let Ok(mut last) = self.ca_data.lock() {
                    *last = Some(data);
                }
                Err(error.to_string())
            }
        }
    }

    fn current_ca(&self) -> Option<Arc<CaMaterial>> {
        self.ca.borrow().clone()
    }

    fn serving_key(&self) -> Option<Arc<rustls::sign::CertifiedKey>> {
        let ca = self.current_ca()?;
        let service = &self.config.webhook_service;
        let ns = &self.config.namespace;
        let names = vec![
            format!("{service}.{ns}.svc"),
            format!("{service}.{ns}.svc.cluster.local"),
        ];
        match ca.signing.issue_server_cert(
            &names,
            self.config.webhook_cert_lifetime,
            OffsetDateTime::now_utc(),
        ) {
            Ok(signed) => match webhook::certified_key(&signed.cert_pem, &signed.key_pem) {
                Ok(key) => {
                    self.metrics.issued("webhook", "serving");
                    Some(key)
                }
                Err(error) => {
                    tracing::error!(%error, "Cannot load the webhook certificate");
                    None
                }
            },
            Err(error) => {
                tracing::error!(%error, "Cannot issue the webhook certificate");
                None
            }
        }
    }
}

/// Reissues the webhook's certificate at a third of its lifetime and
/// whenever the CA changes.
async fn refresh_serving_cert(
    shared: Arc<Shared>,
    serving: Arc<webhook::ServingCert>,
    mut ca: watch::Receiver<Option<Arc<CaMaterial>>>,
) {
    let every = shared.config.webhook_cert_lifetime * 2 / 3;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            changed = ca.changed() => if changed.is_err() { return },
        }
        if let Some(key) = shared.serving_key() {
            serving.replace(key);
        }
    }
}

/// The caches the reconciler reads.
struct Caches {
    namespaces: Store<Namespace>,
    service_accounts: Store<ServiceAccount>,
    secrets: Store<Secret>,
    pods: Store<PartialObjectMeta<Pod>>,
    ready: Arc<AtomicBool>,
}

/// A reflector cache of `api`, driven in its own task; every event (or
/// watch error, which the watcher retries with backoff) pokes `changed`.
fn cache<K>(api: Api<K>, config: watcher::Config, changed: Arc<Notify>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (store, writer) = reflector::store::<K>();
    let stream = reflector::reflector(writer, watcher(api, config)).default_backoff();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            // A persistent error here (RBAC, a missing API) keeps the
            // caches unready and nothing issued: say so where it is seen.
            if let Err(error) = event {
                tracing::warn!(%error, "Watch failed; retrying with backoff");
            }
            changed.notify_one();
        }
    });
    store
}

fn start_caches(client: &Client, changed: Arc<Notify>) -> Caches {
    let all = watcher::Config::default;
    let namespaces = cache(
        Api::<Namespace>::all(client.clone()),
        all(),
        changed.clone(),
    );
    let service_accounts = cache(
        Api::<ServiceAccount>::all(client.clone()),
        all(),
        changed.clone(),
    );
    let secrets = cache(
        Api::<Secret>::all(client.clone()),
        all().labels(&format!("{IDENTITY_LABEL}=true")),
        changed.clone(),
    );
    // Pod metadata only: annotations are all we read.
    let pods = cache(
        Api::<PartialObjectMeta<Pod>>::all(client.clone()),
        all(),
        changed.clone(),
    );
    let ready = Arc::new(AtomicBool::new(false));
    let flag = ready.clone();
    let (a, b, c, d) = (
        namespaces.clone(),
        service_accounts.clone(),
        secrets.clone(),
        pods.clone(),
    );
    tokio::spawn(async move {
        let all = async {
            a.wait_until_ready().await?;
            b.wait_until_ready().await?;
            c.wait_until_ready().await?;
            d.wait_until_ready().await
        };
        if all.await.is_ok() {
            flag.store(true, Ordering::Relaxed);
            changed.notify_one();
        }
    });
    Caches {
        namespaces,
        service_accounts,
        secrets,
        pods,
        ready,
    }
}

async fn reconcile_forever(shared: Arc<Shared>, mut leading: watch::Receiver<bool>) {
    let changed = Arc::new(Notify::new());
    let caches = start_caches(&shared.client, changed.clone());
    let mut ca = shared.ca.subscribe();
    let mut next = tokio::time::Instant::now();
    let mut last_warning: Option<tokio::time::Instant> = None;
    let mut last_pass = tokio::time::Instant::now()
        .checked_sub(MIN_PASS_INTERVAL)
        .unwrap_or_else(tokio::time::Instant::now);
    loop {
        tokio::select! {
            _ = changed.notified() => {}
            _ = tokio::time::sleep_until(next) => {}
            _ = leading.changed() => {}
            _ = ca.changed() => {}
        }
        // Coalesce bursts of events (a relist, pods churning across the
        // cluster): at most one pass a second.
        let since = last_pass.elapsed();
        if since < MIN_PASS_INTERVAL {
            tokio::time::sleep(MIN_PASS_INTERVAL - since).await;
        }
        last_pass = tokio::time::Instant::now();
        let leader = *leading.borrow();
        shared.metrics.set_leader(leader);
        if let Err(error) = shared.load_ca().await {
            tracing::warn!(%error, "CA Secret unusable; keeping the last good CA");
        }
        let Some(current) = shared.current_ca() else {
            next = tokio::time::Instant::now() + Duration::from_secs(1);
            continue;
        };
        warn_before_expiry(&shared.config, &current, &mut last_warning);
        next = tokio::time::Instant::now() + shared.config.resync;
        if !leader || !caches.ready.load(Ordering::Relaxed) {
            continue;
        }
        let retry = reconcile_once(&shared, &caches, &current).await;
        if let Some(at) = retry {
            next = next.min(at);
        }
        upkeep_ca_bundle(&shared, &current).await;
    }
}

fn warn_before_expiry(
    config: &ControllerConfig,
    ca: &CaMaterial,
    last: &mut Option<tokio::time::Instant>,
) {
    if last.is_some_and(|t| t.elapsed() < Duration::from_secs(3600)) {
        return;
    }
    let horizon = OffsetDateTime::now_utc() + config.expiry_warning;
    for (what, at) in [
        ("issuer", ca.issuer_not_after),
        ("trust anchor", ca.anchor_not_after),
    ] {
        if at <= horizon {
            tracing::warn!(
                certificate = what,
                expires = %crate::units::format_utc(at.unix_timestamp()),
                "The mesh CA expires soon: rotate it (docs/operations.md)"
            );
            *last = Some(tokio::time::Instant::now());
        }
    }
}

/// One pass: plan from the caches, then issue and delete. Returns when to
/// look again (the soonest renewal, or a retry after failures).
async fn reconcile_once(
    shared: &Shared,
    caches: &Caches,
    ca: &CaMaterial,
) -> Option<tokio::time::Instant> {
    let now = OffsetDateTime::now_utc();
    let mut meshed: BTreeSet<String> = caches
        .namespaces
        .state()
        .iter()
        .filter(|ns| ns.labels().get(INJECT).map(String::as_str) == Some("enabled"))
        .map(|ns| ns.name_any())
        .collect();
    meshed.extend(
        caches
            .pods
            .state()
            .iter()
            .filter(|p| p.annotations().get(INJECT).map(String::as_str) == Some("enabled"))
            .filter_map(|p| p.namespace()),
    );
    let service_accounts: Vec<ServiceAccountRef> = caches
        .service_accounts
        .state()
        .iter()
        .filter_map(|sa| {
            Some(ServiceAccountRef {
                namespace: sa.namespace()?,
                name: sa.name_any(),
                uid: sa.uid()?,
            })
        })
        .collect();
    let secrets: Vec<IdentitySecret> = caches
        .secrets
        .state()
        .iter()
        .filter_map(|s| {
            Some(IdentitySecret {
                namespace: s.namespace()?,
                name: s.name_any(),
                service_account: s.labels().get(identities::SERVICE_ACCOUNT_LABEL).cloned(),
                data: s
                    .data
                    .iter()
                    .flatten()
                    .map(|(k, v)| (k.clone(), v.0.clone()))
                    .collect(),
            })
        })
        .collect();
    bind_policy_readers(shared, &meshed).await;
    let plan = identities::plan(&meshed, &service_accounts, &secrets, ca, now);
    shared
        .metrics
        .set_soonest_identity_expiry(plan.soonest_expiry);
    let mut failed = false;
    for action in plan.actions {
        match action {
            Action::Issue {
                service_account,
                reason,
            } => {
                if let Err(error) = issue(shared, ca, &service_account, now).await {
                    failed = true;
                    shared.metrics.failure("write");
                    tracing::warn!(
                        namespace = %service_account.namespace,
                        service_account = %service_account.name,
                        %error,
                        "Cannot write the identity Secret; retrying"
                    );
                } else {
                    shared.metrics.issued("identity", reason.label());
                    tracing::info!(
                        namespace = %service_account.namespace,
                        service_account = %service_account.name,
                        reason = reason.label(),
                        "Issued an identity"
                    );
                }
            }
            Action::Delete { namespace, name } => {
                let api: Api<Secret> = Api::namespaced(shared.client.clone(), &namespace);
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {
                        shared.metrics.deleted();
                        tracing::info!(%namespace, secret = %name, "Removed an identity whose ServiceAccount is gone");
                    }
                    Err(kube::Error::Api(e)) if e.code == 404 => {}
                    Err(error) => {
                        failed = true;
                        tracing::warn!(%namespace, secret = %name, %error, "Cannot remove an identity");
                    }
                }
            }
        }
    }
    let retry = failed.then(|| tokio::time::Instant::now() + Duration::from_secs(2));
    let renewal = plan.next_renewal.map(|at| {
        let wait = (at - OffsetDateTime::now_utc()).max(time::Duration::ZERO);
        tokio::time::Instant::now() + Duration::try_from(wait).unwrap_or(Duration::ZERO)
    });
    match (retry, renewal) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Lets the proxies of each meshed namespace read that namespace's
/// policies, and nothing else (a RoleBinding to the chart's ClusterRole
/// for the namespace's service accounts).
async fn bind_policy_readers(shared: &Shared, meshed: &BTreeSet<String>) {
    for namespace in meshed {
        let due = shared.bound.lock().ok().is_some_and(|bound| {
            bound
                .get(namespace)
                .is_none_or(|at| at.elapsed() >= REBIND_EVERY)
        });
        if !due {
            continue;
        }
        let binding = serde_json::json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {
                "name": POLICY_READER,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/managed-by": "outrider"},
            },
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": POLICY_READER,
            },
            "subjects": [{
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Group",
                "name": format!("system:serviceaccounts:{namespace}"),
            }],
        });
        let api: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
            Api::namespaced(shared.client.clone(), namespace);
        match api
            .patch(
                POLICY_READER,
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&binding),
            )
            .await
        {
            Ok(_) => {
                if let Ok(mut bound) = shared.bound.lock() {
                    bound.insert(namespace.clone(), tokio::time::Instant::now());
                }
            }
            Err(error) => {
                shared.metrics.failure("policy_reader_binding");
                tracing::warn!(%namespace, %error, "Cannot bind the policy reader role");
            }
        }
    }
}

async fn issue(
    shared: &Shared,
    ca: &CaMaterial,
    sa: &ServiceAccountRef,
    now: OffsetDateTime,
) -> Result<(), String> {
    let id = SpiffeId::parse(&format!(
        "spiffe://{}/ns/{}/sa/{}",
        ca.trust_domain, sa.namespace, sa.name
    ))
    .map_err(|e| e.to_string())?;
    let svid = ca
        .signing
        .issue(&id, shared.config.identity_lifetime, now)
        .map_err(|e| e.to_string())?;
    let secret = identities::desired_secret(sa, &svid, &ca.bundle_pem);
    let api: Api<Secret> = Api::namespaced(shared.client.clone(), &sa.namespace);
    let name = crate::inject::pod::identity_secret_name(&sa.name);
    // Server-side apply with a fixed manager; forced, because these
    // Secrets are ours alone and a stale manager must not block renewal.
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&secret),
    )
    .await
    .map(|_| ())
    .map_err(|e| e.to_string())
}

/// Keeps the webhook configuration's caBundle equal to the trust bundle.
async fn upkeep_ca_bundle(shared: &Shared, ca: &CaMaterial) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(shared.client.clone());
    let name = &shared.config.webhook_config;
    let mut config = match api.get_opt(name).await {
        Ok(Some(config)) => config,
        Ok(None) => return,
        Err(error) => {
            tracing::warn!(%error, webhook = %name, "Cannot read the webhook configuration");
            return;
        }
    };
    let bundle = ByteString(ca.bundle_pem.clone().into_bytes());
    let mut changed = false;
    for hook in config.webhooks.iter_mut().flatten() {
        if hook.client_config.ca_bundle.as_ref() != Some(&bundle) {
            hook.client_config.ca_bundle = Some(bundle.clone());
            changed = true;
        }
    }
    if !changed {
        return;
    }
    // The resourceVersion we read makes a concurrent edit a 409; the next
    // pass reads again.
    match api.replace(name, &PostParams::default(), &config).await {
        Ok(_) => tracing::info!(webhook = %name, "Updated the webhook caBundle"),
        Err(error) => tracing::warn!(%error, webhook = %name, "Cannot update the webhook caBundle"),
    }
}
