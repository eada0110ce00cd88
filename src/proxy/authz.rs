//! Enforcing authorization on inbound traffic: the glue between the pure
//! decision in `policy::authz` and connections, metrics and logs.
//!
//! Opaque connections are judged once when they start and again whenever
//! the policy changes (a newly denied connection is closed); HTTP requests
//! are judged one by one, through their caller's view of the policy,
//! shared by the caller's connections and bounded in total.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::authn::{Authenticated, Authenticator, Refusal};
use super::metrics::{Direction, Metrics};
use super::outcome::AuthzKind;
use super::ratelimit::{Counted, Limited, RateLimiter};
use crate::identity::SpiffeId;
use crate::policy::PolicyRx;
use crate::policy::WorkloadPolicy;
use crate::policy::authz::{CallerFacts, CallerPolicy};
use crate::policy::jwt::VerifiedToken;
use crate::policy::{Denied, Http, Permit, Request, authorize};

/// A denial, audit match or ignored HTTP rule for a given (policy, caller,
/// port, kind) is logged at most this often; the metrics count every one.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Who is calling which port.
#[derive(Debug, Clone)]
pub struct Caller {
    pub peer: Option<SpiffeId>,
    pub source: IpAddr,
    pub port: u16,
}

/// What a rate-limited log line is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum LogTopic {
    Denied(AuthzKind),
    Audit,
    HttpRulesOnOpaque,
}

/// (policy, caller, port, topic): one log line per key per minute.
type LogKey = (String, String, u16, LogTopic);

pub struct Enforcer {
    policy: PolicyRx,
    authn: Authenticator,
    limiter: RateLimiter,
    metrics: Metrics,
    logged: Mutex<HashMap<LogKey, Instant>>,
    views: SharedViews,
}

impl Enforcer {
    pub fn new(policy: PolicyRx, metrics: Metrics, authn: Authenticator) -> Self {
        Self {
            limiter: RateLimiter::new(metrics.rate_limited.clone()),
            policy,
            authn,
            metrics,
            logged: Mutex::new(HashMap::new()),
            views: SharedViews::default(),
        }
    }

    pub fn policy(&self) -> &PolicyRx {
        &self.policy
    }

    /// Judges an opaque connection.
    pub fn check_tcp(&self, caller: &Caller) -> Result<Permit, Denied> {
        let policy = self.policy.borrow().clone();
        let outcome = authorize(&policy, &request(caller, None));
        for id in &policy.http_only_rules {
            self.metrics.authz_http_rules_on_opaque(id);
            if self.first_in_window((
                id.to_string(),
                String::new(),
                caller.port,
                LogTopic::HttpRulesOnOpaque,
            )) {
                tracing::info!(policy = %id, port = caller.port, "Policy has HTTP conditions, which an opaque connection cannot meet: they never match in an ALLOW policy and always match in a DENY policy");
            }
        }
        self.record(AuthzKind::Tcp, caller, &outcome, None);
        outcome
    }

    /// Resolves when the policy denies this (allowed) opaque connection;
    /// pending forever otherwise. The policy in force when this starts is
    /// judged too: an update may have come while the connection to the
    /// application was being made.
    pub async fn denied_later(&self, caller: &Caller) -> Denied {
        let mut rx = self.policy.clone();
        loop {
            let policy = rx.borrow_and_update().clone();
            if let Err(denied) = authorize(&policy, &request(caller, None)) {
                self.metrics
                    .authz(Direction::Inbound, AuthzKind::Tcp, &Err(denied.clone()));
                self.metrics.authz_terminated(denied.by.label());
                tracing::info!(
                    peer = caller
                        .peer
                        .as_ref()
                        .map_or("unauthenticated", SpiffeId::as_str),
                    port = caller.port,
                    policy = denied.by.label(),
                    "Closing a connection a policy update denies"
                );
                return denied;
            }
            if rx.changed().await.is_err() {
                // No more updates can come: the last decision stands.
                return std::future::pending().await;
            }
        }
    }

