//! Writing an object under one of the controller's names when an object
//! of that name may already be there: the write, and when the API server
//! refuses it (the name is taken, an immutable field differs), the look
//! at what is there, the decision of [`super::ownership`], and acting on
//! it — replace it (a delete guarded by its uid and resourceVersion, so a
//! concurrent edit is never lost, then our object) or leave it alone.
//!
//! Every foreign object met is reported three ways: a Kubernetes Event on
//! it (`kubectl describe` shows it), a log line naming it, and the
//! metrics `outrider_controller_foreign_objects_total{kind,resolution}`
//! and `outrider_controller_objects_left_alone{kind}`. One left alone is
//! not retried blindly: the controller looks at it again once a minute
//! (or every resync, if shorter: a create refused and one GET) and
//! reports again only when it has changed.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, Preconditions};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource};
use parking_lot::Mutex;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::metrics::ControllerMetrics;
use super::ownership::{Claim, Keeper, Mismatch, Resolution};
use super::{FIELD_MANAGER, write_params};

/// How often an object left alone is looked at again, at most.
pub const LOOK_AGAIN: Duration = Duration::from_secs(60);

/// One object under one of our names.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectKey {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The first write to try.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FirstWrite {
    /// We believe nothing is there (a create, refused if something is).
    Create,
    /// We believe ours is there (a forced server-side apply).
    Apply,
}

/// How a write ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Written {
    Done,
    /// A foreign object holds the name and stays (reported).
    LeftAlone,
}

struct Held {
    resource_version: Option<String>,
    look_again: tokio::time::Instant,
}

/// The objects left alone, and how foreign objects are reported.
pub struct Conflicts {
    recorder: Recorder,
    metrics: ControllerMetrics,
    held: Mutex<BTreeMap<ObjectKey, Held>>,
    look_again: Duration,
}

impl Conflicts {
    /// `resync` is the controller's slowest pass; a held object is looked
    /// at again no later than that.
    pub fn new(
        client: Client,
        instance: &str,
        metrics: ControllerMetrics,
        resync: Duration,
    ) -> Self {
        let reporter = Reporter {
            controller: FIELD_MANAGER.into(),
            instance: Some(instance.into()),
        };
        Self {
            recorder: Recorder::new(client, reporter),
            metrics,
            held: Mutex::new(BTreeMap::new()),
            look_again: resync.min(LOOK_AGAIN),
        }
    }

    /// Whether `key` is held by a foreign object we leave alone and it is
    /// not yet time to look at it again.
    pub fn blocked(&self, key: &ObjectKey) -> bool {
        self.held
            .lock()
            .get(key)
            .is_some_and(|held| tokio::time::Instant::now() < held.look_again)
    }

    /// Writes `desired` under `key`; `claim` judges what holds the name
    /// when the first write is refused. `consequence` says, for the
    /// report, what breaks while a foreign object stays.
    pub async fn write<K>(
        &self,
        api: &Api<K>,
        key: &ObjectKey,
        desired: &K,
        first: FirstWrite,
        claim: impl Fn(&K) -> Claim,
        consequence: &str,
    ) -> Result<Written, kube::Error>
    where
        K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
    {
        let refused = match first {
            FirstWrite::Create => api.create(&write_params(), desired).await.err(),
            FirstWrite::Apply => apply(api, key, desired).await.err(),
        };
        match (first, refused) {
            (_, None) => {
                self.settled(key);
                return Ok(Written::Done);
            }
            // The name is taken (create) or an immutable field differs
            // (apply): look at what is there.
            (FirstWrite::Create, Some(kube::Error::Api(e))) if e.code == 409 => {}
            (FirstWrite::Apply, Some(kube::Error::Api(e))) if e.code == 422 => {}
            (_, Some(other)) => return Err(other),
        }
        let Some(existing) = api.get_opt(&key.name).await? else {
            // Deleted since: ours to create.
            api.create(&write_params(), desired).await?;
            self.settled(key);
            return Ok(Written::Done);
        };
        match claim(&existing) {
            Claim::Ours => {
                apply(api, key, desired).await?;
                self.settled(key);
                Ok(Written::Done)
            }
            Claim::Foreign {
                mismatch,
                resolution: Resolution::Replace,
            } => {
                let written = if mismatch.needs_new_object() {
                    remove_exactly(api, key, existing.meta()).await?;
                    api.create(&write_params(), desired).await?
                } else {
                    apply(api, key, desired).await?
                };
                self.settled(key);
                self.report_replaced(key, written.meta(), &mismatch).await;
                Ok(Written::Done)
            }
            Claim::Foreign {
                mismatch,
                resolution: Resolution::LeaveAlone(keeper),
            } => {
                self.hold(key, existing.meta(), &mismatch, &keeper, consequence)
                    .await;
                Ok(Written::LeftAlone)
            }
        }
    }

