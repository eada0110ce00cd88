//! Judging a LocalRateLimitPolicy object into [`RateLimitPolicy`]. Any
//! problem leaves the object without limits (see the model's docs).

use std::sync::Arc;

use super::{parse_method, parse_path, parse_port, read_spec};
use crate::policy::crd;
use crate::policy::limits::{Limit, Rate, RateLimitPolicy};
use crate::policy::model::{Match, Object, Selector};

impl RateLimitPolicy {
    pub fn from_object(object: &Object) -> Self {
        let id: Arc<str> = format!("{}/{}", object.namespace, object.name).into();
        match read_spec::<crd::LocalRateLimitPolicySpec>(&object.spec) {
            Ok(spec) => Self::from_spec(id, &spec),
            Err(error) => Self {
                id,
                selector: Selector::salvage(&object.spec).unwrap_or(Selector::All),
                dry_run: false,
                limits: Vec::new(),
                problems: vec![format!("spec does not parse: {error}")],
            },
        }
    }

    pub fn from_spec(id: Arc<str>, spec: &crd::LocalRateLimitPolicySpec) -> Self {
        let mut problems = Vec::new();
        let limits: Vec<Limit> = spec
            .limits
            .iter()
            .enumerate()
            .filter_map(|(i, limit)| {
                judge_limit(limit)
                    .map_err(|problem| problems.push(format!("limits[{i}]: {problem}")))
                    .ok()
            })
            .collect();
        if spec.limits.is_empty() {
            problems.push("limits is empty".into());
        }
        Self {
            id,
            selector: Selector::from_crd(spec.selector.as_ref()),
            dry_run: spec.mode == crd::RateLimitMode::DryRun,
            limits: if problems.is_empty() {
                limits
            } else {
                Vec::new()
            },
            problems,
        }
    }
}

/// Parses every value; `None` for an empty list (not constrained).
fn each<T>(
    values: &[String],
    parse: fn(&str) -> Result<T, String>,
) -> Result<Option<Vec<T>>, String> {
    let parsed = values
        .iter()
        .map(|v| parse(v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((!parsed.is_empty()).then_some(parsed))
}

fn judge_limit(limit: &crd::RateLimit) -> Result<Limit, String> {
    let rate = |r: &crd::Rate| -> Result<Rate, String> {
        if r.requests_per_second == 0 || r.burst == Some(0) {
            return Err("requestsPerSecond and burst must be at least 1".into());
        }
        Ok(Rate {
            per_second: r.requests_per_second,
            // One second's worth by default.
            burst: r.burst.unwrap_or(r.requests_per_second),
        })
    };
    let matches = limit.matches.clone().unwrap_or_default();
    let ports: Vec<String> = matches.ports.iter().map(u32::to_string).collect();
    let total = limit.total.as_ref().map(rate).transpose()?;
    let per_client = limit.per_client.as_ref().map(rate).transpose()?;
    let overrides = limit
        .overrides
        .iter()
        .map(|o| {
            if o.clients.is_empty() || o.clients.iter().any(String::is_empty) {
                return Err("overrides need clients".to_string());
            }
            Ok((o.clients.clone(), rate(&o.rate)?))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if total.is_none() && per_client.is_none() && overrides.is_empty() {
        return Err("needs total, perClient or overrides".into());
    }
    Ok(Limit {
        ports: Match {
            any_of: each(&ports, parse_port)?,
            none_of: Vec::new(),
        },
        methods: Match {
            any_of: each(&matches.methods, parse_method)?,
            none_of: Vec::new(),
        },
        paths: Match {
            any_of: each(&matches.paths, parse_path)?,
            none_of: Vec::new(),
        },
        total,
        per_client,
        overrides,
    })
}
