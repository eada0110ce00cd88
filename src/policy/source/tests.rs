use std::time::Duration;

use super::files::FileSource;
use super::*;
use crate::policy::model::{DefaultPolicy, MtlsMode};

const ALLOW: &str = r#"
apiVersion: security.outrider.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: allow-orders}
spec:
  action: ALLOW
  rules: [{from: [{principals: ["spiffe://cluster.local/ns/shop/sa/orders"]}]}]
"#;

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
fn documents_are_read_like_kubectl_apply_reads_them() {
    let text = format!(
        "{ALLOW}---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: unrelated}}\n---\n\
         apiVersion: v1\nkind: List\nitems:\n- apiVersion: security.outrider.dev/v1alpha1\n  kind: PeerAuthentication\n  metadata: {{name: strict, namespace: ops}}\n  spec: {{mtls: {{mode: STRICT}}}}\n---\n"
    );
    let objects = parse_documents(&text, "shop").unwrap();
    assert_eq!(objects.len(), 2, "{objects:?}");
    assert_eq!(
        (
            objects[0].kind,
            objects[0].namespace.as_str(),
            objects[0].name.as_str()
        ),
        (Kind::AuthorizationPolicy, "shop", "allow-orders")
    );
    assert_eq!(
        (objects[1].kind, objects[1].namespace.as_str()),
        (Kind::PeerAuthentication, "ops")
    );
}

#[test]
fn a_nameless_policy_or_broken_yaml_fails_the_whole_file() {
    let nameless = "apiVersion: security.outrider.dev/v1alpha1\nkind: AuthorizationPolicy\nspec: {action: DENY}\n";
    assert!(matches!(
        parse_documents(nameless, "shop"),
        Err(ParseError::NoName { .. })
    ));
    assert!(matches!(
        parse_documents("a: [unclosed", "shop"),
        Err(ParseError::Yaml { .. })
    ));
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

#[test]
fn a_file_that_stops_parsing_keeps_what_it_held() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("policies.yaml");
    std::fs::write(&path, ALLOW).unwrap();
    std::fs::write(dir.path().join(".hidden.yaml"), "garbage: [").unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not a policy").unwrap();
    let mut source = FileSource::new(
        dir.path().into(),
        "shop".into(),
        Duration::from_millis(10),
        Duration::from_secs(1),
        metrics(),
    );
    assert_eq!(source.load().unwrap().len(), 1);
    std::fs::write(&path, "apiVersion: [broken").unwrap();
    assert_eq!(
        source.load().unwrap().len(),
        1,
        "a broken file must not drop its policies"
    );
    std::fs::write(&path, "").unwrap();
    assert_eq!(
        source.load().unwrap().len(),
        0,
        "an emptied file drops them"
    );
    std::fs::write(dir.path().join("new.yaml"), "apiVersion: [broken").unwrap();
    assert_eq!(
        source.load().unwrap().len(),
        0,
        "a file that never parsed contributes nothing"
    );
    std::fs::remove_file(&path).unwrap();
    assert_eq!(source.load().unwrap().len(), 0);
}

mod kube_source {
    use std::time::Duration;

    use serde_json::json;
    use tokio::sync::mpsc;

    use super::super::{Update, kube};
    use super::metrics;
    use crate::test_util::fake_apiserver::FakeApiServer;

    fn policy(name: &str, action: &str) -> serde_json::Value {
        json!({"apiVersion": "security.outrider.dev/v1alpha1", "kind": "AuthorizationPolicy",
               "metadata": {"name": name, "namespace": "shop"},
               "spec": {"action": action, "rules": [{}]}})
    }

    async fn next_set(rx: &mut mpsc::Receiver<Update>) -> Vec<String> {
        loop {
            let update = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an update")
                .expect("open");
            if let Update::Objects(set) = update {
                return set.keys().map(|(_, _, name)| name.clone()).collect();
            }
        }
    }

    #[tokio::test]
    async fn lists_then_follows_watch_events_relists_on_410_and_survives_an_outage() {
        crate::crypto::install_default();
        let server = FakeApiServer::start().await;
        server.apply("authorizationpolicies", policy("first", "DENY"));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(&path, server.kubeconfig()).unwrap();
        let client = kube::client(Some(&path)).await.unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let task = tokio::spawn(kube::run(client, "shop".into(), metrics(), tx));

        assert_eq!(next_set(&mut rx).await, vec!["first"], "initial list");
        server.apply("authorizationpolicies", policy("second", "ALLOW"));
        assert_eq!(
            next_set(&mut rx).await,
            vec!["first", "second"],
            "watch ADDED"
        );
        server.bookmark();
        server.delete("authorizationpolicies", "first");
        assert_eq!(
            next_set(&mut rx).await,
            vec!["second"],
            "watch DELETED after a bookmark"
        );

        let (lists_before, _) = server.requests();
        server.expire_versions();
        server.apply("authorizationpolicies", policy("third", "DENY"));
        assert_eq!(
            next_set(&mut rx).await,
            vec!["second", "third"],
            "relist after 410"
        );
        assert!(
            server.requests().0 > lists_before,
            "410 forces a relist: {lists_before} -> {:?}",
            server.requests()
        );

        server.vanish();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            rx.try_recv().is_err(),
            "an outage publishes nothing: the last state stays"
        );
        server.apply("authorizationpolicies", policy("fourth", "AUDIT"));
        server.come_back().await;
        assert_eq!(
            next_set(&mut rx).await,
            vec!["fourth", "second", "third"],
            "converges after the outage"
        );
        task.abort();
    }
}
