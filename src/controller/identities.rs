//! Which identity Secrets should exist and which need (re)issuing: a pure
//! plan from the cluster as the controller's caches see it.
//!
//! One Secret `outrider-identity-<sa>` per ServiceAccount in a meshed
//! namespace (labelled `outrider.dev/inject=enabled`, or holding a pod
//! annotated `outrider.dev/inject: enabled`). A Secret is reissued when it
//! is missing, unreadable, not issued by the current issuer, carrying
//! another bundle, or has less than a third of its lifetime left. It is
//! deleted when its ServiceAccount is gone; while the ServiceAccount
//! exists it keeps being renewed even if the namespace stops being
//! meshed, because pods injected earlier still run on it.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::{Value, json};
use time::OffsetDateTime;

use crate::ca::inspect::inspect;
use crate::ca::issuer::IssuedSvid;
use crate::ca::secret::{CaMaterial, unix};
use crate::inject::pod::identity_secret_name;

/// Labels on every identity Secret (what the controller lists by).
pub const IDENTITY_LABEL: &str = "outrider.dev/identity";
pub const SERVICE_ACCOUNT_LABEL: &str = "outrider.dev/service-account";
pub const NAMESPACE_INJECT_LABEL: &str = "outrider.dev/inject";

/// A ServiceAccount as the cache holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceAccountRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

/// An identity Secret as the cache holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentitySecret {
    pub namespace: String,
    pub name: String,
    /// The ServiceAccount it belongs to (its label).
    pub service_account: Option<String>,
    pub data: BTreeMap<String, Vec<u8>>,
}

/// Why a Secret is (re)issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reason {
    Missing,
    Expiring,
    NewIssuer,
    NewBundle,
    Invalid(String),
}

impl Reason {
    pub fn label(&self) -> &'static str {
        match self {
            Reason::Missing => "missing",
            Reason::Expiring => "expiring",
            Reason::NewIssuer => "new_issuer",
            Reason::NewBundle => "new_bundle",
            Reason::Invalid(_) => "invalid",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Issue {
        service_account: ServiceAccountRef,
        reason: Reason,
    },
    Delete {
        namespace: String,
        name: String,
    },
}

/// The plan, and when to look again at the latest (the soonest renewal).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub next_renewal: Option<OffsetDateTime>,
    /// The soonest expiry among Secrets that need nothing now.
    pub soonest_expiry: Option<OffsetDateTime>,
}

/// Decides what to do. `meshed` are the meshed namespaces.
pub fn plan(
    meshed: &BTreeSet<String>,
    service_accounts: &[ServiceAccountRef],
    secrets: &[IdentitySecret],
    ca: &CaMaterial,
    now: OffsetDateTime,
) -> Plan {
    let mut actions = Vec::new();
    let mut next_renewal: Option<OffsetDateTime> = None;
    let mut soonest_expiry: Option<OffsetDateTime> = None;
    let by_key: BTreeMap<(&str, &str), &IdentitySecret> = secrets
        .iter()
        .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
        .collect();
    let mut wanted: BTreeSet<(String, String)> = BTreeSet::new();
    for sa in service_accounts {
        let name = identity_secret_name(&sa.name);
        wanted.insert((sa.namespace.clone(), name.clone()));
        let existing = by_key.get(&(sa.namespace.as_str(), name.as_str()));
        let reason = match existing {
            None if meshed.contains(&sa.namespace) => Some(Reason::Missing),
            None => None,
            Some(secret) => match assess(secret, sa, ca, now) {
                Assessment::Fine {
                    renew_at,
                    not_after,
                } => {
                    next_renewal = Some(next_renewal.map_or(renew_at, |t| t.min(renew_at)));
                    soonest_expiry = Some(soonest_expiry.map_or(not_after, |t| t.min(not_after)));
                    None
                }
                Assessment::Reissue(reason) => Some(reason),
            },
        };
        if let Some(reason) = reason {
            actions.push(Action::Issue {
                service_account: sa.clone(),
                reason,
            });
        }
    }
    for secret in secrets {
        if !wanted.contains(&(secret.namespace.clone(), secret.name.clone())) {
            actions.push(Action::Delete {
                namespace: secret.namespace.clone(),
                name: secret.name.clone(),
            });
        }
    }
    Plan {
        actions,
        next_renewal,
        soonest_expiry,
    }
}

