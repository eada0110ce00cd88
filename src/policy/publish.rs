//! The compiled policy the proxy reads, and the task that keeps it
//! current.
//!
//! Sources (a directory of YAML, the Kubernetes API) deliver complete sets
//! of objects; the workload's labels may change too (the downward-API
//! file). The [`Publisher`] judges new objects, logs and counts the invalid
//! ones, recompiles, and publishes on a `watch` channel ([`PolicyRx`]). A
//! source that fails keeps its last complete set; nothing is published as
//! synced until a source has delivered one.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use prometheus::{IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};
use tokio::sync::{mpsc, watch};

use super::index::{Settings, Workload, WorkloadPolicy, compile};
use super::limits::RateLimitPolicy;
use super::model::{Kind, PeerAuth, Policy, RequestAuthn};
use super::objects::ObjectSet;

/// The policy in force for this workload.
pub type PolicyRx = watch::Receiver<Arc<WorkloadPolicy>>;

/// What sources tell the publisher.
#[derive(Debug)]
pub enum Update {
    /// The complete current set of objects.
    Objects(ObjectSet),
    /// The workload's current labels.
    Labels(BTreeMap<String, String>),
}

/// Policy-source metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    objects: IntGaugeVec,
    invalid: IntCounterVec,
    updates: IntCounter,
    synced: IntGauge,
    source_errors: IntCounterVec,
}

impl Metrics {
    pub fn new(registry: &Registry) -> prometheus::Result<Self> {
        let objects = IntGaugeVec::new(
            Opts::new(
                "policy_objects",
                "Policy objects applying to this workload's namespace, by kind and validity.",
            ),
            &["kind", "state"],
        )?;
        let invalid = IntCounterVec::new(
            Opts::new(
                "policy_invalid_total",
                "Invalid policy objects seen (each version counted once); they take their fail-safe form.",
            ),
            &["kind"],
        )?;
        let updates = IntCounter::new(
            "policy_updates_total",
            "Times the compiled policy was republished.",
        )?;
        let synced = IntGauge::new(
            "policy_synced",
            "1 once the policy source has delivered a complete state.",
        )?;
        let source_errors = IntCounterVec::new(
            Opts::new(
                "policy_source_errors_total",
                "Failures reading the policy source; the last good state stays in force.",
            ),
            &["source", "reason"],
        )?;
        registry.register(Box::new(objects.clone()))?;
        registry.register(Box::new(invalid.clone()))?;
        registry.register(Box::new(updates.clone()))?;
        registry.register(Box::new(synced.clone()))?;
        registry.register(Box::new(source_errors.clone()))?;
        Ok(Self {
            objects,
            invalid,
            updates,
            synced,
            source_errors,
        })
    }

    pub fn source_error(&self, source: &str, reason: &str) {
        self.source_errors
            .with_label_values(&[source, reason])
            .inc();
    }
}

/// Judges objects and republishes the compiled policy.
pub struct Publisher {
    workload: Workload,
    settings: Settings,
    objects: Option<ObjectSet>,
    /// False while the labels are still to come from a downward-API file:
    /// until then selectors cannot be evaluated, and a DENY that selects
    /// this workload by label would be missed.
    labels_known: bool,
    judged: Judged,
    /// Invalid object versions already logged and counted.
    reported: HashSet<(Kind, String, String, String)>,
    metrics: Metrics,
    tx: watch::Sender<Arc<WorkloadPolicy>>,
}

impl Publisher {
    /// Starts unsynced: only probes pass until a source delivers (and,
    /// with `labels_from_file`, until the labels have been read).
    pub fn new(
        workload: Workload,
        settings: Settings,
        labels_from_file: bool,
        metrics: Metrics,
    ) -> (Self, PolicyRx) {
        let (tx, rx) = watch::channel(Arc::new(WorkloadPolicy::unsynced(&workload, &settings)));
        (
            Self {
                workload,
                settings,
                objects: None,
                labels_known: !labels_from_file,
                judged: Judged::default(),
                reported: HashSet::new(),
                metrics,
                tx,
            },
            rx,
        )
    }

    /// A publisher that is synced from the start with no objects: for a
    /// proxy configured without a policy source.
    pub fn without_source(workload: Workload, settings: Settings, metrics: Metrics) -> PolicyRx {
        let (mut publisher, rx) = Self::new(workload, settings, false, metrics);
        publisher.apply(Update::Objects(ObjectSet::new()));
        rx
    }

    /// Applies updates until every sender is gone. Judging and compiling
    /// run on a blocking thread (a large policy costs that thread time,
    /// never the data plane's), and a burst of updates is applied as one.
    pub async fn run(mut self, mut updates: mpsc::Receiver<Update>) {
        while let Some(first) = updates.recv().await {
            let mut batch = vec![first];
            while let Ok(more) = updates.try_recv() {
                batch.push(more);
            }
            let publisher = self;
            let applied = tokio::task::spawn_blocking(move || {
                let mut publisher = publisher;
                publisher.apply_all(batch);
                publisher
            })
            .await;
            match applied {
                Ok(publisher) => self = publisher,
                Err(_) => return,
            }
        }
    }

