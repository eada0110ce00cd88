//! The authorization decision: pure, over the compiled policy of one
//! workload and the facts of one connection or request. No I/O, no kube
//! types; the proxy calls it per connection (opaque TCP) or per request
//! (HTTP).
//!
//! Order (Istio's, plus probes and mTLS): kubelet probes from
//! unauthenticated sources are allowed; before the first policy sync
//! everything else is denied; an unauthenticated caller on a STRICT port
//! is denied; any matching DENY denies; if any ALLOW policy selects the
//! workload, the request must match one; otherwise the mesh default
//! applies. AUDIT policies never decide; their matches are reported with
//! the outcome.

use std::cell::OnceCell;
use std::net::IpAddr;
use std::sync::Arc;

use super::index::{Probe, WorkloadPolicy};
use super::jwt::VerifiedToken;
use super::model::{Action, DefaultPolicy, MtlsMode, Operation, Pattern, Policy, Rule, Source};
use super::token_match::{Offered, token_source_matches, when_holds};
use crate::identity::SpiffeId;

/// The facts a decision looks at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The caller's verified identity; `None` for plaintext.
    pub peer: Option<&'a SpiffeId>,
    pub source: IpAddr,
    /// The workload port being called.
    pub port: u16,
    /// `None` for an opaque TCP connection.
    pub http: Option<Http<'a>>,
}

#[derive(Debug, Clone, Copy)]
pub struct Http<'a> {
    pub method: &'a str,
    pub path: &'a str,
    /// The request's verified token, if it carried one.
    pub token: Option<&'a VerifiedToken>,
}

/// What decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decider {
    /// A rule of a policy (index into its rules).
    Policy {
        id: Arc<str>,
        rule: usize,
    },
    /// ALLOW policies select the workload and none matched.
    NoAllowMatched,
    Default(DefaultPolicy),
    /// A configured kubelet probe.
    Probe,
    /// No policy has been received yet.
    NotSynced,
    /// The caller is unauthenticated and the port's mTLS mode is STRICT.
    StrictMtls,
}

impl Decider {
    /// The bounded label for `authz_decisions_total{policy}`.
    pub fn label(&self) -> &str {
        match self {
            Self::Policy { id, .. } => id,
            Self::NoAllowMatched => "no-allow-matched",
            Self::Default(DefaultPolicy::AllowAll) => "default:allow-all",
            Self::Default(DefaultPolicy::AllowAuthenticated) => "default:allow-authenticated",
            Self::Default(DefaultPolicy::AllowSameNamespace) => "default:allow-same-namespace",
            Self::Default(DefaultPolicy::Deny) => "default:deny",
            Self::Probe => "probe",
            Self::NotSynced => "not-synced",
            Self::StrictMtls => "mtls-strict",
        }
    }
}

/// An AUDIT policy rule that matched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditMatch {
    pub id: Arc<str>,
    pub rule: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Permit {
    pub by: Decider,
    pub audits: Vec<AuditMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denied {
    pub by: Decider,
    pub audits: Vec<AuditMatch>,
}

/// Decides one connection or request.
pub fn authorize(policy: &WorkloadPolicy, req: &Request<'_>) -> Result<Permit, Denied> {
    let facts = Facts::of(req);
    let probe = req.peer.is_none()
        && policy
            .probes
            .iter()
            .any(|probe| probe.port == req.port && probe_allows(probe, req.http));
    let plaintext_refused = req.peer.is_none() && policy.mtls_mode(req.port) == MtlsMode::Strict;
    decide(
        policy,
        probe,
        plaintext_refused,
        &EveryRule {
            policy,
            facts: &facts,
        },
        || default_allows(policy, req.peer),
    )
}

/// The policies of a list that match a request, each with its first
/// matching rule: what [`decide`] asks of a request, however the rules are
/// looked at.
trait Matches {
    /// (index of the policy in `list`, index of its first matching rule),
    /// in list order.
    fn matches(&self, list: List) -> impl Iterator<Item = (usize, usize)> + '_;
}

/// Every rule of every policy, judged against the request's facts.
struct EveryRule<'a> {
    policy: &'a WorkloadPolicy,
    facts: &'a Facts<'a>,
}

