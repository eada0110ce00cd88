//! The one place that names the cryptography provider.
//!
//! Everything that signs, verifies, generates keys or draws randomness goes
//! through here, so the provider can be swapped in one line. Imports
//! nothing from this crate.

pub use rustls::crypto::aws_lc_rs as backend;

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

/// SHA-256 of `data` (cache keys for verified tokens).
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data);
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}
