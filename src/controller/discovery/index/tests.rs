use serde_json::{Value, json};

use super::*;

fn td() -> TrustDomain {
    TrustDomain::parse("cluster.local").unwrap()
}

fn service(ns: &str, name: &str, cluster_ips: &[&str], ports: Value) -> Service {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns},
        "spec": {"clusterIPs": cluster_ips, "ports": ports}
    }))
    .unwrap()
}

fn slice(
    ns: &str,
    name: &str,
    service: &str,
    family: &str,
    ports: Value,
    endpoints: Value,
) -> EndpointSlice {
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "labels": {"kubernetes.io/service-name": service}},
        "addressType": family, "ports": ports, "endpoints": endpoints
    }))
    .unwrap()
}

fn endpoint(ip: &str, pod: &str, conditions: Value) -> Value {
    json!({"addresses": [ip], "conditions": conditions,
           "targetRef": {"kind": "Pod", "name": pod, "namespace": "shop"}})
}

fn pod(ns: &str, name: &str, ips: &[&str], sa: &str, meshed: bool) -> Pod {
    let annotations = if meshed {
        json!({"outrider.dev/proxy-version": "0.1.0"})
    } else {
        json!({})
    };
    serde_json::from_value(json!({
        "metadata": {"name": name, "namespace": ns, "annotations": annotations},
        "spec": {"serviceAccountName": sa, "containers": []},
        "status": {"podIPs": ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>()}
    }))
    .unwrap()
}

fn addr(s: &str) -> Target {
    Target::Addr(s.parse().unwrap())
}

fn endpoints(resolution: &Resolution) -> Vec<(String, Option<String>)> {
    match resolution {
        Resolution::Unknown => panic!("unknown"),
        Resolution::Endpoints(set) => set
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.addr.to_string(),
                    e.identity.as_ref().map(|i| i.to_string()),
                )
            })
            .collect(),
    }
}

const READY: fn() -> Value = || json!({"ready": true});

/// web: ClusterIP 10.96.0.10, port 80 → targetPort "http" (8080 on two
/// pods, 9090 on a third, in two slices); api (meshed, SA web) and db
/// (not meshed).
fn shop() -> Index {
    let mut index = Index::new(td());
    index.apply_service(&service(
        "shop",
        "web",
        &["10.96.0.10"],
        json!([{"name": "http", "port": 80, "targetPort": "http"}]),
    ));
    index.apply_slice(&slice(
        "shop",
        "web-a",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 8080}]),
        json!([
            endpoint("10.0.0.1", "web-1", READY()),
            endpoint("10.0.0.2", "web-2", READY())
        ]),
    ));
    index.apply_slice(&slice(
        "shop",
        "web-b",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 9090}]),
        json!([endpoint("10.0.0.3", "web-3", READY())]),
    ));
    index.apply_pod(&pod("shop", "web-1", &["10.0.0.1"], "web", true));
    index.apply_pod(&pod("shop", "web-2", &["10.0.0.2"], "web", true));
    index.apply_pod(&pod("shop", "web-3", &["10.0.0.3"], "legacy", false));
    index
}

#[test]
fn targets_parse_as_addresses_or_service_names_and_nothing_else() {
    let domain = "cluster.local";
    assert_eq!(
        Target::parse("10.96.0.10:80", domain),
        Ok(addr("10.96.0.10:80"))
    );
    assert_eq!(
        Target::parse("[fd00::10]:80", domain),
        Ok(addr("[fd00::10]:80"))
    );
    let web = Target::Name {
        namespace: "shop".into(),
        name: "web".into(),
        port: 80,
    };
    for text in [
        "web.shop.svc:80",
        "web.shop.svc.cluster.local:80",
        "web.shop.svc.cluster.local.:80",
    ] {
        assert_eq!(Target::parse(text, domain).as_ref(), Ok(&web), "{text}");
    }
    for text in [
        "web.shop:80",
        "web.shop.svc.other.domain:80",
        "web.shop.svc:0",
        "web.shop.svc:99999",
        "web.shop.svc",
        "Web.shop.svc:80",
        "-web.shop.svc:80",
        "a.b.c.svc:80",
        "",
        ":80",
    ] {
        assert!(Target::parse(text, domain).is_err(), "{text}");
    }
}

