//! `outrider controller` against an in-process fake API server (no real
//! kube-apiserver can run here): identity Secrets issued, renewed,
//! recreated and removed; the CA bootstrapped, refused when broken, and
//! rotated through the three-step anchor runbook; the Lease; the webhook
//! over HTTPS with its caBundle kept current.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use std::time::Duration;

use base64::Engine as _;
use common::BIN;
use common::controller::ControllerProcess;
use outrider::ca::inspect::inspect;
use outrider::test_util::apps::{http1_get, metric};
use outrider::test_util::eventually;
use outrider::test_util::fake_apiserver::FakeApiServer;
use rustls_pki_types::UnixTime;
use rustls_pki_types::pem::PemObject;
use serde_json::{Value, json};

fn namespace(name: &str, meshed: bool) -> Value {
    let labels = if meshed {
        json!({"outrider.dev/inject": "enabled"})
    } else {
        json!({})
    };
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn service_account(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}})
}

fn webhook_configuration() -> Value {
    let hook = |name: &str, path: &str| {
        json!({"name": name, "admissionReviewVersions": ["v1"], "sideEffects": "None",
               "clientConfig": {"service": {"name": "outrider-webhook", "namespace": "outrider-system", "path": path}}})
    };
    json!({"apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingWebhookConfiguration",
           "metadata": {"name": "outrider-injector"},
           "webhooks": [hook("namespace.inject.outrider.dev", "/inject/namespace"),
                        hook("pod.inject.outrider.dev", "/inject/pod")]})
}

fn decode(secret: &Value, key: &str) -> Vec<u8> {
    let text = secret["data"][key].as_str().unwrap_or_default();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .unwrap_or_default()
}

fn now() -> UnixTime {
    UnixTime::now()
}

/// The SPIFFE ID and serial of an identity Secret, after checking it as a
/// proxy would (chain against the Secret's own bundle).
fn identity_of(secret: &Value) -> (String, String) {
    let report = inspect(
        &decode(secret, "tls.crt"),
        Some(&decode(secret, "ca.crt")),
        now(),
    )
    .expect("a valid X509-SVID");
    (report.leaf.id.to_string(), report.leaf.serial.clone())
}

struct Cluster {
    api: FakeApiServer,
    _dir: tempfile::TempDir,
    kubeconfig: std::path::PathBuf,
}

async fn cluster() -> Cluster {
    let api = FakeApiServer::start().await;
    api.apply("namespaces", namespace("outrider-system", false));
    api.apply("namespaces", namespace("shop", true));
    api.apply("namespaces", namespace("plain", false));
    api.apply("serviceaccounts", service_account("shop", "orders"));
    api.apply("serviceaccounts", service_account("shop", "default"));
    api.apply("serviceaccounts", service_account("plain", "worker"));
    api.apply("mutatingwebhookconfigurations", webhook_configuration());
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, api.kubeconfig()).unwrap();
    Cluster {
        api,
        _dir: dir,
        kubeconfig,
    }
}

async fn secret(api: &FakeApiServer, ns: &str, name: &str, within: Duration) -> Option<Value> {
    eventually(within, async || api.get("secrets", ns, name)).await
}

/// The identity Secret of `ns/sa`, once the controller has written it.
async fn identity(api: &FakeApiServer, ns: &str, sa: &str) -> Option<Value> {
    let name = format!("outrider-identity-{sa}");
    secret(api, ns, &name, Duration::from_secs(10)).await
}

