use super::file::addr;
use super::*;
use crate::policy::{DefaultPolicy, MtlsMode};
use crate::tls::KxGroup;

const ID: &str = "identity:\n  id: spiffe://cluster.local/ns/shop/sa/orders\n";

#[test]
fn an_empty_file_with_an_identity_gives_the_documented_defaults() {
    let config = FileConfig::from_yaml(ID).unwrap().validate().unwrap();
    assert_eq!(config.admin_listen, addr("0.0.0.0:4191"));
    let inbound = config.proxy.inbound.unwrap();
    assert_eq!(inbound.listen, addr("0.0.0.0:4143"));
    assert_eq!(inbound.target, InboundTarget::OriginalDst);
    assert_eq!(
        config.proxy.outbound.unwrap().listen,
        addr("127.0.0.1:4140")
    );
    assert_eq!(config.proxy.mtls_mode, MtlsMode::Permissive);
    assert!(config.proxy.opaque_ports.contains(&3306));
    assert_eq!(config.identity.dir, PathBuf::from(DEFAULT_IDENTITY_DIR));
    assert_eq!(config.proxy.limits.detect_timeout, Duration::from_secs(1));
}

#[test]
fn the_identity_is_required() {
    let err = FileConfig::from_yaml("").unwrap().validate().unwrap_err();
    assert_eq!(err.field, "identity.id");
}

#[test]
fn type_errors_name_the_field_path() {
    let err =
        FileConfig::from_yaml(&format!("{ID}limits:\n  idle_timeout: forever\n")).unwrap_err();
    assert_eq!(err.field, "limits.idle_timeout");
    let err = FileConfig::from_yaml(&format!("{ID}inbound:\n  listen: nowhere\n")).unwrap_err();
    assert_eq!(err.field, "inbound.listen");
    let err = FileConfig::from_yaml("identity:\n  id: http://not-spiffe/x\n").unwrap_err();
    assert_eq!(err.field, "identity.id");
}

#[test]
fn unknown_keys_are_rejected_not_ignored() {
    let err = FileConfig::from_yaml(&format!("{ID}limits:\n  idle_timout: 5s\n")).unwrap_err();
    assert!(err.reason.contains("idle_timout"), "{err}");
}

#[test]
fn semantic_errors_name_the_field() {
    let cases = [
        ("limits:\n  max_connections: 0\n", "limits.max_connections"),
        ("limits:\n  detect_timeout: 0s\n", "limits.detect_timeout"),
        (
            "outbound:\n  peer_id: spiffe://cluster.local/ns/a/sa/b\n",
            "outbound.peer_id",
        ),
        (
            "outbound:\n  peer: 127.0.0.1:9\n  peer_id: spiffe://other.td/ns/a/sa/b\n",
            "outbound.peer_id",
        ),
        (
            "inbound:\n  listen: 127.0.0.1:9\n  app: 127.0.0.1:9\n",
            "inbound.app",
        ),
        ("tls:\n  key_exchange: []\n", "tls.key_exchange"),
        (
            "tls:\n  key_exchange: [x25519mlkem768]\n  post_quantum: false\n",
            "tls.post_quantum",
        ),
        ("log:\n  level: outrider=loud\n", "log.level"),
    ];
    for (yaml, field) in cases {
        let err = FileConfig::from_yaml(&format!("{ID}{yaml}"))
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err.field, field, "{yaml}: {err}");
    }
}

#[test]
fn overrides_replace_file_values_and_are_validated_alike() {
    let mut file = FileConfig::from_yaml(&format!("{ID}mtls_mode: permissive\n")).unwrap();
    file.apply(&Overrides {
        mtls_mode: Some("STRICT".into()),
        inbound_app: Some("127.0.0.1:8080".into()),
        outbound_peer: Some("127.0.0.1:6143".into()),
        outbound_peer_id: Some("spiffe://cluster.local/ns/shop/sa/payments".into()),
        tls_key_exchange: Some("x25519".into()),
        ..Overrides::default()
    })
    .unwrap();
    let config = file.validate().unwrap();
    assert_eq!(config.proxy.mtls_mode, MtlsMode::Strict);
    assert_eq!(
        config.proxy.inbound.unwrap().target,
        InboundTarget::App(addr("127.0.0.1:8080"))
    );
    assert_eq!(config.tls.key_exchange, vec![KxGroup::X25519]);

    let mut file = FileConfig::from_yaml(ID).unwrap();
    let err = file
        .apply(&Overrides {
            outbound_peer: Some("not-an-address".into()),
            ..Overrides::default()
        })
        .unwrap_err();
    assert_eq!(err.field, "outbound.peer");
}