#[test]
fn a_cluster_ip_resolves_to_the_ready_endpoints_with_each_slice_s_target_port_and_identity() {
    let index = shop();
    let resolution = index.resolve(&addr("10.96.0.10:80"));
    assert_eq!(
        endpoints(&resolution),
        [
            (
                "10.0.0.1:8080".into(),
                Some("spiffe://cluster.local/ns/shop/sa/web".into())
            ),
            (
                "10.0.0.2:8080".into(),
                Some("spiffe://cluster.local/ns/shop/sa/web".into())
            ),
            // No sidecar: no identity to expect.
            ("10.0.0.3:9090".into(), None),
        ]
    );
    let Resolution::Endpoints(set) = resolution else {
        unreachable!()
    };
    assert_eq!(set.service, Some(("shop".into(), "web".into())));
    // The same answer by name.
    let by_name =
        index.resolve(&Target::parse("web.shop.svc.cluster.local:80", "cluster.local").unwrap());
    assert_eq!(
        endpoints(&by_name),
        endpoints(&index.resolve(&addr("10.96.0.10:80")))
    );
}

#[test]
fn unknown_addresses_ports_services_and_external_names_are_unknown() {
    let mut index = shop();
    assert_eq!(index.resolve(&addr("10.96.0.99:80")), Resolution::Unknown);
    assert_eq!(index.resolve(&addr("10.96.0.10:81")), Resolution::Unknown);
    let nowhere = Target::Name {
        namespace: "shop".into(),
        name: "nowhere".into(),
        port: 80,
    };
    assert_eq!(index.resolve(&nowhere), Resolution::Unknown);
    let external: Service = serde_json::from_value(json!({
        "metadata": {"name": "mail", "namespace": "shop"},
        "spec": {"type": "ExternalName", "externalName": "mail.example.com", "ports": [{"port": 25}]}
    }))
    .unwrap();
    index.apply_service(&external);
    let mail = Target::Name {
        namespace: "shop".into(),
        name: "mail".into(),
        port: 25,
    };
    assert_eq!(index.resolve(&mail), Resolution::Unknown);
}

#[test]
fn terminating_endpoints_serve_only_when_none_is_ready() {
    let mut index = Index::new(td());
    index.apply_service(&service(
        "shop",
        "web",
        &["10.96.0.10"],
        json!([{"port": 80, "targetPort": 8080}]),
    ));
    let slice_with = |endpoints: Value| {
        slice(
            "shop",
            "web-a",
            "web",
            "IPv4",
            json!([{"port": 8080}]),
            endpoints,
        )
    };
    let terminating = json!({"ready": false, "serving": true, "terminating": true});
    let gone = json!({"ready": false, "serving": false, "terminating": true});
    let not_ready = json!({"ready": false, "serving": false});
    index.apply_slice(&slice_with(json!([
        endpoint("10.0.0.1", "a", READY()),
        endpoint("10.0.0.2", "b", terminating.clone()),
        endpoint("10.0.0.3", "c", gone.clone()),
        endpoint("10.0.0.4", "d", not_ready.clone()),
        // No conditions at all: ready, as the API says.
        {"addresses": ["10.0.0.5"]},
    ])));
    let names: Vec<String> = endpoints(&index.resolve(&addr("10.96.0.10:80")))
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(names, ["10.0.0.1:8080", "10.0.0.5:8080"]);
    index.apply_slice(&slice_with(json!([
        endpoint("10.0.0.2", "b", terminating),
        endpoint("10.0.0.3", "c", gone),
        endpoint("10.0.0.4", "d", not_ready),
    ])));
    let Resolution::Endpoints(set) = index.resolve(&addr("10.96.0.10:80")) else {
        panic!("unknown")
    };
    assert_eq!(set.endpoints.len(), 1);
    assert_eq!(set.endpoints[0].addr.to_string(), "10.0.0.2:8080");
    assert!(set.endpoints[0].terminating);
    // Nothing left at all: an empty set, not unknown (the Service exists).
    index.delete_slice("shop", "web-a");
    assert_eq!(
        index.resolve(&addr("10.96.0.10:80")),
        Resolution::Endpoints(EndpointSet {
            service: Some(("shop".into(), "web".into())),
            opaque: false,
            endpoints: vec![],
        })
    );
}