#[tokio::test]
async fn service_accounts_of_meshed_namespaces_get_identities_kept_in_step_with_the_cluster() {
    let c = cluster().await;
    let controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    let api = &c.api;

    // The CA was bootstrapped into its Secret.
    let ca = secret(
        api,
        "outrider-system",
        "outrider-ca",
        Duration::from_secs(10),
    )
    .await
    .expect("bootstrapped CA Secret");
    assert_eq!(ca["type"], "kubernetes.io/tls");

    let orders = identity(api, "shop", "orders")
        .await
        .unwrap_or_else(|| panic!("no identity for shop/orders:\n{}", controller.logs()));
    assert_eq!(orders["type"], "kubernetes.io/tls");
    assert_eq!(
        identity_of(&orders).0,
        "spiffe://cluster.local/ns/shop/sa/orders"
    );
    assert_eq!(decode(&orders, "ca.crt"), decode(&ca, "ca.crt"));
    assert_eq!(
        orders["metadata"]["labels"]["outrider.dev/identity"],
        "true"
    );
    assert_eq!(
        orders["metadata"]["ownerReferences"][0]["kind"],
        "ServiceAccount"
    );
    assert_eq!(
        orders["metadata"]["ownerReferences"][0]["uid"],
        api.get("serviceaccounts", "shop", "orders").unwrap()["metadata"]["uid"]
    );
    assert!(identity(api, "shop", "default").await.is_some());
    // Created (so a foreign Secret of that name would be noticed, not
    // overwritten) with our field manager.
    assert!(api.seen().iter().any(|r| r.method == "POST"
        && r.path.ends_with("/namespaces/shop/secrets")
        && r.query.contains("fieldManager=outrider-controller")));
    // The namespace's proxies may read its policies.
    let binding = eventually(Duration::from_secs(5), async || {
        api.get("rolebindings", "shop", "outrider-policy-reader")
    })
    .await
    .expect("policy reader binding");
    assert_eq!(binding["roleRef"]["name"], "outrider-policy-reader");
    assert_eq!(
        binding["subjects"][0]["name"],
        "system:serviceaccounts:shop"
    );
    // Not meshed: nothing.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        api.get("rolebindings", "plain", "outrider-policy-reader")
            .is_none()
    );
    assert!(
        api.get("secrets", "plain", "outrider-identity-worker")
            .is_none()
    );

    // A new ServiceAccount.
    api.apply("serviceaccounts", service_account("shop", "payments"));
    let payments = identity(api, "shop", "payments")
        .await
        .expect("identity for a new ServiceAccount");
    assert_eq!(
        identity_of(&payments).0,
        "spiffe://cluster.local/ns/shop/sa/payments"
    );

    // Deleted: recreated, with a new certificate.
    let serial = identity_of(&orders).1;
    api.delete("secrets", "outrider-identity-orders");
    let again = identity(api, "shop", "orders").await.expect("recreated");
    assert_ne!(identity_of(&again).1, serial);

    // The ServiceAccount goes away: so does its identity.
    api.delete("serviceaccounts", "default");
    let removed = eventually(Duration::from_secs(5), async || {
        api.get("secrets", "shop", "outrider-identity-default")
            .is_none()
            .then_some(())
    })
    .await;
    assert!(removed.is_some(), "{}", controller.logs());

    // A pod annotated for injection meshes its namespace.
    api.apply(
        "pods",
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "w", "namespace": "plain", "annotations": {"outrider.dev/inject": "enabled"}},
               "spec": {"serviceAccountName": "worker", "containers": [{"name": "w", "image": "w"}]}}),
    );
    assert!(
        identity(api, "plain", "worker").await.is_some(),
        "{}",
        controller.logs()
    );

    // A 410 Gone on every watch: the caches relist and keep working.
    let (lists_before, _) = api.requests();
    api.expire_versions();
    api.apply("serviceaccounts", service_account("shop", "after-gone"));
    assert!(identity(api, "shop", "after-gone").await.is_some());
    assert!(api.requests().0 > lists_before, "a relist after 410");

    // The webhook configuration carries the bundle.
    let hooks = api
        .get("mutatingwebhookconfigurations", "", "outrider-injector")
        .unwrap();
    for hook in hooks["webhooks"].as_array().unwrap() {
        let bundle = base64::engine::general_purpose::STANDARD
            .decode(hook["clientConfig"]["caBundle"].as_str().expect("caBundle"))
            .unwrap();
        assert_eq!(bundle, decode(&ca, "ca.crt"));
    }

    let metrics = controller.metrics().await;
    assert!(
        metric(
            &metrics,
            "outrider_controller_certificates_issued_total",
            &[("kind", "identity")]
        ) >= 5.0
    );
    assert_eq!(metric(&metrics, "outrider_controller_leader", &[]), 1.0);
    assert!(
        metric(
            &metrics,
            "outrider_controller_issuer_expiry_timestamp_seconds",
            &[]
        ) > 0.0
    );
    assert!(
        metric(
            &metrics,
            "outrider_controller_identity_soonest_expiry_timestamp_seconds",
            &[]
        ) > 0.0
    );
}

#[tokio::test]
async fn an_identity_is_renewed_when_a_third_of_its_lifetime_remains_and_write_conflicts_are_retried()
 {
    let c = cluster().await;
    // The first apply of the orders Secret hits a conflict.
    c.api.fail_next("PATCH", "secrets", 409);
    let controller = ControllerProcess::spawn(&c.kubeconfig, &["--identity-lifetime", "6s"]);
    let first = identity(&c.api, "shop", "orders")
        .await
        .unwrap_or_else(|| panic!("{}", controller.logs()));
    let (_, first_serial) = identity_of(&first);
    // 6 s lifetime: renewed after about 4 s.
    let renewed = eventually(Duration::from_secs(10), async || {
        let s = c.api.get("secrets", "shop", "outrider-identity-orders")?;
        let (_, serial) = identity_of(&s);
        (serial != first_serial).then_some(s)
    })
    .await;
    assert!(renewed.is_some(), "not renewed:\n{}", controller.logs());
    let metrics = controller.metrics().await;
    assert!(
        metric(
            &metrics,
            "outrider_controller_certificates_issued_total",
            &[("reason", "expiring")]
        ) >= 1.0,
        "{metrics}"
    );
    assert!(
        metric(&metrics, "outrider_controller_renewal_failures_total", &[]) >= 1.0,
        "{metrics}"
    );
}

