//! Sidecar injection: the mesh values and per-pod annotations
//! ([`config`]), the pure pod transformation ([`pod`]), and its two users'
//! entry points: [`manifest`] for `outrider inject` and [`pod_patch`] for
//! the admission webhook. Both go through [`pod::inject_template`], so
//! offline and in-cluster injection cannot drift apart.

pub mod config;
pub mod manifest;
pub mod pod;
pub mod pod_security;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use config::{InjectConfig, ValueError};
pub use pod::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("document {document}: not YAML: {reason}")]
    Yaml { document: usize, reason: String },
    #[error("{object}: {reason}")]
    Shape { object: String, reason: String },
    #[error("{object}: {field} is not a valid pod {field}: {reason}")]
    Invalid {
        object: String,
        field: &'static str,
        reason: String,
    },
    #[error("{object}: {source}")]
    Value { object: String, source: ValueError },
    #[error("cannot serialise the injected pod: {0}")]
    Serialise(#[from] serde_json::Error),
}

fn from_json<T: DeserializeOwned>(
    object: &str,
    field: &'static str,
    value: Value,
) -> Result<T, InjectError> {
    serde_path_to_error::deserialize(value).map_err(|e| InjectError::Invalid {
        object: object.to_string(),
        field,
        reason: e.to_string(),
    })
}

fn to_json<T: Serialize>(value: &T) -> Result<Value, InjectError> {
    Ok(serde_json::to_value(value)?)
}

/// The webhook's view: a Pod as JSON in, the outcome and the JSON Patch
/// that applies it out (none unless injected). The patch is computed
/// between the pod and the injected pod after the same typed round trip,
/// so it holds only what injection changed.
pub fn pod_patch(
    pod: &Value,
    mesh: &InjectConfig,
) -> Result<(Outcome, Option<json_patch::Patch>), InjectError> {
    let (outcome, injected) = inject_pod(pod, mesh)?;
    Ok((outcome, injected.map(|i| i.patch)))
}

/// An injected pod: the patch, and the spec it produces (for checks on
/// what injection added, without applying the patch again).
#[derive(Debug)]
pub struct InjectedPod {
    pub patch: json_patch::Patch,
    pub spec: k8s_openapi::api::core::v1::PodSpec,
}

/// [`pod_patch`], keeping the injected spec.
pub fn inject_pod(
    pod: &Value,
    mesh: &InjectConfig,
) -> Result<(Outcome, Option<InjectedPod>), InjectError> {
    let object = format!(
        "Pod/{}",
        pod["metadata"]["name"]
            .as_str()
            .or_else(|| pod["metadata"]["generateName"].as_str())
            .unwrap_or("<unnamed>")
    );
    let typed: k8s_openapi::api::core::v1::Pod = from_json(&object, "object", pod.clone())?;
    let before = to_json(&typed)?;
    let mut metadata = typed.metadata.clone();
    let mut spec = typed.spec.clone().ok_or_else(|| InjectError::Shape {
        object: object.clone(),
        reason: "the pod has no spec".to_string(),
    })?;
    let outcome =
        pod::inject_template(&mut metadata, &mut spec, mesh).map_err(|e| InjectError::Value {
            object: object.clone(),
            source: e,
        })?;
    if !matches!(outcome, Outcome::Injected { .. }) {
        return Ok((outcome, None));
    }
    let injected = k8s_openapi::api::core::v1::Pod {
        metadata,
        spec: Some(spec),
        status: typed.status,
    };
    let after = to_json(&injected)?;
    Ok((
        outcome,
        Some(InjectedPod {
            patch: json_patch::diff(&before, &after),
            spec: injected.spec.unwrap_or_default(),
        }),
    ))
}

/// The checks of the Pod Security Standard `level` that the containers
/// injection added to `spec` fail.
pub fn pod_security_violations(
    spec: &k8s_openapi::api::core::v1::PodSpec,
    level: pod_security::Level,
) -> Vec<pod_security::Violation> {
    let ours: Vec<&k8s_openapi::api::core::v1::Container> = spec
        .init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
        .filter(|c| c.name == pod::INIT_CONTAINER || c.name == pod::PROXY_CONTAINER)
        .collect();
    pod_security::violations(level, spec.security_context.as_ref(), &ours)
}

#[cfg(test)]
mod tests;
