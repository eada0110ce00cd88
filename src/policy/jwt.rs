//! Request authentication with JSON Web Tokens, as a pure decision: the
//! JWT rules of a RequestAuthentication as the proxy applies them, where
//! a request's token is found, and whether a token verifies against an
//! issuer's keys. Signatures are checked by `jsonwebtoken` (on aws-lc-rs);
//! nothing here parses JOSE by hand. Fetching keys, caching verified
//! tokens and answering requests are the proxy's (`proxy::authn`).
//!
//! What is refused, and why, is a [`TokenError`]: every variant becomes a
//! 401 with `WWW-Authenticate: Bearer error="invalid_token"` and a metric
//! label. Keys offered by the token itself (`jku`, `x5u`, `jwk`, `x5c`)
//! are never read: a token cannot pick the key that verifies it.

pub mod keys;

use std::sync::Arc;

use http::header::{HeaderMap, HeaderName};
use jsonwebtoken::{Algorithm, Validation};
use serde_json::{Map, Value};

pub use keys::{KeySet, KeysError};

/// Tokens and claims are judged within this much clock skew.
pub const CLOCK_SKEW_SECONDS: u64 = 60;

/// A longer token is refused unread: no provider issues one, and every
/// byte of it would be hashed, decoded and parsed.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Where a token is looked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenLocation {
    pub header: HeaderName,
    /// Compared without regard to case (`Bearer `, `bearer `).
    pub prefix: String,
}

impl TokenLocation {
    pub fn bearer() -> Self {
        Self {
            header: http::header::AUTHORIZATION,
            prefix: "Bearer ".into(),
        }
    }
}

/// Where an issuer's keys come from.
#[derive(Debug, Clone)]
pub enum KeySource {
    /// Fetched from this HTTPS URL by the proxy.
    Uri(Arc<str>),
    /// Given in the object itself.
    Inline(Arc<KeySet>),
}

/// One `jwtRules` entry, judged.
#[derive(Debug, Clone)]
pub struct JwtRule {
    /// `namespace/name`, for logs.
    pub policy: Arc<str>,
    pub issuer: Arc<str>,
    pub audiences: Vec<String>,
    pub keys: KeySource,
    pub locations: Vec<TokenLocation>,
    pub forward: bool,
    /// (header, top-level claim).
    pub claim_headers: Vec<(HeaderName, String)>,
    pub required: bool,
    pub algorithms: Vec<Algorithm>,
}

/// Every asymmetric algorithm we verify: the default allow-list (the six
/// RSA ones first: `keys` hands out that part for RSA keys).
pub static ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Why a token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, thiserror::Error)]
pub enum TokenError {
    #[error("the request carries more than one token")]
    Ambiguous,
    #[error("the token is not a JWT (or is over {MAX_TOKEN_BYTES} bytes)")]
    Malformed,
    #[error("no rule accepts tokens from the token's issuer")]
    UnknownIssuer,
    #[error("the token's algorithm is not accepted")]
    AlgorithmNotAllowed,
    #[error("no key of the issuer carries the token's key id")]
    UnknownKeyId,
    #[error("the signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token has no exp claim")]
    NoExpiry,
    #[error("the token's audience is not accepted")]
    WrongAudience,
    #[error("the token's claims are malformed")]
    BadClaims,
    #[error("the request carries no token and one is required")]
    Missing,
}

impl TokenError {
    /// The bounded metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ambiguous => "ambiguous",
            Self::Malformed => "malformed",
            Self::UnknownIssuer => "unknown_issuer",
            Self::AlgorithmNotAllowed => "algorithm_not_allowed",
            Self::UnknownKeyId => "unknown_key_id",
            Self::BadSignature => "bad_signature",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::NoExpiry => "no_expiry",
            Self::WrongAudience => "wrong_audience",
            Self::BadClaims => "bad_claims",
            Self::Missing => "missing",
        }
    }
}