/// The Warning events recorded about `ns/name`, by reason.
fn events_about(api: &FakeApiServer, ns: &str, name: &str) -> Vec<String> {
    api.all("events")
        .iter()
        .filter(|e| e["metadata"]["namespace"] == ns && e["regarding"]["name"] == name)
        .map(|e| e["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn a_foreign_secret_under_an_identity_name_is_replaced_and_reported() {
    let c = cluster().await;
    // `kubectl create secret generic outrider-identity-orders ...`: no
    // type (Opaque, immutable), no label, so the cache never sees it.
    c.api.apply(
        "secrets",
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "outrider-identity-orders", "namespace": "shop"},
               "data": {"hand-made.pem": "aGFuZA=="}}),
    );
    // Of the right type but unlabelled: taken over in place.
    c.api.apply(
        "secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
               "metadata": {"name": "outrider-identity-default", "namespace": "shop"},
               "data": {"tls.crt": "", "tls.key": ""}}),
    );
    let controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    for sa in ["orders", "default"] {
        let name = format!("outrider-identity-{sa}");
        let replaced = eventually(Duration::from_secs(10), async || {
            let s = c.api.get("secrets", "shop", &name)?;
            (s["type"] == "kubernetes.io/tls" && !decode(&s, "tls.crt").is_empty()).then_some(s)
        })
        .await
        .unwrap_or_else(|| panic!("{name} not replaced:\n{}", controller.logs()));
        assert_eq!(
            identity_of(&replaced).0,
            format!("spiffe://cluster.local/ns/shop/sa/{sa}")
        );
        assert_eq!(
            replaced["metadata"]["labels"]["outrider.dev/identity"],
            "true"
        );
        let events = eventually(Duration::from_secs(5), async || {
            let events = events_about(&c.api, "shop", &name);
            (!events.is_empty()).then_some(events)
        })
        .await
        .unwrap_or_default();
        assert_eq!(events, ["ForeignObjectReplaced"], "{name}");
    }
    assert!(controller.logs().contains(
        "Replaced Secret shop/outrider-identity-orders: its type is Opaque, not kubernetes.io/tls"
    ));
    // The delete was guarded by the object's uid and resourceVersion.
    assert!(c.api.seen().iter().any(|r| {
        r.method == "DELETE"
            && r.path
                .ends_with("/namespaces/shop/secrets/outrider-identity-orders")
    }));
    let metrics = controller.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "outrider_controller_foreign_objects_total",
            &[("kind", "Secret"), ("resolution", "replaced")]
        ),
        2.0,
        "{metrics}"
    );
}

#[tokio::test]
async fn a_foreign_secret_kept_by_another_tool_is_left_alone_reported_once_and_not_retried_blindly()
{
    let c = cluster().await;
    c.api.apply(
        "secrets",
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
               "metadata": {"name": "outrider-identity-orders", "namespace": "shop",
                            "labels": {"app.kubernetes.io/managed-by": "Helm"}},
               "data": {"token": "c2VjcmV0"}}),
    );
    // Resync every 2 s: the held Secret is looked at again that often.
    let controller = ControllerProcess::spawn(&c.kubeconfig, &["--resync", "2s"]);
    assert!(identity(&c.api, "shop", "default").await.is_some());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let kept = c
        .api
        .get("secrets", "shop", "outrider-identity-orders")
        .unwrap();
    assert_eq!(kept["type"], "Opaque");
    assert_eq!(kept["data"]["token"], "c2VjcmV0");
    assert_eq!(
        events_about(&c.api, "shop", "outrider-identity-orders"),
        ["ForeignObjectLeftAlone"],
        "{}",
        controller.logs()
    );
    // Not every pass: a look per resync (2 s) at most, a create and a GET.
    let creates = c
        .api
        .seen()
        .iter()
        .filter(|r| r.method == "POST" && r.path.ends_with("/namespaces/shop/secrets"))
        .count();
    assert!((1..=5).contains(&creates), "{creates} creates");
    assert!(controller.logs().contains(
        "Secret shop/outrider-identity-orders is not outrider's (its type is Opaque, not kubernetes.io/tls) and is managed by Helm"
    ));
    let metrics = controller.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "outrider_controller_objects_left_alone",
            &[("kind", "Secret")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "outrider_controller_renewal_failures_total", &[]),
        0.0,
        "{metrics}"
    );
    // Once it is gone, the identity is issued at the next look.
    c.api.delete("secrets", "outrider-identity-orders");
    let issued = eventually(Duration::from_secs(8), async || {
        let s = c.api.get("secrets", "shop", "outrider-identity-orders")?;
        (s["type"] == "kubernetes.io/tls").then_some(s)
    })
    .await;
    assert!(issued.is_some(), "{}", controller.logs());
    let metrics = eventually(Duration::from_secs(3), async || {
        let m = controller.metrics().await;
        (metric(
            &m,
            "outrider_controller_objects_left_alone",
            &[("kind", "Secret")],
        ) == 0.0)
            .then_some(m)
    })
    .await;
    assert!(metrics.is_some(), "the gauge still counts the Secret");
}

