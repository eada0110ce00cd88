//! Who may talk to this workload, and how.
//!
//! `crd` defines the CustomResourceDefinitions; `model` judges objects into
//! kube-free policies (with their fail-safe forms); `index` compiles what
//! applies to one workload; `authz` decides, purely; `source` keeps the
//! compiled policy current from files or the Kubernetes API and publishes
//! it on a `watch` channel. Only `crd` and `source` know about kube.

pub mod authz;
pub mod check;
pub mod crd;
pub mod index;
pub mod model;
pub mod source;

pub use authz::{Decider, Denied, Http, Permit, Request, authorize};
pub use index::{Probe, Settings, Workload, WorkloadPolicy};
pub use model::{DefaultPolicy, MtlsMode};
