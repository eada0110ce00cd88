//! The policy-reader bindings: in each meshed namespace, a RoleBinding
//! `outrider-policy-reader` gives that namespace's service accounts the
//! chart's ClusterRole of the same name, which reads policies and nothing
//! else, so a proxy can read its own namespace's policies only. A binding
//! of that name granting another role is replaced or left alone by the
//! rule of [`super::ownership`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef, Subject};
use kube::api::{Api, ObjectMeta};

use super::Controller;
use super::conflicts::{FirstWrite, ObjectKey, Written};
use super::ownership::claim_policy_binding;

/// The ClusterRole (from the chart) and the RoleBinding that grants it.
pub const POLICY_READER: &str = "outrider-policy-reader";
/// Re-apply bindings this often, so a deleted one comes back.
const REBIND_EVERY: Duration = Duration::from_secs(600);

/// The binding for `namespace`, as the controller applies it.
pub fn policy_reader_binding(namespace: &str) -> RoleBinding {
    RoleBinding {
        metadata: ObjectMeta {
            name: Some(POLICY_READER.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/managed-by".to_string(),
                "outrider".to_string(),
            )])),
            ..Default::default()
        },
        role_ref: RoleRef {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "ClusterRole".into(),
            name: POLICY_READER.into(),
        },
        subjects: Some(vec![Subject {
            api_group: Some("rbac.authorization.k8s.io".into()),
            kind: "Group".into(),
            name: format!("system:serviceaccounts:{namespace}"),
            namespace: None,
        }]),
    }
}

/// Applies each meshed namespace's binding when it is new or due again.
pub(super) async fn bind_policy_readers(controller: &Controller, meshed: &BTreeSet<String>) {
    for namespace in meshed {
        let due = controller
            .bound
            .lock()
            .get(namespace)
            .is_none_or(|at| at.elapsed() >= REBIND_EVERY);
        if !due {
            continue;
        }
        // k8s-openapi types serialize their apiVersion and kind, which
        // server-side apply needs in the body.
        let binding = policy_reader_binding(namespace);
        let key = ObjectKey {
            kind: "RoleBinding",
            namespace: namespace.clone(),
            name: POLICY_READER.into(),
        };
        if controller.conflicts.blocked(&key) {
            continue;
        }
        let api: Api<RoleBinding> = Api::namespaced(controller.client.clone(), namespace);
        let result = controller
            .conflicts
            .write(
                &api,
                &key,
                &binding,
                FirstWrite::Apply,
                |existing| claim_policy_binding(existing, &binding.role_ref),
                "the proxies of this namespace cannot read their policies and never become ready",
            )
            .await;
        match result {
            Ok(Written::Done) => {
                controller
                    .bound
                    .lock()
                    .insert(namespace.clone(), tokio::time::Instant::now());
            }
            Ok(Written::LeftAlone) => {}
            Err(error) => {
                controller.metrics.failure("policy_reader_binding");
                tracing::warn!(%namespace, %error, "Cannot bind the policy reader role");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binding_grants_the_reader_role_to_the_namespace_service_accounts_only() {
        let binding = policy_reader_binding("shop");
        let body = serde_json::to_value(&binding).unwrap();
        assert_eq!(body["apiVersion"], "rbac.authorization.k8s.io/v1");
        assert_eq!(body["kind"], "RoleBinding");
        assert_eq!(binding.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(binding.role_ref.kind, "ClusterRole");
        assert_eq!(binding.role_ref.name, POLICY_READER);
        let subjects = binding.subjects.unwrap();
        assert_eq!(subjects.len(), 1);
        assert_eq!(subjects[0].kind, "Group");
        assert_eq!(subjects[0].name, "system:serviceaccounts:shop");
    }
}
