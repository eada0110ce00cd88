//! The mesh CA: creating a trust anchor and an issuer, issuing workload
//! X509-SVIDs into a kubelet-style directory, describing certificates, and
//! the CA Secret the controller runs on (`secret`).
//!
//! Pure or local-file code only: the controller does the Kubernetes side.
//! Never called by the proxy: the mounted files are the only interface
//! between whoever issues identities and the sidecar that uses them.

pub mod inspect;
pub mod issuer;
pub mod secret;
pub mod secret_dir;
pub mod store;
