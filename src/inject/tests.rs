use serde_json::json;

use super::config::{InjectConfig, SidecarMode};
use super::manifest::inject_manifests;
use super::pod::{INIT_CONTAINER, Outcome, PROXY_CONTAINER};
use super::*;
use crate::policy::index::Probe;
use crate::test_util::golden::{assert_golden, golden_path};

fn mesh() -> InjectConfig {
    InjectConfig {
        image: "ghcr.io/outrider-mesh/outrider:test".into(),
        ..InjectConfig::default()
    }
}

fn input(name: &str) -> String {
    std::fs::read_to_string(golden_path(&format!("inject/{name}.input.yaml"))).unwrap()
}

fn outcomes(reports: &[manifest::Report]) -> Vec<(String, Option<Outcome>)> {
    reports
        .iter()
        .map(|r| (r.object.clone(), r.outcome.clone()))
        .collect()
}

#[test]
fn a_deployment_gets_the_sidecar_and_the_other_documents_pass_through_untouched() {
    let (out, reports) = inject_manifests(&input("web"), &mesh()).unwrap();
    assert_golden("inject/web.golden.yaml", &out);
    // The ConfigMap keeps its comment: it was not re-serialised.
    assert!(out.contains("comments and layout of untouched documents survive"));
    assert_eq!(
        outcomes(&reports),
        vec![
            ("ConfigMap/web-config".into(), None),
            ("Service/web".into(), None),
            (
                "Deployment/web".into(),
                Some(Outcome::Injected {
                    probes: vec![
                        Probe {
                            port: 8080,
                            path: Some("/livez".into())
                        },
                        Probe {
                            port: 8080,
                            path: Some("/healthz".into())
                        },
                    ]
                })
            ),
        ]
    );
}

#[test]
fn every_workload_kind_and_list_items_are_injected_and_disabled_pods_are_not() {
    let (out, reports) = inject_manifests(&input("batch"), &mesh()).unwrap();
    assert_golden("inject/batch.golden.yaml", &out);
    let summary: Vec<(String, &str)> = reports
        .iter()
        .map(|r| {
            let what = match &r.outcome {
                Some(Outcome::Injected { .. }) => "injected",
                Some(Outcome::Disabled) => "disabled",
                Some(Outcome::HostNetwork) => "host network",
                Some(Outcome::AlreadyInjected) => "already",
                None => "passed",
            };
            (r.object.clone(), what)
        })
        .collect();
    assert_eq!(
        summary,
        vec![
            ("Job/report".into(), "injected"),
            ("CronJob/nightly-cleanup".into(), "injected"),
            ("StatefulSet/orders-db".into(), "injected"),
            ("Pod/debug".into(), "disabled"),
            ("Pod/legacy-agent".into(), "injected"),
            ("DaemonSet/node-exporter".into(), "injected"),
            ("ReplicaSet/worker".into(), "injected"),
            ("DaemonSet/kube-proxy-like".into(), "host network"),
        ]
    );
}

#[test]
fn injecting_an_injected_manifest_changes_nothing() {
    for name in ["web", "batch"] {
        let (once, _) = inject_manifests(&input(name), &mesh()).unwrap();
        let (twice, reports) = inject_manifests(&once, &mesh()).unwrap();
        assert_eq!(once, twice, "{name}");
        assert!(
            reports
                .iter()
                .all(|r| !matches!(r.outcome, Some(Outcome::Injected { .. }))),
            "{name}: {reports:?}"
        );
    }
}

fn pod(spec: serde_json::Value, annotations: serde_json::Value) -> serde_json::Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "p", "namespace": "shop", "annotations": annotations},
           "spec": spec})
}

fn injected(pod_json: &serde_json::Value) -> k8s_openapi::api::core::v1::Pod {
    let (outcome, patch) = pod_patch(pod_json, &mesh()).unwrap();
    assert!(matches!(outcome, Outcome::Injected { .. }), "{outcome:?}");
    let mut patched = pod_json.clone();
    json_patch::patch(&mut patched, &patch.unwrap()).unwrap();
    serde_json::from_value(patched).unwrap()
}

#[test]
fn native_mode_puts_rules_then_proxy_before_the_pods_own_init_containers() {
    let pod = injected(&pod(
        json!({"initContainers": [{"name": "migrate", "image": "m"}],
               "containers": [{"name": "app", "image": "a"}]}),
        json!({}),
    ));
    let spec = pod.spec.unwrap();
    let init: Vec<&str> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(init, [INIT_CONTAINER, PROXY_CONTAINER, "migrate"]);
    let proxy = &spec.init_containers.as_ref().unwrap()[1];
    assert_eq!(proxy.restart_policy.as_deref(), Some("Always"));
    assert!(
        proxy.startup_probe.is_some(),
        "the app must wait for the proxy"
    );
    assert_eq!(spec.containers.len(), 1);
    let security = proxy.security_context.as_ref().unwrap();
    assert_eq!(security.run_as_user, Some(2102));
    assert_eq!(security.read_only_root_filesystem, Some(true));
    assert_eq!(
        security.capabilities.as_ref().unwrap().drop.as_deref(),
        Some(&["ALL".to_string()][..])
    );
    let init_caps = spec.init_containers.as_ref().unwrap()[0]
        .security_context
        .as_ref()
        .unwrap()
        .capabilities
        .clone()
        .unwrap();
    assert_eq!(
        init_caps.add.unwrap(),
        vec!["NET_ADMIN".to_string(), "NET_RAW".to_string()]
    );
    let identity = spec
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "outrider-identity")
        .unwrap();
    assert_eq!(
        identity.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("outrider-identity-default")
    );
}

