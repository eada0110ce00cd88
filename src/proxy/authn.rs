//! Request authentication on inbound HTTP: the glue between the pure
//! token checks of `policy::jwt`, the issuers' keys (`jwks`) and the
//! request. Runs before authorization, which then sees the verified
//! token.
//!
//! A verified token is remembered by its SHA-256 digest until its `exp`
//! (bounded in number), together with the rule and the keys that
//! verified it: a token reused across requests costs a hash and a lookup,
//! and is verified again once its rule or its issuer's keys change.

use std::collections::HashMap;
use std::sync::Arc;

use http::HeaderMap;
use parking_lot::Mutex;
use prometheus::IntCounterVec;

use super::jwks::{Fetcher, KeyStore, Unavailable};
use crate::policy::index::JwtPolicy;
use crate::policy::jwt::{
    self, CLOCK_SKEW_SECONDS, JwtRule, KeySet, TokenError, TokenLocation, VerifiedToken,
};

/// Verified tokens remembered at most. Past it, an arbitrary entry goes:
/// a caller minting many valid tokens only costs itself verifications.
pub const CACHE_ENTRIES: usize = 4096;

/// Why a request is refused before authorization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// 401 `invalid_token`.
    Invalid(TokenError),
    /// 503 `jwks-unavailable`.
    KeysUnavailable(Unavailable),
    /// 503: a RequestAuthentication selecting the workload is broken.
    PolicyBroken,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Invalid(reason) => reason.as_str(),
            Self::KeysUnavailable(_) => "jwks_unavailable",
            Self::PolicyBroken => "policy_broken",
        }
    }
}

/// A request's token, verified, and what to do with the headers.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub token: Arc<VerifiedToken>,
    pub rule: Arc<JwtRule>,
    /// Where the token was found (removed when the rule does not forward).
    pub location: TokenLocation,
}

struct Cached {
    token: Arc<VerifiedToken>,
    rule: Arc<JwtRule>,
    keys: Arc<KeySet>,
}

pub struct Authenticator {
    keys: Arc<KeyStore>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    outcomes: IntCounterVec,
}

impl Authenticator {
    /// `outcomes`: `request_authn_total{outcome, reason}`.
    pub fn new(keys: Arc<KeyStore>, outcomes: IntCounterVec) -> Self {
        Self {
            keys,
            cache: Mutex::new(HashMap::new()),
            outcomes,
        }
    }

    /// The inbound authenticator, its key store following the JWKS URLs
    /// of the policy in force.
    pub fn following(
        proxy: &super::ProxyConfig,
        policy: &crate::policy::PolicyRx,
        metrics: &super::metrics::Metrics,
    ) -> Result<Self, super::Error> {
        let fetcher = Fetcher::new(
            super::jwks::fetch::roots(&proxy.jwks.extra_roots),
            proxy.jwks.fetch_timeout,
        )
        .map_err(super::Error::Jwks)?;
        let keys = KeyStore::new(fetcher, metrics.jwks.clone());
        let mut policy = policy.clone();
        let store = Arc::downgrade(&keys);
        tokio::spawn(async move {
            loop {
                let rules = policy.borrow_and_update().jwt.rules.clone();
                match store.upgrade() {
                    Some(store) => store.sync(&rules),
                    None => return,
                }
                if policy.changed().await.is_err() {
                    return;
                }
            }
        });
        Ok(Self::new(keys, metrics.authn_outcomes.clone()))
    }

    /// Authenticates one request under `policy`. Headers some rule copies
    /// claims into are removed first, whatever happens next.
    pub async fn authenticate(
        &self,
        policy: &JwtPolicy,
        headers: &mut HeaderMap,
    ) -> Result<Option<Authenticated>, Refusal> {
        for name in &policy.claim_headers {
            headers.remove(name);
        }
        let outcome = self.decide(policy, headers).await;
        let (label, reason) = match &outcome {
            Ok(Some(_)) => ("verified", ""),
            Ok(None) => ("anonymous", ""),
            Err(refusal) => ("refused", refusal.as_str()),
        };
        self.outcomes.with_label_values(&[label, reason]).inc();
        outcome
    }

