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
    callers: HashMap<Arc<str>, Bucket>,
}

impl LimitState {
    fn new(limit: &Limit, now: Instant) -> Self {
        Self {
            limit: limit.clone(),
            total: Bucket::new(now),
            callers: HashMap::new(),
        }
    }

    fn caller_bucket(&mut self, caller: &str, now: Instant) -> Bucket {
        if let Some(bucket) = self.callers.get(caller) {
            return *bucket;
        }
        if self.callers.len() >= MAX_CALLERS_PER_LIMIT {
            self.callers.retain(|_, b| !b.is_full(now));
            if self.callers.len() >= MAX_CALLERS_PER_LIMIT
                && let Some(victim) = self.callers.keys().next().cloned()
            {
                self.callers.remove(&victim);
            }
        }
        Bucket::new(now)
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

type Key = (Arc<str>, usize);

pub struct RateLimiter {
    states: Mutex<HashMap<Key, Arc<Mutex<LimitState>>>>,
    /// `rate_limited_total{policy, mode}`.
    limited: IntCounterVec,
}

/// A spend decided but not yet made.
struct Pending {
    state: Arc<Mutex<LimitState>>,
    caller: Option<Bucket>,
    total: Option<Bucket>,
}

impl RateLimiter {
    pub fn new(limited: IntCounterVec) -> Self {
        Self {
            states: Mutex::new(HashMap::new()),
            limited,
        }
    }

    /// Counts one request against every limit of `policies` it matches.
    /// `Err` only for an enforced limit; dry-run ones are counted alone.
    pub fn check(
        &self,
        policies: &[Arc<RateLimitPolicy>],
        request: Counted<'_>,
        now: Instant,
    ) -> Result<(), Limited> {
        if policies.is_empty() {
            return Ok(());
        }
        let in_force: usize = policies.iter().map(|p| p.limits.len()).sum();
        if self.states.lock().len() > in_force {
            self.retain(policies);
        }
        let mut pending = Vec::new();
        let mut refused = None;
        for policy in policies {
            for (index, limit) in policy.limits.iter().enumerate() {
                if !limit.counts(request.port, request.method, request.path) {
                    continue;
                }
                let state = self.state(&policy.id, index, limit, now);
                match Self::decide(&state, limit, request.caller, now) {
                    Ok((caller, total)) => pending.push(Pending {
                        state,
                        caller,
                        total,
                    }),
                    Err(retry_after) => {
                        let mode = if policy.dry_run { "dry-run" } else { "enforce" };
                        self.limited.with_label_values(&[&policy.id, mode]).inc();
                        if !policy.dry_run && refused.is_none() {
                            refused = Some(Limited {
                                policy: policy.id.clone(),
                                retry_after,
                            });
                        }
                    }
                }
            }
        }
        if let Some(limited) = refused {
            return Err(limited);
        }
        for spend in pending {
            let mut state = spend.state.lock();
            if let Some(bucket) = spend.total {
                state.total = bucket;
            }
            if let Some(bucket) = spend.caller {
                state.callers.insert(request.caller.into(), bucket);
            }
        }
        Ok(())
    }

    /// The buckets after this request, or how long until it would fit:
    /// the caller's own first, then the shared one.
    fn decide(
        state: &Mutex<LimitState>,
        limit: &Limit,
        caller: &str,
        now: Instant,
    ) -> Result<(Option<Bucket>, Option<Bucket>), Duration> {
        let mut state = state.lock();
        let caller_bucket = match limit.client_rate(caller) {
            Some(rate) => Some(state.caller_bucket(caller, now).spend(rate, now)?),
            None => None,
        };
        let total = match limit.total {
            Some(rate) => Some(state.total.spend(rate, now)?),
            None => None,
        };
        Ok((caller_bucket, total))
    }

    fn state(
        &self,
        policy: &Arc<str>,
        index: usize,
        limit: &Limit,
        now: Instant,
    ) -> Arc<Mutex<LimitState>> {
        let mut states = self.states.lock();
        let key = (policy.clone(), index);
        let state = states
            .entry(key)
            .or_insert_with(|| Arc::new(Mutex::new(LimitState::new(limit, now))))
            .clone();
        drop(states);
        let mut guard = state.lock();
        if guard.limit != *limit {
            *guard = LimitState::new(limit, now);
        }
        drop(guard);
        state
    }

    /// Drops the buckets of limits no longer in force.
    pub fn retain(&self, policies: &[Arc<RateLimitPolicy>]) {
        self.states.lock().retain(|(id, index), _| {
            policies
                .iter()
                .any(|p| p.id == *id && *index < p.limits.len())
        });
    }
}

#[cfg(test)]
mod tests;