/// A token whose signature and claims verified.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifiedToken {
    pub issuer: Arc<str>,
    /// `<iss>/<sub>`; `None` without a `sub` claim.
    pub principal: Option<String>,
    pub audiences: Vec<String>,
    pub claims: Map<String, Value>,
    /// `exp`, in seconds since the epoch.
    pub expires: u64,
}

/// The token a request carries, where it was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FoundToken<'a> {
    pub token: &'a str,
    pub location: usize,
}

/// The distinct places the rules look for tokens, in rule order.
pub fn locations(rules: &[Arc<JwtRule>]) -> Vec<TokenLocation> {
    let mut out: Vec<TokenLocation> = Vec::new();
    for location in rules.iter().flat_map(|r| r.locations.iter()) {
        if !out.contains(location) {
            out.push(location.clone());
        }
    }
    out
}

/// Finds the request's token. A header value without the location's
/// prefix is not a token (`Authorization: Basic ...` passes through); two
/// different tokens are refused rather than guessed between.
pub fn find_token<'a>(
    headers: &'a HeaderMap,
    locations: &[TokenLocation],
) -> Result<Option<FoundToken<'a>>, TokenError> {
    let mut found: Option<FoundToken<'a>> = None;
    for (index, location) in locations.iter().enumerate() {
        for value in headers.get_all(&location.header) {
            let bytes = value.as_bytes();
            let prefix = location.prefix.as_bytes();
            if bytes.len() < prefix.len() || !bytes[..prefix.len()].eq_ignore_ascii_case(prefix) {
                continue;
            }
            let token = std::str::from_utf8(&bytes[prefix.len()..])
                .map_err(|_| TokenError::Malformed)?
                .trim();
            match found {
                Some(earlier) if earlier.token != token => return Err(TokenError::Ambiguous),
                Some(_) => {}
                None => {
                    found = Some(FoundToken {
                        token,
                        location: index,
                    })
                }
            }
        }
    }
    Ok(found)
}

/// What the token says before anything is verified: enough to pick the
/// rule and the key.
#[derive(Debug, Clone)]
pub struct Unverified {
    pub issuer: String,
    pub key_id: Option<String>,
    pub algorithm: Algorithm,
}

/// Reads the header and the issuer, verifying nothing. `alg: none` and
/// algorithms we do not know fail here, as malformed.
pub fn peek(token: &str) -> Result<Unverified, TokenError> {
    if token.len() > MAX_TOKEN_BYTES || token.split('.').count() != 3 {
        return Err(TokenError::Malformed);
    }
    let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
    #[derive(serde::Deserialize)]
    struct Issuer {
        iss: String,
    }
    // Only picks the rule and the key; `verify` checks everything.
    let claims = jsonwebtoken::dangerous::insecure_decode_claims::<Issuer>(token)
        .map_err(|_| TokenError::Malformed)?;
    Ok(Unverified {
        issuer: claims.iss,
        key_id: header.kid,
        algorithm: header.alg,
    })
}

/// The rule that accepts tokens from `issuer`.
pub fn rule_for<'a>(rules: &'a [Arc<JwtRule>], issuer: &str) -> Option<&'a Arc<JwtRule>> {
    rules.iter().find(|rule| &*rule.issuer == issuer)
}

