//! outrider: a service-mesh sidecar proxy and its small control plane, in
//! one crate and one binary.
//!
//! The module map, the traffic flow and the dependency rules (which module
//! may use which) are in `docs/architecture.md`; `tests/architecture.rs`
//! holds the rules. In one line each, from the ground floor up:
//!
//! - `units`, `runtime`, `crypto`, `lifecycle`, `listener`: parsers,
//!   process plumbing, the TLS crypto provider, drain signals, the accept
//!   loop;
//! - `identity`: SPIFFE IDs, X509-SVIDs, the credential reloader;
//! - `tls`: rustls configs and SPIFFE verifiers over an identity;
//! - `policy`: CRDs, the kube-free model, the compiled per-workload index,
//!   the pure authorization decision, its sources and publisher;
//! - `proxy`: the data plane (inbound, outbound, detection, HTTP, pool);
//! - `admin`: `/metrics`, `/ready`, `/live`, `/shutdown`;
//! - `ca`, `init`, `inject`: the CA and its Secret, the iptables rules,
//!   the injection patch (all pure or local files);
//! - `kube_client`, `controller`: the control plane;
//! - `config`, `app`: the proxy's configuration and its wiring;
//! - `demo`, `cli`: the local demo and the command line.

pub mod admin;
pub mod app;
pub mod ca;
pub mod cli;
pub mod config;
pub mod controller;
pub mod crypto;
pub mod demo;
pub mod discovery_api;
pub mod identity;
pub mod init;
pub mod inject;
pub mod kube_client;
pub mod lifecycle;
pub mod listener;
pub mod memory;
pub mod policy;
pub mod proxy;
pub mod runtime;
#[cfg(any(test, feature = "test-util"))]
pub mod test_util;
pub mod tls;
pub mod units;
pub mod yaml;
