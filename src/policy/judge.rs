//! Judging objects into the model: each CRD object, read as JSON, becomes
//! a [`Policy`] or [`PeerAuth`] once. Values are parsed into typed
//! matchers, and anything invalid is turned into its fail-safe form, so
//! that a broken object never widens access:
//!
//! - a broken ALLOW policy still selects its workloads (so they become
//!   deny-by-default) but matches nothing;
//! - in a DENY policy, an unparseable value in a positive field makes that
//!   field match everything, and one in a `not` field is dropped, so the
//!   rule denies at least what was meant; a DENY (or unknown-action) policy
//!   whose spec cannot be read at all denies everything to the workloads it
//!   selects, or to the whole namespace if even its selector is unreadable;
//! - a broken AUDIT policy is ignored (it never decides anything);
//! - a PeerAuthentication that cannot be read makes its workloads STRICT.
//!
//! The only place that knows both the CRD types and the model.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;
use serde_json::Value;

use super::crd;
use super::model::{
    Action, Condition, Match, MtlsMode, Object, Operation, Pattern, PeerAuth, Policy, Rule,
    Selector, Source, TokenKey,
};
use crate::identity::SpiffeId;

impl Selector {
    fn from_crd(selector: Option<&crd::WorkloadSelector>) -> Self {
        match selector {
            Some(s) if !s.match_labels.is_empty() => Self::Labels(s.match_labels.clone()),
            _ => Self::All,
        }
    }

    /// Reads `spec.selector.matchLabels` out of a spec that failed to
    /// parse as a whole; `None` when even that is unreadable.
    fn salvage(spec: &Value) -> Option<Self> {
        match spec.get("selector") {
            None | Some(Value::Null) => Some(Self::All),
            Some(selector) => match selector.get("matchLabels") {
                None | Some(Value::Null) => Some(Self::All),
                Some(labels) => {
                    let labels: BTreeMap<String, String> =
                        serde_json::from_value(labels.clone()).ok()?;
                    Some(if labels.is_empty() {
                        Self::All
                    } else {
                        Self::Labels(labels)
                    })
                }
            },
        }
    }
}

// === AuthorizationPolicy conversion ===

/// Collects problems while converting one field of one policy.
struct Field<'a> {
    action: Action,
    problems: &'a mut Vec<String>,
    broken: &'a mut bool,
}

impl Field<'_> {
    /// Parses every value, recording each bad one; true if any was bad.
    fn parse_each<T>(
        &mut self,
        name: &str,
        values: &[impl AsRef<str>],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> (Vec<T>, bool) {
        let mut out = Vec::with_capacity(values.len());
        let mut bad = false;
        for v in values {
            match parse(v.as_ref()) {
                Ok(t) => out.push(t),
                Err(e) => {
                    self.problems.push(format!("{name}: {e}"));
                    bad = true;
                }
            }
        }
        (out, bad)
    }

    /// Parses a positive field. In a DENY policy a bad value makes the
    /// whole field unconstrained (match everything); elsewhere it breaks
    /// the policy.
    fn any_of<T>(
        &mut self,
        name: &str,
        values: &[impl AsRef<str>],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Option<Vec<T>> {
        if values.is_empty() {
            return None;
        }
        let (out, bad) = self.parse_each(name, values, parse);
        if bad {
            if self.action == Action::Deny {
                return None;
            }
            *self.broken = true;
        }
        Some(out)
    }

    /// Parses a `not` field. In a DENY policy a bad value is dropped (the
    /// rule excludes less, so denies more); elsewhere it breaks the policy.
    fn none_of<T>(
        &mut self,
        name: &str,
        values: &[impl AsRef<str>],
        parse: impl Fn(&str) -> Result<T, String>,
    ) -> Vec<T> {
        let (out, bad) = self.parse_each(name, values, parse);
        if bad && self.action != Action::Deny {
            *self.broken = true;
        }
        out
    }
}

impl Field<'_> {
    /// A `when` entry. A key we cannot read breaks an ALLOW or AUDIT
    /// policy; in a DENY policy the condition is dropped, so the rule
    /// denies at least what was meant.
    fn condition(&mut self, c: &crd::Condition) -> Option<Condition> {
        let key = match TokenKey::parse(&c.key) {
            Ok(key) => key,
            Err(e) => {
                self.problems.push(format!("when.key: {e}"));
                if self.action != Action::Deny {
                    *self.broken = true;
                }
                return None;
            }
        };
        let values = c.values.as_deref().unwrap_or_default();
        let not_values = c.not_values.as_deref().unwrap_or_default();
        if values.is_empty() && not_values.is_empty() {
            self.problems
                .push(format!("when {:?}: needs values or notValues", c.key));
            if self.action != Action::Deny {
                *self.broken = true;
            }
            return None;
        }
        let values = Match {
            any_of: self.any_of("when.values", values, Pattern::parse),
            none_of: self.none_of("when.notValues", not_values, Pattern::parse),
        };
        Some(Condition { key, values })
    }
}