#[test]
fn human_units_parse_in_the_file() {
    let yaml = format!("{ID}limits:\n  max_header_bytes: 16KiB\n  idle_timeout: 1h30m\n");
    let config = FileConfig::from_yaml(&yaml).unwrap().validate().unwrap();
    assert_eq!(config.proxy.limits.max_header_bytes, 16384);
    assert_eq!(config.proxy.limits.idle_timeout, Duration::from_secs(5400));
}

#[test]
fn policy_settings_default_to_no_source_and_the_identity_namespace() {
    let config = FileConfig::from_yaml(ID).unwrap().validate().unwrap();
    assert_eq!(config.policy.source, PolicySource::None);
    assert_eq!(config.policy.workload.namespace, "shop");
    assert_eq!(config.policy.settings.default, DefaultPolicy::AllowAll);
    assert_eq!(config.policy.settings.mtls, MtlsMode::Permissive);
}

#[test]
fn policy_settings_parse_from_the_file_and_the_flags() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "{ID}workload:\n  namespace: payments\npolicy:\n  source: files\n  dir: {}\n  default: allow-same-namespace\n  probes: [{{port: 8080, path: /healthz}}, {{port: 5432}}]\n",
        dir.path().display()
    );
    let mut file = FileConfig::from_yaml(&yaml).unwrap();
    file.apply(&Overrides {
        workload_labels: Some("app=payments, tier=backend".into()),
        policy_default: Some("deny".into()),
        ..Overrides::default()
    })
    .unwrap();
    let config = file.validate().unwrap();
    assert_eq!(
        config.policy.source,
        PolicySource::Files(dir.path().to_path_buf())
    );
    assert_eq!(config.policy.workload.namespace, "payments");
    assert_eq!(
        config.policy.workload.labels,
        BTreeMap::from([
            ("app".to_string(), "payments".to_string()),
            ("tier".to_string(), "backend".to_string())
        ])
    );
    assert_eq!(config.policy.settings.default, DefaultPolicy::Deny);
    assert_eq!(config.policy.settings.probes.len(), 2);
}

#[test]
fn policy_mistakes_name_the_field() {
    let cases = [
        ("policy:\n  source: files\n", "policy.dir"),
        (
            "policy:\n  source: files\n  dir: /nonexistent/outrider/policies\n",
            "policy.dir",
        ),
        ("policy:\n  probes: [{port: 0}]\n", "policy.probes[0].port"),
        (
            "policy:\n  probes: [{port: 80, path: healthz}]\n",
            "policy.probes[0].path",
        ),
        ("policy:\n  reload_debounce: 0s\n", "policy.reload_debounce"),
        (
            "workload:\n  labels: {app: a}\n  labels_file: /etc/podinfo/labels\n",
            "workload.labels",
        ),
        ("workload:\n  namespace: \"\"\n", "workload.namespace"),
    ];
    for (yaml, field) in cases {
        let err = FileConfig::from_yaml(&format!("{ID}{yaml}"))
            .unwrap()
            .validate()
            .unwrap_err();
        assert_eq!(err.field, field, "{yaml}: {err}");
    }
    for (yaml, field) in [
        ("policy:\n  default: maybe\n", "policy.default"),
        ("policy:\n  source: etcd\n", "policy.source"),
    ] {
        let err = FileConfig::from_yaml(&format!("{ID}{yaml}")).unwrap_err();
        assert_eq!(err.field, field, "{yaml}: {err}");
    }
    let mut file = FileConfig::from_yaml(ID).unwrap();
    let err = file
        .apply(&Overrides {
            workload_labels: Some("app".into()),
            ..Overrides::default()
        })
        .unwrap_err();
    assert_eq!(err.field, "workload.labels");
}

