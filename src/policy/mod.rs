//! Who may talk to this workload, and how.
//!
//! `crd` defines the CustomResourceDefinitions; `objects` reads policy
//! objects out of YAML or JSON; `model` judges objects into kube-free
//! policies (with their fail-safe forms); `index` compiles what applies to
//! one workload; `authz` decides, purely; `publish` republishes the
//! compiled policy on a `watch` channel ([`PolicyRx`]) as `source`s
//! (files, the Kubernetes API, the labels file) deliver updates; `check`
//! explains a decision offline. Only `crd` and `source::kube` know about
//! kube; the proxy reads `publish`, `index` and `authz`, never a source.

pub mod authz;
pub mod check;
pub mod crd;
pub mod index;
pub mod judge;
pub mod jwt;
pub mod limits;
pub mod model;
pub mod objects;
pub mod publish;
pub mod source;
pub mod token_match;

pub use authz::{Decider, Denied, Http, Permit, Request, authorize};
pub use index::{Probe, Settings, Workload, WorkloadPolicy};
pub use model::{DefaultPolicy, MtlsMode};
pub use publish::PolicyRx;
