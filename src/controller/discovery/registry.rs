//! The shared index and its subscribers: every change to the index
//! names what it affects (a Service, a pod IP), and only the streams
//! resolving a target that depends on one of those are woken to compute
//! a new answer. A stream sends an answer only when it differs from the
//! last one it sent, and nothing before every source has delivered its
//! first full list: a controller that just started knows no Service yet,
//! and "unknown" would send proxies to original destinations with weaker
//! identity checks than the ones they already hold.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, RwLock};
use tokio::sync::{Notify, watch};

use super::index::{Affected, Index, Resolution, Target};

/// The index, and who waits on what.
#[derive(Debug)]
pub struct Registry {
    index: RwLock<Index>,
    waiting: Mutex<HashMap<Affected, Vec<Weak<Notify>>>>,
    /// The sources still to deliver their first full list.
    unsynced: Mutex<BTreeSet<&'static str>>,
    synced: watch::Sender<bool>,
}

impl Registry {
    /// A registry over a complete index (local mode, tests).
    pub fn new(index: Index) -> Arc<Self> {
        Self::awaiting(index, &[])
    }

    /// A registry that answers nobody until each of `sources` has called
    /// [`Self::source_synced`].
    pub fn awaiting(index: Index, sources: &[&'static str]) -> Arc<Self> {
        Arc::new(Self {
            index: RwLock::new(index),
            waiting: Mutex::new(HashMap::new()),
            unsynced: Mutex::new(sources.iter().copied().collect()),
            synced: watch::channel(sources.is_empty()).0,
        })
    }

    /// `source` has delivered a full list.
    pub fn source_synced(&self, source: &'static str) {
        let mut unsynced = self.unsynced.lock();
        if unsynced.remove(source) && unsynced.is_empty() {
            self.synced.send_replace(true);
        }
    }

    /// Waits until every source has delivered a full list.
    pub async fn wait_synced(&self) {
        let mut synced = self.synced.subscribe();
        let _ = synced.wait_for(|synced| *synced).await;
    }

    /// Changes the index and wakes the subscribers of what changed.
    pub fn update(&self, change: impl FnOnce(&mut Index) -> Vec<Affected>) {
        let affected = change(&mut self.index.write());
        let mut waiting = self.waiting.lock();
        for what in affected {
            let Some(list) = waiting.get_mut(&what) else {
                continue;
            };
            list.retain(|weak| match weak.upgrade() {
                Some(notify) => {
                    notify.notify_one();
                    true
                }
                None => false,
            });
            if list.is_empty() {
                waiting.remove(&what);
            }
        }
    }

    /// The current answer for `target`, and what it depends on.
    pub fn resolve(&self, target: &Target) -> (Resolution, Affected) {
        let index = self.index.read();
        (index.resolve(target), index.depends_on(target))
    }

    /// What `target`'s answer depends on now.
    /// The ServiceAccount the pod `namespace/name` runs as, if known.
    pub fn service_account_of(&self, namespace: &str, name: &str) -> Option<String> {
        self.index
            .read()
            .service_account_of(namespace, name)
            .map(str::to_string)
    }

    pub fn depends_on(&self, target: &Target) -> Affected {
        self.index.read().depends_on(target)
    }

    /// Wakes `notify` on changes to `what` until it is dropped.
    pub fn watch(&self, what: Affected, notify: &Arc<Notify>) {
        self.waiting
            .lock()
            .entry(what)
            .or_default()
            .push(Arc::downgrade(notify));
    }

    /// Stops waking `notify` on changes to `what`.
    pub fn unwatch(&self, what: &Affected, notify: &Arc<Notify>) {
        let mut waiting = self.waiting.lock();
        if let Some(list) = waiting.get_mut(what) {
            list.retain(|weak| !std::ptr::eq(weak.as_ptr(), Arc::as_ptr(notify)));
            if list.is_empty() {
                waiting.remove(what);
            }
        }
    }

    /// How many subscriptions are registered.
    pub fn subscriptions(&self) -> usize {
        self.waiting.lock().values().map(Vec::len).sum()
    }
}

/// One stream's subscription: the next answer that differs from the
/// last one sent.
pub struct Subscription {
    registry: Arc<Registry>,
    target: Target,
    notify: Arc<Notify>,
    watching: Option<Affected>,
    last: Option<Resolution>,
}

impl Subscription {
    pub fn new(registry: Arc<Registry>, target: Target) -> Self {
        Self {
            registry,
            target,
            notify: Arc::new(Notify::new()),
            watching: None,
            last: None,
        }
    }

