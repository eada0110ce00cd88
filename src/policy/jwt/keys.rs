//! An issuer's signing keys, read out of a JWKS document: the public
//! keys of the algorithms we accept, each with its key id and the one
//! algorithm family (and curve) it may verify. Pure; fetching is the
//! proxy's.

use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;

/// A JWKS document is refused past this many keys (providers publish a
/// handful; more is a mistake or an attack on our memory).
pub const MAX_KEYS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeysError {
    #[error("not a JWKS document: {0}")]
    NotJwks(String),
    #[error("{0} keys, more than the {MAX_KEYS} accepted")]
    TooMany(usize),
    #[error("no signing key of a supported type (RSA, EC P-256/P-384, Ed25519)")]
    NoUsableKey,
}

/// One verification key.
#[derive(Clone)]
pub struct Key {
    pub id: Option<String>,
    /// The algorithms this key may verify: its family, narrowed by the
    /// curve and by the JWK's own `alg` when it names one.
    pub algorithms: &'static [Algorithm],
    pub decoding: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("id", &self.id)
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

/// The usable keys of a JWKS document.
#[derive(Debug, Clone, Default)]
pub struct KeySet {
    keys: Vec<Key>,
    /// Keys present but not usable (symmetric, encryption-only, unknown
    /// type), for the logs.
    pub skipped: usize,
}

impl KeySet {
    /// Reads a JWKS document (`{"keys": [...]}`). Keys we cannot use are
    /// skipped, not fatal: a provider may publish encryption keys or key
    /// types we do not know beside its signing keys.
    pub fn parse(document: &[u8]) -> Result<Self, KeysError> {
        let value: Value =
            serde_json::from_slice(document).map_err(|e| KeysError::NotJwks(e.to_string()))?;
        let Some(listed) = value.get("keys").and_then(Value::as_array) else {
            return Err(KeysError::NotJwks("no \"keys\" array".into()));
        };
        if listed.len() > MAX_KEYS {
            return Err(KeysError::TooMany(listed.len()));
        }
        let mut set = KeySet::default();
        for entry in listed {
            match serde_json::from_value::<Jwk>(entry.clone())
                .ok()
                .and_then(|jwk| usable(&jwk))
            {
                Some(key) => set.keys.push(key),
                None => set.skipped += 1,
            }
        }
        if set.keys.is_empty() {
            return Err(KeysError::NoUsableKey);
        }
        Ok(set)
    }

    /// The keys that may verify a token with this key id (`None`: every
    /// key) and algorithm.
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        algorithm: Algorithm,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys.iter().filter(move |key| {
            key.algorithms.contains(&algorithm)
                && kid.is_none_or(|kid| key.id.as_deref() == Some(kid))
        })
    }

    /// Whether a key carries this id.
    pub fn has_key_id(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.id.as_deref() == Some(kid))
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A signing key of a type we verify with, or `None`.
fn usable(jwk: &Jwk) -> Option<Key> {
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let family: &'static [Algorithm] = match &jwk.algorithm {
        // RS256..PS512.
        AlgorithmParameters::RSA(_) => &super::ASYMMETRIC[..6],
        AlgorithmParameters::EllipticCurve(ec) => match ec.curve {
            EllipticCurve::P256 => &[Algorithm::ES256],
            EllipticCurve::P384 => &[Algorithm::ES384],
            _ => return None,
        },
        AlgorithmParameters::OctetKeyPair(okp) => match okp.curve {
            EllipticCurve::Ed25519 => &[Algorithm::EdDSA],
            _ => return None,
        },
        // Shared secrets are never accepted: a public JWKS carrying one
        // would let anyone who reads it mint tokens.
        AlgorithmParameters::OctetKey(_) => return None,
        // Kinds a later jsonwebtoken may add are not ours to guess at.
        _ => return None,
    };
    let algorithms = match jwk.common.key_algorithm {
        None => family,
        Some(named) => {
            let named = algorithm_of(named)?;
            let position = family.iter().position(|a| *a == named)?;
            &family[position..=position]
        }
    };
    let decoding = DecodingKey::from_jwk(jwk).ok()?;
    Some(Key {
        id: jwk.common.key_id.clone(),
        algorithms,
        decoding,
    })
}

fn algorithm_of(named: KeyAlgorithm) -> Option<Algorithm> {
    Some(match named {
        KeyAlgorithm::RS256 => Algorithm::RS256,
        KeyAlgorithm::RS384 => Algorithm::RS384,
        KeyAlgorithm::RS512 => Algorithm::RS512,
        KeyAlgorithm::PS256 => Algorithm::PS256,
        KeyAlgorithm::PS384 => Algorithm::PS384,
        KeyAlgorithm::PS512 => Algorithm::PS512,
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::ES384 => Algorithm::ES384,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        _ => return None,
    })
}
