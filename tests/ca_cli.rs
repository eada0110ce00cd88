//! `outrider ca`: init, issue (kubelet-style rotation), inspect — and
//! proxies running on identities it issued.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use common::{BIN, Workload};
use outrider::identity::SpiffeId;
use outrider::test_util::apps;

fn ca(args: &[&str], dir: &Path) -> Output {
    Command::new(BIN)
        .arg("ca")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn init_writes_private_keys_readable_by_the_owner_only_and_refuses_to_overwrite() {
    let tmp = tempfile::tempdir().unwrap();
    let out = ca(
        &["init", "--dir", "ca", "--trust-domain", "prod.example"],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    for (file, mode) in [
        ("root.crt", 0o644),
        ("root.key", 0o600),
        ("issuer.crt", 0o644),
        ("issuer.key", 0o600),
    ] {
        let meta = std::fs::metadata(tmp.path().join("ca").join(file)).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, mode, "{file}");
    }
    let root_before = std::fs::read(tmp.path().join("ca/root.crt")).unwrap();
    let again = ca(&["init", "--dir", "ca"], tmp.path());
    assert!(!again.status.success());
    assert!(stderr(&again).contains("--force"), "{}", stderr(&again));
    assert_eq!(
        std::fs::read(tmp.path().join("ca/root.crt")).unwrap(),
        root_before,
        "refused init changed the CA"
    );
    let forced = ca(&["init", "--dir", "ca", "--force"], tmp.path());
    assert!(forced.status.success());
    assert_ne!(
        std::fs::read(tmp.path().join("ca/root.crt")).unwrap(),
        root_before
    );

    let bad = ca(
        &["init", "--dir", "other", "--trust-domain", "Bad Domain"],
        tmp.path(),
    );
    assert_eq!(bad.status.code(), Some(64), "{}", stderr(&bad));
}

#[test]
fn issue_publishes_like_kubelet_and_reissuing_rotates() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(ca(&["init", "--dir", "ca"], tmp.path()).status.success());
    let args = [
        "issue",
        "--dir",
        "ca",
        "--namespace",
        "shop",
        "--service-account",
        "orders",
        "--ttl",
        "1h",
        "--out",
        "id",
    ];
    let first = ca(&args, tmp.path());
    assert!(first.status.success(), "{}", stderr(&first));
    let id_dir = tmp.path().join("id");
    for file in ["tls.crt", "tls.key", "ca.crt"] {
        let target = std::fs::read_link(id_dir.join(file)).unwrap();
        assert_eq!(target, Path::new("..data").join(file));
    }
    assert_eq!(
        std::fs::metadata(id_dir.join("tls.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let generation = std::fs::read_link(id_dir.join("..data")).unwrap();

    let inspect = ca(
        &["inspect", "id/tls.crt", "--bundle", "id/ca.crt"],
        tmp.path(),
    );
    assert!(inspect.status.success(), "{}", stderr(&inspect));
    let report = stdout(&inspect);
    assert!(
        report.contains("SPIFFE ID:   spiffe://cluster.local/ns/shop/sa/orders"),
        "{report}"
    );
    assert!(
        report.contains("Remaining:   59m") || report.contains("Remaining:   1h"),
        "{report}"
    );
    assert!(report.contains("Verified:"), "{report}");
    let serial = |r: &str| {
        r.lines()
            .find(|l| l.starts_with("Serial:"))
            .unwrap()
            .to_string()
    };

    let second = ca(&args, tmp.path());
    assert!(second.status.success());
    assert_ne!(
        std::fs::read_link(id_dir.join("..data")).unwrap(),
        generation
    );
    assert!(
        !id_dir.join(&generation).exists(),
        "old generation not cleaned up"
    );
    let rotated = stdout(&ca(&["inspect", "id/tls.crt"], tmp.path()));
    assert_ne!(serial(&rotated), serial(&report));
}

#[test]
fn extra_roots_join_the_bundle() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(ca(&["init", "--dir", "old"], tmp.path()).status.success());
    assert!(ca(&["init", "--dir", "new"], tmp.path()).status.success());
    let out = ca(
        &[
            "issue",
            "--dir",
            "old",
            "--namespace",
            "a",
            "--service-account",
            "b",
            "--out",
            "id",
            "--extra-root",
            "new/root.crt",
        ],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let bundle = std::fs::read_to_string(tmp.path().join("id/ca.crt")).unwrap();
    assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 2);
    let bad = ca(
        &[
            "issue",
            "--dir",
            "old",
            "--namespace",
            "a",
            "--service-account",
            "b",
            "--out",
            "id2",
            "--extra-root",
            "id/tls.key",
        ],
        tmp.path(),
    );
    assert!(!bad.status.success(), "a key was accepted as a root");
}

#[test]
fn inspect_rejects_what_is_not_a_valid_svid_with_the_reason() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(ca(&["init", "--dir", "ca"], tmp.path()).status.success());
    let root = ca(&["inspect", "ca/root.crt"], tmp.path());
    assert!(!root.status.success());
    assert!(stderr(&root).contains("no path"), "{}", stderr(&root));
    std::fs::write(tmp.path().join("junk.pem"), "hello").unwrap();
    let junk = ca(&["inspect", "junk.pem"], tmp.path());
    assert!(!junk.status.success());
    assert!(
        stderr(&junk).contains("no certificate"),
        "{}",
        stderr(&junk)
    );
    let foreign_bundle = {
        assert!(ca(&["init", "--dir", "other"], tmp.path()).status.success());
        assert!(
            ca(
                &[
                    "issue",
                    "--dir",
                    "ca",
                    "--namespace",
                    "a",
                    "--service-account",
                    "b",
                    "--out",
                    "id"
                ],
                tmp.path()
            )
            .status
            .success()
        );
        ca(
            &["inspect", "id/tls.crt", "--bundle", "other/root.crt"],
            tmp.path(),
        )
    };
    assert!(!foreign_bundle.status.success());
    assert!(
        stderr(&foreign_bundle).contains("root in the trust bundle"),
        "{}",
        stderr(&foreign_bundle)
    );
}

#[tokio::test]
async fn proxies_run_on_identities_issued_by_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(ca(&["init", "--dir", "ca"], tmp.path()).status.success());
    for sa in ["orders", "payments"] {
        let out = ca(
            &[
                "issue",
                "--dir",
                "ca",
                "--namespace",
                "shop",
                "--service-account",
                sa,
                "--out",
                sa,
            ],
            tmp.path(),
        );
        assert!(out.status.success());
    }
    let id =
        |sa: &str| SpiffeId::parse(&format!("spiffe://cluster.local/ns/shop/sa/{sa}")).unwrap();
    let server_w = Workload {
        dir: tmp.path().join("payments"),
        id: id("payments"),
    };
    let client_w = Workload {
        dir: tmp.path().join("orders"),
        id: id("orders"),
    };
    let app = apps::http1_app(std::time::Duration::ZERO).await;
    let (_server, client) = common::strict_pair(&server_w, &client_w, app).await;
    let (status, body) = apps::http1_get(client.outbound(), "/").await.unwrap();
    assert_eq!(status, 200);
    assert!(body.ends_with("caller=spiffe://cluster.local/ns/shop/sa/orders"));
}

