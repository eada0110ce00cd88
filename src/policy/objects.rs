//! Policy objects out of text: a multi-document YAML (or JSON) stream
//! read the way `kubectl apply` reads it, and the outrider objects picked
//! out of Kubernetes-shaped values. Shared by the file source, the
//! Kubernetes source and `outrider policy check`.

use std::collections::BTreeMap;

use serde_json::Value;

use super::crd;
use super::model::{Kind, Object};

/// Objects by kind, namespace and name.
pub type ObjectSet = BTreeMap<(Kind, String, String), Object>;

#[derive(Debug, thiserror::Error)]
pub enum ParseError {
    #[error("not YAML, or beyond the limits: {0}")]
    Yaml(#[from] crate::yaml::Error),
    #[error("document {index}: {kind} without metadata.name")]
    NoName { index: usize, kind: &'static str },
}

/// Reads a multi-document YAML (or JSON) stream the way `kubectl apply`
/// does: `List` documents are flattened, objects of other kinds are
/// skipped, a missing namespace means `default_namespace`.
pub fn parse_documents(text: &str, default_namespace: &str) -> Result<Vec<Object>, ParseError> {
    let documents = crate::yaml::documents(text).map_err(ParseError::Yaml)?;
    let mut objects = Vec::new();
    for (index, value) in documents.into_iter().enumerate() {
        collect(value, index, default_namespace, &mut objects)?;
    }
    Ok(objects)
}

fn collect(
    value: Value,
    index: usize,
    default_namespace: &str,
    out: &mut Vec<Object>,
) -> Result<(), ParseError> {
    if value.is_null() {
        return Ok(()); // an empty document
    }
    if value.get("kind").and_then(Value::as_str) == Some("List") {
        if let Some(items) = value.get("items").and_then(Value::as_array) {
            for item in items {
                collect(item.clone(), index, default_namespace, out)?;
            }
        }
        return Ok(());
    }
    let Some(object) = object_from_value(value, default_namespace) else {
        return Ok(());
    };
    object
        .map(|o| out.push(o))
        .map_err(|kind| ParseError::NoName { index, kind })
}

/// An outrider policy object out of a Kubernetes-shaped value; `None` for
/// anything else, `Err(kind)` for one of ours without a name.
pub fn object_from_value(
    value: Value,
    default_namespace: &str,
) -> Option<Result<Object, &'static str>> {
    let api_version = value.get("apiVersion").and_then(Value::as_str)?;
    if api_version.split('/').next() != Some(crd::GROUP) {
        return None;
    }
    let kind = Kind::from_kind(value.get("kind").and_then(Value::as_str)?)?;
    let metadata = value.get("metadata");
    let name = metadata.and_then(|m| m.get("name")).and_then(Value::as_str);
    let Some(name) = name else {
        return Some(Err(kind.as_str()));
    };
    let namespace = metadata
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str)
        .unwrap_or(default_namespace);
    let created = metadata
        .and_then(|m| m.get("creationTimestamp"))
        .and_then(Value::as_str)
        .map(String::from);
    Some(Ok(Object {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
        created,
        spec: value.get("spec").cloned().unwrap_or(Value::Null),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::ALLOW_ORDERS as ALLOW;

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
            Err(ParseError::Yaml(_))
        ));
    }
}