    fn record(
        &self,
        kind: AuthzKind,
        caller: &Caller,
        outcome: &Result<Permit, Denied>,
        method: Option<&str>,
    ) {
        self.metrics.authz(Direction::Inbound, kind, outcome);
        let peer = caller
            .peer
            .as_ref()
            .map_or("unauthenticated", SpiffeId::as_str);
        let audits = match outcome {
            Ok(p) => &p.audits,
            Err(d) => &d.audits,
        };
        for audit in audits {
            if self.first_in_window((
                audit.id.to_string(),
                peer.to_string(),
                caller.port,
                LogTopic::Audit,
            )) {
                tracing::info!(peer, source = %caller.source, port = caller.port, kind = kind.as_str(), method, policy = %audit.id, rule = audit.rule, allowed = outcome.is_ok(), "Audit policy matched");
            }
        }
        let Err(denied) = outcome else { return };
        let key = (
            denied.by.label().to_string(),
            peer.to_string(),
            caller.port,
            LogTopic::Denied(kind),
        );
        if self.first_in_window(key) {
            tracing::info!(
                peer,
                source = %caller.source,
                port = caller.port,
                kind = kind.as_str(),
                method,
                policy = denied.by.label(),
                "Denied by policy"
            );
        }
    }

    /// Whether a log line keyed so was not written in the last
    /// [`LOG_EVERY`] (and notes that it is being written now).
    fn first_in_window(&self, key: LogKey) -> bool {
        let now = Instant::now();
        let mut logged = self.logged.lock();
        if logged
            .get(&key)
            .is_some_and(|at| now.duration_since(*at) < LOG_EVERY)
        {
            return false;
        }
        if logged.len() >= 1024 {
            logged.clear();
        }
        logged.insert(key, now);
        true
    }
}

/// Judges the HTTP requests of one connection. The caller is fixed for the
/// connection, so its view of the policy ([`CallerPolicy`]) is looked up
/// once, shared with the caller's other connections, and looked up again
/// only when the policy changes.
pub struct ConnectionAuthz {
    enforcer: Arc<Enforcer>,
    caller: Caller,
    view: Mutex<Option<CachedView>>,
}

/// What a connection found when it last looked for its caller's view.
#[derive(Clone)]
enum CachedView {
    Shared(Arc<SharedView>),
    /// None fitted the budget for this policy: not looked for again until
    /// the policy changes (building one to throw it away would double the
    /// cost of every request).
    OverBudget(Arc<WorkloadPolicy>),
}

impl ConnectionAuthz {
    pub fn new(enforcer: Arc<Enforcer>, caller: Caller) -> Self {
        Self {
            enforcer,
            caller,
            view: Mutex::new(None),
        }
    }

    /// The policy in force: read once per request, so that every check of
    /// the request sees the same one.
    pub fn current(&self) -> Arc<WorkloadPolicy> {
        self.enforcer.policy.borrow().clone()
    }

    /// Authenticates one request under `current` (see `authn`): its
    /// verified token, if it carries one.
    pub async fn authenticate(
        &self,
        current: &WorkloadPolicy,
        headers: &mut http::HeaderMap,
    ) -> Result<Option<Authenticated>, Refusal> {
        if current.jwt.is_empty() {
            return Ok(None);
        }
        self.enforcer
            .authn
            .authenticate(&current.jwt, headers)
            .await
    }

    /// Counts the request against the rate limits in force. The caller is
    /// its mesh identity, else its token's principal, else its address.
    pub fn rate_limit(
        &self,
        current: &WorkloadPolicy,
        method: &str,
        path: &str,
        token: Option<&VerifiedToken>,
    ) -> Result<(), Limited> {
        if current.rate_limits.is_empty() {
            return Ok(());
        }
        let address;
        let caller = match (
            &self.caller.peer,
            token.and_then(|t| t.principal.as_deref()),
        ) {
            (Some(peer), _) => peer.as_str(),
            (None, Some(principal)) => principal,
            (None, None) => {
                address = self.caller.source.to_string();
                &address
            }
        };
        self.enforcer.limiter.check(
            &current.rate_limits,
            Counted {
                port: self.caller.port,
                method,
                path,
                caller,
            },
            tokio::time::Instant::now(),
        )
    }

    /// Counts a request refused for the size of its body.
    pub fn body_too_large(&self) {
        self.enforcer.metrics.request_body_too_large();
    }

    /// Judges one request under the policy in force.
    #[cfg(test)]
    pub fn check_http(
        &self,
        method: &str,
        path: &str,
        token: Option<&VerifiedToken>,
    ) -> Result<Permit, Denied> {
        self.check_http_in(&self.current(), method, path, token)
    }

