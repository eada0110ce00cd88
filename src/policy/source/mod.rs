//! Where policies come from: a directory of YAML files ([`files`]), the
//! Kubernetes API ([`kube`]), and the workload's labels from a
//! downward-API file ([`labels`]). Each sends [`Update`]s to the
//! publisher; none of them decides anything.
//!
//! [`Update`]: super::publish::Update

pub mod files;
pub mod kube;
pub mod labels;

#[cfg(test)]
mod tests;
