//! Whose object is it: the controller writes objects under fixed names
//! (an identity Secret `outrider-identity-<sa>` per ServiceAccount, the
//! RoleBinding `outrider-policy-reader` per meshed namespace), and an
//! object of that name may already exist that it did not write, or whose
//! immutable fields (a Secret's `type`, a RoleBinding's `roleRef`) differ
//! from what it writes. This module decides, from the object alone,
//! whether it is ours, and if not, whether replacing it is safe.
//!
//! The rule (docs/decisions.md, "Objects the controller does not own"):
//! a foreign object is replaced unless something else keeps it — a
//! controller (an ownerReference with `controller: true`) or a deployment
//! tool (`app.kubernetes.io/managed-by` naming anything but outrider).
//! Replacing those would start a fight the other side wins on its next
//! sync; they are left alone and reported instead.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{RoleBinding, RoleRef};
use kube::api::ObjectMeta;

use super::identities::IDENTITY_LABEL;

/// The Secret type every identity Secret has (and the proxy reads).
pub const IDENTITY_SECRET_TYPE: &str = "kubernetes.io/tls";
const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
const OURSELVES: &str = "outrider";

/// What the controller makes of an existing object bearing one of its names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// Written by us (or equivalent to what we write): update it in place.
    Ours,
    Foreign {
        mismatch: Mismatch,
        resolution: Resolution,
    },
}

/// How the object differs from one the controller wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    /// A Secret without the identity label, of the right type.
    Unlabelled,
    /// A Secret of another type (immutable: only a new object fixes it).
    SecretType { found: String },
    /// A RoleBinding granting another role (immutable, as above).
    RoleRef { found: String },
}

impl Mismatch {
    /// Whether fixing it needs a new object (delete, then create).
    pub fn needs_new_object(&self) -> bool {
        !matches!(self, Mismatch::Unlabelled)
    }
}

impl fmt::Display for Mismatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Mismatch::Unlabelled => write!(f, "it lacks the label {IDENTITY_LABEL}=true"),
            Mismatch::SecretType { found } => {
                write!(f, "its type is {found}, not {IDENTITY_SECRET_TYPE}")
            }
            Mismatch::RoleRef { found } => write!(f, "it grants {found}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolution {
    Replace,
    LeaveAlone(Keeper),
}

/// What keeps a foreign object, so replacing it would not last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Keeper {
    /// The controller named by its controlling ownerReference.
    Controller { kind: String, name: String },
    /// The tool named by `app.kubernetes.io/managed-by` (Helm, Argo CD...).
    Tool(String),
}

impl fmt::Display for Keeper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Keeper::Controller { kind, name } => write!(f, "controlled by {kind} {name}"),
            Keeper::Tool(tool) => write!(f, "managed by {tool}"),
        }
    }
}

/// An existing identity Secret of the name we write.
pub fn claim_identity_secret(secret: &Secret) -> Claim {
    let labelled = label(&secret.metadata, IDENTITY_LABEL) == Some("true");
    // The API server defaults an absent type to Opaque.
    let kind = secret.type_.as_deref().unwrap_or("Opaque");
    let mismatch = if kind != IDENTITY_SECRET_TYPE {
        Mismatch::SecretType { found: kind.into() }
    } else if !labelled {
        Mismatch::Unlabelled
    } else {
        return Claim::Ours;
    };
    foreign(&secret.metadata, mismatch)
}

/// An existing policy-reader RoleBinding, against the role it must grant.
/// Its subjects and labels are ours to set whatever they were.
pub fn claim_policy_binding(binding: &RoleBinding, wanted: &RoleRef) -> Claim {
    let found = &binding.role_ref;
    if found.kind == wanted.kind && found.name == wanted.name && found.api_group == wanted.api_group
    {
        return Claim::Ours;
    }
    let mismatch = Mismatch::RoleRef {
        found: format!("{} {}", found.kind, found.name),
    };
    foreign(&binding.metadata, mismatch)
}

fn foreign(meta: &ObjectMeta, mismatch: Mismatch) -> Claim {
    let resolution = keeper(meta).map_or(Resolution::Replace, Resolution::LeaveAlone);
    Claim::Foreign {
        mismatch,
        resolution,
    }
}

fn keeper(meta: &ObjectMeta) -> Option<Keeper> {
    let controlling = meta
        .owner_references
        .iter()
        .flatten()
        .find(|owner| owner.controller == Some(true));
    if let Some(owner) = controlling {
        return Some(Keeper::Controller {
            kind: owner.kind.clone(),
            name: owner.name.clone(),
        });
    }
    match label(meta, MANAGED_BY) {
        Some(tool) if !tool.is_empty() && tool != OURSELVES => Some(Keeper::Tool(tool.into())),
        _ => None,
    }
}

