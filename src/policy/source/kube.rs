//! Cluster mode: `AuthorizationPolicy` and `PeerAuthentication` objects
//! watched through the Kubernetes API, scoped to the pod's own namespace.
//!
//! Objects are read as dynamic JSON, not typed structs, so that an object
//! the API server accepted but our model cannot read still arrives and
//! takes its fail-safe form instead of breaking the whole list. A relist
//! (after `410 Gone` or a reconnect) is buffered and swapped in whole; while
//! the API server is unreachable the last complete state stays in force.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Client, Resource};
use tokio::sync::mpsc;

use crate::policy::crd::{
    AuthorizationPolicy, LocalRateLimitPolicy, PeerAuthentication, RequestAuthentication,
};
use crate::policy::model::{Kind, Object};
use crate::policy::objects::{ObjectSet, object_from_value};
use crate::policy::publish::{Metrics, Update};

/// The state of one kind's watch.
#[derive(Default)]
struct Watched {
    objects: BTreeMap<String, Object>,
    relisting: Option<BTreeMap<String, Object>>,
    synced: bool,
}

/// Watches both kinds in `namespace` and sends the complete set after the
/// first full sync of both, then after every change.
pub async fn run(
    client: Client,
    namespace: String,
    metrics: Metrics,
    updates: mpsc::Sender<Update>,
) {
    let stream = |kind: Kind, resource: ApiResource| {
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &namespace, &resource);
        watcher::watcher(api, watcher::Config::default())
            .backoff(crate::kube_client::WatchBackoff::default())
            .map(move |event| (kind, event))
    };
    let policies = stream(
        Kind::AuthorizationPolicy,
        ApiResource::erase::<AuthorizationPolicy>(&()),
    );
    let peer_auths = stream(
        Kind::PeerAuthentication,
        ApiResource::erase::<PeerAuthentication>(&()),
    );
    let request_authns = stream(
        Kind::RequestAuthentication,
        ApiResource::erase::<RequestAuthentication>(&()),
    );
    let rate_limits = stream(
        Kind::LocalRateLimitPolicy,
        ApiResource::erase::<LocalRateLimitPolicy>(&()),
    );
    let events = futures_util::stream::select_all([
        policies.boxed(),
        peer_auths.boxed(),
        request_authns.boxed(),
        rate_limits.boxed(),
    ]);
    tokio::pin!(events);

    let mut state: BTreeMap<Kind, Watched> = BTreeMap::new();
    let mut last_sent: Option<ObjectSet> = None;
    let mut failing = false;
    while let Some((kind, event)) = events.next().await {
        let watched = state.entry(kind).or_default();
        let changed = match event {
            Ok(event) => {
                if failing {
                    tracing::info!("Kubernetes API reachable again");
                    failing = false;
                }
                apply(watched, kind, event, &namespace)
            }
            Err(error) => {
                metrics.source_error("kubernetes", "watch_failed");
                if !failing {
                    tracing::warn!(kind = kind.as_str(), %error, "Cannot watch policies; keeping the last good ones");
                    failing = true;
                }
                false
            }
        };
        let all_synced = state.len() == 4 && state.values().all(|w| w.synced);
        if changed && all_synced {
            let set: ObjectSet = state
                .values()
                .flat_map(|w| w.objects.values())
                .map(|o| ((o.kind, o.namespace.clone(), o.name.clone()), o.clone()))
                .collect();
            // A relist that found what we already had changes nothing.
            if last_sent.as_ref() == Some(&set) {
                continue;
            }
            last_sent = Some(set.clone());
            if updates.send(Update::Objects(set)).await.is_err() {
                return;
            }
        }
    }
}

/// Applies one watch event; true when the complete state changed.
fn apply(watched: &mut Watched, kind: Kind, event: Event<DynamicObject>, namespace: &str) -> bool {
    let convert = |o: DynamicObject| -> Option<Object> {
        let mut value = serde_json::to_value(&o).ok()?;
        // Items of a list may come without apiVersion and kind; the
        // watcher knows what it watches, and an object dropped here would
        // be a policy silently not enforced.
        value["apiVersion"] = format!(
            "{}/{}",
            crate::policy::crd::GROUP,
            crate::policy::crd::VERSION
        )
        .into();
        value["kind"] = kind.as_str().into();
        object_from_value(value, namespace)?.ok()
    };
    match event {
        Event::Init => {
            watched.relisting = Some(BTreeMap::new());
            false
        }
        Event::InitApply(o) => {
            if let (Some(relisting), Some(object)) = (watched.relisting.as_mut(), convert(o)) {
                relisting.insert(object.name.clone(), object);
            }
            false
        }
        Event::InitDone => {
            watched.objects = watched.relisting.take().unwrap_or_default();
            watched.synced = true;
            true
        }
        Event::Apply(o) => match convert(o) {
            Some(object) => {
                watched.objects.insert(object.name.clone(), object);
                true
            }
            None => false,
        },
        Event::Delete(o) => {
            let name = o.meta().name.clone().unwrap_or_default();
            watched.objects.remove(&name).is_some()
        }
    }
}