/// Verifies `token` (already [`peek`]ed) against `rule` and the issuer's
/// `keys`. `UnknownKeyId` means: fetch the keys again, once, and retry.
pub fn verify(
    token: &str,
    unverified: &Unverified,
    rule: &JwtRule,
    keys: &KeySet,
) -> Result<VerifiedToken, TokenError> {
    if !rule.algorithms.contains(&unverified.algorithm) {
        return Err(TokenError::AlgorithmNotAllowed);
    }
    let mut validation = Validation::new(unverified.algorithm);
    validation.leeway = CLOCK_SKEW_SECONDS;
    validation.validate_nbf = true;
    validation.required_spec_claims = ["exp", "iss", "aud"].map(String::from).into();
    validation.set_issuer(&[&*rule.issuer]);
    validation.set_audience(&rule.audiences);
    let mut candidates = keys
        .candidates(unverified.key_id.as_deref(), unverified.algorithm)
        .peekable();
    if candidates.peek().is_none() {
        return Err(match &unverified.key_id {
            Some(kid) if !keys.has_key_id(kid) => TokenError::UnknownKeyId,
            // The key exists but not for this algorithm (an RSA key asked
            // to verify ES256, say).
            Some(_) => TokenError::AlgorithmNotAllowed,
            None => TokenError::UnknownKeyId,
        });
    }
    let mut last = TokenError::BadSignature;
    for key in candidates {
        match jsonwebtoken::decode::<Map<String, Value>>(token, &key.decoding, &validation) {
            Ok(data) => return verified(rule, data.claims),
            Err(error) => {
                last = token_error(error.kind());
                if last != TokenError::BadSignature {
                    // The signature verified; the claims did not.
                    return Err(last);
                }
            }
        }
    }
    Err(last)
}

fn verified(rule: &JwtRule, claims: Map<String, Value>) -> Result<VerifiedToken, TokenError> {
    let expires = claims
        .get("exp")
        .and_then(Value::as_u64)
        .ok_or(TokenError::NoExpiry)?;
    let audiences = match claims.get("aud") {
        Some(Value::String(one)) => vec![one.clone()],
        Some(Value::Array(many)) => many
            .iter()
            .filter_map(|a| a.as_str().map(String::from))
            .collect(),
        _ => return Err(TokenError::WrongAudience),
    };
    let principal = match claims.get("sub") {
        Some(Value::String(sub)) => Some(format!("{}/{sub}", rule.issuer)),
        None => None,
        Some(_) => return Err(TokenError::BadClaims),
    };
    Ok(VerifiedToken {
        issuer: rule.issuer.clone(),
        principal,
        audiences,
        claims,
        expires,
    })
}

fn token_error(kind: &jsonwebtoken::errors::ErrorKind) -> TokenError {
    use jsonwebtoken::errors::ErrorKind as E;
    match kind {
        E::InvalidSignature | E::InvalidEcdsaKey | E::InvalidRsaKey(_) | E::InvalidKeyFormat => {
            TokenError::BadSignature
        }
        E::ExpiredSignature => TokenError::Expired,
        E::ImmatureSignature => TokenError::NotYetValid,
        E::MissingRequiredClaim(claim) if claim == "exp" => TokenError::NoExpiry,
        E::MissingRequiredClaim(claim) if claim == "aud" => TokenError::WrongAudience,
        E::InvalidAudience => TokenError::WrongAudience,
        E::InvalidIssuer => TokenError::UnknownIssuer,
        E::InvalidAlgorithm | E::InvalidAlgorithmName | E::MissingAlgorithm => {
            TokenError::AlgorithmNotAllowed
        }
        E::InvalidToken | E::Base64(_) | E::Json(_) | E::Utf8(_) => TokenError::Malformed,
        _ => TokenError::BadClaims,
    }
}

/// Whether a header name is the proxy's own (`x-outrider-*`, in any
/// spelling), which no claim may be copied into.
pub fn is_reserved_header(name: &HeaderName) -> bool {
    let name = name.as_str().as_bytes();
    let reserved = b"x-outrider-";
    name.len() >= reserved.len()
        && name[..reserved.len()]
            .iter()
            .zip(reserved)
            .all(|(&got, &want)| got == want || (got == b'_' && want == b'-'))
}

/// The value a claim puts in a header: strings as they are, numbers and
/// booleans as JSON writes them; `None` for anything else or for a value
/// a header cannot carry.
pub fn claim_header_value(claims: &Map<String, Value>, claim: &str) -> Option<http::HeaderValue> {
    http::HeaderValue::from_str(&claim_text(claims.get(claim)?)?).ok()
}

/// A scalar claim as text (strings as they are, numbers and booleans as
/// JSON writes them); `None` for lists, objects and null. Shared by claim
/// headers and `when` conditions, so both read a claim alike.
pub fn claim_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