enum Assessment {
    Fine {
        renew_at: OffsetDateTime,
        not_after: OffsetDateTime,
    },
    Reissue(Reason),
}

fn assess(
    secret: &IdentitySecret,
    sa: &ServiceAccountRef,
    ca: &CaMaterial,
    now: OffsetDateTime,
) -> Assessment {
    let get = |key: &str| {
        secret
            .data
            .get(key)
            .and_then(|v| std::str::from_utf8(v).ok())
    };
    let (Some(chain), Some(_key), Some(bundle)) = (get("tls.crt"), get("tls.key"), get("ca.crt"))
    else {
        return Assessment::Reissue(Reason::Invalid("tls.crt, tls.key or ca.crt missing".into()));
    };
    if normalise(bundle) != normalise(&ca.bundle_pem) {
        return Assessment::Reissue(Reason::NewBundle);
    }
    let report = match inspect(chain.as_bytes(), Some(ca.bundle_pem.as_bytes()), unix(now)) {
        Ok(report) => report,
        Err(e) => return Assessment::Reissue(Reason::Invalid(e.to_string())),
    };
    let expected = format!(
        "spiffe://{}/ns/{}/sa/{}",
        ca.trust_domain, sa.namespace, sa.name
    );
    if report.leaf.id.as_str() != expected {
        return Assessment::Reissue(Reason::Invalid(format!(
            "carries {} instead of {expected}",
            report.leaf.id
        )));
    }
    if !normalise(chain).ends_with(&normalise(&ca.issuer_pem)) {
        return Assessment::Reissue(Reason::NewIssuer);
    }
    let (Ok(not_before), Ok(not_after)) = (
        OffsetDateTime::from_unix_timestamp(report.leaf.not_before),
        OffsetDateTime::from_unix_timestamp(report.leaf.not_after),
    ) else {
        return Assessment::Reissue(Reason::Invalid("validity out of range".into()));
    };
    // Renew when less than a third of the lifetime is left.
    let renew_at = not_after - (not_after - not_before) / 3;
    if now >= renew_at {
        return Assessment::Reissue(Reason::Expiring);
    }
    Assessment::Fine {
        renew_at,
        not_after,
    }
}

/// PEM compared without whitespace differences.
fn normalise(pem: &str) -> String {
    pem.split_whitespace().collect()
}

