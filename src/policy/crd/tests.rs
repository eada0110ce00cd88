//! The CRDs' CEL rules, run by the same CEL library the API server uses.

use kube::CustomResourceExt;
use serde_json::{Value, json};

use super::*;

fn schema<K: CustomResourceExt>() -> Value {
    let crd = K::crd();
    serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap()
}

fn check_policy(spec: Value) -> Result<(), String> {
    let object = json!({"apiVersion": "security.outrider.dev/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "p", "namespace": "shop"}, "spec": spec});
    kube::core::cel::Validator::new()
        .validate(&schema::<AuthorizationPolicy>(), &object, None)
        .map_err(|e| format!("{e:?}"))
}

fn source(field: &str, values: Value) -> Value {
    json!({"action": "ALLOW", "rules": [{"from": [{field: values}]}]})
}

fn operation(field: &str, values: Value) -> Value {
    json!({"action": "ALLOW", "rules": [{"to": [{field: values}]}]})
}

#[test]
fn a_realistic_policy_passes_every_rule() {
    let spec = json!({
        "selector": {"matchLabels": {"app": "payments"}},
        "action": "ALLOW",
        "rules": [{
            "from": [{"principals": ["spiffe://cluster.local/ns/shop/sa/orders", "*/sa/admin", "spiffe://cluster.local/ns/ops/*"],
                      "namespaces": ["shop"], "ipBlocks": ["10.0.0.0/8", "192.168.1.7", "fd00::/8"], "authenticated": true}],
            "to": [{"ports": [8080], "methods": ["POST"], "paths": ["/api/payments/*", "*.json", "/healthz"]}]
        }]
    });
    check_policy(spec).unwrap();
}

#[test]
fn rejects_malformed_patterns() {
    for bad in [
        json!([""]),
        json!(["spiffe://a/*/b"]),
        json!(["**x"]),
        json!(["a*b"]),
    ] {
        assert!(
            check_policy(source("principals", bad.clone())).is_err(),
            "principals {bad}"
        );
        assert!(
            check_policy(operation("paths", bad.clone())).is_err(),
            "paths {bad}"
        );
    }
    for good in [json!(["*"]), json!(["*x"]), json!(["x*"])] {
        check_policy(source("notPrincipals", good.clone())).unwrap();
    }
}

#[test]
fn rejects_ports_out_of_range() {
    assert!(check_policy(operation("ports", json!([0]))).is_err());
    assert!(check_policy(operation("ports", json!([65536]))).is_err());
    check_policy(operation("notPorts", json!([1, 65535]))).unwrap();
}

#[test]
fn rejects_what_cannot_be_an_address_or_cidr() {
    for bad in ["10.0.0.0/8x", "example.com", "10.0.0", ""] {
        assert!(
            check_policy(source("ipBlocks", json!([bad]))).is_err(),
            "{bad}"
        );
    }
}

#[test]
fn rejects_lower_case_methods_and_bad_namespaces() {
    assert!(check_policy(operation("methods", json!(["get"]))).is_err());
    assert!(check_policy(source("namespaces", json!(["Shop"]))).is_err());
    assert!(check_policy(source("namespaces", json!(["-shop"]))).is_err());
}

#[test]
fn peer_authentication_port_keys_must_be_ports() {
    let check = |spec: Value| {
        let object = json!({"apiVersion": "security.outrider.dev/v1alpha1", "kind": "PeerAuthentication",
            "metadata": {"name": "p", "namespace": "shop"}, "spec": spec});
        kube::core::cel::Validator::new().validate(&schema::<PeerAuthentication>(), &object, None)
    };
    check(json!({"mtls": {"mode": "STRICT"}, "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}}}))
        .unwrap();
    assert!(check(json!({"portLevelMtls": {"http": {"mode": "STRICT"}}})).is_err());
    assert!(check(json!({"portLevelMtls": {"70000": {"mode": "STRICT"}}})).is_err());
}

#[test]
fn kinds_have_short_names_and_the_outrider_category_so_they_never_clash_with_istio() {
    // With Istio installed, `kubectl get authorizationpolicy` is ambiguous;
    // `kubectl get outrider` and these short names are not.
    let istio_short_names = ["ap", "pa", "ra"];
    let mut seen = Vec::new();
    for crd in [AuthorizationPolicy::crd(), PeerAuthentication::crd()] {
        let names = &crd.spec.names;
        assert_eq!(
            names.categories.as_deref(),
            Some(&["outrider".to_string()][..]),
            "{}",
            names.kind
        );
        let short = names.short_names.clone().unwrap_or_default();
        assert!(!short.is_empty(), "{} has no short name", names.kind);
        for name in short {
            assert!(!istio_short_names.contains(&name.as_str()), "{name}");
            assert!(!seen.contains(&name), "{name} used twice");
            seen.push(name);
        }
    }
}

#[test]
fn the_yaml_round_trips_through_serde() {
    let yaml = crds_yaml().unwrap();
    let docs = crate::yaml::documents(&yaml).unwrap();
    assert_eq!(docs.len(), 4);
    assert_eq!(docs[0]["spec"]["group"], "security.outrider.dev");
    assert_eq!(docs[1]["spec"]["names"]["kind"], "PeerAuthentication");
    assert_eq!(docs[2]["spec"]["names"]["kind"], "RequestAuthentication");
    assert_eq!(docs[3]["spec"]["names"]["kind"], "LocalRateLimitPolicy");
}

#[test]
fn committed_crds_match_the_generated_ones() {
    // The plain manifests and the Helm chart's crds/ both come from
    // `outrider crds --write`.
    for place in ["manifests/crds", "charts/outrider/crds"] {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(place);
        let generated = crd_files().unwrap();
        let mut committed: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        committed.sort();
        let mut names: Vec<String> = generated.iter().map(|(n, _)| n.clone()).collect();
        names.sort();
        assert_eq!(committed, names, "{place} holds other files than the CRDs");
        for (name, yaml) in &generated {
            let on_disk = std::fs::read_to_string(dir.join(name)).unwrap();
            assert!(
                on_disk == *yaml,
                "{place}/{name} drifted from the Rust types; regenerate it with \
                 `cargo run -- crds --write {place}`"
            );
        }
    }
}

#[test]
fn every_example_passes_the_schema_and_its_cel_rules() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("manifests/examples");
    let mut checked = 0;
    let mut stack = vec![dir];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for value in crate::yaml::documents(&text).unwrap() {
                // Workloads beside the policies (the demo app) are checked
                // against the Kubernetes schemas in tests/chart.rs.
                if !value["apiVersion"]
                    .as_str()
                    .is_some_and(|v| v.starts_with("security.outrider.dev/"))
                {
                    continue;
                }
                let (schema, spec_ok) = match value["kind"].as_str() {
                    Some("AuthorizationPolicy") => (
                        schema::<AuthorizationPolicy>(),
                        serde_json::from_value::<AuthorizationPolicySpec>(value["spec"].clone())
                            .map(|_| ()),
                    ),
                    Some("PeerAuthentication") => (
                        schema::<PeerAuthentication>(),
                        serde_json::from_value::<PeerAuthenticationSpec>(value["spec"].clone())
                            .map(|_| ()),
                    ),
                    Some("RequestAuthentication") => (
                        schema::<RequestAuthentication>(),
                        serde_json::from_value::<RequestAuthenticationSpec>(value["spec"].clone())
                            .map(|_| ()),
                    ),
                    Some("LocalRateLimitPolicy") => (
                        schema::<LocalRateLimitPolicy>(),
                        serde_json::from_value::<LocalRateLimitPolicySpec>(value["spec"].clone())
                            .map(|_| ()),
                    ),
                    other => panic!("{}: unexpected kind {other:?}", path.display()),
                };
                spec_ok.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                kube::core::cel::Validator::new()
                    .validate(&schema, &value, None)
                    .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()));
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "only {checked} example objects found");
}

/// The rules the API server applies to a structural schema (the ones a
/// generated schema could break): every node has a type, `properties` and
/// `additionalProperties` exclude each other, no references, and value
/// validations (`anyOf`, `allOf`, `oneOf`, `not`) carry no types, defaults
/// or descriptions of their own.
fn structural_violations(node: &Value, path: &str, out: &mut Vec<String>) {
    let Some(map) = node.as_object() else {
        out.push(format!("{path}: not an object"));
        return;
    };
    for forbidden in ["$ref", "definitions", "$schema", "$defs"] {
        if map.contains_key(forbidden) {
            out.push(format!("{path}: {forbidden}"));
        }
    }
    let open = map.get("x-kubernetes-int-or-string") == Some(&json!(true))
        || map.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    if !open
        && map
            .get("type")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
    {
        out.push(format!("{path}: no type"));
    }
    if map.contains_key("properties") && map.contains_key("additionalProperties") {
        out.push(format!("{path}: properties and additionalProperties"));
    }
    for (name, child) in map
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        structural_violations(child, &format!("{path}.{name}"), out);
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = map.get(key).filter(|c| c.is_object()) {
            structural_violations(child, &format!("{path}.{key}"), out);
        }
    }
    for key in ["anyOf", "allOf", "oneOf", "not"] {
        let branches = match map.get(key) {
            Some(Value::Array(branches)) => branches.clone(),
            Some(branch) => vec![branch.clone()],
            None => continue,
        };
        for branch in branches {
            for forbidden in [
                "type",
                "default",
                "description",
                "nullable",
                "additionalProperties",
            ] {
                if branch.get(forbidden).is_some() {
                    out.push(format!(
                        "{path}.{key}: {forbidden} inside a value validation"
                    ));
                }
            }
        }
    }
}

#[test]
fn both_schemas_are_structural() {
    for (name, schema) in [
        ("AuthorizationPolicy", schema::<AuthorizationPolicy>()),
        ("PeerAuthentication", schema::<PeerAuthentication>()),
    ] {
        let mut violations = Vec::new();
        structural_violations(&schema, name, &mut violations);
        assert!(violations.is_empty(), "{violations:#?}");
        // The checker itself finds what it is meant to find.
        let mut broken = schema.clone();
        broken["properties"]["spec"]["properties"]["selector"]
            .as_object_mut()
            .unwrap()
            .remove("type");
        let mut found = Vec::new();
        structural_violations(&broken, name, &mut found);
        assert_eq!(found, vec![format!("{name}.spec.selector: no type")]);
    }
}

#[test]
fn every_field_is_documented_for_kubectl_explain() {
    fn undocumented(node: &Value, path: &str, out: &mut Vec<String>) {
        for (name, child) in node["properties"].as_object().into_iter().flatten() {
            let here = format!("{path}.{name}");
            if child["description"].as_str().is_none_or(str::is_empty) {
                out.push(here.clone());
            }
            undocumented(child, &here, out);
            undocumented(&child["items"], &here, out);
            undocumented(&child["additionalProperties"], &here, out);
        }
    }
    for (name, schema) in [
        ("AuthorizationPolicy", schema::<AuthorizationPolicy>()),
        ("PeerAuthentication", schema::<PeerAuthentication>()),
    ] {
        let mut missing = Vec::new();
        undocumented(&schema["properties"]["spec"], name, &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
    }
}

fn check_request_authn(spec: Value) -> Result<(), String> {
    let object = json!({"apiVersion": "security.outrider.dev/v1alpha1", "kind": "RequestAuthentication",
        "metadata": {"name": "idp", "namespace": "shop"}, "spec": spec});
    kube::core::cel::Validator::new()
        .validate(&schema::<RequestAuthentication>(), &object, None)
        .map_err(|e| format!("{e:?}"))
}

fn jwt_rule(extra: Value) -> Value {
    let mut rule = json!({"issuer": "https://idp.example", "audiences": ["payments"],
        "jwksUri": "https://idp.example/keys"});
    for (k, v) in extra.as_object().unwrap() {
        if v.is_null() {
            rule.as_object_mut().unwrap().remove(k);
        } else {
            rule[k] = v.clone();
        }
    }
    json!({"jwtRules": [rule]})
}

#[test]
fn a_realistic_request_authentication_passes_every_rule() {
    check_request_authn(jwt_rule(json!({
        "fromHeaders": [{"name": "x-jwt", "prefix": ""}],
        "forwardOriginalToken": false,
        "outputClaimToHeaders": [{"header": "x-user-group", "claim": "group"}],
        "presence": "Required",
        "algorithms": ["ES256", "EdDSA"],
    })))
    .unwrap();
    check_request_authn(jwt_rule(json!({"jwksUri": null, "jwks": "{\"keys\": []}"}))).unwrap();
}

#[test]
fn request_authentication_refuses_plain_http_keys_two_key_sources_and_our_headers() {
    for (bad, why) in [
        (json!({"jwksUri": "http://idp.example/keys"}), "plain http"),
        (json!({"jwks": "{}"}), "both jwksUri and jwks"),
        (json!({"jwksUri": null}), "no keys at all"),
        (
            json!({"outputClaimToHeaders": [{"header": "X-Outrider-Client-Id", "claim": "sub"}]}),
            "the proxy's own header",
        ),
        (
            json!({"outputClaimToHeaders": [{"header": "x_outrider_client_id", "claim": "sub"}]}),
            "the proxy's own header, CGI spelling",
        ),
        (
            json!({"fromHeaders": [{"name": "bad header"}]}),
            "header name",
        ),
    ] {
        assert!(check_request_authn(jwt_rule(bad)).is_err(), "{why}");
    }
    // Sizes are OpenAPI's, which the API server checks (not CEL).
    let rule = &schema::<RequestAuthentication>()["properties"]["spec"]["properties"]["jwtRules"]["items"]
        ["properties"];
    assert_eq!(rule["audiences"]["minItems"], 1);
    assert_eq!(rule["issuer"]["minLength"], 1);
    // Shared-secret and unsigned algorithms do not exist in the schema.
    let hs = serde_json::from_value::<JwtAlgorithm>(json!("HS256"));
    assert!(hs.is_err());
}

#[test]
fn when_keys_are_token_claims_or_audiences_only() {
    let with_when = |key: &str, values: Value| json!({"action": "ALLOW", "rules": [{"when": [{"key": key, "values": values}]}]});
    for good in [
        "request.auth.claims[groups]",
        "request.auth.claims[org][team]",
        "request.auth.audiences",
    ] {
        check_policy(with_when(good, json!(["a"]))).unwrap();
    }
    for bad in [
        "request.headers[x-user]",
        "source.ip",
        "request.auth.claims",
        "request.auth.claims[]",
        "request.auth.claims[a]x",
    ] {
        assert!(check_policy(with_when(bad, json!(["a"]))).is_err(), "{bad}");
    }
    let no_values =
        json!({"action": "ALLOW", "rules": [{"when": [{"key": "request.auth.audiences"}]}]});
    assert!(check_policy(no_values).is_err());
}

fn check_rate_limit(spec: Value) -> Result<(), String> {
    let object = json!({"apiVersion": "security.outrider.dev/v1alpha1", "kind": "LocalRateLimitPolicy",
        "metadata": {"name": "limits", "namespace": "shop"}, "spec": spec});
    kube::core::cel::Validator::new()
        .validate(&schema::<LocalRateLimitPolicy>(), &object, None)
        .map_err(|e| format!("{e:?}"))
}

#[test]
fn a_rate_limit_needs_a_budget_and_well_formed_matches() {
    check_rate_limit(json!({"mode": "DryRun", "limits": [{
        "match": {"ports": [8080], "methods": ["POST"], "paths": ["/api/*"]},
        "total": {"requestsPerSecond": 100, "burst": 200},
        "perClient": {"requestsPerSecond": 10},
        "overrides": [{"clients": ["spiffe://cluster.local/ns/shop/sa/batch"], "requestsPerSecond": 50}]
    }]}))
    .unwrap();
    assert!(check_rate_limit(json!({"limits": [{"match": {"paths": ["/api/*"]}}]})).is_err());
    assert!(
        check_rate_limit(
            json!({"limits": [{"match": {"paths": ["a*b"]}, "total": {"requestsPerSecond": 1}}]})
        )
        .is_err()
    );
    assert!(
        check_rate_limit(
            json!({"limits": [{"match": {"ports": [0]}, "total": {"requestsPerSecond": 1}}]})
        )
        .is_err()
    );
}
