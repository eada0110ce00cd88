use super::*;
use crate::policy::model::Object;
use crate::policy::model::{DefaultPolicy, MtlsMode};
use crate::policy::objects::parse_documents;
use prometheus::Registry;

use crate::test_util::ALLOW_ORDERS as ALLOW;

fn metrics() -> Metrics {
    Metrics::new(&Registry::new()).unwrap()
}

fn publisher(labels: &[(&str, &str)]) -> (Publisher, PolicyRx) {
    publisher_with(labels, false, metrics())
}

/// A publisher for workload `shop` with these labels (or waiting for them
/// from a file), the mesh default allow-all, permissive mTLS.
fn publisher_with(
    labels: &[(&str, &str)],
    labels_from_file: bool,
    metrics: Metrics,
) -> (Publisher, PolicyRx) {
    let workload = Workload {
        namespace: "shop".into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    };
    let settings = Settings {
        default: DefaultPolicy::AllowAll,
        mtls: MtlsMode::Permissive,
        probes: Vec::new(),
    };
    Publisher::new(workload, settings, labels_from_file, metrics)
}

fn set(objects: Vec<Object>) -> ObjectSet {
    objects
        .into_iter()
        .map(|o| ((o.kind, o.namespace.clone(), o.name.clone()), o))
        .collect()
}

#[test]
fn nothing_is_synced_until_a_source_delivers() {
    let (mut publisher, rx) = publisher(&[]);
    assert!(!rx.borrow().synced);
    publisher.apply(Update::Objects(ObjectSet::new()));
    assert!(rx.borrow().synced);
}

#[test]
fn with_a_labels_file_nothing_is_synced_until_the_labels_are_read() {
    // Objects first: a DENY selecting `app: web` must not be missed because
    // the labels are not known yet.
    let only_web = "apiVersion: security.outrider.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web}\nspec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}\n";
    let (mut publisher, rx) = publisher_with(&[], true, metrics());
    publisher.apply(Update::Objects(set(
        parse_documents(only_web, "shop").unwrap()
    )));
    assert!(!rx.borrow().synced);
    publisher.apply(Update::Labels(
        [("app".to_string(), "web".to_string())].into(),
    ));
    assert!(rx.borrow().synced);
    assert_eq!(rx.borrow().deny.len(), 1);
}

#[test]
fn a_label_change_reselects_the_policies() {
    let only_web = "apiVersion: security.outrider.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: web}\nspec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}\n";
    let (mut publisher, rx) = publisher(&[("app", "payments")]);
    publisher.apply(Update::Objects(set(
        parse_documents(only_web, "shop").unwrap()
    )));
    assert!(rx.borrow().deny.is_empty());
    publisher.apply(Update::Labels(
        [("app".to_string(), "web".to_string())].into(),
    ));
    assert_eq!(rx.borrow().deny.len(), 1);
}

#[test]
fn objects_of_other_namespaces_are_ignored() {
    let (mut publisher, rx) = publisher(&[]);
    let mut objects = parse_documents(ALLOW, "ops").unwrap();
    objects[0].namespace = "ops".into();
    publisher.apply(Update::Objects(set(objects)));
    assert!(rx.borrow().allow.is_empty());
}

#[test]
fn an_invalid_object_is_counted_once_per_version() {
    let registry = Registry::new();
    let metrics = Metrics::new(&registry).unwrap();
    let (mut publisher, _rx) = publisher_with(&[], false, metrics);
    let broken = "apiVersion: security.outrider.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: b}\nspec: {action: ALLOW, rules: [{from: [{ipBlocks: [nope]}]}]}\n";
    let objects = set(parse_documents(broken, "shop").unwrap());
    publisher.apply(Update::Objects(objects.clone()));
    publisher.apply(Update::Objects(objects));
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    assert!(
        text.contains("policy_invalid_total{kind=\"AuthorizationPolicy\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("policy_objects{kind=\"AuthorizationPolicy\",state=\"invalid\"} 1"),
        "{text}"
    );
}