    async fn decide(
        &self,
        policy: &JwtPolicy,
        headers: &HeaderMap,
    ) -> Result<Option<Authenticated>, Refusal> {
        if policy.broken.is_some() {
            return Err(Refusal::PolicyBroken);
        }
        let Some(found) = jwt::find_token(headers, &policy.locations).map_err(Refusal::Invalid)?
        else {
            return if policy.required {
                Err(Refusal::Invalid(TokenError::Missing))
            } else {
                Ok(None)
            };
        };
        let location = policy
            .locations
            .get(found.location)
            .cloned()
            .unwrap_or_else(TokenLocation::bearer);
        if found.token.len() > jwt::MAX_TOKEN_BYTES {
            return Err(Refusal::Invalid(TokenError::Malformed));
        }
        let digest = crate::crypto::sha256(found.token.as_bytes());
        if let Some(hit) = self.cached(&digest, policy).await {
            return Ok(Some(Authenticated {
                token: hit.0,
                rule: hit.1,
                location,
            }));
        }
        let unverified = jwt::peek(found.token).map_err(Refusal::Invalid)?;
        let rule = jwt::rule_for(&policy.rules, &unverified.issuer)
            .ok_or(Refusal::Invalid(TokenError::UnknownIssuer))?;
        let keys = self
            .keys
            .keys(rule)
            .await
            .map_err(Refusal::KeysUnavailable)?;
        let (verified, keys) = match jwt::verify(found.token, &unverified, rule, &keys) {
            Err(TokenError::UnknownKeyId) => match self.keys.refetch(rule, &keys).await {
                Some(fresh) => (jwt::verify(found.token, &unverified, rule, &fresh), fresh),
                None => (Err(TokenError::UnknownKeyId), keys),
            },
            other => (other, keys),
        };
        let token = Arc::new(verified.map_err(Refusal::Invalid)?);
        self.remember(digest, &token, rule, keys);
        Ok(Some(Authenticated {
            token,
            rule: rule.clone(),
            location,
        }))
    }

    /// A remembered token still good: not expired, and verified by the
    /// rule in force for its issuer with that issuer's current keys.
    async fn cached(
        &self,
        digest: &[u8; 32],
        policy: &JwtPolicy,
    ) -> Option<(Arc<VerifiedToken>, Arc<JwtRule>)> {
        let (token, rule, keys) = {
            let cache = self.cache.lock();
            let hit = cache.get(digest)?;
            (hit.token.clone(), hit.rule.clone(), hit.keys.clone())
        };
        let in_force = jwt::rule_for(&policy.rules, &token.issuer)?;
        if !Arc::ptr_eq(in_force, &rule) || now_seconds() > token.expires + CLOCK_SKEW_SECONDS {
            self.cache.lock().remove(digest);
            return None;
        }
        let current = self.keys.keys(&rule).await.ok()?;
        if !Arc::ptr_eq(&current, &keys) {
            self.cache.lock().remove(digest);
            return None;
        }
        Some((token, rule))
    }

    fn remember(
        &self,
        digest: [u8; 32],
        token: &Arc<VerifiedToken>,
        rule: &Arc<JwtRule>,
        keys: Arc<KeySet>,
    ) {
        let mut cache = self.cache.lock();
        if cache.len() >= CACHE_ENTRIES {
            let now = now_seconds();
            cache.retain(|_, c| now <= c.token.expires + CLOCK_SKEW_SECONDS);
            if cache.len() >= CACHE_ENTRIES
                && let Some(victim) = cache.keys().next().copied()
            {
                cache.remove(&victim);
            }
        }
        cache.insert(
            digest,
            Cached {
                token: token.clone(),
                rule: rule.clone(),
                keys,
            },
        );
    }
}

fn now_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes what the application sees of an authenticated request: the
/// principal in `x-outrider-request-principal`, the claims its rule
/// copies into headers, and the token itself only when the rule forwards
/// it. Call after reserved headers were removed.
pub fn set_headers(headers: &mut HeaderMap, authenticated: &Authenticated) {
    if let Some(principal) = &authenticated.token.principal
        && let Ok(value) = http::HeaderValue::from_str(principal)
    {
        headers.insert(&super::headers::REQUEST_PRINCIPAL_HEADER, value);
    }
    for (header, claim) in &authenticated.rule.claim_headers {
        if let Some(value) = jwt::claim_header_value(&authenticated.token.claims, claim) {
            headers.insert(header.clone(), value);
        }
    }
    if !authenticated.rule.forward {
        headers.remove(&authenticated.location.header);
    }
}
