//! `outrider controller` against a real kube-apiserver (v1.20, the newest
//! that builds here: `ci/kube-apiserver.sh`) and etcd, started by the
//! test on loopback ports, the controller authenticated as its own
//! ServiceAccount with exactly the chart's RBAC: what the fake API server
//! can only imitate — immutable fields, delete preconditions, RBAC on
//! every request, the field managers `managedFields` records — and the
//! API requests the controller makes on an idle cluster, counted by the
//! server's own audit log.
//!
//! `OUTRIDER_KUBE_APISERVER` names the directory holding `kube-apiserver`
//! and `etcd` (ci/test.sh builds it and sets it). Without it the tests
//! say so and pass outside CI; under `CI=true` they fail instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use common::controller::ControllerProcess;
use k8s_openapi::api::authentication::v1::TokenRequest;
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::Client;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use outrider::test_util::eventually;
use serde_json::{Value, json};

const SYSTEM: &str = "outrider-system";
const CONTROLLER_USER: &str = "system:serviceaccount:outrider-system:outrider-controller";

/// etcd and kube-apiserver, stopped when dropped.
struct RealApiServer {
    etcd: Child,
    apiserver: Child,
    dir: tempfile::TempDir,
    url: String,
    ca_pem: String,
    admin_token: String,
}

