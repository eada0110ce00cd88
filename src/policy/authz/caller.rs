//! One caller's view of a workload's policy ([`CallerPolicy`]): the
//! rules its connection-level facts leave possible, so that each of its
//! requests is judged against those alone.

use std::net::IpAddr;
use std::sync::Arc;

use super::{
    Action, Facts, Http, List, Matches, Policy, Probe, Request, Source, WorkloadPolicy, decide,
    default_allows, probe_allows, request_matches, source_matches,
};
use super::{Denied, MtlsMode, Permit, offered, token_source_matches, when_holds};
use crate::identity::SpiffeId;

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
    /// The sources of residual rules that wait on the token, as indices
    /// into its `from`; `source_spans` are the ranges of it.
    sources: Box<[u32]>,
    source_spans: Box<[(u32, u32)]>,
}

/// A rule the caller's source and port leave possible. 20 bytes.
#[derive(Debug, Clone, Copy)]
struct Residual {
    /// Index of its policy in the list.
    policy: u32,
    rule: u32,
    /// Its possible operations, `operations[start..end]` of the view;
    /// `start == ANY`: the rule has no `to` and matches any request.
    operations: (u32, u32),
    /// Index into the view's `source_spans` of the sources the caller
    /// matched that still ask about the request's token; `ANY`: a source
    /// the caller matched asks nothing of the token (or there is no
    /// `from`). Rare, hence the indirection that keeps this small.
    sources: u32,
}

/// "Not constrained" in a [`Residual`] field.
const ANY: u32 = u32::MAX;

impl Residual {
    fn operations(&self) -> Option<(u32, u32)> {
        (self.operations.0 != ANY).then_some(self.operations)
    }
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
        let mut sources: Vec<u32> = Vec::new();
        let mut source_spans: Vec<(u32, u32)> = Vec::new();
        let mut residuals = |list: &[Arc<Policy>]| -> Option<Box<[Residual]>> {
            let mut kept = Vec::new();
            for (i, p) in list.iter().enumerate() {
                for (r, rule) in p.rules.iter().enumerate() {
                    let residual_sources = if rule.from.is_empty() {
                        ANY
                    } else {
                        let matched: Vec<(usize, &Source)> = rule
                            .from
                            .iter()
                            .enumerate()
                            .filter(|(_, s)| source_matches(s, &facts))
                            .collect();
                        if matched.is_empty() {
                            continue;
                        }
                        if matched.iter().any(|(_, s)| !s.has_token_conditions()) {
                            ANY
                        } else {
                            let start = u32::try_from(sources.len()).ok()?;
                            for (j, _) in matched {
                                sources.push(u32::try_from(j).ok()?);
                            }
                            source_spans.push((start, u32::try_from(sources.len()).ok()?));
                            u32::try_from(source_spans.len() - 1)
                                .ok()
                                .filter(|i| *i != ANY)?
                        }
                    };
                    let residual_operations = if rule.to.is_empty() {
                        (ANY, ANY)
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
                        (start, end)
                    };
                    kept.push(Residual {
                        policy: u32::try_from(i).ok()?,
                        rule: u32::try_from(r).ok()?,
                        operations: residual_operations,
                        sources: residual_sources,
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
            sources: sources.into_boxed_slice(),
            source_spans: source_spans.into_boxed_slice(),
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
            + std::mem::size_of_val(&*self.sources)
            + std::mem::size_of_val(&*self.source_spans)
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
        // An index the view cannot resolve never happens (it was built
        // from this policy); were it to, it fails closed: a DENY rule
        // matches, an ALLOW rule does not.
        let unresolved = policy.action == Action::Deny;
        let Some(rule) = policy.rules.get(residual.rule as usize) else {
            return unresolved;
        };
        let operation_hit = match residual.operations() {
            None => true,
            Some((start, end)) => match self.view.operations.get(start as usize..end as usize) {
                None => unresolved,
                Some(operations) => operations.iter().any(|&j| {
                    rule.to.get(j as usize).map_or(unresolved, |op| {
                        request_matches(op, policy.action, self.http)
                    })
                }),
            },
        };
        let source_hit = || match residual.sources {
            ANY => true,
            span => match self
                .view
                .source_spans
                .get(span as usize)
                .and_then(|&(start, end)| self.view.sources.get(start as usize..end as usize))
            {
                None => unresolved,
                Some(sources) => sources.iter().any(|&j| {
                    rule.from.get(j as usize).map_or(unresolved, |source| {
                        token_source_matches(source, policy.action, offered(self.http))
                    })
                }),
            },
        };
        operation_hit && source_hit() && when_holds(&rule.when, policy.action, offered(self.http))
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
