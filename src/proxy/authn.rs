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

use http::{HeaderMap, HeaderName, HeaderValue};
use parking_lot::Mutex;
use prometheus::{IntCounter, IntCounterVec};

use super::jwks::{Fetcher, KeyStore, Unavailable};
use crate::policy::index::JwtPolicy;
use crate::policy::jwt::{self, CLOCK_SKEW_SECONDS, JwtRule, KeySet, TokenError, VerifiedToken};

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
    /// `x-outrider-request-principal`'s value, made once per token.
    principal_header: Option<HeaderValue>,
    /// The header the token came in, when the rule does not forward it.
    remove: Option<HeaderName>,
}

struct Cached {
    token: Arc<VerifiedToken>,
    rule: Arc<JwtRule>,
    keys: Arc<KeySet>,
    principal_header: Option<HeaderValue>,
}

pub struct Authenticator {
    keys: Arc<KeyStore>,
    cache: Mutex<HashMap<[u8; 32], Cached>>,
    outcomes: IntCounterVec,
    /// The two outcomes of nearly every request, resolved once.
    verified: IntCounter,
    anonymous: IntCounter,
}

impl Authenticator {
    /// `outcomes`: `request_authn_total{outcome, reason}`.
    pub fn new(keys: Arc<KeyStore>, outcomes: IntCounterVec) -> Self {
        Self {
            keys,
            cache: Mutex::new(HashMap::new()),
            verified: outcomes.with_label_values(&["verified", ""]),
            anonymous: outcomes.with_label_values(&["anonymous", ""]),
            outcomes,
        }
    }

