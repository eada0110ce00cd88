//! The Helm chart and everything a user applies without it, checked with
//! the real tools: `helm lint --strict` and `helm template` (default and
//! non-default values), `kubernetes-validate --strict` on every rendered
//! object and every `outrider inject` output for the oldest and newest
//! Kubernetes we support, `manifests/install.yaml` against a fresh render,
//! and the chart's values against what the binary accepts.
//!
//! Needs `helm` and `kubernetes-validate` (ci/test.sh installs both; the
//! `HELM` and `KUBERNETES_VALIDATE` variables override the PATH lookup).
//! Without them these tests fail and say so.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_outrider");
const ROOT: &str = env!("CARGO_MANIFEST_DIR");
/// The oldest and newest Kubernetes versions we support: native sidecars
/// are GA from 1.33, and 1.37 is the newest schema set available.
const KUBERNETES_VERSIONS: [&str; 2] = ["1.33.0", "1.37.0"];

fn tool(var: &str, name: &str) -> String {
    let path = std::env::var(var).unwrap_or_else(|_| name.to_string());
    let found = Command::new(&path).arg("--help").output().is_ok();
    assert!(
        found,
        "{name} is not installed (run ci/test.sh, which installs it, or set {var})"
    );
    path
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .current_dir(ROOT)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

fn ok(out: &Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn helm_template(values: Option<&str>) -> String {
    let helm = tool("HELM", "helm");
    let mut args = vec![
        "template",
        "outrider",
        "charts/outrider",
        "--namespace",
        "outrider-system",
        "--include-crds",
    ];
    if let Some(values) = values {
        args.extend(["-f", values]);
    }
    ok(&run(&helm, &args), "helm template")
}

/// Writes YAML documents to a file with `List`s unrolled (the validator
/// has no schema for `List` and would skip its items).
fn unrolled(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    let mut out = String::new();
    for value in outrider::yaml::documents(yaml).unwrap() {
        let items = match value.get("kind").and_then(|k| k.as_str()) {
            Some("List") => value["items"].as_array().cloned().unwrap_or_default(),
            _ => vec![value],
        };
        for item in items {
            out.push_str("---\n");
            out.push_str(&outrider::yaml::to_string(&item).unwrap());
        }
    }
    let path = dir.join(name);
    std::fs::write(&path, out).unwrap();
    path
}

fn validate(files: &[PathBuf]) {
    let validator = tool("KUBERNETES_VALIDATE", "kubernetes-validate");
    for version in KUBERNETES_VERSIONS {
        let mut args = vec!["--strict", "--quiet", "-k", version];
        let names: Vec<String> = files.iter().map(|f| f.display().to_string()).collect();
        args.extend(names.iter().map(String::as_str));
        let out = run(&validator, &args);
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success() && !report.contains("ERROR"),
            "kubernetes-validate {version}:\n{report}"
        );
    }
}

#[test]
fn helm_lint_strict_passes_with_default_and_non_default_values() {
    let helm = tool("HELM", "helm");
    ok(
        &run(&helm, &["lint", "--strict", "charts/outrider"]),
        "helm lint",
    );
    ok(
        &run(
            &helm,
            &[
                "lint",
                "--strict",
                "charts/outrider",
                "-f",
                "charts/outrider/ci/non-default-values.yaml",
            ],
        ),
        "helm lint (non-default values)",
    );
}

#[test]
fn every_rendered_object_passes_kubernetes_validate_for_the_oldest_and_newest_versions() {
    let dir = tempfile::tempdir().unwrap();
    let default = helm_template(None);
    let custom = helm_template(Some("charts/outrider/ci/non-default-values.yaml"));
    // The rendering holds what the issue asks of the chart.
    for kind in [
        "kind: CustomResourceDefinition",
        "kind: Deployment",
        "kind: PodDisruptionBudget",
        "kind: Service",
        "kind: ServiceAccount",
        "kind: ClusterRole",
        "kind: MutatingWebhookConfiguration",
        "kind: ConfigMap",
    ] {
        assert!(default.contains(kind), "no {kind} in the chart");
    }
    assert!(custom.contains("kind: PodMonitor"));
    assert!(custom.contains("failurePolicy: Ignore"));
    validate(&[
        unrolled(dir.path(), "default.yaml", &default),
        unrolled(dir.path(), "custom.yaml", &custom),
    ]);
}

#[test]
fn the_values_schema_rejects_nonsense_with_the_field_named() {
    let helm = tool("HELM", "helm");
    let out = run(
        &helm,
        &[
            "template",
            "outrider",
            "charts/outrider",
            "--set",
            "proxy.defaultPolicy=allow-some",
        ],
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("defaultPolicy"), "{stderr}");
}

#[test]
fn install_yaml_is_the_chart_rendered_with_default_values() {
    let committed =
        std::fs::read_to_string(Path::new(ROOT).join("manifests/install.yaml")).unwrap();
    let expected = format!(
        "# Generated by ci/render-install.sh from charts/outrider (default values). Do not edit.\n\
         apiVersion: v1\nkind: Namespace\nmetadata:\n  name: outrider-system\n---\n{}",
        helm_template(None)
    );
    assert!(
        committed == expected,
        "manifests/install.yaml drifted from the chart; regenerate it with ci/render-install.sh"
    );
}

/// The ConfigMap the chart renders must be values the binary accepts, and
/// the controller's arguments must parse: a chart that installs a
/// controller which exits at once is caught here, not in a cluster.
#[test]
fn the_chart_configures_the_binary_with_values_it_accepts() {
    for values in [None, Some("charts/outrider/ci/non-default-values.yaml")] {
        let rendered = helm_template(values);
        let mut inject_yaml = None;
        let mut args = None;
        for value in outrider::yaml::documents(&rendered).unwrap() {
            match value.get("kind").and_then(|k| k.as_str()) {
                Some("ConfigMap") => {
                    inject_yaml = value["data"]["inject.yaml"].as_str().map(str::to_string)
                }
                Some("Deployment") => {
                    args = value["spec"]["template"]["spec"]["containers"][0]["args"]
                        .as_array()
                        .map(|a| {
                            a.iter()
                                .filter_map(|v| v.as_str().map(str::to_string))
                                .collect::<Vec<_>>()
                        })
                }
                _ => {}
            }
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("inject.yaml");
        std::fs::write(&config, inject_yaml.expect("the inject ConfigMap")).unwrap();
        let web = Path::new(ROOT).join("tests/golden/inject/web.input.yaml");
        let out = Command::new(BIN)
            .arg("inject")
            .arg("--config")
            .arg(&config)
            .arg("-f")
            .arg(&web)
            .output()
            .unwrap();
        ok(
            &out,
            &format!("outrider inject with the chart's values ({values:?})"),
        );

        // The controller's flags parse; it then fails on the missing
        // kubeconfig (exit 1), not on its arguments (exit 2 or 64).
        // The ConfigMap's mount path does not exist here: point the flag
        // at the extracted copy instead.
        let args: Vec<String> = args
            .expect("controller args")
            .into_iter()
            .filter(|a| !a.starts_with("--inject-config="))
            .collect();
        let mut command = Command::new(BIN);
        command
            .args(&args)
            .arg(format!("--inject-config={}", config.display()))
            .args(["--kubeconfig", "/nonexistent/kubeconfig"])
            .args([
                "--admin-listen",
                "127.0.0.1:0",
                "--webhook-listen",
                "127.0.0.1:0",
            ]);
        let out = command.output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(1),
            "controller {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("kubeconfig"));
    }
}

#[test]
fn injected_manifests_and_the_examples_pass_kubernetes_validate() {
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for name in ["web", "batch"] {
        let input = Path::new(ROOT).join(format!("tests/golden/inject/{name}.input.yaml"));
        let out = Command::new(BIN)
            .arg("inject")
            .arg("-f")
            .arg(&input)
            .output()
            .unwrap();
        let injected = ok(&out, "outrider inject");
        files.push(unrolled(dir.path(), &format!("{name}.yaml"), &injected));
    }
    // The demo app, injected as the webhook would.
    let mut demo = String::new();
    for entry in std::fs::read_dir(Path::new(ROOT).join("manifests/examples/demo-app")).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        // Policies are CRD objects: their schema is checked in the CRD tests.
        if !text.contains("security.outrider.dev") {
            demo.push_str("---\n");
            demo.push_str(&text);
        }
    }
    let demo_file = dir.path().join("demo-input.yaml");
    std::fs::write(&demo_file, &demo).unwrap();
    let out = Command::new(BIN)
        .arg("inject")
        .arg("-f")
        .arg(&demo_file)
        .output()
        .unwrap();
    let injected = ok(&out, "outrider inject (demo app)");
    assert!(injected.contains("outrider-proxy"));
    files.push(unrolled(dir.path(), "demo.yaml", &injected));
    validate(&files);
}

fn webhooks(rendered: &str) -> Vec<Value> {
    let configuration = outrider::yaml::documents(rendered)
        .unwrap()
        .into_iter()
        .find(|doc| doc["kind"] == "MutatingWebhookConfiguration")
        .expect("a MutatingWebhookConfiguration");
    configuration["webhooks"].as_array().unwrap().clone()
}

fn pod_level(webhooks: &[Value]) -> Value {
    webhooks
        .iter()
        .find(|w| w["name"] == "pod.inject.outrider.dev")
        .expect("the pod-level webhook")
        .clone()
}

/// A hung injector must delay what the pod-level webhook is sent by
/// seconds at most, and never block it.
#[test]
fn a_hung_injector_delays_pods_of_unmeshed_namespaces_by_at_most_three_seconds() {
    let pod_level = pod_level(&webhooks(&helm_template(None)));
    assert_eq!(pod_level["failurePolicy"], "Ignore");
    let timeout = pod_level["timeoutSeconds"].as_u64().unwrap();
    assert!(
        timeout <= 3,
        "a hung injector delays every pod by {timeout} s"
    );
}

/// Runs a webhook's CEL match condition on `pod` with a real CEL engine
/// (kube's, as for the CRD rules): `object` is the pod, as the API
/// server binds it, here `self`.
fn match_condition(expression: &str, pod: &Value) -> bool {
    let rule = expression.replace("object.", "self.");
    // Below the root, where the validator (as the API server for CRDs)
    // does not trim `metadata` to name and generateName.
    // `metadata` typed as the Pod schema has it: labels and annotations
    // are maps of strings.
    let map = json!({"type": "object", "additionalProperties": {"type": "string"}});
    let schema = json!({
        "type": "object",
        "properties": {"pod": {
            "type": "object",
            "properties": {
                "apiVersion": {"type": "string"},
                "kind": {"type": "string"},
                "metadata": {"type": "object", "properties": {
                    "name": {"type": "string"}, "labels": map, "annotations": map
                }}
            },
            "x-kubernetes-validations": [{"rule": rule}]
        }}
    });
    match kube::core::cel::Validator::new().validate(&schema, &json!({ "pod": pod }), None) {
        Ok(()) => true,
        Err(errors) => {
            let text = format!("{errors:?}");
            // A rule that evaluates to false, not one that cannot run.
            assert!(text.contains("failed rule"), "{expression}: {text}");
            false
        }
    }
}

/// Only pods that opt in are sent to the pod-level webhook: an unmeshed
/// namespace's pods never wait on the injector (docs/install.md).
#[test]
fn the_api_server_sends_the_pod_level_webhook_only_pods_that_opt_in() {
    let default = pod_level(&webhooks(&helm_template(None)));
    let conditions = default["matchConditions"]
        .as_array()
        .expect("matchConditions");
    assert_eq!(conditions.len(), 1);
    let expression = conditions[0]["expression"].as_str().unwrap();
    let pod = |metadata: Value| json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata});
    let sent = [
        pod(json!({"annotations": {"outrider.dev/inject": "enabled"}})),
        pod(json!({"labels": {"outrider.dev/inject": "enabled"}})),
        pod(json!({"labels": {"app": "web"}, "annotations": {"outrider.dev/inject": "enabled"}})),
    ];
    let not_sent = [
        pod(json!({"name": "plain"})),
        pod(json!({"annotations": {}, "labels": {}})),
        pod(json!({"annotations": {"outrider.dev/inject": "disabled"}})),
        pod(json!({"annotations": {"other": "enabled"}, "labels": {"outrider.dev/inject": "yes"}})),
    ];
    for pod in &sent {
        assert!(match_condition(expression, pod), "not sent: {pod}");
    }
    for pod in &not_sent {
        assert!(!match_condition(expression, pod), "sent: {pod}");
    }
    // The fallback for API servers without matchConditions: the label,
    // by objectSelector.
    let fallback = pod_level(&webhooks(&helm_template(Some(
        "charts/outrider/ci/non-default-values.yaml",
    ))));
    assert!(fallback.get("matchConditions").is_none());
    assert_eq!(
        fallback["objectSelector"]["matchLabels"]["outrider.dev/inject"],
        "enabled"
    );
    assert_eq!(fallback["timeoutSeconds"], 2);
    // In meshed namespaces, a pod labelled disabled is not sent either.
    let namespace_level = webhooks(&helm_template(None))
        .into_iter()
        .find(|w| w["name"] == "namespace.inject.outrider.dev")
        .unwrap();
    assert_eq!(
        namespace_level["objectSelector"]["matchExpressions"][0],
        json!({"key": "outrider.dev/inject", "operator": "NotIn", "values": ["disabled"]})
    );
}