fn label<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.labels
        .as_ref()
        .and_then(|labels: &BTreeMap<String, String>| labels.get(key))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

    use super::*;
    use crate::controller::rbac::policy_reader_binding;

    fn meta(labels: &[(&str, &str)], owners: Vec<OwnerReference>) -> ObjectMeta {
        ObjectMeta {
            name: Some("outrider-identity-web".into()),
            namespace: Some("shop".into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            owner_references: Some(owners),
            ..ObjectMeta::default()
        }
    }

    fn secret(type_: Option<&str>, labels: &[(&str, &str)], owners: Vec<OwnerReference>) -> Secret {
        Secret {
            metadata: meta(labels, owners),
            type_: type_.map(str::to_string),
            ..Secret::default()
        }
    }

    fn owner(kind: &str, name: &str, controller: Option<bool>) -> OwnerReference {
        OwnerReference {
            api_version: "v1".into(),
            kind: kind.into(),
            name: name.into(),
            uid: "u".into(),
            controller,
            block_owner_deletion: None,
        }
    }

    const OURS: &[(&str, &str)] = &[(IDENTITY_LABEL, "true"), (MANAGED_BY, "outrider")];

    #[test]
    fn a_labelled_tls_secret_is_ours_even_with_its_service_account_as_owner() {
        let ours = secret(
            Some(IDENTITY_SECRET_TYPE),
            OURS,
            vec![owner("ServiceAccount", "web", None)],
        );
        assert_eq!(claim_identity_secret(&ours), Claim::Ours);
    }

    #[test]
    fn foreign_identity_secrets_are_replaced_unless_something_keeps_them() {
        let table = [
            (
                secret(Some("Opaque"), &[], vec![]),
                Mismatch::SecretType {
                    found: "Opaque".into(),
                },
                Resolution::Replace,
            ),
            // kubectl create secret generic sends no type: Opaque.
            (
                secret(None, &[], vec![]),
                Mismatch::SecretType {
                    found: "Opaque".into(),
                },
                Resolution::Replace,
            ),
            (
                secret(Some(IDENTITY_SECRET_TYPE), &[], vec![]),
                Mismatch::Unlabelled,
                Resolution::Replace,
            ),
            // Our label on a Secret of the wrong type is still not ours.
            (
                secret(Some("Opaque"), OURS, vec![]),
                Mismatch::SecretType {
                    found: "Opaque".into(),
                },
                Resolution::Replace,
            ),
            // An owner that is not its controller keeps nothing.
            (
                secret(
                    Some(IDENTITY_SECRET_TYPE),
                    &[],
                    vec![owner("ServiceAccount", "web", Some(false))],
                ),
                Mismatch::Unlabelled,
                Resolution::Replace,
            ),
            (
                secret(
                    Some(IDENTITY_SECRET_TYPE),
                    &[],
                    vec![owner("Certificate", "web-cert", Some(true))],
                ),
                Mismatch::Unlabelled,
                Resolution::LeaveAlone(Keeper::Controller {
                    kind: "Certificate".into(),
                    name: "web-cert".into(),
                }),
            ),
            (
                secret(Some("Opaque"), &[(MANAGED_BY, "Helm")], vec![]),
                Mismatch::SecretType {
                    found: "Opaque".into(),
                },
                Resolution::LeaveAlone(Keeper::Tool("Helm".into())),
            ),
        ];
        for (existing, mismatch, resolution) in table {
            assert_eq!(
                claim_identity_secret(&existing),
                Claim::Foreign {
                    mismatch,
                    resolution
                },
                "{existing:?}"
            );
        }
    }

    #[test]
    fn a_binding_is_ours_when_it_grants_the_reader_role_whatever_its_subjects() {
        let wanted = policy_reader_binding("shop");
        let mut existing = wanted.clone();
        existing.subjects = None;
        existing.metadata.labels = None;
        assert_eq!(
            claim_policy_binding(&existing, &wanted.role_ref),
            Claim::Ours
        );
    }

    #[test]
    fn a_binding_granting_another_role_needs_a_new_object_unless_kept() {
        let wanted = policy_reader_binding("shop");
        let mut existing = wanted.clone();
        existing.role_ref.name = "edit".into();
        existing.metadata.labels = None;
        let claim = claim_policy_binding(&existing, &wanted.role_ref);
        let Claim::Foreign {
            mismatch,
            resolution,
        } = claim
        else {
            panic!("not foreign: {claim:?}");
        };
        assert!(mismatch.needs_new_object());
        assert_eq!(mismatch.to_string(), "it grants ClusterRole edit");
        assert_eq!(resolution, Resolution::Replace);

        existing.metadata.labels = Some(BTreeMap::from([(MANAGED_BY.into(), "argocd".into())]));
        assert_eq!(
            claim_policy_binding(&existing, &wanted.role_ref),
            Claim::Foreign {
                mismatch: Mismatch::RoleRef {
                    found: "ClusterRole edit".into()
                },
                resolution: Resolution::LeaveAlone(Keeper::Tool("argocd".into())),
            }
        );
        // A Role of the same name is another role too.
        let mut role = wanted.clone();
        role.role_ref.kind = "Role".into();
        assert!(matches!(
            claim_policy_binding(&role, &wanted.role_ref),
            Claim::Foreign { .. }
        ));
    }
}
