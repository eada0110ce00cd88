//! Who this workload is and which roots it trusts.
//!
//! Owns SPIFFE ID parsing, the X509-SVID rules, loading and validating the
//! mounted credential files, and watching that directory for rotations.
//! Imports nothing else from this crate: the TLS layer and the proxy build
//! on it, never the other way round.

mod credentials;
pub mod reload;
mod spiffe;
pub mod svid;

pub use credentials::{
    BUNDLE_FILE, CERT_FILE, Credentials, DATA_LINK, KEY_FILE, LoadError, RawCredentials,
};
pub use spiffe::{InvalidSpiffeId, SpiffeId, TrustDomain};
pub use svid::{SvidError, SvidLeaf, TrustBundle};