impl Matches for EveryRule<'_> {
    fn matches(&self, list: List) -> impl Iterator<Item = (usize, usize)> + '_ {
        self.policy
            .list(list)
            .iter()
            .enumerate()
            .filter_map(|(i, policy)| first_match(policy, self.facts).map(|rule| (i, rule)))
    }
}

/// Which of a workload's policy lists.
#[derive(Debug, Clone, Copy)]
enum List {
    Deny,
    Allow,
    Audit,
}

impl WorkloadPolicy {
    fn list(&self, list: List) -> &[Arc<Policy>] {
        match list {
            List::Deny => &self.deny,
            List::Allow => &self.allow,
            List::Audit => &self.audit,
        }
    }
}

/// The decision order, over the policies a request matches: shared by
/// [`authorize`] and [`CallerPolicy`], so both decide alike by
/// construction.
fn decide(
    policy: &WorkloadPolicy,
    probe: bool,
    plaintext_refused: bool,
    matcher: &impl Matches,
    default_allows: impl FnOnce() -> bool,
) -> Result<Permit, Denied> {
    // An index from the matcher always names a policy of that list; were
    // one not to, a DENY match would still deny and an ALLOW match would
    // not allow.
    let named = |list: List, i: usize| policy.list(list).get(i).map(|p| p.id.clone());
    let audits = || -> Vec<AuditMatch> {
        matcher
            .matches(List::Audit)
            .filter_map(|(i, rule)| {
                Some(AuditMatch {
                    id: named(List::Audit, i)?,
                    rule,
                })
            })
            .collect()
    };
    if probe {
        return Ok(Permit {
            by: Decider::Probe,
            audits: Vec::new(),
        });
    }
    if !policy.synced {
        return Err(Denied {
            by: Decider::NotSynced,
            audits: Vec::new(),
        });
    }
    if plaintext_refused {
        return Err(Denied {
            by: Decider::StrictMtls,
            audits: Vec::new(),
        });
    }
    if let Some((i, rule)) = matcher.matches(List::Deny).next() {
        return Err(Denied {
            by: Decider::Policy {
                id: named(List::Deny, i).unwrap_or_else(|| Arc::from("unknown")),
                rule,
            },
            audits: audits(),
        });
    }
    if !policy.allow.is_empty() {
        if let Some((i, rule)) = matcher.matches(List::Allow).next()
            && let Some(id) = named(List::Allow, i)
        {
            return Ok(Permit {
                by: Decider::Policy { id, rule },
                audits: audits(),
            });
        }
        return Err(Denied {
            by: Decider::NoAllowMatched,
            audits: audits(),
        });
    }
    let by = Decider::Default(policy.default);
    if default_allows() {
        Ok(Permit {
            by,
            audits: audits(),
        })
    } else {
        Err(Denied {
            by,
            audits: audits(),
        })
    }
}

/// Whether a probe exemption covers this request on its port: any
/// connection for a port-only probe, else `GET`/`HEAD` of its exact path
/// (the query ignored).
pub fn probe_allows(probe: &Probe, http: Option<Http<'_>>) -> bool {
    match (&probe.path, http) {
        (None, _) => true,
        (Some(path), Some(http)) => {
            (http.method == "GET" || http.method == "HEAD")
                && http.path.split('?').next() == Some(path.as_str())
        }
        (Some(_), None) => false,
    }
}

/// Whether a connection without mesh TLS may go on to detection and the
/// per-request decision on `port`: always on a PERMISSIVE port; on a
/// STRICT one only where a kubelet probe is exempted, and then only the
/// probe gets through ([`authorize`] denies the rest as `mtls-strict`).
/// Deciding this before detection closes everything else at once.
pub fn admits_plaintext(policy: &WorkloadPolicy, port: u16) -> bool {
    policy.mtls_mode(port) == MtlsMode::Permissive
        || policy.probes.iter().any(|probe| probe.port == port)
}