#[test]
fn dual_stack_answers_in_the_target_s_family_and_names_in_the_primary_one() {
    let mut index = Index::new(td());
    let mut svc = service(
        "shop",
        "web",
        &["fd00::10", "10.96.0.10"],
        json!([{"port": 80}]),
    );
    if let Some(spec) = svc.spec.as_mut() {
        spec.ip_families = Some(vec!["IPv6".into(), "IPv4".into()]);
    }
    index.apply_service(&svc);
    index.apply_slice(&slice(
        "shop",
        "web-v4",
        "web",
        "IPv4",
        json!([{"port": 80}]),
        json!([endpoint("10.0.0.1", "a", READY())]),
    ));
    index.apply_slice(&slice(
        "shop",
        "web-v6",
        "web",
        "IPv6",
        json!([{"port": 80}]),
        json!([endpoint("fd00::1", "a", READY())]),
    ));
    let first = |r: Resolution| endpoints(&r).into_iter().map(|e| e.0).collect::<Vec<_>>();
    assert_eq!(
        first(index.resolve(&addr("10.96.0.10:80"))),
        ["10.0.0.1:80"]
    );
    assert_eq!(
        first(index.resolve(&addr("[fd00::10]:80"))),
        ["[fd00::1]:80"]
    );
    let by_name = Target::parse("web.shop.svc:80", "cluster.local").unwrap();
    assert_eq!(first(index.resolve(&by_name)), ["[fd00::1]:80"]);
}

#[test]
fn a_headless_service_answers_by_name_and_its_pods_by_pod_ip() {
    let mut index = Index::new(td());
    index.apply_service(&service("shop", "db", &["None"], json!([{"port": 5432}])));
    index.apply_slice(&slice(
        "shop",
        "db-a",
        "db",
        "IPv4",
        json!([{"port": 5432}]),
        json!([endpoint("10.0.0.7", "db-0", READY())]),
    ));
    index.apply_pod(&pod("shop", "db-0", &["10.0.0.7"], "db", true));
    let by_name = Target::parse("db.shop.svc:5432", "cluster.local").unwrap();
    assert_eq!(
        endpoints(&index.resolve(&by_name)),
        [(
            "10.0.0.7:5432".into(),
            Some("spiffe://cluster.local/ns/shop/sa/db".into())
        )]
    );
    let Resolution::Endpoints(set) = index.resolve(&addr("10.0.0.7:5432")) else {
        panic!("unknown")
    };
    assert_eq!(set.service, None);
    assert_eq!(set.endpoints[0].pod, Some(("shop".into(), "db-0".into())));
    assert_eq!(
        set.endpoints[0]
            .identity
            .as_ref()
            .map(ToString::to_string)
            .as_deref(),
        Some("spiffe://cluster.local/ns/shop/sa/db")
    );
    // A pod without a sidecar: known, but with no identity to expect.
    index.apply_pod(&pod("shop", "db-0", &["10.0.0.7"], "db", false));
    assert_eq!(
        endpoints(&index.resolve(&addr("10.0.0.7:5432"))),
        [("10.0.0.7:5432".into(), None)]
    );
    index.delete_pod("shop", "db-0");
    assert_eq!(index.resolve(&addr("10.0.0.7:5432")), Resolution::Unknown);
}

