//! `outrider inject` over multi-document YAML: finds the pod template in
//! every workload kind (and in `List`s), injects it, and passes every
//! other document through byte for byte.

use serde_json::Value;

use super::config::InjectConfig;
use super::pod::{Outcome, inject_template};
use super::{InjectError, from_json, to_json};

/// One document's fate, for the report on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// `Deployment/web` (or `document 3` when it has no kind and name).
    pub object: String,
    pub outcome: Option<Outcome>,
}

/// Where the pod template sits in each workload kind.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    match kind {
        "Pod" => Some(&[]),
        "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController"
        | "Job" => Some(&["spec", "template"]),
        "CronJob" => Some(&["spec", "jobTemplate", "spec", "template"]),
        _ => None,
    }
}

/// Transforms a multi-document YAML stream.
pub fn inject_manifests(
    input: &str,
    mesh: &InjectConfig,
) -> Result<(String, Vec<Report>), InjectError> {
    let mut output = String::new();
    let mut reports = Vec::new();
    for (index, document) in split_documents(input).into_iter().enumerate() {
        if !output.is_empty() && !output.ends_with("---\n") {
            output.push_str("---\n");
        }
        let value = crate::yaml::value(&document).map_err(|e| InjectError::Yaml {
            document: index + 1,
            reason: e.to_string(),
        })?;
        let Some(mut value) = Some(value).filter(|v| !v.is_null()) else {
            // Comments only: keep them.
            output.push_str(&document);
            continue;
        };
        let mut changed = false;
        inject_object(&mut value, mesh, index + 1, &mut changed, &mut reports)?;
        if changed {
            let yaml = crate::yaml::to_string(&value).map_err(|e| InjectError::Yaml {
                document: index + 1,
                reason: e.to_string(),
            })?;
            output.push_str(&yaml);
        } else {
            output.push_str(&document);
        }
    }
    Ok((output, reports))
}

fn inject_object(
    value: &mut Value,
    mesh: &InjectConfig,
    document: usize,
    changed: &mut bool,
    reports: &mut Vec<Report>,
) -> Result<(), InjectError> {
    let kind = value["kind"].as_str().unwrap_or_default().to_string();
    let name = value["metadata"]["name"]
        .as_str()
        .unwrap_or("<unnamed>")
        .to_string();
    let object = format!("{kind}/{name}");
    if kind == "List" || kind.ends_with("List") {
        if let Some(items) = value.get_mut("items").and_then(Value::as_array_mut) {
            for item in items {
                inject_object(item, mesh, document, changed, reports)?;
            }
        }
        return Ok(());
    }
    let Some(path) = template_path(&kind) else {
        reports.push(Report {
            object: if kind.is_empty() {
                format!("document {document}")
            } else {
                object
            },
            outcome: None,
        });
        return Ok(());
    };
    let mut template = value;
    for key in path {
        template = template.get_mut(*key).ok_or_else(|| InjectError::Shape {
            object: object.clone(),
            reason: format!("no {} in a {kind}", path.join(".")),
        })?;
    }
    let metadata_value = template.get("metadata").cloned().unwrap_or(Value::Null);
    let mut metadata = if metadata_value.is_null() {
        Default::default()
    } else {
        from_json(&object, "metadata", metadata_value)?
    };
    let spec_value = template
        .get("spec")
        .cloned()
        .ok_or_else(|| InjectError::Shape {
            object: object.clone(),
            reason: "the pod template has no spec".to_string(),
        })?;
    let mut spec = from_json(&object, "spec", spec_value)?;
    let outcome =
        inject_template(&mut metadata, &mut spec, mesh).map_err(|e| InjectError::Value {
            object: object.clone(),
            source: e,
        })?;
    if matches!(outcome, Outcome::Injected { .. }) {
        template["metadata"] = to_json(&metadata)?;
        template["spec"] = to_json(&spec)?;
        *changed = true;
    }
    reports.push(Report {
        object,
        outcome: Some(outcome),
    });
    Ok(())
}

/// Splits a YAML stream at `---` lines, keeping each document's text.
fn split_documents(input: &str) -> Vec<String> {
    let mut documents = vec![String::new()];
    for line in input.split_inclusive('\n') {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") || bare.starts_with("---#") {
            documents.push(String::new());
            continue;
        }
        if let Some(last) = documents.last_mut() {
            last.push_str(line);
        }
    }
    for document in &mut documents {
        if !document.is_empty() && !document.ends_with('\n') {
            document.push('\n');
        }
    }
    // A leading `---` makes an empty first document; drop empty ones.
    documents.retain(|d| !d.trim().is_empty());
    documents
}
