use std::time::Duration;

use prometheus::Registry;

use super::files::FileSource;
use crate::policy::publish::Metrics;

use crate::test_util::ALLOW_ORDERS as ALLOW;

fn metrics() -> Metrics {
    Metrics::new(&Registry::new()).unwrap()
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

    use super::super::kube;
    use super::metrics;
    use crate::policy::publish::Update;
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
        let client = crate::kube_client::client(Some(&path), "proxy")
            .await
            .unwrap();
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