fn default_allows(policy: &WorkloadPolicy, peer: Option<&SpiffeId>) -> bool {
    match policy.default {
        DefaultPolicy::AllowAll => true,
        DefaultPolicy::AllowAuthenticated => peer.is_some(),
        DefaultPolicy::AllowSameNamespace => {
            peer.and_then(namespace_of) == Some(policy.namespace.as_str())
        }
        DefaultPolicy::Deny => false,
    }
}

/// The first rule of `policy` that matches, if any.
pub fn matching_rule(policy: &Policy, req: &Request<'_>) -> Option<usize> {
    first_match(policy, &Facts::of(req))
}

/// A request with what rules look at worked out at most once: the caller's
/// namespace is parsed out of its SPIFFE ID when a rule first needs it,
/// not once per rule.
struct Facts<'a> {
    authenticated: bool,
    /// Empty without an identity (no pattern matches an empty value).
    principal: &'a str,
    namespace: OnceCell<&'a str>,
    req: &'a Request<'a>,
}

impl<'a> Facts<'a> {
    fn of(req: &'a Request<'a>) -> Self {
        Self {
            authenticated: req.peer.is_some(),
            principal: req.peer.map_or("", SpiffeId::as_str),
            namespace: OnceCell::new(),
            req,
        }
    }

    /// Empty without an identity or outside the `/ns/<ns>/sa/<sa>` form.
    fn namespace(&self) -> &'a str {
        self.namespace
            .get_or_init(|| self.req.peer.and_then(namespace_of).unwrap_or(""))
    }
}

fn first_match(policy: &Policy, facts: &Facts<'_>) -> Option<usize> {
    policy
        .rules
        .iter()
        .position(|rule| rule_matches(rule, policy.action, facts))
}

fn rule_matches(rule: &Rule, action: Action, facts: &Facts<'_>) -> bool {
    (rule.from.is_empty()
        || rule.from.iter().any(|s| {
            source_matches(s, facts) && token_source_matches(s, action, offered(facts.req.http))
        }))
        && (rule.to.is_empty()
            || rule
                .to
                .iter()
                .any(|o| operation_matches(o, action, facts.req)))
        && when_holds(&rule.when, action, offered(facts.req.http))
}

/// The caller-level conditions of a source (its token conditions are
/// [`token_source_matches`]'s).
fn source_matches(source: &Source, facts: &Facts<'_>) -> bool {
    source
        .authenticated
        .is_none_or(|want| want == facts.authenticated)
        && source
            .principals
            .check(|p: &Pattern| p.matches(facts.principal))
        && source
            .namespaces
            .check(|ns| !facts.namespace().is_empty() && ns == facts.namespace())
        && source
            .ip_blocks
            .check(|net| net.contains(&facts.req.source))
}

fn operation_matches(op: &Operation, action: Action, req: &Request<'_>) -> bool {
    op.ports.check(|p| *p == req.port) && request_matches(op, action, req.http)
}

/// The method and path conditions of an operation.
fn request_matches(op: &Operation, action: Action, http: Option<Http<'_>>) -> bool {
    match http {
        Some(http) => {
            op.methods.check(|m| m == http.method)
                && op.paths.check(|p: &Pattern| p.matches(http.path))
        }
        // HTTP conditions cannot be checked on an opaque connection: they
        // never let an ALLOW match and never stop a DENY from matching.
        None => !op.is_http_only() || action == Action::Deny,
    }
}

/// What a request offers the token conditions of a rule.
fn offered(http: Option<Http<'_>>) -> Offered<'_> {
    match http {
        Some(http) => Offered::Http(http.token),
        None => Offered::Opaque,
    }
}

fn namespace_of(id: &SpiffeId) -> Option<&str> {
    id.namespace_and_service_account().map(|(ns, _)| ns)
}

mod caller;
pub use caller::{CallerFacts, CallerPolicy};

#[cfg(test)]
pub(crate) mod tests;