fn parse_principal(s: &str) -> Result<Pattern, String> {
    // Istio writes principals without the scheme; accept both forms.
    let full = if s.starts_with("spiffe://") || s.starts_with('*') {
        s.to_string()
    } else {
        format!("spiffe://{s}")
    };
    let pattern = Pattern::parse(&full)?;
    if let Pattern::Exact(id) = &pattern {
        SpiffeId::parse(id).map_err(|e| e.to_string())?;
    }
    Ok(pattern)
}

fn parse_namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not a namespace name"))
    }
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    s.parse::<IpNet>()
        .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
        .map_err(|_| format!("{s:?} is not an IP address or CIDR"))
}

fn parse_port(s: &str) -> Result<u16, String> {
    s.parse::<u16>()
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| format!("{s} is not a port (1-65535)"))
}

fn parse_method(s: &str) -> Result<String, String> {
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_uppercase()) {
        Ok(s.to_string())
    } else {
        Err(format!("{s:?} is not an upper-case HTTP method"))
    }
}

fn parse_path(s: &str) -> Result<Pattern, String> {
    Pattern::parse(s)
}

/// Deserialises a spec, naming the field that does not fit
/// (`rules[0].to[0].ports[0]: invalid type ...`). A field this version
/// does not know is an error too: `principal:` for `principals:` would
/// otherwise be dropped silently and an ALLOW rule would open to everyone.
/// (The API server prunes unknown fields, so this bites in file mode and
/// with a newer CRD than the proxy, where a constraint we cannot see must
/// not be ignored either.)
fn read_spec<T: serde::de::DeserializeOwned>(spec: &Value) -> Result<T, String> {
    let mut unknown = Vec::new();
    let mut note_unknown = |path: serde_ignored::Path<'_>| unknown.push(path.to_string());
    let parsed =
        serde_path_to_error::deserialize(serde_ignored::Deserializer::new(spec, &mut note_unknown))
            .map_err(|error| {
                let path = error.path().to_string();
                if path == "." {
                    error.into_inner().to_string()
                } else {
                    format!("{path}: {}", error.into_inner())
                }
            })?;
    if unknown.is_empty() {
        Ok(parsed)
    } else {
        Err(format!("unknown field {}", unknown.join(", ")))
    }
}

impl Policy {
    /// Judges an AuthorizationPolicy object. Never fails: what cannot be
    /// read takes its fail-safe form (see the module docs).
    pub fn from_object(object: &Object) -> Self {
        let id: Arc<str> = format!("{}/{}", object.namespace, object.name).into();
        match read_spec::<crd::AuthorizationPolicySpec>(&object.spec) {
            Ok(spec) => Self::from_spec(id, &spec),
            Err(error) => Self::unreadable(id, &object.spec, error),
        }
    }

