//! The policy objects proxies ask for over the discovery API: every
//! AuthorizationPolicy and PeerAuthentication of the cluster, kept as the
//! API server returns them (JSON, judged by each proxy as if it had read
//! them itself), by namespace, with whether both kinds have been read in
//! full. Until they have, no proxy is sent a set: an empty set would mean
//! "no policies" and let the mesh default apply.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures_util::StreamExt;
use kube::api::{Api, ApiResource, DynamicObject};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use parking_lot::RwLock;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::kube_client::WatchBackoff;
use crate::policy::crd::{
    AuthorizationPolicy, LocalRateLimitPolicy, PeerAuthentication, RequestAuthentication,
};

/// The kinds served, as the proxy names them.
pub const KINDS: [&str; 4] = [
    "AuthorizationPolicy",
    "PeerAuthentication",
    "RequestAuthentication",
    "LocalRateLimitPolicy",
];

/// One object: its kind and its JSON.
pub type PolicyObject = (&'static str, Arc<Vec<u8>>);

type Key = (String, &'static str, String);

#[derive(Debug, Default)]
struct State {
    objects: BTreeMap<Key, Arc<Vec<u8>>>,
    synced: BTreeSet<&'static str>,
}

/// Every policy object, and a version bumped on each change.
#[derive(Debug)]
pub struct PolicyStore {
    state: RwLock<State>,
    changed: watch::Sender<u64>,
}

impl PolicyStore {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            state: RwLock::new(State::default()),
            changed: watch::channel(0).0,
        })
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// The objects of `namespace`, once every kind has been read in full.
    pub fn namespace(&self, namespace: &str) -> Option<Vec<PolicyObject>> {
        let state = self.state.read();
        if state.synced.len() < KINDS.len() {
            return None;
        }
        Some(
            state
                .objects
                .range((namespace.to_string(), "", String::new())..)
                .take_while(|((ns, _, _), _)| ns == namespace)
                .map(|((_, kind, _), json)| (*kind, json.clone()))
                .collect(),
        )
    }

    fn bump(&self) {
        self.changed.send_modify(|version| *version += 1);
    }

    pub fn apply(&self, kind: &'static str, namespace: &str, name: &str, json: Vec<u8>) {
        let key = (namespace.to_string(), kind, name.to_string());
        let json = Arc::new(json);
        let changed = self.state.write().objects.insert(key, json.clone()) != Some(json);
        if changed {
            self.bump();
        }
    }

    pub fn delete(&self, kind: &'static str, namespace: &str, name: &str) {
        let key = (namespace.to_string(), kind, name.to_string());
        if self.state.write().objects.remove(&key).is_some() {
            self.bump();
        }
    }

    /// A full list of `kind` was read: what it did not hold is gone, and
    /// the kind is synced.
    pub fn relisted(&self, kind: &'static str, listed: &BTreeSet<(String, String)>) {
        let mut state = self.state.write();
        state
            .objects
            .retain(|(ns, k, name), _| *k != kind || listed.contains(&(ns.clone(), name.clone())));
        state.synced.insert(kind);
        drop(state);
        self.bump();
    }
}

/// Starts a cluster-wide watch of every kind into `store`.
pub fn start(client: &Client, store: &Arc<PolicyStore>, tasks: &mut JoinSet<()>) {
    tasks.spawn(feed(
        Api::all_with(
            client.clone(),
            &ApiResource::erase::<AuthorizationPolicy>(&()),
        ),
        store.clone(),
        KINDS[0],
    ));
    tasks.spawn(feed(
        Api::all_with(
            client.clone(),
            &ApiResource::erase::<PeerAuthentication>(&()),
        ),
        store.clone(),
        KINDS[1],
    ));
    tasks.spawn(feed(
        Api::all_with(
            client.clone(),
            &ApiResource::erase::<RequestAuthentication>(&()),
        ),
        store.clone(),
        KINDS[2],
    ));
    tasks.spawn(feed(
        Api::all_with(
            client.clone(),
            &ApiResource::erase::<LocalRateLimitPolicy>(&()),
        ),
        store.clone(),
        KINDS[3],
    ));
}

