//! The authorization decision: pure, over the compiled policy of one
//! workload and the facts of one connection or request. No I/O, no kube
//! types; the proxy calls it per connection (opaque TCP) or per request
//! (HTTP).
//!
//! Order (Istio's): kubelet probes from unauthenticated sources are
//! allowed; before the first policy sync everything else is denied; any
//! matching DENY denies; if any ALLOW policy selects the workload, the
//! request must match one; otherwise the mesh default applies. AUDIT
//! policies never decide; their matches are reported with the outcome.

use std::cell::OnceCell;
use std::net::IpAddr;
use std::sync::Arc;

use super::index::WorkloadPolicy;
use super::model::{Action, DefaultPolicy, Operation, Pattern, Policy, Rule, Source};
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
    let facts = &facts;
    let audits = || -> Vec<AuditMatch> {
        policy
            .audit
            .iter()
            .filter_map(|p| {
                first_match(p, facts).map(|rule| AuditMatch {
                    id: p.id.clone(),
                    rule,
                })
            })
            .collect()
    };
    if req.peer.is_none() && policy.probes.iter().any(|probe| probe.matches(req)) {
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
    for deny in &policy.deny {
        if let Some(rule) = first_match(deny, facts) {
            return Err(Denied {
                by: Decider::Policy {
                    id: deny.id.clone(),
                    rule,
                },
                audits: audits(),
            });
        }
    }
    if !policy.allow.is_empty() {
        for allow in &policy.allow {
            if let Some(rule) = first_match(allow, facts) {
                return Ok(Permit {
                    by: Decider::Policy {
                        id: allow.id.clone(),
                        rule,
                    },
                    audits: audits(),
                });
            }
        }
        return Err(Denied {
            by: Decider::NoAllowMatched,
            audits: audits(),
        });
    }
    let by = Decider::Default(policy.default);
    let allowed = match policy.default {
        DefaultPolicy::AllowAll => true,
        DefaultPolicy::AllowAuthenticated => req.peer.is_some(),
        DefaultPolicy::AllowSameNamespace => {
            req.peer.and_then(namespace_of) == Some(policy.namespace.as_str())
        }
        DefaultPolicy::Deny => false,
    };
    if allowed {
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
    (rule.from.is_empty() || rule.from.iter().any(|s| source_matches(s, facts)))
        && (rule.to.is_empty()
            || rule
                .to
                .iter()
                .any(|o| operation_matches(o, action, facts.req)))
}

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
    if !op.ports.check(|p| *p == req.port) {
        return false;
    }
    match req.http {
        Some(http) => {
            op.methods.check(|m| m == http.method)
                && op.paths.check(|p: &Pattern| p.matches(http.path))
        }
        // HTTP conditions cannot be checked on an opaque connection: they
        // never let an ALLOW match and never stop a DENY from matching.
        None => !op.is_http_only() || action == Action::Deny,
    }
}

fn namespace_of(id: &SpiffeId) -> Option<&str> {
    id.namespace_and_service_account().map(|(ns, _)| ns)
}

#[cfg(test)]
mod tests;