#[test]
fn classic_mode_makes_the_proxy_the_first_regular_container() {
    let mut mesh = mesh();
    mesh.sidecar_mode = SidecarMode::Classic;
    let mut metadata = Default::default();
    let mut spec: k8s_openapi::api::core::v1::PodSpec =
        serde_json::from_value(json!({"containers": [{"name": "app", "image": "a"}]})).unwrap();
    pod::inject_template(&mut metadata, &mut spec, &mesh).unwrap();
    assert_eq!(spec.containers[0].name, PROXY_CONTAINER);
    assert_eq!(spec.containers[0].restart_policy, None);
    assert_eq!(spec.containers[0].startup_probe, None);
    assert_eq!(spec.init_containers.unwrap()[0].name, INIT_CONTAINER);
}

#[test]
fn the_webhook_patch_is_empty_for_injected_disabled_and_host_network_pods() {
    let once = serde_json::to_value(injected(&pod(
        json!({"containers": [{"name": "app", "image": "a"}]}),
        json!({}),
    )))
    .unwrap();
    let (outcome, patch) = pod_patch(&once, &mesh()).unwrap();
    assert_eq!((outcome, patch), (Outcome::AlreadyInjected, None));
    let disabled = pod(
        json!({"containers": [{"name": "app", "image": "a"}]}),
        json!({"outrider.dev/inject": "disabled"}),
    );
    assert_eq!(
        pod_patch(&disabled, &mesh()).unwrap(),
        (Outcome::Disabled, None)
    );
    let host = pod(
        json!({"hostNetwork": true, "containers": [{"name": "agent", "image": "a"}]}),
        json!({"outrider.dev/inject": "enabled"}),
    );
    assert_eq!(
        pod_patch(&host, &mesh()).unwrap(),
        (Outcome::HostNetwork, None)
    );
}

#[test]
fn garbage_and_bad_annotations_are_errors_that_say_what_is_wrong() {
    let err = pod_patch(
        &json!({"metadata": {"name": "x"}, "spec": {"containers": "nope"}}),
        &mesh(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("spec.containers"), "{err}");
    let err = pod_patch(&json!({"metadata": {"name": "x"}}), &mesh()).unwrap_err();
    assert!(err.to_string().contains("no spec"), "{err}");
    let bad = pod(
        json!({"containers": [{"name": "app", "image": "a"}]}),
        json!({"outrider.dev/skip-inbound-ports": "ssh"}),
    );
    let err = pod_patch(&bad, &mesh()).unwrap_err();
    assert!(
        err.to_string().contains("outrider.dev/skip-inbound-ports"),
        "{err}"
    );
    let err = inject_manifests("kind: Pod\nmetadata: {name: a\n", &mesh()).unwrap_err();
    assert!(err.to_string().starts_with("document 1: not YAML"), "{err}");
}

#[test]
fn probes_become_exemptions_by_kind() {
    let spec: k8s_openapi::api::core::v1::PodSpec = serde_json::from_value(json!({
        "containers": [{
            "name": "app", "image": "a",
            "ports": [{"name": "http", "containerPort": 8080}],
            "readinessProbe": {"httpGet": {"path": "/ready?full=1", "port": "http"}},
            "livenessProbe": {"httpGet": {"path": "/live", "port": 8080, "host": "10.0.0.1"}},
            "startupProbe": {"tcpSocket": {"port": 5432}}
        }, {
            "name": "grpc", "image": "g",
            "livenessProbe": {"grpc": {"port": 9090}},
            "readinessProbe": {"httpGet": {"port": "missing"}}
        }]
    }))
    .unwrap();
    assert_eq!(
        pod::app_probes(&spec),
        vec![
            Probe {
                port: 8080,
                path: Some("/ready".into())
            },
            Probe {
                port: 5432,
                path: None
            },
            Probe {
                port: 9090,
                path: None
            },
        ]
    );
}

#[test]
fn turning_post_quantum_off_mesh_wide_reaches_every_proxy_and_the_default_adds_nothing() {
    let off = InjectConfig {
        post_quantum: false,
        ..mesh()
    };
    let (out, _) = inject_manifests(&input("web"), &off).unwrap();
    assert!(
        out.contains("- name: OUTRIDER_TLS_POST_QUANTUM\n          value: 'false'")
            || out.contains("- name: OUTRIDER_TLS_POST_QUANTUM\n          value: \"false\"")
            || out.contains("- name: OUTRIDER_TLS_POST_QUANTUM\n          value: false"),
        "{out}"
    );
    let (default, _) = inject_manifests(&input("web"), &mesh()).unwrap();
    assert!(!default.contains("OUTRIDER_TLS_POST_QUANTUM"));
}