async fn feed(api: Api<DynamicObject>, store: Arc<PolicyStore>, kind: &'static str) {
    let stream = watcher(api, watcher::Config::default()).backoff(WatchBackoff::default());
    let mut stream = std::pin::pin!(stream);
    let mut relisted = BTreeSet::new();
    let json = |object: &DynamicObject| -> Option<(String, String, Vec<u8>)> {
        let mut value = serde_json::to_value(object).ok()?;
        // Items of a list may come without apiVersion and kind.
        value["apiVersion"] = format!(
            "{}/{}",
            crate::policy::crd::GROUP,
            crate::policy::crd::VERSION
        )
        .into();
        value["kind"] = kind.into();
        Some((
            object.namespace()?,
            object.name_any(),
            serde_json::to_vec(&value).ok()?,
        ))
    };
    while let Some(event) = stream.next().await {
        match event {
            Ok(watcher::Event::Apply(object)) => {
                if let Some((ns, name, json)) = json(&object) {
                    store.apply(kind, &ns, &name, json);
                }
            }
            Ok(watcher::Event::Delete(object)) => {
                if let Some(ns) = object.namespace() {
                    store.delete(kind, &ns, &object.name_any());
                }
            }
            Ok(watcher::Event::Init) => relisted.clear(),
            Ok(watcher::Event::InitApply(object)) => {
                if let Some((ns, name, json)) = json(&object) {
                    relisted.insert((ns.clone(), name.clone()));
                    store.apply(kind, &ns, &name, json);
                }
            }
            Ok(watcher::Event::InitDone) => store.relisted(kind, &relisted),
            // The last complete state stays served while the watch retries.
            Err(error) => {
                tracing::warn!(kind, %error, "Policy watch failed; retrying with backoff")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_served_until_every_kind_is_listed_in_full() {
        let store = PolicyStore::new();
        store.apply(KINDS[0], "shop", "a", b"{}".to_vec());
        assert_eq!(store.namespace("shop"), None);
        store.relisted(KINDS[0], &[("shop".into(), "a".into())].into());
        assert_eq!(store.namespace("shop"), None, "PeerAuthentications unread");
        store.relisted(KINDS[1], &BTreeSet::new());
        assert_eq!(
            store.namespace("shop"),
            None,
            "RequestAuthentications unread"
        );
        store.relisted(KINDS[2], &BTreeSet::new());
        assert_eq!(
            store.namespace("shop"),
            None,
            "LocalRateLimitPolicies unread"
        );
        store.relisted(KINDS[3], &BTreeSet::new());
        assert_eq!(store.namespace("shop").map(|s| s.len()), Some(1));
    }

    #[test]
    fn a_namespace_gets_its_own_objects_only_and_a_relist_drops_the_gone() {
        let store = PolicyStore::new();
        store.relisted(KINDS[1], &BTreeSet::new());
        store.relisted(KINDS[2], &BTreeSet::new());
        store.relisted(KINDS[3], &BTreeSet::new());
        for (ns, name) in [
            ("shop", "a"),
            ("shop", "b"),
            ("shopping", "c"),
            ("sho", "d"),
        ] {
            store.apply(KINDS[0], ns, name, name.as_bytes().to_vec());
        }
        store.relisted(
            KINDS[0],
            &[("shop".into(), "a".into()), ("shopping".into(), "c".into())].into(),
        );
        let shop = store.namespace("shop").unwrap();
        assert_eq!(shop.len(), 1);
        assert_eq!(shop[0].1.as_slice(), b"a");
        assert_eq!(store.namespace("sho").unwrap().len(), 0);
    }

    #[test]
    fn an_unchanged_object_wakes_nobody() {
        let store = PolicyStore::new();
        let mut rx = store.subscribe();
        store.apply(KINDS[0], "shop", "a", b"1".to_vec());
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        store.apply(KINDS[0], "shop", "a", b"1".to_vec());
        assert!(!rx.has_changed().unwrap());
        store.delete(KINDS[0], "shop", "a");
        assert!(rx.has_changed().unwrap());
    }
}
