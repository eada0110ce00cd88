//! The leader's reconcile loop: kube-rs caches of namespaces, service
//! accounts, identity Secrets and pod metadata; on every change (at most
//! once a second) and at least every resync, a pure plan
//! ([`super::identities::plan`]) from them, then the writes it asks for,
//! the policy-reader bindings and the webhook's caBundle.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, ServiceAccount};
use kube::api::{Api, DeleteParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use time::OffsetDateTime;
use tokio::sync::{Notify, watch};

use super::ca::warn_before_expiry;
use super::conflicts::{FirstWrite, ObjectKey, Written};
use super::identities::{self, Action, IDENTITY_LABEL, IdentitySecret, ServiceAccountRef};
use super::ownership::claim_identity_secret;
use super::{Controller, Error};
use crate::ca::secret::CaMaterial;
use crate::identity::SpiffeId;
use crate::inject::config::{INJECT, PodChoice, pod_choice};
use crate::kube_client::WatchBackoff;

/// The reconciler looks at everything at most this often.
const MIN_PASS_INTERVAL: Duration = Duration::from_secs(1);

/// The caches the reconciler reads (the webhook reads the namespaces too).
pub(super) struct Caches {
    pub(super) namespaces: Store<Namespace>,
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
    let stream =
        reflector::reflector(writer, watcher(api, config)).backoff(WatchBackoff::default());
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

/// Starts the watches; every event pokes `changed`.
pub(super) fn start_caches(client: &Client, changed: Arc<Notify>) -> Caches {
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

pub(super) async fn reconcile_forever(
    controller: Arc<Controller>,
    caches: Caches,
    changed: Arc<Notify>,
    mut leading: watch::Receiver<bool>,
) {
    let mut ca = controller.ca.subscribe();
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
        controller.metrics.set_leader(leader);
        if let Err(error) = controller.load_ca().await {
            tracing::warn!(%error, reason = error.label(), "CA Secret unusable; keeping the last good CA");
        }
        let Some(current) = controller.current_ca() else {
            next = tokio::time::Instant::now() + Duration::from_secs(1);
            continue;
        };
        warn_before_expiry(&controller.config, &current, &mut last_warning);
        next = tokio::time::Instant::now() + controller.config.resync;
        if !leader || !caches.ready.load(Ordering::Relaxed) {
            continue;
        }
        let retry = reconcile_once(&controller, &caches, &current).await;
        if let Some(at) = retry {
            next = next.min(at);
        }
        upkeep_ca_bundle(&controller, &current).await;
    }
}

/// One pass: plan from the caches, then issue and delete. Returns when to
/// look again (the soonest renewal, or a retry after failures).
async fn reconcile_once(
    controller: &Controller,
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
            .filter(|p| {
                pod_choice(
                    p.annotations().get(INJECT).map(String::as_str),
                    p.labels().get(INJECT).map(String::as_str),
                ) == PodChoice::Enabled
            })
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
    let wanted: BTreeSet<ObjectKey> = service_accounts.iter().map(identity_key).collect();
    controller
        .conflicts
        .forget_unwanted("Secret", |key| wanted.contains(key));
    controller
        .conflicts
        .forget_unwanted("RoleBinding", |key| meshed.contains(&key.namespace));
    super::rbac::bind_policy_readers(controller, &meshed).await;
    let plan = identities::plan(&meshed, &service_accounts, &secrets, ca, now);
    controller
        .metrics
        .set_soonest_identity_expiry(plan.soonest_expiry);
    let mut failed = false;
    for action in plan.actions {
        match action {
            Action::Issue {
                service_account,
                reason,
            } => {
                let key = identity_key(&service_account);
                if controller.conflicts.blocked(&key) {
                    continue;
                }
                // Nothing of ours in the cache: create, so that a foreign
                // Secret holding the name is noticed, not overwritten.
                let first = match reason {
                    identities::Reason::Missing => FirstWrite::Create,
                    _ => FirstWrite::Apply,
                };
                match issue(controller, ca, &service_account, &key, first, now).await {
                    Ok(Written::Done) => {
                        controller.metrics.issued("identity", reason.label());
                        tracing::info!(
                            namespace = %service_account.namespace,
                            service_account = %service_account.name,
                            reason = reason.label(),
                            "Issued an identity"
                        );
                    }
                    Ok(Written::LeftAlone) => {}
                    Err(error) => {
                        failed = true;
                        let cause = match error {
                            Error::Issue(_) | Error::Id(_) => "issue",
                            _ => "write",
                        };
                        controller.metrics.failure(cause);
                        tracing::warn!(
                            namespace = %service_account.namespace,
                            service_account = %service_account.name,
                            %error,
                            reason = error.label(),
                            "Cannot write the identity Secret; retrying"
                        );
                    }
                }
            }
            Action::Delete { namespace, name } => {
                let api: Api<Secret> = Api::namespaced(controller.client.clone(), &namespace);
                match api.delete(&name, &DeleteParams::default()).await {
                    Ok(_) => {
                        controller.metrics.deleted();
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

fn identity_key(sa: &ServiceAccountRef) -> ObjectKey {
    ObjectKey {
        kind: "Secret",
        namespace: sa.namespace.clone(),
        name: crate::inject::pod::identity_secret_name(&sa.name),
    }
}

/// Writes a fresh identity Secret for `sa` under `key`.
async fn issue(
    controller: &Controller,
    ca: &CaMaterial,
    sa: &ServiceAccountRef,
    key: &ObjectKey,
    first: FirstWrite,
    now: OffsetDateTime,
) -> Result<Written, Error> {
    let id = SpiffeId::workload(&ca.trust_domain, &sa.namespace, &sa.name)?;
    let svid = ca
        .signing
        .issue(&id, controller.config.identity_lifetime, now)?;
    let secret: Secret =
        serde_json::from_value(identities::desired_secret(sa, &svid, &ca.bundle_pem))
            .map_err(Error::Encode)?;
    let api: Api<Secret> = Api::namespaced(controller.client.clone(), &sa.namespace);
    let consequence = format!(
        "pods running as ServiceAccount {} get no identity and never become ready",
        sa.name
    );
    let written = controller
        .conflicts
        .write(
            &api,
            key,
            &secret,
            first,
            claim_identity_secret,
            &consequence,
        )
        .await?;
    Ok(written)
}

/// Keeps the webhook configuration's caBundle equal to the trust bundle.
async fn upkeep_ca_bundle(controller: &Controller, ca: &CaMaterial) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(controller.client.clone());
    let name = &controller.config.webhook_config;
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
    match api.replace(name, &super::write_params(), &config).await {
        Ok(_) => tracing::info!(webhook = %name, "Updated the webhook caBundle"),
        Err(error) => tracing::warn!(%error, webhook = %name, "Cannot update the webhook caBundle"),
    }
}