    /// The inbound authenticator, its key store following the JWKS URLs
    /// of the policy in force.
    pub fn following(
        proxy: &super::ProxyConfig,
        policy: &crate::policy::PolicyRx,
        metrics: &super::metrics::Metrics,
    ) -> Self {
        let settings = proxy.jwks.clone();
        let keys = KeyStore::new(
            Box::new(move || {
                Fetcher::new(
                    super::jwks::fetch::roots(&settings.extra_roots),
                    settings.fetch_timeout,
                )
            }),
            metrics.jwks.clone(),
        );
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
        Self::new(keys, metrics.authn_outcomes.clone())
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
        match &outcome {
            Ok(Some(_)) => self.verified.inc(),
            Ok(None) => self.anonymous.inc(),
            Err(refusal) => self
                .outcomes
                .with_label_values(&["refused", refusal.as_str()])
                .inc(),
        }
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
        let removed = |rule: &JwtRule| {
            (!rule.forward).then(|| {
                policy
                    .locations
                    .get(found.location)
                    .map_or(http::header::AUTHORIZATION, |l| l.header.clone())
            })
        };
        if found.token.len() > jwt::MAX_TOKEN_BYTES {
            return Err(Refusal::Invalid(TokenError::Malformed));
        }
        let digest = crate::crypto::sha256(found.token.as_bytes());
        if let Some((token, rule, principal_header)) = self.cached(&digest, policy).await {
            return Ok(Some(Authenticated {
                remove: removed(&rule),
                token,
                rule,
                principal_header,
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
        let principal_header = token
            .principal
            .as_deref()
            .and_then(|p| HeaderValue::from_str(p).ok());
        self.remember(
            digest,
            Cached {
                token: token.clone(),
                rule: rule.clone(),
                keys,
                principal_header: principal_header.clone(),
            },
        );
        Ok(Some(Authenticated {
            remove: removed(rule),
            token,
            rule: rule.clone(),
            principal_header,
        }))
    }

    /// A remembered token still good: not expired, and verified by the
    /// rule in force for its issuer with that issuer's current keys.
    async fn cached(
        &self,
        digest: &[u8; 32],
        policy: &JwtPolicy,
    ) -> Option<(Arc<VerifiedToken>, Arc<JwtRule>, Option<HeaderValue>)> {
        let (token, rule, keys, principal_header) = {
            let cache = self.cache.lock();
            let hit = cache.get(digest)?;
            (
                hit.token.clone(),
                hit.rule.clone(),
                hit.keys.clone(),
                hit.principal_header.clone(),
            )
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
        Some((token, rule, principal_header))
    }

    fn remember(&self, digest: [u8; 32], entry: Cached) {
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
        cache.insert(digest, entry);
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
    if let Some(value) = &authenticated.principal_header {
        headers.insert(&super::headers::REQUEST_PRINCIPAL_HEADER, value.clone());
    }
    for (header, claim) in &authenticated.rule.claim_headers {
        if let Some(value) = jwt::claim_header_value(&authenticated.token.claims, claim) {
            headers.insert(header.clone(), value);
        }
    }
    if let Some(name) = &authenticated.remove {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::jwt::{ASYMMETRIC, KeySource, TokenLocation};

    fn authenticated(forward: bool) -> Authenticated {
        let rule = JwtRule {
            policy: "shop/idp".into(),
            issuer: "https://idp".into(),
            audiences: vec!["a".into()],
            keys: KeySource::Inline(Arc::new(KeySet::default())),
            locations: vec![TokenLocation::bearer()],
            forward,
            claim_headers: vec![
                (http::HeaderName::from_static("x-group"), "group".into()),
                (http::HeaderName::from_static("x-groups"), "groups".into()),
            ],
            required: false,
            algorithms: ASYMMETRIC.to_vec(),
        };
        let claims = json!({"group": "buyers", "groups": ["a", "b"]});
        Authenticated {
            token: Arc::new(VerifiedToken {
                issuer: "https://idp".into(),
                principal: Some("https://idp/alice".into()),
                audiences: vec!["a".into()],
                claims: claims.as_object().cloned().unwrap_or_default(),
                expires: u64::MAX,
            }),
            rule: Arc::new(rule),
            principal_header: Some(HeaderValue::from_static("https://idp/alice")),
            remove: (!forward).then_some(http::header::AUTHORIZATION),
        }
    }

    #[tokio::test]
    async fn the_token_cache_stays_bounded_and_lets_expired_tokens_go_first() {
        let fetcher = crate::proxy::jwks::Fetcher::new(
            rustls::RootCertStore::empty(),
            std::time::Duration::from_secs(1),
        )
        .unwrap();
        let registry = prometheus::Registry::new();
        let store = KeyStore::with_fetcher(
            fetcher,
            crate::proxy::jwks::JwksMetrics::new(&registry).unwrap(),
        );
        let outcomes =
            IntCounterVec::new(prometheus::Opts::new("o", "h"), &["outcome", "reason"]).unwrap();
        let authn = Authenticator::new(store, outcomes);
        let entry = |expires: u64| {
            let a = authenticated(true);
            let mut token = (*a.token).clone();
            token.expires = expires;
            Cached {
                token: Arc::new(token),
                rule: a.rule,
                keys: Arc::new(KeySet::default()),
                principal_header: None,
            }
        };
        let digest = |i: usize| {
            let mut d = [0u8; 32];
            d[..8].copy_from_slice(&(i as u64).to_le_bytes());
            d
        };
        // Half the cache expired long ago, half valid.
        for i in 0..CACHE_ENTRIES {
            let expires = if i % 2 == 0 { 1 } else { u64::MAX / 2 };
            authn.remember(digest(i), entry(expires));
        }
        authn.remember(digest(CACHE_ENTRIES), entry(u64::MAX / 2));
        let cache = authn.cache.lock();
        assert_eq!(cache.len(), CACHE_ENTRIES / 2 + 1, "the expired ones went");
        assert!(cache.values().all(|c| c.token.expires > 1));
        drop(cache);
        for i in 0..3 * CACHE_ENTRIES {
            authn.remember(digest(10 * CACHE_ENTRIES + i), entry(u64::MAX / 2));
        }
        assert!(authn.cache.lock().len() <= CACHE_ENTRIES);
    }

    #[test]
    fn the_application_gets_the_principal_the_claims_and_the_token_unless_it_is_kept_back() {
        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        set_headers(&mut headers, &authenticated(true));
        assert_eq!(
            headers[&crate::proxy::headers::REQUEST_PRINCIPAL_HEADER],
            "https://idp/alice"
        );
        assert_eq!(headers["x-group"], "buyers");
        assert!(!headers.contains_key("x-groups"), "a list is not copied");
        assert_eq!(headers["authorization"], "Bearer t");

        let mut headers = HeaderMap::new();
        headers.insert("authorization", HeaderValue::from_static("Bearer t"));
        set_headers(&mut headers, &authenticated(false));
        assert!(
            !headers.contains_key("authorization"),
            "forwardOriginalToken: false"
        );
    }
}
