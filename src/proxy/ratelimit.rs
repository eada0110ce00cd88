//! Spending the budgets of the LocalRateLimitPolicies in force (judged in
//! `policy::limits`), per pod. Each budget is a GCRA bucket (the
//! token-bucket rate and burst, kept as one instant per bucket).
//!
//! For every limit a request is counted by, the caller's own bucket is
//! checked before the shared one, and nothing is spent unless the request
//! passes every limit: a caller over its own budget does not drain the
//! workload's, and a refused request costs no one anything. Callers are
//! bounded per limit ([`MAX_CALLERS_PER_LIMIT`]): a bucket back at full is
//! the same as none and goes first; past that an arbitrary one does, so a
//! flood of distinct callers costs memory only up to the bound, and the
//! shared budget still holds them all back.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::IntCounterVec;
use tokio::time::Instant;

use crate::policy::limits::{Limit, Rate, RateLimitPolicy};

pub const MAX_CALLERS_PER_LIMIT: usize = 10_000;

/// A GCRA bucket: the time at which it would be full again.
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    full_at: Instant,
}

impl Bucket {
    pub fn new(now: Instant) -> Self {
        Self { full_at: now }
    }

    /// The bucket after one more request, or how long until one fits.
    pub fn spend(self, rate: Rate, now: Instant) -> Result<Self, Duration> {
        let interval = Duration::from_secs(1) / rate.per_second.max(1);
        let full_at = self.full_at.max(now) + interval;
        let allowance = interval * rate.burst.max(1);
        let ahead = full_at - now;
        if ahead <= allowance {
            Ok(Self { full_at })
        } else {
            Err(ahead - allowance)
        }
    }

    /// Back at full: no different from a new bucket.
    pub fn is_full(&self, now: Instant) -> bool {
        self.full_at <= now
    }
}

/// One limit's buckets.
#[derive(Debug)]
struct LimitState {
    /// The limit they were made for: a changed limit starts afresh.
    limit: Limit,
    total: Bucket,
    /// By caller fingerprint ([`Fingerprint`]).
    callers: HashMap<u64, Bucket, BuildHasherDefault<Fingerprint>>,
}

impl LimitState {
    fn new(limit: &Limit, now: Instant) -> Self {
        Self {
            limit: limit.clone(),
            total: Bucket::new(now),
            callers: HashMap::default(),
        }
    }

    fn caller_bucket(&self, caller: u64, now: Instant) -> Bucket {
        self.callers
            .get(&caller)
            .copied()
            .unwrap_or_else(|| Bucket::new(now))
    }

    /// The buckets after this request, or how long until it would fit:
    /// the caller's own first, then the shared one.
    fn spend(
        &self,
        limit: &Limit,
        caller: &str,
        fingerprint: u64,
        now: Instant,
    ) -> Result<(Option<Bucket>, Option<Bucket>), Duration> {
        let own = match limit.client_rate(caller) {
            Some(rate) => Some(self.caller_bucket(fingerprint, now).spend(rate, now)?),
            None => None,
        };
        let total = match limit.total {
            Some(rate) => Some(self.total.spend(rate, now)?),
            None => None,
        };
        Ok((own, total))
    }

    fn keep(&mut self, fingerprint: u64, bucket: Bucket, now: Instant) {
        if !self.callers.contains_key(&fingerprint) && self.callers.len() >= MAX_CALLERS_PER_LIMIT {
            self.callers.retain(|_, b| !b.is_full(now));
            if self.callers.len() >= MAX_CALLERS_PER_LIMIT
                && let Some(victim) = self.callers.keys().next().copied()
            {
                self.callers.remove(&victim);
            }
        }
        self.callers.insert(fingerprint, bucket);
    }
}

/// Callers are keyed by a 64-bit SipHash of who they are, under a key
/// drawn at start-up: computed once per request rather than once per
/// limit, and unpredictable, so no caller can aim at another's bucket
/// (two callers share one only by a 2^-64 accident). This hasher passes
/// that fingerprint through.
#[derive(Default)]
struct Fingerprint(u64);

impl Hasher for Fingerprint {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used (the key is a u64); fold anything else.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A request over a limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    pub policy: Arc<str>,
    pub retry_after: Duration,
}

