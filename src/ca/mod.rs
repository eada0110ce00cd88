//! The local mesh CA behind `outrider ca`: creating a trust anchor and an
//! issuer, issuing workload X509-SVIDs into a kubelet-style directory, and
//! describing certificates.
//!
//! Never called by the proxy: the mounted files are the only interface
//! between whoever issues identities and the sidecar that uses them.

pub mod inspect;
pub mod issuer;
pub mod secret_dir;
pub mod store;
