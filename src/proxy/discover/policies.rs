//! Policies over the discovery API: the AuthorizationPolicies and
//! PeerAuthentications of the proxy's namespace, streamed by the
//! controller (which first checks that the pod runs as this proxy's
//! identity) and handed to the policy publisher as complete sets.
//!
//! Fail-safe rules: nothing is published until the first set arrives (the
//! publisher starts unsynced: probes only); a set with an object that is
//! not JSON is refused whole and the last one stays; while the stream is
//! down the last set stays in force, and it is re-established with backoff
//! (250 ms doubling to 10 s) — a restarting controller never opens a
//! window without policy.

use tokio::sync::mpsc;

use super::{FIRST_RETRY, MAX_RETRY, Resolver};
use crate::discovery_api::v1;
use crate::policy::objects::{ObjectSet, object_from_value};
use crate::policy::publish::{Metrics, Update};

/// Why a policy set from the controller was not used.
#[derive(Debug, thiserror::Error)]
pub enum InvalidSet {
    #[error("{kind} object is not JSON: {source}")]
    NotJson {
        kind: String,
        source: serde_json::Error,
    },
}

/// The objects of a set, read as the Kubernetes source reads them.
pub fn object_set(set: &v1::PolicySet, namespace: &str) -> Result<ObjectSet, InvalidSet> {
    let mut objects = ObjectSet::new();
    for object in &set.objects {
        let value: serde_json::Value =
            serde_json::from_slice(&object.json).map_err(|source| InvalidSet::NotJson {
                kind: object.kind.clone(),
                source,
            })?;
        if let Some(Ok(object)) = object_from_value(value, namespace) {
            objects.insert(
                (object.kind, object.namespace.clone(), object.name.clone()),
                object,
            );
        }
    }
    Ok(objects)
}

/// Follows the policies of `namespace` for pod `pod` until `updates` is
/// closed.
pub async fn run(
    resolver: Resolver,
    namespace: String,
    pod: String,
    metrics: Metrics,
    updates: mpsc::Sender<Update>,
) {
    let mut retry = FIRST_RETRY;
    let mut failing = false;
    loop {
        let request = v1::PolicyRequest {
            namespace: namespace.clone(),
            pod: pod.clone(),
        };
        let stream = match resolver.inner.client().await {
            Ok(mut client) => client
                .watch_policies(request)
                .await
                .map_err(|status| format!("{}: {}", status.code(), status.message())),
            Err(error) => Err(error),
        };
        match stream {
            Ok(response) => {
                let mut stream = response.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(set)) => match object_set(&set, &namespace) {
                            Ok(objects) => {
                                retry = FIRST_RETRY;
                                if failing {
                                    tracing::info!("Policies from the controller again");
                                    failing = false;
                                }
                                if updates.send(Update::Objects(objects)).await.is_err() {
                                    return;
                                }
                            }
                            Err(error) => {
                                metrics.source_error("discovery", "invalid_set");
                                tracing::warn!(%error, "Unusable policy set from the controller; keeping the last one");
                            }
                        },
                        Ok(None) => break,
                        Err(status) => {
                            tracing::debug!(%status, "Policy stream ended");
                            break;
                        }
                    }
                }
            }
            Err(error) => {
                metrics.source_error("discovery", "unavailable");
                if !failing {
                    tracing::warn!(%error, "Cannot get policies from the controller; keeping the last ones");
                    failing = true;
                }
            }
        }
        if updates.is_closed() {
            return;
        }
        tokio::time::sleep(retry).await;
        retry = (retry * 2).min(MAX_RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(kind: &str, json: &[u8]) -> v1::PolicyObject {
        v1::PolicyObject {
            kind: kind.into(),
            json: json.to_vec(),
        }
    }

    #[test]
    fn a_set_is_read_as_the_kubernetes_source_reads_it() {
        let set = v1::PolicySet {
            objects: vec![object(
                "AuthorizationPolicy",
                br#"{"apiVersion": "security.outrider.dev/v1alpha1", "kind": "AuthorizationPolicy",
                     "metadata": {"name": "deny-all", "namespace": "shop"},
                     "spec": {"action": "DENY", "rules": [{}]}}"#,
            )],
        };
        let objects = object_set(&set, "shop").unwrap();
        assert_eq!(objects.len(), 1);
        assert!(
            objects
                .keys()
                .any(|(_, ns, name)| ns == "shop" && name == "deny-all")
        );
    }

    #[test]
    fn a_set_with_an_object_that_is_not_json_is_refused_whole() {
        let set = v1::PolicySet {
            objects: vec![
                object(
                    "AuthorizationPolicy",
                    br#"{"apiVersion": "security.outrider.dev/v1alpha1", "kind": "AuthorizationPolicy",
                         "metadata": {"name": "a", "namespace": "shop"}, "spec": {}}"#,
                ),
                object("AuthorizationPolicy", b"{not json"),
            ],
        };
        assert!(object_set(&set, "shop").is_err());
    }
}
