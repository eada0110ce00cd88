//! Enforcing authorization on inbound traffic: the glue between the pure
//! decision in `policy::authz` and connections, metrics and logs.
//!
//! Opaque connections are judged once when they start and again whenever
//! the policy changes (a newly denied connection is closed); HTTP requests
//! are judged one by one, through a per-connection view of the policy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::metrics::{Direction, Metrics};
use super::outcome::AuthzKind;
use crate::identity::SpiffeId;
use crate::policy::PolicyRx;
use crate::policy::authz::{CallerFacts, CallerPolicy};
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
    metrics: Metrics,
    logged: Mutex<HashMap<LogKey, Instant>>,
}

impl Enforcer {
    pub fn new(policy: PolicyRx, metrics: Metrics) -> Self {
        Self {
            policy,
            metrics,
            logged: Mutex::new(HashMap::new()),
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
/// connection, so its view of the policy ([`CallerPolicy`]) is built once
/// and rebuilt only when the policy changes.
pub struct ConnectionAuthz {
    enforcer: Arc<Enforcer>,
    caller: Caller,
    view: Mutex<Option<Arc<CallerPolicy>>>,
}

impl ConnectionAuthz {
    pub fn new(enforcer: Arc<Enforcer>, caller: Caller) -> Self {
        Self {
            enforcer,
            caller,
            view: Mutex::new(None),
        }
    }

    /// Judges one request.
    pub fn check_http(&self, method: &str, path: &str) -> Result<Permit, Denied> {
        let outcome = self.view().decide(Some(Http { method, path }));
        self.enforcer
            .record(AuthzKind::Http, &self.caller, &outcome, Some(method));
        outcome
    }

    /// The view of the policy in force now.
    fn view(&self) -> Arc<CallerPolicy> {
        let current = self.enforcer.policy.borrow().clone();
        // Only this connection's requests share the lock, for the time of
        // a pointer comparison.
        let mut cached = self.view.lock();
        match &*cached {
            Some(view) if Arc::ptr_eq(view.policy(), &current) => view.clone(),
            _ => {
                let view = Arc::new(CallerPolicy::new(
                    current,
                    CallerFacts {
                        peer: self.caller.peer.as_ref(),
                        source: self.caller.source,
                        port: self.caller.port,
                    },
                ));
                *cached = Some(view.clone());
                view
            }
        }
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