#[tokio::test]
async fn a_policy_reader_binding_granting_another_role_is_recreated_unless_a_tool_keeps_it() {
    let c = cluster().await;
    c.api.apply("namespaces", namespace("kept", true));
    let binding = |ns: &str, labels: Value| {
        json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
               "metadata": {"name": "outrider-policy-reader", "namespace": ns, "labels": labels},
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "edit"},
               "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]})
    };
    c.api.apply("rolebindings", binding("shop", json!({})));
    c.api.apply(
        "rolebindings",
        binding("kept", json!({"app.kubernetes.io/managed-by": "argocd"})),
    );
    let controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    let fixed = eventually(Duration::from_secs(10), async || {
        let b = c
            .api
            .get("rolebindings", "shop", "outrider-policy-reader")?;
        (b["roleRef"]["name"] == "outrider-policy-reader").then_some(b)
    })
    .await
    .unwrap_or_else(|| panic!("not recreated:\n{}", controller.logs()));
    assert_eq!(fixed["subjects"][0]["name"], "system:serviceaccounts:shop");
    assert_eq!(fixed["subjects"].as_array().map(Vec::len), Some(1));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kept = c
        .api
        .get("rolebindings", "kept", "outrider-policy-reader")
        .unwrap();
    assert_eq!(kept["roleRef"]["name"], "edit");
    assert_eq!(
        events_about(&c.api, "shop", "outrider-policy-reader"),
        ["ForeignObjectReplaced"],
        "{:?}\n{}",
        c.api.all("events"),
        controller.logs()
    );
    assert_eq!(
        events_about(&c.api, "kept", "outrider-policy-reader"),
        ["ForeignObjectLeftAlone"]
    );
    assert!(controller.logs().contains("it grants ClusterRole edit"));
    let metrics = controller.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "outrider_controller_objects_left_alone",
            &[("kind", "RoleBinding")]
        ),
        1.0,
        "{metrics}"
    );
    // Once the namespace is no longer meshed, the binding blocks nothing.
    c.api.apply("namespaces", namespace("kept", false));
    let forgotten = eventually(Duration::from_secs(5), async || {
        let m = controller.metrics().await;
        (metric(
            &m,
            "outrider_controller_objects_left_alone",
            &[("kind", "RoleBinding")],
        ) == 0.0)
            .then_some(())
    })
    .await;
    assert!(forgotten.is_some(), "still counted:\n{}", controller.logs());
}

fn ca_dir(dir: &Path, name: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let status = Command::new(BIN)
        .args(["ca", "init", "--dir"])
        .arg(&path)
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    path
}

fn read(dir: &Path, file: &str) -> String {
    std::fs::read_to_string(dir.join(file)).unwrap()
}

fn ca_secret(issuer_dir: &Path, bundle: &str) -> Value {
    let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
    json!({"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
           "metadata": {"name": "outrider-ca", "namespace": "outrider-system"},
           "data": {"tls.crt": b64(&read(issuer_dir, "issuer.crt")),
                    "tls.key": b64(&read(issuer_dir, "issuer.key")),
                    "ca.crt": b64(bundle)}})
}

/// `outrider ca secret`, the runbook's command, parsed as `kubectl apply`
/// would read it.
fn runbook_secret(issuer_dir: &Path, trust: &[&Path]) -> Result<Value, String> {
    let mut command = Command::new(BIN);
    command
        .args(["ca", "secret", "--issuer-dir"])
        .arg(issuer_dir);
    for root in trust {
        command.arg("--trust").arg(root.join("root.crt"));
    }
    let out = command.output().unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(outrider::yaml::from_str(&String::from_utf8_lossy(&out.stdout)).expect("YAML Secret"))
}