impl Drop for RealApiServer {
    fn drop(&mut self) {
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn binaries() -> Option<PathBuf> {
    match std::env::var_os("OUTRIDER_KUBE_APISERVER") {
        Some(dir) => Some(PathBuf::from(dir)),
        None if std::env::var("CI").as_deref() == Ok("true") => {
            panic!("OUTRIDER_KUBE_APISERVER is not set: ci/test.sh builds and sets it")
        }
        None => {
            eprintln!(
                "skipped: no real kube-apiserver (set OUTRIDER_KUBE_APISERVER to the directory ci/kube-apiserver.sh fills)"
            );
            None
        }
    }
}

impl RealApiServer {
    async fn start(bin: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        // PKI: a CA, the serving certificate, the service-account keys.
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let serving_key = rcgen::KeyPair::generate().unwrap();
        let serving = rcgen::CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()])
            .unwrap()
            .signed_by(&serving_key, &issuer)
            .unwrap();
        let sa_key = rcgen::KeyPair::generate().unwrap();
        std::fs::write(path("ca.crt"), ca.pem()).unwrap();
        std::fs::write(path("serving.crt"), serving.pem()).unwrap();
        std::fs::write(path("serving.key"), serving_key.serialize_pem()).unwrap();
        std::fs::write(path("sa.key"), sa_key.serialize_pem()).unwrap();
        std::fs::write(path("sa.pub"), sa_key.public_key_pem()).unwrap();
        let admin_token = format!("{:032x}", rand_u128());
        std::fs::write(
            path("tokens.csv"),
            format!("{admin_token},admin,admin,system:masters\n"),
        )
        .unwrap();
        // Everything the controller's ServiceAccount asks, once answered.
        std::fs::write(
            path("audit.yaml"),
            format!(
                "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived, ResponseStarted]\n\
                 rules:\n- level: Metadata\n  users: [\"{CONTROLLER_USER}\"]\n- level: None\n"
            ),
        )
        .unwrap();
        let (client_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let log = |name: &str| Stdio::from(std::fs::File::create(path(name)).unwrap());
        let etcd = Command::new(bin.join("etcd"))
            .args(["--name", "test", "--data-dir"])
            .arg(path("etcd"))
            .arg(format!(
                "--listen-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!(
                "--advertise-client-urls=http://127.0.0.1:{client_port}"
            ))
            .arg(format!("--listen-peer-urls=http://127.0.0.1:{peer_port}"))
            .arg(format!(
                "--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}"
            ))
            .arg(format!(
                "--initial-cluster=test=http://127.0.0.1:{peer_port}"
            ))
            .stdin(Stdio::null())
            .stdout(log("etcd.log"))
            .stderr(log("etcd.err"))
            .spawn()
            .expect("etcd");
        let file = |name: &str| path(name).display().to_string();
        let apiserver = Command::new(bin.join("kube-apiserver"))
            .arg(format!("--etcd-servers=http://127.0.0.1:{client_port}"))
            .args(["--bind-address=127.0.0.1", "--insecure-port=0"])
            .arg(format!("--secure-port={api_port}"))
            .args([
                "--advertise-address=127.0.0.1",
                "--endpoint-reconciler-type=none",
                "--service-cluster-ip-range=10.96.0.0/16",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NamespaceLifecycle,ServiceAccount,MutatingAdmissionWebhook,ValidatingAdmissionWebhook",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--api-audiences=https://kubernetes.default.svc",
                "--profiling=false",
                "--audit-log-format=json",
            ])
            .arg(format!("--tls-cert-file={}", file("serving.crt")))
            .arg(format!("--tls-private-key-file={}", file("serving.key")))
            .arg(format!("--client-ca-file={}", file("ca.crt")))
            .arg(format!("--token-auth-file={}", file("tokens.csv")))
            .arg(format!("--service-account-key-file={}", file("sa.pub")))
            .arg(format!("--service-account-signing-key-file={}", file("sa.key")))
            .arg(format!("--cert-dir={}", file("pki")))
            .arg(format!("--audit-policy-file={}", file("audit.yaml")))
            .arg(format!("--audit-log-path={}", file("audit.log")))
            .stdin(Stdio::null())
            .stdout(log("kube-apiserver.log"))
            .stderr(log("kube-apiserver.err"))
            .spawn()
            .expect("kube-apiserver");
        let server = Self {
            etcd,
            apiserver,
            url: format!("https://127.0.0.1:{api_port}"),
            ca_pem: ca.pem(),
            admin_token,
            dir,
        };
        let admin = server.admin().await;
        let ready = eventually(Duration::from_secs(90), async || {
            admin
                .request_text(http::Request::get("/readyz").body(Vec::new()).unwrap())
                .await
                .ok()
                .filter(|body| body.trim() == "ok")
        })
        .await;
        assert!(
            ready.is_some(),
            "kube-apiserver not ready:\n{}",
            std::fs::read_to_string(server.dir.path().join("kube-apiserver.err"))
                .unwrap_or_default()
        );
        server
    }

    fn kubeconfig(&self, name: &str, token: &str) -> PathBuf {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: real\n  cluster: {{server: \"{}\", certificate-authority-data: \"{ca}\"}}\n\
             users:\n- name: {name}\n  user: {{token: \"{token}\"}}\ncontexts:\n- name: real\n  context: {{cluster: real, user: {name}}}\ncurrent-context: real\n",
            self.url
        );
        let path = self.dir.path().join(format!("{name}.kubeconfig"));
        std::fs::write(&path, text).unwrap();
        path
    }

    async fn admin(&self) -> Client {
        let path = self.kubeconfig("admin", &self.admin_token);
        outrider::kube_client::client(Some(&path), "test-admin")
            .await
            .unwrap()
    }

    /// The audit log's entries for the controller's user.
    fn controller_requests(&self) -> Vec<Value> {
        std::fs::read_to_string(self.dir.path().join("audit.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .filter(|entry| entry["user"]["username"] == CONTROLLER_USER)
            .collect()
    }
}

fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    outrider::crypto::provider()
        .secure_random
        .fill(&mut bytes)
        .unwrap();
    u128::from_le_bytes(bytes)
}

/// `helm template` of the chart, the templates named only. The pod-level
/// webhook selects by label: 1.20 refuses `matchConditions` ("field not
/// declared in schema"), which is what that fallback is for.
fn chart(templates: &[&str]) -> Vec<Value> {
    let helm = std::env::var("HELM").unwrap_or_else(|_| "helm".into());
    let mut command = Command::new(helm);
    command.args([
        "template",
        "outrider",
        "charts/outrider",
        "--namespace",
        SYSTEM,
        "--set",
        "webhook.podSelection=label",
    ]);
    for template in templates {
        command.args(["--show-only", &format!("templates/{template}")]);
    }
    let out = command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("helm (ci/test.sh installs it; HELM names it)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    outrider::yaml::documents(&String::from_utf8_lossy(&out.stdout))
        .unwrap()
        .into_iter()
        .filter(|doc| !doc.is_null())
        .collect()
}

/// Creates or updates `object` as the admin (server-side apply).
async fn apply(client: &Client, object: Value) {
    let (group, version) = match object["apiVersion"].as_str().unwrap().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (
            String::new(),
            object["apiVersion"].as_str().unwrap().to_string(),
        ),
    };
    let gvk = GroupVersionKind::gvk(&group, &version, object["kind"].as_str().unwrap());
    let resource = ApiResource::from_gvk(&gvk);
    let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    };
    let name = object["metadata"]["name"].as_str().unwrap().to_string();
    api.patch(
        &name,
        &PatchParams::apply("test-admin").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("apply {} {name}: {e}", object["kind"]));
}

async fn get(
    client: &Client,
    api_version: &str,
    kind: &str,
    ns: &str,
    name: &str,
) -> Option<Value> {
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk(group, version, kind));
    let api: Api<DynamicObject> = if ns.is_empty() {
        Api::all_with(client.clone(), &resource)
    } else {
        Api::namespaced_with(client.clone(), ns, &resource)
    };
    let object = api.get_opt(name).await.ok()??;
    Some(serde_json::to_value(object).unwrap())
}

/// The chart's RBAC and webhook configuration, the controller's
/// ServiceAccount and a token for it; returns its kubeconfig.
async fn install(server: &RealApiServer, admin: &Client) -> PathBuf {
    apply(
        admin,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": SYSTEM}}),
    )
    .await;
    apply(
        admin,
        json!({"apiVersion": "v1", "kind": "ServiceAccount",
               "metadata": {"name": "outrider-controller", "namespace": SYSTEM}}),
    )
    .await;
    for object in chart(&["rbac.yaml", "webhook.yaml"]) {
        apply(admin, object).await;
    }
    // The policy CRDs, as helm installs them from crds/: the controller
    // watches both kinds to serve proxies their policies.
    let crds = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/outrider/crds");
    for file in std::fs::read_dir(crds).expect("charts/outrider/crds") {
        let text = std::fs::read_to_string(file.expect("a CRD file").path()).expect("a CRD");
        for mut object in outrider::yaml::documents(&text).unwrap() {
            if !object.is_null() {
                without_cel(&mut object);
                apply(admin, object).await;
            }
        }
    }
    let accounts: Api<ServiceAccount> = Api::namespaced(admin.clone(), SYSTEM);
    let request: TokenRequest = serde_json::from_value(json!({
        "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
        "spec": {"audiences": ["https://kubernetes.default.svc"], "expirationSeconds": 3600}
    }))
    .unwrap();
    let token: TokenRequest = accounts
        .create_subresource(
            "token",
            "outrider-controller",
            &PostParams::default(),
            &request,
        )
        .await
        .expect("TokenRequest");
    let token = token.status.expect("a token").token.expect("a token");
    server.kubeconfig("outrider-controller", &token)
}

/// Drops the CEL rules from a CRD's schema: 1.20 refuses the field ("not
/// declared in schema"); the rules themselves are run by a CEL engine in
/// src/policy/crd/tests.rs.
fn without_cel(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.remove("x-kubernetes-validations");
            map.values_mut().for_each(without_cel);
        }
        Value::Array(items) => items.iter_mut().for_each(without_cel),
        _ => {}
    }
}

