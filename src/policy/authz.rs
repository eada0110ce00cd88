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
use super::model::{Action, DefaultPolicy, MtlsMode, Operation, Pattern, Policy, Rule, Source};
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

/// One caller's view of a workload's policy: every rule whose source and
/// port conditions the caller meets, reduced to its method and path
/// conditions. Built once per caller (and again when the policy changes),
/// it decides each request without looking at rules that could never
/// match it: with HTTP keep-alive or HTTP/2 the cost of a large policy is
/// paid per caller, not per request. Compact (20 bytes per rule left
/// possible), so that callers can share it and a budget can bound it.
/// [`CallerPolicy::decide`] equals [`authorize`] for the same caller; a
/// property test holds it to that.
#[derive(Debug)]
pub struct CallerPolicy {
    policy: Arc<WorkloadPolicy>,
    /// The probes an unauthenticated caller on this port may reach.
    probes: Vec<Probe>,
    /// Unauthenticated, on a STRICT port.
    plaintext_refused: bool,
    default_allows: bool,
    /// The rules still possible in `policy.deny`, `.allow` and `.audit`,
    /// in list and rule order.
    deny: Box<[Residual]>,
    allow: Box<[Residual]>,
    audit: Box<[Residual]>,
    /// The operations still possible of every residual rule, as indices
    /// into its `to`.
    operations: Box<[u32]>,
}

/// A rule the caller's source and port leave possible.
#[derive(Debug, Clone, Copy)]
struct Residual {
    /// Index of its policy in the list.
    policy: u32,
    rule: u32,
    /// Its possible operations, `operations[start..end]` of the view;
    /// `None`: the rule has no `to` and matches any request.
    operations: Option<(u32, u32)>,
}

/// Who is calling which port: the connection-level facts of a request.
#[derive(Debug, Clone, Copy)]
pub struct CallerFacts<'a> {
    pub peer: Option<&'a SpiffeId>,
    pub source: IpAddr,
    pub port: u16,
}

impl CallerPolicy {
    /// `None` only for a policy whose lists or rules could not be counted
    /// in 32 bits, which no document under the size cap comes near; the
    /// caller then decides with [`authorize`].
    pub fn new(policy: Arc<WorkloadPolicy>, caller: CallerFacts<'_>) -> Option<Self> {
        let req = Request {
            peer: caller.peer,
            source: caller.source,
            port: caller.port,
            http: None,
        };
        let facts = Facts::of(&req);
        let mut operations: Vec<u32> = Vec::new();
        let mut residuals = |list: &[Arc<Policy>]| -> Option<Box<[Residual]>> {
            let mut kept = Vec::new();
            for (i, p) in list.iter().enumerate() {
                for (r, rule) in p.rules.iter().enumerate() {
                    if !(rule.from.is_empty()
                        || rule.from.iter().any(|s| source_matches(s, &facts)))
                    {
                        continue;
                    }
                    let residual_operations = if rule.to.is_empty() {
                        None
                    } else {
                        let start = u32::try_from(operations.len()).ok()?;
                        for (j, op) in rule.to.iter().enumerate() {
                            if op.ports.check(|p| *p == caller.port) {
                                operations.push(u32::try_from(j).ok()?);
                            }
                        }
                        let end = u32::try_from(operations.len()).ok()?;
                        if start == end {
                            continue;
                        }
                        Some((start, end))
                    };
                    kept.push(Residual {
                        policy: u32::try_from(i).ok()?,
                        rule: u32::try_from(r).ok()?,
                        operations: residual_operations,
                    });
                }
            }
            Some(kept.into_boxed_slice())
        };
        let deny = residuals(&policy.deny)?;
        let allow = residuals(&policy.allow)?;
        let audit = residuals(&policy.audit)?;
        Some(Self {
            probes: if caller.peer.is_none() {
                policy
                    .probes
                    .iter()
                    .filter(|p| p.port == caller.port)
                    .cloned()
                    .collect()
            } else {
                Vec::new()
            },
            plaintext_refused: caller.peer.is_none()
                && policy.mtls_mode(caller.port) == MtlsMode::Strict,
            default_allows: default_allows(&policy, caller.peer),
            deny,
            allow,
            audit,
            operations: operations.into_boxed_slice(),
            policy,
        })
    }

    /// The policy this view was built from.
    pub fn policy(&self) -> &Arc<WorkloadPolicy> {
        &self.policy
    }

    /// What this view holds in memory, in bytes (the policy it points to
    /// is shared and not counted).
    pub fn bytes(&self) -> usize {
        std::mem::size_of::<Self>()
            + std::mem::size_of_val(&*self.deny)
            + std::mem::size_of_val(&*self.allow)
            + std::mem::size_of_val(&*self.audit)
            + std::mem::size_of_val(&*self.operations)
            + self.probes.capacity() * std::mem::size_of::<Probe>()
    }

    /// Decides one request (`None`: the connection is opaque).
    pub fn decide(&self, http: Option<Http<'_>>) -> Result<Permit, Denied> {
        let probe = self.probes.iter().any(|probe| probe_allows(probe, http));
        decide(
            &self.policy,
            probe,
            self.plaintext_refused,
            &ViewedRequest { view: self, http },
            || self.default_allows,
        )
    }
}

/// One request, judged through its caller's view.
struct ViewedRequest<'a> {
    view: &'a CallerPolicy,
    http: Option<Http<'a>>,
}

impl ViewedRequest<'_> {
    /// Whether the residual rule matches the request.
    fn hits(&self, policy: &Policy, residual: &Residual) -> bool {
        let Some((start, end)) = residual.operations else {
            return true;
        };
        // An index the view cannot resolve never happens (it was built
        // from this policy); were it to, it fails closed: a DENY rule
        // matches, an ALLOW rule does not.
        let unresolved = policy.action == Action::Deny;
        let (Some(rule), Some(operations)) = (
            policy.rules.get(residual.rule as usize),
            self.view.operations.get(start as usize..end as usize),
        ) else {
            return unresolved;
        };
        operations.iter().any(|&j| {
            rule.to.get(j as usize).map_or(unresolved, |op| {
                request_matches(op, policy.action, self.http)
            })
        })
    }
}

impl Matches for ViewedRequest<'_> {
    fn matches(&self, list: List) -> impl Iterator<Item = (usize, usize)> + '_ {
        let residuals = match list {
            List::Deny => &self.view.deny,
            List::Allow => &self.view.allow,
            List::Audit => &self.view.audit,
        };
        let policies = self.view.policy.list(list);
        residuals
            .chunk_by(|a, b| a.policy == b.policy)
            .filter_map(move |of_one_policy| {
                let first = of_one_policy.first()?;
                let policy = policies.get(first.policy as usize)?;
                of_one_policy
                    .iter()
                    .find(|residual| self.hits(policy, residual))
                    .map(|residual| (residual.policy as usize, residual.rule as usize))
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

fn namespace_of(id: &SpiffeId) -> Option<&str> {
    id.namespace_and_service_account().map(|(ns, _)| ns)
}

#[cfg(test)]
mod tests;