/// Plays kubelet: copies identity Secrets into directories the way a
/// Secret volume is updated, whenever they change.
fn kubelet(
    api: FakeApiServer,
    mounts: Vec<(String, std::path::PathBuf)>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut seen: std::collections::BTreeMap<String, String> = Default::default();
        loop {
            for (name, dir) in &mounts {
                if let Some(s) = api.get("secrets", "shop", name) {
                    let version = s["metadata"]["resourceVersion"]
                        .as_str()
                        .unwrap_or("")
                        .to_string();
                    if seen.get(name) != Some(&version) {
                        let text = |k| String::from_utf8(decode(&s, k)).unwrap();
                        outrider::test_util::certs::write_identity(
                            dir,
                            &text("tls.crt"),
                            &text("tls.key"),
                            &text("ca.crt"),
                        );
                        seen.insert(name.clone(), version);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// Waits until every identity Secret's bundle is `bundle` and its chain
/// verifies, and returns their issuers (the second certificate).
async fn identities_settle(api: &FakeApiServer, bundle: &str, issuer: &str) -> bool {
    let issuer = issuer.split_whitespace().collect::<String>();
    let bundle_bytes = bundle.as_bytes().to_vec();
    eventually(Duration::from_secs(10), async || {
        let secrets: Vec<Value> = api
            .all("secrets")
            .into_iter()
            .filter(|s| s["metadata"]["labels"]["outrider.dev/identity"] == "true")
            .collect();
        let ok = secrets.len() == 2
            && secrets.iter().all(|s| {
                let chain = String::from_utf8(decode(s, "tls.crt")).unwrap_or_default();
                decode(s, "ca.crt") == bundle_bytes
                    && inspect(chain.as_bytes(), Some(bundle.as_bytes()), now()).is_ok()
                    && chain
                        .split_whitespace()
                        .collect::<String>()
                        .ends_with(&issuer)
            });
        ok.then_some(())
    })
    .await
    .is_some()
}

#[tokio::test]
async fn the_trust_anchor_rotates_in_three_runbook_steps_under_load_without_a_failed_request() {
    let c = cluster().await;
    let tmp = tempfile::tempdir().unwrap();
    let old = ca_dir(tmp.path(), "old");
    let new = ca_dir(tmp.path(), "new");
    let old_root = read(&old, "root.crt");
    let new_root = read(&new, "root.crt");
    let both = format!("{old_root}{new_root}");
    c.api
        .apply("secrets", runbook_secret(&old, &[&old]).expect("start"));
    let controller = ControllerProcess::spawn(&c.kubeconfig, &["--bootstrap-ca", "false"]);
    assert!(
        identities_settle(&c.api, &old_root, &read(&old, "issuer.crt")).await,
        "start: {}",
        controller.logs()
    );

    // Two proxies on the controller's identities (orders serves, default
    // calls), their Secret volumes kept current by a stand-in kubelet.
    let server_dir = tmp.path().join("orders");
    let client_dir = tmp.path().join("default");
    let _kubelet = kubelet(
        c.api.clone(),
        vec![
            ("outrider-identity-orders".into(), server_dir.clone()),
            ("outrider-identity-default".into(), client_dir.clone()),
        ],
    );
    assert!(
        eventually(Duration::from_secs(5), async || client_dir
            .join("tls.crt")
            .exists()
            .then_some(()))
        .await
        .is_some()
    );
    let workload = |dir: &Path, sa: &str| common::Workload {
        dir: dir.to_path_buf(),
        id: outrider::identity::SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}"))
            .unwrap(),
    };
    let server_w = workload(&server_dir, "orders");
    let client_w = workload(&client_dir, "default");
    let app = outrider::test_util::apps::http1_app(Duration::ZERO).await;
    let (server, client) = common::strict_pair(&server_w, &client_w, app).await;
    let target = client.outbound();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match http1_get(target, "/rotation").await {
                    Ok((status, _)) if status == 200 => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };

    let steps: [(&str, &Path, &[&Path], &str); 3] = [
        (
            "1. trust both roots, still issuing from the old issuer",
            &old,
            &[&old, &new],
            &both,
        ),
        (
            "2. issue from the new issuer, both roots trusted",
            &new,
            &[&old, &new],
            &both,
        ),
        ("3. drop the old root", &new, &[&new], &new_root),
    ];
    for (step, issuer, trust, bundle) in steps {
        c.api
            .apply("secrets", runbook_secret(issuer, trust).expect(step));
        assert!(
            identities_settle(&c.api, bundle, &read(issuer, "issuer.crt")).await,
            "{step}: {}",
            controller.logs()
        );
        // Traffic keeps flowing while the proxies pick the change up.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 100, "too little traffic to prove anything: {ok}");
    assert!(
        failed.is_empty(),
        "{} failed of {}: {:?}\nserver:\n{}",
        failed.len(),
        ok,
        &failed[..failed.len().min(5)],
        server.logs()
    );
    // Both proxies reloaded at each step (the first load plus three).
    for proxy in [&server, &client] {
        let m = proxy.metrics().await;
        assert!(
            metric(&m, "outrider_identity_reloads_total", &[]) >= 4.0,
            "{m}"
        );
    }
    let hooks = c
        .api
        .get("mutatingwebhookconfigurations", "", "outrider-injector")
        .unwrap();
    let bundle = base64::engine::general_purpose::STANDARD
        .decode(
            hooks["webhooks"][0]["clientConfig"]["caBundle"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
    assert_eq!(bundle, new_root.as_bytes());

    // The runbook refuses a step that would break the mesh: an issuer
    // whose root is not trusted.
    let refused = runbook_secret(&old, &[&new]).unwrap_err();
    assert!(
        refused.contains("does not verify against the bundle"),
        "{refused}"
    );
}

#[tokio::test]
async fn a_broken_or_deleted_ca_secret_is_refused_and_the_last_good_ca_keeps_issuing() {
    let c = cluster().await;
    let tmp = tempfile::tempdir().unwrap();
    let old = ca_dir(tmp.path(), "old");
    let new = ca_dir(tmp.path(), "new");
    c.api
        .apply("secrets", ca_secret(&old, &read(&old, "root.crt")));
    // Bootstrapping stays on: it must not replace a CA that was deleted.
    let controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    assert!(identity(&c.api, "shop", "orders").await.is_some());
    // The issuer does not chain to the bundle.
    c.api
        .apply("secrets", ca_secret(&old, &read(&new, "root.crt")));
    let refused = eventually(Duration::from_secs(5), async || {
        let m = controller.metrics().await;
        (metric(&m, "outrider_controller_ca_load_failures_total", &[]) >= 1.0).then_some(())
    })
    .await;
    assert!(refused.is_some(), "{}", controller.logs());
    c.api
        .apply("serviceaccounts", service_account("shop", "late"));
    let late = identity(&c.api, "shop", "late")
        .await
        .expect("still issuing with the last good CA");
    assert!(
        inspect(
            &decode(&late, "tls.crt"),
            Some(read(&old, "root.crt").as_bytes()),
            now()
        )
        .is_ok()
    );

    // The CA Secret deleted: no new anchor is bootstrapped behind the
    // mesh's back; the CA in use keeps issuing.
    c.api.delete("secrets", "outrider-ca");
    c.api
        .apply("serviceaccounts", service_account("shop", "after-delete"));
    let after = identity(&c.api, "shop", "after-delete")
        .await
        .expect("still issuing after the CA Secret was deleted");
    assert!(
        inspect(
            &decode(&after, "tls.crt"),
            Some(read(&old, "root.crt").as_bytes()),
            now()
        )
        .is_ok()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        c.api
            .get("secrets", "outrider-system", "outrider-ca")
            .is_none(),
        "a new CA was bootstrapped over a deleted one:\n{}",
        controller.logs()
    );
}

#[tokio::test]
async fn a_replica_that_loses_the_lease_stops_issuing_and_only_one_of_two_leads() {
    let c = cluster().await;
    let lease = [
        "--lease-duration",
        "3s",
        "--lease-renew-deadline",
        "2s",
        "--lease-retry",
        "200ms",
    ];
    let mut args_a = lease.to_vec();
    args_a.extend(["--replica-name", "a"]);
    let mut args_b = lease.to_vec();
    args_b.extend(["--replica-name", "b"]);
    let a = ControllerProcess::spawn(&c.kubeconfig, &args_a);
    let b = ControllerProcess::spawn(&c.kubeconfig, &args_b);
    assert!(identity(&c.api, "shop", "orders").await.is_some());
    let leaders = async || {
        metric(&a.metrics().await, "outrider_controller_leader", &[])
            + metric(&b.metrics().await, "outrider_controller_leader", &[])
    };
    assert_eq!(
        eventually(Duration::from_secs(5), async || (leaders().await == 1.0)
            .then_some(()))
        .await,
        Some(()),
        "exactly one leader"
    );

    // Someone else takes the Lease for an hour: neither replica may issue.
    let mut stolen = c
        .api
        .get("leases", "outrider-system", "outrider-controller")
        .unwrap();
    stolen["spec"]["holderIdentity"] = json!("someone-else");
    stolen["spec"]["leaseDurationSeconds"] = json!(3600);
    stolen["spec"]["renewTime"] = json!(
        time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    );
    c.api.apply("leases", stolen);
    assert_eq!(
        eventually(Duration::from_secs(5), async || (leaders().await == 0.0)
            .then_some(()))
        .await,
        Some(()),
        "nobody leads a stolen lease:\n{}\n{}",
        a.logs(),
        b.logs()
    );
    c.api
        .apply("serviceaccounts", service_account("shop", "unissued"));
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        c.api
            .get("secrets", "shop", "outrider-identity-unissued")
            .is_none(),
        "a follower issued"
    );
}

#[tokio::test]
async fn every_write_names_the_controller_as_field_manager_and_every_request_its_agent() {
    let c = cluster().await;
    let controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    assert!(identity(&c.api, "shop", "orders").await.is_some());
    // The Lease renewed at least once, and the caBundle written.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let seen = c.api.seen();
    let writes: Vec<_> = seen
        .iter()
        .filter(|r| matches!(r.method.as_str(), "POST" | "PUT" | "PATCH"))
        .collect();
    for kind in ["leases", "secrets"] {
        assert!(
            writes.iter().any(|w| w.path.contains(kind)),
            "no write to {kind} seen"
        );
    }
    for write in &writes {
        assert!(
            write.query.contains("fieldManager=outrider-controller"),
            "{} {}?{} names no field manager\n{}",
            write.method,
            write.path,
            write.query,
            controller.logs()
        );
    }
    let agent = format!("outrider-controller/{}", env!("CARGO_PKG_VERSION"));
    for request in &seen {
        assert_eq!(
            request.user_agent, agent,
            "{} {}",
            request.method, request.path
        );
    }
}

#[tokio::test]
async fn lease_renewals_on_an_idle_cluster_start_no_reconcile_pass() {
    let c = cluster().await;
    // Renewing five times a second: before, each renewal woke a pass
    // (at most one a second), and each pass read the CA Secret and the
    // webhook configuration.
    let controller =
        ControllerProcess::spawn(&c.kubeconfig, &["--lease-retry", "200ms", "--resync", "1h"]);
    assert!(identity(&c.api, "shop", "orders").await.is_some());
    // Let the first passes finish (issuing, the caBundle): two quiet
    // seconds in a row, on a busy machine too.
    let others = |from: usize| {
        c.api.seen()[from..]
            .iter()
            .filter(|r| !r.path.contains("/leases"))
            .count()
    };
    let mut quiet = 0;
    for _ in 0..20 {
        let mark = c.api.seen().len();
        tokio::time::sleep(Duration::from_secs(1)).await;
        quiet = if others(mark) == 0 { quiet + 1 } else { 0 };
        if quiet == 2 {
            break;
        }
    }
    let before = c.api.seen().len();
    tokio::time::sleep(Duration::from_secs(6)).await;
    let seen = c.api.seen();
    let idle: Vec<String> = seen[before..]
        .iter()
        .filter(|r| !r.path.contains("/leases"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    let renewals = seen[before..]
        .iter()
        .filter(|r| r.method == "PUT" && r.path.contains("/leases"))
        .count();
    eprintln!("{renewals} renewals, {} other requests in 6 s", idle.len());
    assert!(renewals >= 10, "the lease was not renewed: {renewals}");
    assert!(
        idle.is_empty(),
        "requests other than the lease on an idle cluster: {idle:?}\n{}",
        controller.logs()
    );
}

#[tokio::test]
async fn a_leader_stopped_for_a_rolling_update_hands_over_within_two_seconds() {
    let c = cluster().await;
    // client-go's lease duration (15 s): without a release the other
    // replica would wait for it to expire.
    let lease = ["--lease-duration", "15s", "--lease-retry", "500ms"];
    let spawn = |name: &str| {
        let mut args = lease.to_vec();
        args.extend(["--replica-name", name]);
        ControllerProcess::spawn(&c.kubeconfig, &args)
    };
    let mut replicas = [spawn("a"), spawn("b")];
    let leads = async |replica: &ControllerProcess| {
        metric(&replica.metrics().await, "outrider_controller_leader", &[]) == 1.0
    };
    let leader = eventually(Duration::from_secs(10), async || {
        for (i, replica) in replicas.iter().enumerate() {
            if leads(replica).await {
                return Some(i);
            }
        }
        None
    })
    .await
    .expect("a leader");
    let other = 1 - leader;

    let stopped = std::time::Instant::now();
    let status = replicas[leader].terminate().await;
    assert!(
        status.is_some_and(|s| s.success()),
        "the leader did not stop cleanly: {status:?}\n{}",
        replicas[leader].logs()
    );
    let lease = c
        .api
        .get("leases", "outrider-system", "outrider-controller")
        .unwrap();
    assert!(
        lease["spec"]["holderIdentity"]
            .as_str()
            .is_none_or(|h| h != ["a", "b"][leader]),
        "the stopped leader still holds the lease: {lease}\n{}",
        replicas[leader].logs()
    );
    let took_over = eventually(Duration::from_secs(10), async || {
        leads(&replicas[other]).await.then(|| stopped.elapsed())
    })
    .await
    .expect("the other replica never led");
    eprintln!("failover took {took_over:?}");
    assert!(
        took_over < Duration::from_secs(2),
        "failover took {took_over:?}\n{}",
        replicas[other].logs()
    );
}

#[tokio::test]
async fn the_webhook_serves_https_with_a_mesh_certificate_and_patches_pods() {
    use http_body_util::{BodyExt, Full};
    let c = cluster().await;
    // A meshed namespace that enforces the baseline Pod Security Standard.
    c.api.apply(
        "namespaces",
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "locked",
               "labels": {"outrider.dev/inject": "enabled",
                          "pod-security.kubernetes.io/enforce": "baseline"}}}),
    );
    let controller = ControllerProcess::spawn(&c.kubeconfig, &[]);
    let ca = secret(
        &c.api,
        "outrider-system",
        "outrider-ca",
        Duration::from_secs(10),
    )
    .await
    .unwrap();
    let bundle = decode(&ca, "ca.crt");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&bundle) {
        roots.add(cert.unwrap()).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(outrider::crypto::provider()))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));

    let post = async |path: &str, body: Vec<u8>| -> (u16, Value) {
        let tcp = tokio::net::TcpStream::connect(controller.webhook)
            .await
            .unwrap();
        // Verified by name against the mesh's trust anchor, as the API
        // server does with the caBundle.
        let name =
            rustls_pki_types::ServerName::try_from("outrider-webhook.outrider-system.svc").unwrap();
        let tls = connector
            .connect(name, tcp)
            .await
            .expect("TLS with the mesh CA");
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
                .await
                .unwrap();
        tokio::spawn(conn);
        let request = http::Request::post(path)
            .header("content-type", "application/json")
            .body(Full::new(bytes::Bytes::from(body)))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
    };
    let review_in = |namespace: &str, object: Value| {
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
               "request": {"uid": "abc", "kind": {"group": "", "version": "v1", "kind": "Pod"},
                           "operation": "CREATE", "namespace": namespace, "object": object}})
        .to_string()
        .into_bytes()
    };
    let review = |object: Value| review_in("shop", object);
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "namespace": "shop"},
                     "spec": {"containers": [{"name": "web", "image": "web:1"}]}});

    let (status, answer) = post("/inject/namespace", review(pod.clone())).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["uid"], "abc");
    assert_eq!(answer["response"]["allowed"], true);
    let patch: json_patch::Patch = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD
            .decode(answer["response"]["patch"].as_str().expect("a patch"))
            .unwrap(),
    )
    .unwrap();
    let mut injected = pod.clone();
    json_patch::patch(&mut injected, &patch).unwrap();
    assert_eq!(
        injected["spec"]["initContainers"][1]["name"],
        "outrider-proxy"
    );

    let (status, answer) = post("/inject/namespace", review(injected)).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none(), "{answer}");

    // Baseline would reject outrider-init's capabilities after injection:
    // refused up front, saying what to do (once the namespace is cached).
    let mut locked_pod = pod.clone();
    locked_pod["metadata"]["namespace"] = json!("locked");
    let refused = eventually(Duration::from_secs(5), async || {
        let (_, answer) = post("/inject/namespace", review_in("locked", locked_pod.clone())).await;
        (answer["response"]["allowed"] == false).then_some(answer)
    })
    .await
    .expect("refused in a baseline namespace");
    let message = refused["response"]["status"]["message"].as_str().unwrap();
    assert!(
        message.contains(
            "namespace locked enforces Pod Security \"baseline\" (pod-security.kubernetes.io/enforce)"
        ) && message.contains("container outrider-init adds capabilities NET_ADMIN, NET_RAW")
            && message.contains("pod-security.kubernetes.io/enforce=privileged"),
        "{message}"
    );

    let (status, answer) = post("/inject/namespace", b"garbage".to_vec()).await;
    assert_eq!(status, 200, "a denial, never a 500");
    assert_eq!(answer["response"]["allowed"], false);
    assert!(
        answer["response"]["status"]["message"]
            .as_str()
            .unwrap()
            .contains("not an AdmissionReview")
    );

    // An oversized body is refused with the reason, not read to the end.
    let (status, answer) = post("/inject/namespace", vec![b' '; 9 * 1024 * 1024]).await;
    assert_eq!(status, 200);
    assert_eq!(answer["response"]["allowed"], false);
    let message = answer["response"]["status"]["message"].as_str().unwrap();
    assert!(message.contains("over 8388608 bytes"), "{message}");

    // A client that connects and then says nothing is dropped.
    let tcp = tokio::net::TcpStream::connect(controller.webhook)
        .await
        .unwrap();
    let name =
        rustls_pki_types::ServerName::try_from("outrider-webhook.outrider-system.svc").unwrap();
    let mut idle = connector.connect(name, tcp).await.unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        let mut buf = [0u8; 64];
        tokio::io::AsyncReadExt::read(&mut idle, &mut buf).await
    })
    .await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "a silent client kept its connection: {closed:?}"
    );

    let metrics = controller.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "outrider_controller_webhook_reviews_total",
            &[("verdict", "injected")]
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "outrider_controller_webhook_reviews_total",
            &[("verdict", "malformed")]
        ),
        2.0
    );
    assert!(
        metric(
            &metrics,
            "outrider_controller_webhook_reviews_total",
            &[("verdict", "pod_security")]
        ) >= 1.0
    );
}

#[test]
fn bad_flags_exit_64_naming_the_flag_before_touching_the_cluster() {
    for (flag, value) in [
        ("--log-format", "xml"),
        ("--trust-domain", "Not A Domain"),
        ("--pod-security", "ignore"),
    ] {
        let out = Command::new(BIN)
            .args(["controller", "--kubeconfig", "/nonexistent", flag, value])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{flag}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(flag),
            "{flag}"
        );
    }
}