/// The Secret to apply (server-side) for a freshly issued identity.
pub fn desired_secret(sa: &ServiceAccountRef, svid: &IssuedSvid, bundle_pem: &str) -> Value {
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
    let not_after = svid
        .not_after
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {
            "name": identity_secret_name(&sa.name),
            "namespace": sa.namespace,
            "labels": {
                "app.kubernetes.io/managed-by": "outrider",
                IDENTITY_LABEL: "true",
                SERVICE_ACCOUNT_LABEL: sa.name,
            },
            "annotations": {
                "outrider.dev/spiffe-id": svid.id.as_str(),
                "outrider.dev/serial": svid.serial,
                "outrider.dev/not-after": not_after,
            },
            "ownerReferences": [{
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "name": sa.name,
                "uid": sa.uid,
            }],
        },
        "data": {
            "tls.crt": b64(&svid.chain_pem),
            "tls.key": b64(&svid.key_pem),
            "ca.crt": b64(bundle_pem),
        },
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::ca::secret::CaMaterial;
    use crate::identity::{SpiffeId, TrustDomain};

    fn ca(now: OffsetDateTime) -> CaMaterial {
        let td = TrustDomain::parse("cluster.local").unwrap();
        let year = Duration::from_secs(365 * 86400);
        let data = CaMaterial::bootstrap(&td, year, year, now).unwrap();
        let data = data.into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
        CaMaterial::from_secret_data(&data, &td, now).unwrap()
    }

    fn sa(ns: &str, name: &str) -> ServiceAccountRef {
        ServiceAccountRef {
            namespace: ns.into(),
            name: name.into(),
            uid: format!("uid-{name}"),
        }
    }

    fn secret_for(
        ca: &CaMaterial,
        sa: &ServiceAccountRef,
        issued_at: OffsetDateTime,
        lifetime: Duration,
    ) -> IdentitySecret {
        let id = SpiffeId::parse(&format!(
            "spiffe://cluster.local/ns/{}/sa/{}",
            sa.namespace, sa.name
        ))
        .unwrap();
        let svid = ca.signing.issue(&id, lifetime, issued_at).unwrap();
        IdentitySecret {
            namespace: sa.namespace.clone(),
            name: identity_secret_name(&sa.name),
            service_account: Some(sa.name.clone()),
            data: BTreeMap::from([
                ("tls.crt".into(), svid.chain_pem.into_bytes()),
                ("tls.key".into(), svid.key_pem.into_bytes()),
                ("ca.crt".into(), ca.bundle_pem.clone().into_bytes()),
            ]),
        }
    }

    fn two_issuers_one_anchor(now: OffsetDateTime) -> (CaMaterial, CaMaterial) {
        use crate::ca::issuer::{SigningCa, new_intermediate, new_trust_anchor};
        let td = TrustDomain::parse("cluster.local").unwrap();
        let year = Duration::from_secs(365 * 86400);
        let root = new_trust_anchor(&td, year, now).unwrap();
        let root_ca = SigningCa::from_pem(&root.cert_pem, &root.key_pem).unwrap();
        let load = || {
            let issuer = new_intermediate(&td, &root_ca, year, now).unwrap();
            let data = BTreeMap::from([
                ("tls.crt".to_string(), issuer.cert_pem.into_bytes()),
                ("tls.key".to_string(), issuer.key_pem.into_bytes()),
                ("ca.crt".to_string(), root.cert_pem.clone().into_bytes()),
            ]);
            CaMaterial::from_secret_data(&data, &td, now).unwrap()
        };
        (load(), load())
    }

    fn meshed(names: &[&str]) -> BTreeSet<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn every_service_account_of_a_meshed_namespace_gets_one_and_others_do_not() {
        let now = OffsetDateTime::now_utc();
        let ca = ca(now);
        let plan = plan(
            &meshed(&["shop"]),
            &[
                sa("shop", "orders"),
                sa("shop", "default"),
                sa("other", "x"),
            ],
            &[],
            &ca,
            now,
        );
        assert_eq!(
            plan.actions,
            vec![
                Action::Issue {
                    service_account: sa("shop", "orders"),
                    reason: Reason::Missing
                },
                Action::Issue {
                    service_account: sa("shop", "default"),
                    reason: Reason::Missing
                },
            ]
        );
    }

    #[test]
    fn a_fresh_secret_is_left_alone_until_a_third_of_its_lifetime_remains() {
        let now = OffsetDateTime::now_utc();
        let ca = ca(now);
        let orders = sa("shop", "orders");
        let fresh = secret_for(&ca, &orders, now, DAY);
        let plan_now = plan(
            &meshed(&["shop"]),
            std::slice::from_ref(&orders),
            std::slice::from_ref(&fresh),
            &ca,
            now,
        );
        assert_eq!(plan_now.actions, vec![]);
        let renew_at = plan_now.next_renewal.unwrap();
        // Two thirds of 24 h after issue (issue is backdated by a minute).
        let expected = now + time::Duration::hours(16);
        assert!(
            (renew_at - expected).abs() < time::Duration::minutes(2),
            "{renew_at}"
        );
        let later = plan(
            &meshed(&["shop"]),
            std::slice::from_ref(&orders),
            &[fresh],
            &ca,
            renew_at + time::Duration::seconds(1),
        );
        assert_eq!(
            later.actions,
            vec![Action::Issue {
                service_account: orders,
                reason: Reason::Expiring
            }]
        );
    }

    #[test]
    fn a_new_bundle_or_issuer_or_a_broken_secret_means_reissue() {
        let now = OffsetDateTime::now_utc();
        let old = ca(now);
        let new = ca(now);
        let orders = sa("shop", "orders");
        let issued_by_old = secret_for(&old, &orders, now, DAY);
        let reason = |ca: &CaMaterial, secret: IdentitySecret| match &plan(
            &meshed(&["shop"]),
            std::slice::from_ref(&orders),
            &[secret],
            ca,
            now,
        )
        .actions[..]
        {
            [Action::Issue { reason, .. }] => reason.clone(),
            other => panic!("{other:?}"),
        };
        assert_eq!(reason(&new, issued_by_old.clone()), Reason::NewBundle);

        // Same anchor, new issuer (an issuer rotation).
        let (first, second) = two_issuers_one_anchor(now);
        let issued_by_first = secret_for(&first, &orders, now, DAY);
        assert_eq!(reason(&second, issued_by_first), Reason::NewIssuer);

        let mut broken = issued_by_old.clone();
        broken.data.insert("tls.crt".into(), b"garbage".to_vec());
        assert!(matches!(reason(&old, broken), Reason::Invalid(_)));
        let mut missing = issued_by_old;
        missing.data.remove("tls.key");
        assert!(matches!(reason(&old, missing), Reason::Invalid(_)));
    }

    #[test]
    fn a_secret_for_another_identity_is_reissued() {
        let now = OffsetDateTime::now_utc();
        let ca = ca(now);
        let mut wrong = secret_for(&ca, &sa("shop", "payments"), now, DAY);
        wrong.name = identity_secret_name("orders");
        let plan = plan(
            &meshed(&["shop"]),
            &[sa("shop", "orders")],
            &[wrong],
            &ca,
            now,
        );
        assert!(matches!(
            &plan.actions[..],
            [Action::Issue {
                reason: Reason::Invalid(_),
                ..
            }]
        ));
    }

    #[test]
    fn secrets_of_deleted_service_accounts_are_removed_and_unmeshed_ones_kept_fresh() {
        let now = OffsetDateTime::now_utc();
        let ca = ca(now);
        let gone = secret_for(&ca, &sa("shop", "gone"), now, DAY);
        let kept = secret_for(&ca, &sa("legacy", "app"), now, DAY);
        let plan = plan(
            &meshed(&["shop"]),
            &[sa("legacy", "app")],
            &[gone, kept],
            &ca,
            now,
        );
        assert_eq!(
            plan.actions,
            vec![Action::Delete {
                namespace: "shop".into(),
                name: "outrider-identity-gone".into()
            }]
        );
        assert!(
            plan.next_renewal.is_some(),
            "the unmeshed one is still renewed"
        );
    }

    #[test]
    fn the_desired_secret_is_a_tls_secret_owned_by_its_service_account() {
        let now = OffsetDateTime::now_utc();
        let ca = ca(now);
        let orders = sa("shop", "orders");
        let id = SpiffeId::parse("spiffe://cluster.local/ns/shop/sa/orders").unwrap();
        let svid = ca.signing.issue(&id, DAY, now).unwrap();
        let secret = desired_secret(&orders, &svid, &ca.bundle_pem);
        assert_eq!(secret["type"], "kubernetes.io/tls");
        assert_eq!(secret["metadata"]["name"], "outrider-identity-orders");
        assert_eq!(
            secret["metadata"]["ownerReferences"][0]["uid"],
            "uid-orders"
        );
        assert_eq!(secret["metadata"]["labels"][IDENTITY_LABEL], "true");
        for key in ["tls.crt", "tls.key", "ca.crt"] {
            assert!(secret["data"][key].as_str().is_some_and(|v| !v.is_empty()));
        }
    }
}