    /// Forgets the held objects of `kind` that are no longer wanted (their
    /// ServiceAccount or namespace is gone), so the gauge does not count
    /// them forever.
    pub fn forget_unwanted(&self, kind: &str, wanted: impl Fn(&ObjectKey) -> bool) {
        let mut held = self.held.lock();
        let before = held.len();
        held.retain(|key, _| key.kind != kind || wanted(key));
        if held.len() != before {
            self.metrics.set_left_alone(kind, count(&held, kind));
        }
    }

    fn settled(&self, key: &ObjectKey) {
        let mut held = self.held.lock();
        if held.remove(key).is_some() {
            self.metrics
                .set_left_alone(key.kind, count(&held, key.kind));
            tracing::info!(object = %key, "A foreign object no longer holds the name");
        }
    }

    async fn hold(
        &self,
        key: &ObjectKey,
        meta: &ObjectMeta,
        mismatch: &Mismatch,
        keeper: &Keeper,
        consequence: &str,
    ) {
        let changed = {
            let mut held = self.held.lock();
            let look_again = tokio::time::Instant::now() + self.look_again;
            let previous = held.insert(
                key.clone(),
                Held {
                    resource_version: meta.resource_version.clone(),
                    look_again,
                },
            );
            self.metrics
                .set_left_alone(key.kind, count(&held, key.kind));
            previous.is_none_or(|p| p.resource_version != meta.resource_version)
        };
        if !changed {
            return;
        }
        self.metrics.foreign_object(key.kind, "left_alone");
        let note = format!(
            "{key} is not outrider's ({mismatch}) and is {keeper}, so outrider leaves it alone: \
             {consequence} until it is removed or renamed (see docs/operations.md)"
        );
        tracing::warn!(object = %key, %mismatch, %keeper, "{note}");
        self.publish(key, meta, "ForeignObjectLeftAlone", "Skip", note)
            .await;
    }

    async fn report_replaced(&self, key: &ObjectKey, meta: &ObjectMeta, mismatch: &Mismatch) {
        self.metrics.foreign_object(key.kind, "replaced");
        let note = format!(
            "Replaced {key}: {mismatch}; the name is reserved for outrider (see docs/operations.md)"
        );
        tracing::warn!(object = %key, %mismatch, "{note}");
        self.publish(key, meta, "ForeignObjectReplaced", "Replace", note)
            .await;
    }

    async fn publish(
        &self,
        key: &ObjectKey,
        meta: &ObjectMeta,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let reference = ObjectReference {
            api_version: Some(api_version(key.kind).into()),
            kind: Some(key.kind.into()),
            namespace: Some(key.namespace.clone()),
            name: Some(key.name.clone()),
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
            field_path: None,
        };
        let event = Event {
            type_: EventType::Warning,
            reason: reason.into(),
            note: Some(note),
            action: action.into(),
            secondary: None,
        };
        // The log line and the metric already say it; an event that
        // cannot be written (RBAC, a 1.x server without events.k8s.io)
        // is not worth failing the write for.
        if let Err(error) = self.recorder.publish(&event, &reference).await {
            tracing::debug!(%error, object = %key, "Cannot record an event");
        }
    }
}

fn count(held: &BTreeMap<ObjectKey, Held>, kind: &str) -> usize {
    held.keys().filter(|k| k.kind == kind).count()
}

fn api_version(kind: &str) -> &'static str {
    match kind {
        "RoleBinding" => "rbac.authorization.k8s.io/v1",
        _ => "v1",
    }
}

/// A forced server-side apply (these names are ours alone, and a stale
/// manager must not block renewal).
async fn apply<K>(api: &Api<K>, key: &ObjectKey, desired: &K) -> Result<K, kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    api.patch(
        &key.name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(desired),
    )
    .await
}

/// Deletes exactly the object we looked at: if it changed or was replaced
/// meanwhile, the API server refuses (409) and the next pass looks again.
async fn remove_exactly<K>(
    api: &Api<K>,
    key: &ObjectKey,
    meta: &ObjectMeta,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + DeserializeOwned,
{
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: meta.uid.clone(),
            resource_version: meta.resource_version.clone(),
        }),
        ..DeleteParams::default()
    };
    match api.delete(&key.name, &params).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e),
    }
}