    pub fn from_spec(id: Arc<str>, spec: &crd::AuthorizationPolicySpec) -> Self {
        let action = match spec.action {
            crd::Action::Allow => Action::Allow,
            crd::Action::Deny => Action::Deny,
            crd::Action::Audit => Action::Audit,
        };
        let mut problems = Vec::new();
        let mut broken = false;
        let mut field = Field {
            action,
            problems: &mut problems,
            broken: &mut broken,
        };
        let port_strings = |ports: &[u32]| ports.iter().map(u32::to_string).collect::<Vec<_>>();
        let rules = spec
            .rules
            .iter()
            .map(|rule| Rule {
                from: rule
                    .from
                    .iter()
                    .map(|s| Source {
                        principals: Match {
                            any_of: field.any_of("principals", &s.principals, parse_principal),
                            none_of: field.none_of(
                                "notPrincipals",
                                &s.not_principals,
                                parse_principal,
                            ),
                        },
                        namespaces: Match {
                            any_of: field.any_of("namespaces", &s.namespaces, parse_namespace),
                            none_of: field.none_of(
                                "notNamespaces",
                                &s.not_namespaces,
                                parse_namespace,
                            ),
                        },
                        ip_blocks: Match {
                            any_of: field.any_of("ipBlocks", &s.ip_blocks, parse_cidr),
                            none_of: field.none_of("notIpBlocks", &s.not_ip_blocks, parse_cidr),
                        },
                        authenticated: s.authenticated,
                        request_principals: Match {
                            any_of: field.any_of(
                                "requestPrincipals",
                                &s.request_principals,
                                Pattern::parse,
                            ),
                            none_of: field.none_of(
                                "notRequestPrincipals",
                                &s.not_request_principals,
                                Pattern::parse,
                            ),
                        },
                    })
                    .collect(),
                to: rule
                    .to
                    .iter()
                    .map(|o| Operation {
                        ports: Match {
                            any_of: field.any_of("ports", &port_strings(&o.ports), parse_port),
                            none_of: field.none_of(
                                "notPorts",
                                &port_strings(&o.not_ports),
                                parse_port,
                            ),
                        },
                        methods: Match {
                            any_of: field.any_of("methods", &o.methods, parse_method),
                            none_of: field.none_of("notMethods", &o.not_methods, parse_method),
                        },
                        paths: Match {
                            any_of: field.any_of("paths", &o.paths, parse_path),
                            none_of: field.none_of("notPaths", &o.not_paths, parse_path),
                        },
                    })
                    .collect(),
                when: rule
                    .when
                    .iter()
                    .filter_map(|c| field.condition(c))
                    .collect(),
            })
            .collect();
        Self {
            id,
            action,
            selector: Selector::from_crd(spec.selector.as_ref()),
            // A broken ALLOW or AUDIT policy keeps its selector but
            // matches nothing.
            rules: if broken { Vec::new() } else { rules },
            problems,
        }
    }

    /// The fail-safe stand-in for a policy whose spec does not parse.
    fn unreadable(id: Arc<str>, spec: &Value, error: String) -> Self {
        let action = match spec.get("action").and_then(Value::as_str) {
            Some("ALLOW") => Action::Allow,
            Some("AUDIT") => Action::Audit,
            // DENY, or an action we cannot read: deny.
            _ => Action::Deny,
        };
        let selector = Selector::salvage(spec);
        let problems = vec![format!("spec does not parse: {error}")];
        let (selector, rules) = match (action, selector) {
            (Action::Deny, Some(selector)) => (selector, vec![Rule::default()]),
            // Cannot even tell whom it was for: the whole namespace.
            (Action::Deny, None) => (Selector::All, vec![Rule::default()]),
            (_, selector) => (selector.unwrap_or(Selector::All), Vec::new()),
        };
        Self {
            id,
            action,
            selector,
            rules,
            problems,
        }
    }
}

// === PeerAuthentication conversion ===

impl PeerAuth {
    pub fn from_object(object: &Object) -> Self {
        let id: Arc<str> = format!("{}/{}", object.namespace, object.name).into();
        let order_key = (
            object.created.clone().unwrap_or_default(),
            object.name.clone(),
        );
        let mode = |m: crd::PeerAuthMode| match m {
            crd::PeerAuthMode::Strict => MtlsMode::Strict,
            crd::PeerAuthMode::Permissive => MtlsMode::Permissive,
        };
        match read_spec::<crd::PeerAuthenticationSpec>(&object.spec) {
            Ok(spec) => {
                let mut problems = Vec::new();
                let mut ports = BTreeMap::new();
                for (port, settings) in &spec.port_level_mtls {
                    match parse_port(port) {
                        Ok(p) => {
                            ports.insert(p, mode(settings.mode));
                        }
                        Err(e) => problems.push(format!("portLevelMtls: {e}")),
                    }
                }
                // An unreadable port key cannot be honoured per port; make
                // the whole workload strict rather than guess.
                let workload_mode = if problems.is_empty() {
                    spec.mtls.as_ref().map(|m| mode(m.mode))
                } else {
                    Some(MtlsMode::Strict)
                };
                Self {
                    id,
                    selector: Selector::from_crd(spec.selector.as_ref()),
                    order_key,
                    mode: workload_mode,
                    ports,
                    problems,
                }
            }
            Err(error) => Self {
                id,
                selector: Selector::salvage(&object.spec).unwrap_or(Selector::All),
                order_key,
                mode: Some(MtlsMode::Strict),
                ports: BTreeMap::new(),
                problems: vec![format!("spec does not parse: {error}")],
            },
        }
    }
}

mod rate_limit;
mod request_authentication;

#[cfg(test)]
mod tests;