/// A real API server with the chart's RBAC installed, its admin client
/// and the controller's kubeconfig; `None` when no server is available
/// outside CI (see [`binaries`]).
async fn installed() -> Option<(RealApiServer, Client, PathBuf)> {
    let _ = outrider::crypto::provider().install_default();
    let bin = binaries()?;
    let server = RealApiServer::start(&bin).await;
    let admin = server.admin().await;
    let kubeconfig = install(&server, &admin).await;
    Some((server, admin, kubeconfig))
}

fn namespace(name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Namespace",
           "metadata": {"name": name, "labels": {"outrider.dev/inject": "enabled"}}})
}

fn service_account(ns: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": ns}})
}

fn reader_binding(ns: &str, role: &str, labels: Value) -> Value {
    json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
           "metadata": {"name": "outrider-policy-reader", "namespace": ns, "labels": labels},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
           "subjects": [{"kind": "User", "name": "alice", "apiGroup": "rbac.authorization.k8s.io"}]})
}

/// The reasons of the events recorded about `ns/name`.
async fn events_about(admin: &Client, ns: &str, name: &str) -> Vec<String> {
    let resource = ApiResource::from_gvk(&GroupVersionKind::gvk("events.k8s.io", "v1", "Event"));
    let api: Api<DynamicObject> = Api::namespaced_with(admin.clone(), ns, &resource);
    let list = api.list(&ListParams::default()).await.unwrap();
    list.items
        .iter()
        .filter(|e| e.data["regarding"]["name"] == name)
        .map(|e| e.data["reason"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn managers(object: &Value) -> Vec<String> {
    object["metadata"]["managedFields"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| m["manager"].as_str().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_real_api_server_foreign_objects_are_healed_or_left_alone_as_the_controller_s_own_account()
 {
    let Some((server, admin, kubeconfig)) = installed().await else {
        return;
    };
    // What an operator may have left under our names.
    for object in [
        namespace("shop"),
        service_account("shop", "web"),
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "outrider-identity-web", "namespace": "shop"},
               "data": {"hand-made.pem": "aGFuZA=="}}),
        reader_binding("shop", "view", json!({})),
        namespace("kept"),
        service_account("kept", "api"),
        json!({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
               "metadata": {"name": "outrider-identity-api", "namespace": "kept",
                            "labels": {"app.kubernetes.io/managed-by": "Helm"}},
               "data": {"token": "c2VjcmV0"}}),
        reader_binding(
            "kept",
            "edit",
            json!({"app.kubernetes.io/managed-by": "argocd"}),
        ),
    ] {
        apply(&admin, object).await;
    }
    let mut controller = ControllerProcess::spawn(
        &kubeconfig,
        &[
            "--namespace",
            SYSTEM,
            "--replica-name",
            "controller-0",
            "--resync",
            "2s",
        ],
    );

    // The Opaque Secret (type is immutable: 422 on any write) is replaced.
    let healed = eventually(Duration::from_secs(30), async || {
        let s = get(&admin, "v1", "Secret", "shop", "outrider-identity-web").await?;
        (s["type"] == "kubernetes.io/tls").then_some(s)
    })
    .await
    .unwrap_or_else(|| panic!("not replaced:\n{}", controller.logs()));
    assert_eq!(
        healed["metadata"]["labels"]["outrider.dev/identity"],
        "true"
    );
    // The binding granting `view` (roleRef is immutable) is recreated.
    let rebound = eventually(Duration::from_secs(30), async || {
        let b = get(
            &admin,
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            "shop",
            "outrider-policy-reader",
        )
        .await?;
        (b["roleRef"]["name"] == "outrider-policy-reader").then_some(b)
    })
    .await
    .unwrap_or_else(|| panic!("not recreated:\n{}", controller.logs()));
    assert_eq!(
        rebound["subjects"][0]["name"],
        "system:serviceaccounts:shop"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let kept = get(&admin, "v1", "Secret", "kept", "outrider-identity-api")
        .await
        .unwrap();
    assert_eq!(kept["type"], "Opaque");
    let kept_binding = get(
        &admin,
        "rbac.authorization.k8s.io/v1",
        "RoleBinding",
        "kept",
        "outrider-policy-reader",
    )
    .await
    .unwrap();
    assert_eq!(kept_binding["roleRef"]["name"], "edit");
    assert_eq!(
        events_about(&admin, "shop", "outrider-identity-web").await,
        ["ForeignObjectReplaced"]
    );
    assert_eq!(
        events_about(&admin, "shop", "outrider-policy-reader").await,
        ["ForeignObjectReplaced"]
    );
    assert_eq!(
        events_about(&admin, "kept", "outrider-identity-api").await,
        ["ForeignObjectLeftAlone"]
    );
    assert_eq!(
        events_about(&admin, "kept", "outrider-policy-reader").await,
        ["ForeignObjectLeftAlone"]
    );

    // Every object it wrote names it in managedFields, none `unknown`.
    let written = [
        get(&admin, "v1", "Secret", "shop", "outrider-identity-web").await,
        get(&admin, "v1", "Secret", SYSTEM, "outrider-ca").await,
        get(
            &admin,
            "coordination.k8s.io/v1",
            "Lease",
            SYSTEM,
            "outrider-controller",
        )
        .await,
        get(
            &admin,
            "rbac.authorization.k8s.io/v1",
            "RoleBinding",
            "shop",
            "outrider-policy-reader",
        )
        .await,
        get(
            &admin,
            "admissionregistration.k8s.io/v1",
            "MutatingWebhookConfiguration",
            "",
            "outrider-injector",
        )
        .await,
    ];
    for object in written {
        let object = object.expect("written");
        let managers = managers(&object);
        assert!(
            managers.contains(&"outrider-controller".to_string()),
            "{}: {managers:?}",
            object["metadata"]["name"]
        );
        assert!(
            !managers.contains(&"unknown".to_string()),
            "{}: {managers:?}",
            object["metadata"]["name"]
        );
    }
    // Nothing the controller asked was refused by RBAC.
    let refused: Vec<String> = server
        .controller_requests()
        .iter()
        .filter(|r| r["responseStatus"]["code"] == 403)
        .map(|r| format!("{} {}", r["verb"], r["requestURI"]))
        .collect();
    assert!(refused.is_empty(), "forbidden: {refused:?}");

    // A rolling update: a second replica with the shipped Lease timings
    // (retry 2 s) takes over when the leader is stopped, because the
    // leader hands its Lease back instead of letting it expire (15 s).
    let standby = ControllerProcess::spawn(
        &kubeconfig,
        &[
            "--namespace",
            SYSTEM,
            "--replica-name",
            "controller-1",
            "--resync",
            "2s",
        ],
    );
    // Past its start-up, into its retry cycle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let stopped_at = std::time::Instant::now();
    controller.terminate().await.expect("exits on SIGTERM");
    let took_over = eventually(Duration::from_secs(20), async || {
        let lease = get(
            &admin,
            "coordination.k8s.io/v1",
            "Lease",
            SYSTEM,
            "outrider-controller",
        )
        .await?;
        (lease["spec"]["holderIdentity"] == "controller-1").then(|| stopped_at.elapsed())
    })
    .await
    .unwrap_or_else(|| panic!("no takeover:\n{}", standby.logs()));
    eprintln!("failover from SIGTERM to the other replica holding the Lease: {took_over:?}");
    assert!(took_over < Duration::from_secs(3), "{took_over:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_real_api_server_an_idle_controller_makes_few_requests() {
    let Some((server, admin, kubeconfig)) = installed().await else {
        return;
    };
    for object in [
        namespace("shop"),
        service_account("shop", "web"),
        service_account("shop", "db"),
    ] {
        apply(&admin, object).await;
    }
    // The shipped timings: resync 30 s, Lease retry 2 s.
    let controller = ControllerProcess::spawn(
        &kubeconfig,
        &[
            "--namespace",
            SYSTEM,
            "--replica-name",
            "controller-0",
            "--resync",
            "30s",
        ],
    );
    let settled = eventually(Duration::from_secs(30), async || {
        get(&admin, "v1", "Secret", "shop", "outrider-identity-db").await
    })
    .await;
    assert!(settled.is_some(), "{}", controller.logs());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let before = server.controller_requests().len();
    let window = Duration::from_secs(60);
    tokio::time::sleep(window).await;
    let requests = server.controller_requests();
    let idle = &requests[before..];
    let mut by_kind: BTreeMap<String, usize> = BTreeMap::new();
    for request in idle {
        let key = format!(
            "{} {}",
            request["verb"].as_str().unwrap_or_default(),
            request["objectRef"]["resource"]
                .as_str()
                .unwrap_or_default()
        );
        *by_kind.entry(key).or_default() += 1;
    }
    // Printed for docs/operations.md.
    eprintln!(
        "requests in {window:?} on an idle cluster: {} {by_kind:?}",
        idle.len()
    );
    // The Lease (a GET and an UPDATE every 2 s: 60) and two resync passes
    // (the CA Secret and the webhook configuration: 4); watches that the
    // server ends and the reflector renews come on top, a few a minute.
    assert!(idle.len() <= 80, "{} requests: {by_kind:?}", idle.len());
    let leases = by_kind.get("update leases").copied().unwrap_or_default();
    assert!((25..=35).contains(&leases), "{by_kind:?}");
}