    /// Waits for an answer different from the last one (the first answer
    /// at once).
    pub async fn next(&mut self) -> Resolution {
        if self.last.is_none() {
            self.registry.wait_synced().await;
        }
        loop {
            // Watch first, then read: a change after the watch leaves a
            // permit in `notify`, so none is missed. A target's dependency
            // can change (an address becomes a Service's ClusterIP): watch
            // the new one, and read again if it moved meanwhile.
            let depends_on = self.registry.depends_on(&self.target);
            if self.watching.as_ref() != Some(&depends_on) {
                if let Some(old) = self.watching.take() {
                    self.registry.unwatch(&old, &self.notify);
                }
                self.registry.watch(depends_on.clone(), &self.notify);
                self.watching = Some(depends_on.clone());
            }
            let (answer, now_depends_on) = self.registry.resolve(&self.target);
            if now_depends_on != depends_on {
                continue;
            }
            if self.last.as_ref() != Some(&answer) {
                self.last = Some(answer.clone());
                return answer;
            }
            self.notify.notified().await;
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Some(what) = self.watching.take() {
            self.registry.unwatch(&what, &self.notify);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use k8s_openapi::api::core::v1::Service;
    use serde_json::json;

    use super::*;
    use crate::identity::TrustDomain;

    fn service(ip: &str) -> Service {
        serde_json::from_value(json!({"metadata": {"name": "web", "namespace": "shop"},
            "spec": {"clusterIPs": [ip], "ports": [{"port": 80}]}}))
        .unwrap()
    }

    fn other() -> Service {
        serde_json::from_value(json!({"metadata": {"name": "db", "namespace": "shop"},
            "spec": {"clusterIPs": ["10.96.0.20"], "ports": [{"port": 5432}]}}))
        .unwrap()
    }

    #[tokio::test]
    async fn nobody_is_answered_before_every_source_has_listed_in_full() {
        let registry = Registry::awaiting(
            Index::new(TrustDomain::parse("cluster.local").unwrap()),
            &["Service", "Pod"],
        );
        let target = Target::Addr("10.96.0.10:80".parse().unwrap());
        let mut subscription = Subscription::new(registry.clone(), target);
        // A controller that just started knows no Service: "unknown" now
        // would be a lie that weakens the proxy's identity check.
        let early = tokio::time::timeout(Duration::from_millis(50), subscription.next()).await;
        assert!(early.is_err(), "answered before the lists: {early:?}");
        registry.update(|index| index.apply_service(&service("10.96.0.10")));
        registry.source_synced("Service");
        registry.source_synced("Service");
        let early = tokio::time::timeout(Duration::from_millis(50), subscription.next()).await;
        assert!(early.is_err(), "answered before the pods were listed");
        registry.source_synced("Pod");
        let answer = tokio::time::timeout(Duration::from_secs(1), subscription.next())
            .await
            .expect("answered once synced");
        assert!(matches!(answer, Resolution::Endpoints(_)), "{answer:?}");
    }

    #[tokio::test]
    async fn a_subscriber_hears_changes_to_its_target_only_and_never_the_same_answer_twice() {
        let registry = Registry::new(Index::new(TrustDomain::parse("cluster.local").unwrap()));
        let target = Target::Addr("10.96.0.10:80".parse().unwrap());
        let mut subscription = Subscription::new(registry.clone(), target);
        assert_eq!(subscription.next().await, Resolution::Unknown);
        // The address becomes a Service's ClusterIP: a new answer.
        registry.update(|index| index.apply_service(&service("10.96.0.10")));
        let answer = tokio::time::timeout(Duration::from_secs(1), subscription.next())
            .await
            .expect("woken");
        assert!(matches!(answer, Resolution::Endpoints(_)), "{answer:?}");
        // Another Service changing, or the same Service unchanged: nothing.
        registry.update(|index| index.apply_service(&other()));
        registry.update(|index| index.apply_service(&service("10.96.0.10")));
        assert!(
            tokio::time::timeout(Duration::from_millis(100), subscription.next())
                .await
                .is_err()
        );
        // The Service moves away from the address: unknown again.
        registry.update(|index| index.apply_service(&service("10.96.0.11")));
        let answer = tokio::time::timeout(Duration::from_secs(1), subscription.next())
            .await
            .expect("woken");
        assert_eq!(answer, Resolution::Unknown);
        // One registration at a time, gone with the subscription.
        assert_eq!(registry.subscriptions(), 1);
        drop(subscription);
        assert_eq!(registry.subscriptions(), 0);
    }
}
