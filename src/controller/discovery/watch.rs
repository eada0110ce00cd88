//! The watches that feed the discovery index: Services, EndpointSlices
//! (discovery.k8s.io/v1) and Pods, each a kube-rs watcher whose events
//! become index changes. A relist (the watcher's Init … InitDone) also
//! removes what the new list no longer holds.

use std::collections::BTreeSet;
use std::sync::Arc;

use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::task::JoinSet;

use super::index::{Affected, Index, Key};
use super::registry::Registry;
use crate::controller::metrics::ControllerMetrics;
use crate::kube_client::WatchBackoff;

type Apply<K> = fn(&mut Index, &K) -> Vec<Affected>;
type Delete = fn(&mut Index, &str, &str) -> Vec<Affected>;

/// The sources [`start`] feeds the registry from, by the names it gives
/// [`Registry::source_synced`].
pub const SOURCES: [&str; 3] = ["Service", "EndpointSlice", "Pod"];

/// Starts the three watches; they run until `tasks` is dropped.
pub fn start(
    client: &Client,
    registry: &Arc<Registry>,
    metrics: &ControllerMetrics,
    tasks: &mut JoinSet<()>,
) {
    tasks.spawn(feed(
        Api::<Service>::all(client.clone()),
        Fed::new(registry, metrics, SOURCES[0]),
        Index::apply_service,
        Index::delete_service,
    ));
    tasks.spawn(feed(
        Api::<EndpointSlice>::all(client.clone()),
        Fed::new(registry, metrics, SOURCES[1]),
        Index::apply_slice,
        Index::delete_slice,
    ));
    tasks.spawn(feed(
        Api::<Pod>::all(client.clone()),
        Fed::new(registry, metrics, SOURCES[2]),
        Index::apply_pod,
        Index::delete_pod,
    ));
}

/// Where one watch's changes go, counted.
struct Fed {
    registry: Arc<Registry>,
    metrics: ControllerMetrics,
    kind: &'static str,
}

impl Fed {
    fn new(registry: &Arc<Registry>, metrics: &ControllerMetrics, kind: &'static str) -> Self {
        Self {
            registry: registry.clone(),
            metrics: metrics.clone(),
            kind,
        }
    }

    fn update(&self, change: impl FnOnce(&mut Index) -> Vec<Affected>) {
        self.metrics.discovery_change(self.kind);
        self.registry.update(change);
    }
}

async fn feed<K>(api: Api<K>, fed: Fed, apply: Apply<K>, delete: Delete)
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let stream = watcher(api, watcher::Config::default()).backoff(WatchBackoff::default());
    let mut stream = std::pin::pin!(stream);
    let mut known: BTreeSet<Key> = BTreeSet::new();
    let mut relisted: BTreeSet<Key> = BTreeSet::new();
    let key = |object: &K| -> Option<Key> { Some((object.namespace()?, object.name_any())) };
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(object)) => {
                if let Some(k) = key(&object) {
                    known.insert(k);
                }
                fed.update(|index| apply(index, &object));
            }
            Ok(watcher::Event::Delete(object)) => {
                if let Some((ns, name)) = key(&object) {
                    fed.update(|index| delete(index, &ns, &name));
                    known.remove(&(ns, name));
                }
            }
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitApply(object)) => {
                if let Some(k) = key(&object) {
                    relisted.insert(k);
                }
                fed.update(|index| apply(index, &object));
            }
            Ok(watcher::Event::InitDone) => {
                for (ns, name) in known.difference(&relisted) {
                    fed.update(|index| delete(index, ns, name));
                }
                known = std::mem::take(&mut relisted);
                fed.registry.source_synced(fed.kind);
            }
            // The watcher retries with backoff; the index keeps its last
            // state meanwhile (proxies keep their last answers).
            Err(error) => tracing::warn!(%error, "Discovery watch failed; retrying with backoff"),
        }
    }
}
