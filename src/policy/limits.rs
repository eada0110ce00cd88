//! Local rate limits as the proxy applies them: the judged
//! LocalRateLimitPolicy (which requests each limit counts, and the
//! budgets: shared, per caller, per named caller). Pure; the buckets
//! that spend the budgets are the proxy's (`proxy::ratelimit`).

use std::sync::Arc;

use super::model::{Match, Pattern, Selector};

/// A budget: `per_second` on average, bursts of up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Rate {
    pub per_second: u32,
    pub burst: u32,
}

/// One `limits` entry, judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limit {
    pub ports: Match<u16>,
    pub methods: Match<String>,
    pub paths: Match<Pattern>,
    pub total: Option<Rate>,
    pub per_client: Option<Rate>,
    /// (callers, their rate), in order: the first naming a caller wins.
    pub overrides: Vec<(Vec<String>, Rate)>,
}

impl Limit {
    /// Whether the limit counts this request.
    pub fn counts(&self, port: u16, method: &str, path: &str) -> bool {
        self.ports.check(|p| *p == port)
            && self.methods.check(|m| m == method)
            && self.paths.check(|p: &Pattern| p.matches(path))
    }

    /// The caller's own budget, if it has one.
    pub fn client_rate(&self, client: &str) -> Option<Rate> {
        self.overrides
            .iter()
            .find(|(clients, _)| clients.iter().any(|c| c == client))
            .map(|(_, rate)| *rate)
            .or(self.per_client)
    }
}

/// A LocalRateLimitPolicy, judged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimitPolicy {
    pub id: Arc<str>,
    pub selector: Selector,
    /// Only count what would be refused.
    pub dry_run: bool,
    /// Empty when the object is broken: a limit we cannot read is not
    /// applied (it is not an access rule, and refusing every request
    /// for a typo would be an outage), and is reported.
    pub limits: Vec<Limit>,
    pub problems: Vec<String>,
}

impl RateLimitPolicy {
    pub fn is_valid(&self) -> bool {
        self.problems.is_empty()
    }
}