    /// Applies a batch: only the last object set counts, every label
    /// change in order, and the policy is compiled once.
    fn apply_all(&mut self, batch: Vec<Update>) {
        let last_objects = batch.iter().rposition(|u| matches!(u, Update::Objects(_)));
        let mut changed = false;
        for (i, update) in batch.into_iter().enumerate() {
            let superseded = matches!(update, Update::Objects(_)) && Some(i) != last_objects;
            if !superseded {
                changed |= self.stage(update);
            }
        }
        if changed {
            self.publish();
        }
    }

    /// Applies one update and republishes if it changed anything.
    pub fn apply(&mut self, update: Update) {
        if self.stage(update) {
            self.publish();
        }
    }

    /// Takes an update in; false when it changes nothing.
    fn stage(&mut self, update: Update) -> bool {
        match update {
            Update::Objects(objects) => {
                self.judged = self.judge(&objects);
                self.objects = Some(objects);
                true
            }
            Update::Labels(labels) => {
                if self.labels_known && labels == self.workload.labels {
                    return false;
                }
                tracing::info!(?labels, "Workload labels read");
                self.workload.labels = labels;
                self.labels_known = true;
                true
            }
        }
    }

    /// Compiles what applies to the workload now and publishes it.
    fn publish(&mut self) {
        let synced = self.objects.is_some() && self.labels_known;
        let compiled = compile(
            &self.workload,
            &self.settings,
            &self.judged.policies,
            &self.judged.peer_auths,
            synced,
        )
        .with_request_authentication(&self.workload, &self.judged.request_authns)
        .with_rate_limits(&self.workload, &self.judged.rate_limits);
        tracing::debug!(
            deny = compiled.deny.len(),
            allow = compiled.allow.len(),
            audit = compiled.audit.len(),
            mtls = ?compiled.mtls,
            "Policy compiled"
        );
        for id in &compiled.http_only_rules {
            tracing::debug!(policy = %id, "Policy has HTTP conditions; on opaque connections they never match an ALLOW and always match a DENY");
        }
        self.metrics.synced.set(i64::from(synced));
        self.metrics.updates.inc();
        self.tx.send_replace(Arc::new(compiled));
    }

    fn judge(&mut self, objects: &ObjectSet) -> Judged {
        let in_namespace = objects
            .values()
            .filter(|o| o.namespace == self.workload.namespace);
        let mut judged = Judged::default();
        let mut counts: BTreeMap<(Kind, bool), i64> = BTreeMap::new();
        for object in in_namespace {
            let problems = match object.kind {
                Kind::AuthorizationPolicy => {
                    let policy = Policy::from_object(object);
                    let problems = policy.problems.clone();
                    judged.policies.push(Arc::new(policy));
                    problems
                }
                Kind::PeerAuthentication => {
                    let peer_auth = PeerAuth::from_object(object);
                    let problems = peer_auth.problems.clone();
                    judged.peer_auths.push(peer_auth);
                    problems
                }
                Kind::RequestAuthentication => {
                    let authn = RequestAuthn::from_object(object);
                    let problems = authn.problems.clone();
                    judged.request_authns.push(authn);
                    problems
                }
                Kind::LocalRateLimitPolicy => {
                    let limits = RateLimitPolicy::from_object(object);
                    let problems = limits.problems.clone();
                    judged.rate_limits.push(Arc::new(limits));
                    problems
                }
            };
            *counts
                .entry((object.kind, problems.is_empty()))
                .or_default() += 1;
            if !problems.is_empty() {
                if self.reported.len() >= 4096 {
                    self.reported.clear();
                }
                let key = (
                    object.kind,
                    object.namespace.clone(),
                    object.name.clone(),
                    object.spec.to_string(),
                );
                if self.reported.insert(key) {
                    self.metrics
                        .invalid
                        .with_label_values(&[object.kind.as_str()])
                        .inc();
                    tracing::warn!(
                        kind = object.kind.as_str(),
                        namespace = %object.namespace,
                        name = %object.name,
                        problems = ?problems,
                        "Invalid policy object; applying its fail-safe form"
                    );
                }
            }
        }
        for kind in [
            Kind::AuthorizationPolicy,
            Kind::PeerAuthentication,
            Kind::RequestAuthentication,
            Kind::LocalRateLimitPolicy,
        ] {
            for (valid, state) in [(true, "valid"), (false, "invalid")] {
                let n = counts.get(&(kind, valid)).copied().unwrap_or(0);
                self.metrics
                    .objects
                    .with_label_values(&[kind.as_str(), state])
                    .set(n);
            }
        }
        judged
    }
}

/// The namespace's objects, judged.
#[derive(Debug, Default)]
struct Judged {
    policies: Vec<Arc<Policy>>,
    peer_auths: Vec<PeerAuth>,
    request_authns: Vec<RequestAuthn>,
    rate_limits: Vec<Arc<RateLimitPolicy>>,
}

#[cfg(test)]
mod tests;