/// What the request is, for the limits' matches.
#[derive(Debug, Clone, Copy)]
pub struct Counted<'a> {
    pub port: u16,
    pub method: &'a str,
    pub path: &'a str,
    /// The mesh identity, else the token principal, else the source IP.
    pub caller: &'a str,
}

/// The buckets of the policies in force, one slot per limit in order.
#[derive(Debug, Default)]
struct Slots {
    /// The policies the slots are laid out for.
    layout: Vec<Arc<RateLimitPolicy>>,
    slots: Vec<LimitState>,
}

impl Slots {
    /// Lays the slots out for `policies`, keeping the buckets of every
    /// limit that is still the same (same policy, place and value).
    fn follow(&mut self, policies: &[Arc<RateLimitPolicy>], now: Instant) {
        let same = self.layout.len() == policies.len()
            && self
                .layout
                .iter()
                .zip(policies)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if same {
            return;
        }
        let mut old: HashMap<(Arc<str>, usize), LimitState> = HashMap::new();
        let mut slots = std::mem::take(&mut self.slots).into_iter();
        for policy in &self.layout {
            for index in 0..policy.limits.len() {
                if let Some(state) = slots.next() {
                    old.insert((policy.id.clone(), index), state);
                }
            }
        }
        self.slots = policies
            .iter()
            .flat_map(|p| p.limits.iter().enumerate().map(move |(i, l)| (p, i, l)))
            .map(
                |(policy, index, limit)| match old.remove(&(policy.id.clone(), index)) {
                    Some(state) if state.limit == *limit => state,
                    _ => LimitState::new(limit, now),
                },
            )
            .collect();
        self.layout = policies.to_vec();
    }
}

pub struct RateLimiter {
    slots: Mutex<Slots>,
    fingerprints: RandomState,
    /// `rate_limited_total{policy, mode}`.
    limited: IntCounterVec,
}

impl RateLimiter {
    pub fn new(limited: IntCounterVec) -> Self {
        Self {
            slots: Mutex::new(Slots::default()),
            fingerprints: RandomState::new(),
            limited,
        }
    }

    /// Counts one request against every limit of `policies` it matches.
    /// `Err` only for an enforced limit; dry-run ones are counted alone.
    /// Nothing is spent unless every enforced limit lets it through.
    pub fn check(
        &self,
        policies: &[Arc<RateLimitPolicy>],
        request: Counted<'_>,
        now: Instant,
    ) -> Result<(), Limited> {
        if policies.is_empty() {
            return Ok(());
        }
        let fingerprint = self.fingerprints.hash_one(request.caller);
        let mut guard = self.slots.lock();
        guard.follow(policies, now);
        let slots = &mut guard.slots;
        let counted = || {
            policies
                .iter()
                .flat_map(|p| p.limits.iter().map(move |l| (p, l)))
                .enumerate()
                .filter(|(_, (_, limit))| limit.counts(request.port, request.method, request.path))
        };
        // First pass: would every limit let it through?
        let mut refused = None;
        let mut dry_run_refusals = Vec::new();
        for (slot, (policy, limit)) in counted() {
            let Some(state) = slots.get(slot) else {
                continue;
            };
            if let Err(retry_after) = state.spend(limit, request.caller, fingerprint, now) {
                if policy.dry_run {
                    dry_run_refusals.push(slot);
                } else if refused.is_none() {
                    refused = Some(Limited {
                        policy: policy.id.clone(),
                        retry_after,
                    });
                }
                let mode = if policy.dry_run { "dry-run" } else { "enforce" };
                self.limited.with_label_values(&[&policy.id, mode]).inc();
            }
        }
        if let Some(limited) = refused {
            return Err(limited);
        }
        // Second pass: spend, the same arithmetic at the same instant.
        for (slot, (_, limit)) in counted() {
            if dry_run_refusals.contains(&slot) {
                continue;
            }
            let Some(state) = slots.get_mut(slot) else {
                continue;
            };
            if let Ok((own, total)) = state.spend(limit, request.caller, fingerprint, now) {
                if let Some(bucket) = own {
                    state.keep(fingerprint, bucket, now);
                }
                if let Some(bucket) = total {
                    state.total = bucket;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
