//! The one place that names the cryptography provider.
//!
//! Everything that signs, verifies, generates keys or draws randomness goes
//! through here, so the provider can be swapped in one line. Imports
//! nothing from this crate.

pub use rustls::crypto::ring as backend;

/// The provider with its default suites and groups; callers narrow it.
pub fn provider() -> rustls::crypto::CryptoProvider {
    backend::default_provider()
}

/// Signature algorithms accepted in certificate chains.
pub static CHAIN_ALGORITHMS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] =
    webpki::ALL_VERIFICATION_ALGS;

/// Makes the provider the process default, for libraries (the Kubernetes
/// client) that build their own rustls configurations. Idempotent.
pub fn install_default() {
    let _ = provider().install_default();
}