#[test]
fn a_pod_change_affects_its_ip_and_the_services_that_list_it() {
    let mut index = shop();
    // web-1 comes back under another ServiceAccount.
    let affected = index.apply_pod(&pod("shop", "web-1", &["10.0.0.1"], "intruder", true));
    assert_eq!(
        affected,
        [
            Affected::Service(("shop".into(), "web".into())),
            Affected::PodIp("10.0.0.1".parse().unwrap())
        ]
    );
    assert_eq!(
        endpoints(&index.resolve(&addr("10.96.0.10:80")))[0],
        (
            "10.0.0.1:8080".into(),
            Some("spiffe://cluster.local/ns/shop/sa/intruder".into())
        )
    );
    // Once no slice lists it, its changes no longer touch the Service.
    index.delete_slice("shop", "web-a");
    let affected = index.apply_pod(&pod("shop", "web-1", &["10.0.0.1"], "web", true));
    assert_eq!(affected, [Affected::PodIp("10.0.0.1".parse().unwrap())]);
    assert_eq!(
        index.depends_on(&addr("10.96.0.10:80")),
        Affected::Service(("shop".into(), "web".into()))
    );
    assert_eq!(
        index.depends_on(&addr("10.0.0.1:8080")),
        Affected::PodIp("10.0.0.1".parse().unwrap())
    );
}

#[test]
fn opaque_ports_come_from_the_service_and_the_pod_annotations() {
    let mut index = shop();
    let mut svc = service(
        "shop",
        "web",
        &["10.96.0.10"],
        json!([{"name": "http", "port": 80, "targetPort": "http"}]),
    );
    svc.metadata.annotations = Some([(OPAQUE_PORTS.to_string(), "80".to_string())].into());
    index.apply_service(&svc);
    let mut web3 = pod("shop", "web-3", &["10.0.0.3"], "legacy", false);
    web3.metadata.annotations = Some([(OPAQUE_PORTS.to_string(), "9090,5432".to_string())].into());
    index.apply_pod(&web3);
    let Resolution::Endpoints(set) = index.resolve(&addr("10.96.0.10:80")) else {
        panic!("unknown")
    };
    assert!(set.opaque);
    let opaque: Vec<bool> = set.endpoints.iter().map(|e| e.opaque).collect();
    assert_eq!(opaque, [false, false, true]);
    // A malformed annotation marks nothing.
    web3.metadata.annotations =
        Some([(OPAQUE_PORTS.to_string(), "all of them".to_string())].into());
    index.apply_pod(&web3);
    let Resolution::Endpoints(set) = index.resolve(&addr("10.96.0.10:80")) else {
        panic!("unknown")
    };
    assert!(set.endpoints.iter().all(|e| !e.opaque));
}

#[test]
fn a_service_that_changes_its_cluster_ip_no_longer_answers_on_the_old_one() {
    let mut index = shop();
    index.apply_service(&service(
        "shop",
        "web",
        &["10.96.0.11"],
        json!([{"name": "http", "port": 80}]),
    ));
    assert_eq!(index.resolve(&addr("10.96.0.10:80")), Resolution::Unknown);
    assert_eq!(endpoints(&index.resolve(&addr("10.96.0.11:80"))).len(), 3);
    index.delete_service("shop", "web");
    assert_eq!(index.resolve(&addr("10.96.0.11:80")), Resolution::Unknown);
    // Slices without their Service answer nothing.
    let by_name = Target::parse("web.shop.svc:80", "cluster.local").unwrap();
    assert_eq!(index.resolve(&by_name), Resolution::Unknown);
}

#[test]
fn a_pod_named_by_two_slices_of_a_service_stays_its_endpoint_until_both_are_gone() {
    let mut index = shop();
    // web-1 also appears in slice web-b (a dual-port split, say).
    index.apply_slice(&slice(
        "shop",
        "web-b",
        "web",
        "IPv4",
        json!([{"name": "http", "port": 9090}]),
        json!([
            endpoint("10.0.0.3", "web-3", READY()),
            endpoint("10.0.0.1", "web-1", READY())
        ]),
    ));
    let web = Affected::Service(("shop".into(), "web".into()));
    index.delete_slice("shop", "web-a");
    let affected = index.apply_pod(&pod("shop", "web-1", &["10.0.0.1"], "web", true));
    assert!(affected.contains(&web), "{affected:?}");
    index.delete_slice("shop", "web-b");
    let affected = index.apply_pod(&pod("shop", "web-1", &["10.0.0.1"], "web", true));
    assert!(!affected.contains(&web), "{affected:?}");
}