    /// Judges one request under `current`.
    pub fn check_http_in(
        &self,
        current: &Arc<WorkloadPolicy>,
        method: &str,
        path: &str,
        token: Option<&VerifiedToken>,
    ) -> Result<Permit, Denied> {
        let http = Http {
            method,
            path,
            token,
        };
        let outcome = match self.view(current) {
            Some(view) => view.policy.decide(Some(http)),
            // Past the views' budget: every rule, every request.
            None => authorize(current, &request(&self.caller, Some(http))),
        };
        self.enforcer
            .record(AuthzKind::Http, &self.caller, &outcome, Some(method));
        outcome
    }

    /// The caller's view of `current`, if one fits the budget.
    fn view(&self, current: &Arc<WorkloadPolicy>) -> Option<Arc<SharedView>> {
        // Only this connection's requests share the lock, for the time of
        // a pointer comparison.
        let mut cached = self.view.lock();
        match &*cached {
            Some(CachedView::Shared(view)) if Arc::ptr_eq(view.policy.policy(), current) => {
                return Some(view.clone());
            }
            Some(CachedView::OverBudget(policy)) if Arc::ptr_eq(policy, current) => return None,
            _ => {}
        }
        let found = self.enforcer.views.view(&self.caller, current);
        *cached = Some(match &found {
            Some(view) => CachedView::Shared(view.clone()),
            None => CachedView::OverBudget(current.clone()),
        });
        found
    }
}

/// Views kept past this many bytes in all are not built: connections
/// whose caller has none judge each request against every rule instead.
/// A 10,000-rule policy costs about 200 KiB per distinct caller, so this
/// holds some eighty such callers at once; small policies never come near.
const VIEWS_BUDGET: usize = 16 * 1024 * 1024;

/// The callers' views of the policy, shared by every connection of the
/// same caller (identity, address, port) and counted against
/// [`VIEWS_BUDGET`] while any connection holds them.
struct SharedViews {
    by_caller: Mutex<ViewTable>,
    /// Bytes held by live views.
    held: Arc<AtomicUsize>,
    budget: usize,
}

impl Default for SharedViews {
    fn default() -> Self {
        Self {
            by_caller: Mutex::default(),
            held: Arc::default(),
            budget: VIEWS_BUDGET,
        }
    }
}

#[derive(Default)]
struct ViewTable {
    views: HashMap<(Option<SpiffeId>, IpAddr, u16), Weak<SharedView>>,
    /// Entries of closed callers are swept once the table reaches this.
    sweep_at: usize,
}

/// A view, and its bytes given back to the budget when the last
/// connection holding it lets go.
struct SharedView {
    policy: CallerPolicy,
    bytes: usize,
    held: Arc<AtomicUsize>,
}

impl Drop for SharedView {
    fn drop(&mut self) {
        self.held.fetch_sub(self.bytes, Ordering::Relaxed);
    }
}

impl SharedViews {
    fn view(&self, caller: &Caller, current: &Arc<WorkloadPolicy>) -> Option<Arc<SharedView>> {
        let key = (caller.peer.clone(), caller.source, caller.port);
        let shared = self
            .by_caller
            .lock()
            .views
            .get(&key)
            .and_then(Weak::upgrade);
        if let Some(view) = shared
            && Arc::ptr_eq(view.policy.policy(), current)
        {
            return Some(view);
        }
        // Built outside the table's lock: a large policy takes a while,
        // and other callers' connections should not wait for it.
        let policy = CallerPolicy::new(
            current.clone(),
            CallerFacts {
                peer: caller.peer.as_ref(),
                source: caller.source,
                port: caller.port,
            },
        )?;
        let bytes = policy.bytes();
        let before = self.held.fetch_add(bytes, Ordering::Relaxed);
        if before.saturating_add(bytes) > self.budget {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            tracing::debug!(
                bytes,
                held = before,
                "Policy views are at their budget; judging this caller's requests rule by rule"
            );
            return None;
        }
        let view = Arc::new(SharedView {
            policy,
            bytes,
            held: self.held.clone(),
        });
        let mut table = self.by_caller.lock();
        table.views.insert(key, Arc::downgrade(&view));
        if table.views.len() >= table.sweep_at {
            table.views.retain(|_, view| view.strong_count() > 0);
            table.sweep_at = (table.views.len() * 2).max(64);
        }
        Some(view)
    }
}

fn request<'a>(caller: &'a Caller, http: Option<Http<'a>>) -> Request<'a> {
    Request {
        peer: caller.peer.as_ref(),
        source: caller.source,
        port: caller.port,
        http,
    }
}

#[cfg(test)]
mod tests;