#[test]
fn rotate_issuer_keeps_the_anchor_and_secret_prints_only_what_the_controller_accepts() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(ca(&["init", "--dir", "ca"], tmp.path()).status.success());
    let dir = tmp.path().join("ca");
    let root_before = std::fs::read_to_string(dir.join("root.crt")).unwrap();
    let issuer_before = std::fs::read_to_string(dir.join("issuer.crt")).unwrap();
    let out = ca(
        &["rotate-issuer", "--dir", "ca", "--issuer-ttl", "720h"],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(dir.join("root.crt")).unwrap(),
        root_before
    );
    assert_ne!(
        std::fs::read_to_string(dir.join("issuer.crt")).unwrap(),
        issuer_before
    );

    // The new issuer chains to the old anchor: the Secret is printed.
    let out = ca(
        &["secret", "--issuer-dir", "ca", "--trust", "ca/root.crt"],
        tmp.path(),
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = outrider::yaml::value(&stdout(&out)).unwrap();
    assert_eq!(secret["metadata"]["name"].as_str(), Some("outrider-ca"));
    assert_eq!(
        secret["metadata"]["namespace"].as_str(),
        Some("outrider-system")
    );
    for key in ["tls.crt", "tls.key", "ca.crt"] {
        assert!(
            secret["data"][key].as_str().is_some_and(|v| !v.is_empty()),
            "{key}"
        );
    }

    // An issuer whose root is not trusted is refused.
    assert!(ca(&["init", "--dir", "other"], tmp.path()).status.success());
    let out = ca(
        &["secret", "--issuer-dir", "ca", "--trust", "other/root.crt"],
        tmp.path(),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("would refuse"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
}