#[test]
fn probes_and_opaque_ports_from_the_environment_replace_the_files_lists() {
    let mut file = FileConfig::from_yaml(ID).unwrap();
    file.apply(&Overrides {
        policy_probes: Some("8080/healthz, 5432,".into()),
        opaque_ports: Some("3306,9042".into()),
        ..Overrides::default()
    })
    .unwrap();
    let config = file.validate().unwrap();
    assert_eq!(
        config.policy.settings.probes,
        vec![
            crate::policy::index::Probe {
                port: 8080,
                path: Some("/healthz".into())
            },
            crate::policy::index::Probe {
                port: 5432,
                path: None
            },
        ]
    );
    assert_eq!(
        config.proxy.opaque_ports,
        std::collections::BTreeSet::from([3306, 9042])
    );

    let mut file = FileConfig::from_yaml(ID).unwrap();
    let err = file
        .apply(&Overrides {
            policy_probes: Some("healthz".into()),
            ..Overrides::default()
        })
        .unwrap_err();
    assert_eq!(err.field, "policy.probes");
}

#[test]
fn connection_limits_follow_the_memory_limit_unless_set() {
    let limits = |extra: &str| {
        FileConfig::from_yaml(&format!("{ID}limits:\n{extra}"))
            .unwrap()
            .validate()
            .unwrap()
            .proxy
            .limits
    };
    let derived = limits("  memory_limit: 128Mi\n");
    assert_eq!(derived.max_connections, 1536);
    assert_eq!(derived.max_plaintext_connections, 768);
    let unlimited = limits("  idle_timeout: 1h\n");
    assert_eq!(unlimited.max_connections, 10_000);
    let explicit = limits("  memory_limit: 128Mi\n  max_connections: 50\n");
    assert_eq!(explicit.max_connections, 50);
    assert_eq!(explicit.max_plaintext_connections, 25);
}

#[test]
fn the_memory_limit_comes_from_the_environment_in_bytes() {
    let mut file = FileConfig::from_yaml(ID).unwrap();
    let overrides = Overrides {
        memory_limit: Some("268435456".into()),
        ..Overrides::default()
    };
    file.apply(&overrides).unwrap();
    assert_eq!(file.validate().unwrap().proxy.limits.max_connections, 3584);
    let mut file = FileConfig::from_yaml(ID).unwrap();
    let bad = Overrides {
        memory_limit: Some("lots".into()),
        ..Overrides::default()
    };
    assert_eq!(file.apply(&bad).unwrap_err().field, "limits.memory_limit");
}

#[test]
fn a_plaintext_share_above_the_total_is_refused() {
    let err = FileConfig::from_yaml(&format!(
        "{ID}limits:\n  max_connections: 10\n  max_plaintext_connections: 11\n"
    ))
    .unwrap()
    .validate()
    .unwrap_err();
    assert_eq!(err.field, "limits.max_plaintext_connections");
}

#[test]
fn the_post_quantum_hybrid_is_offered_first_by_default_and_the_switch_drops_only_it() {
    let config = FileConfig::from_yaml(ID).unwrap().validate().unwrap();
    assert_eq!(
        config.tls.key_exchange,
        vec![KxGroup::X25519Mlkem768, KxGroup::X25519, KxGroup::Secp256r1]
    );

    let mut file = FileConfig::from_yaml(ID).unwrap();
    file.apply(&Overrides {
        tls_post_quantum: Some(false),
        ..Overrides::default()
    })
    .unwrap();
    let config = file.validate().unwrap();
    assert_eq!(
        config.tls.key_exchange,
        vec![KxGroup::X25519, KxGroup::Secp256r1]
    );

    // The switch wins over a list that names the hybrid.
    let yaml =
        format!("{ID}tls:\n  key_exchange: [x25519mlkem768, secp384r1]\n  post_quantum: false\n");
    let config = FileConfig::from_yaml(&yaml).unwrap().validate().unwrap();
    assert_eq!(config.tls.key_exchange, vec![KxGroup::Secp384r1]);
}
