//! The conditions of authorization rules on a request's verified token:
//! `requestPrincipals` / `notRequestPrincipals` in a source, and the
//! `when` conditions of a rule. Pure.
//!
//! A request without a token has no principal and no claims: a positive
//! condition does not hold, a `not` condition does (so `notRequestPrincipals:
//! ["*"]` matches exactly the requests without a token). An opaque
//! connection has no request at all: a token condition never lets an
//! ALLOW match and always lets a DENY match.

use serde_json::Value;

use super::jwt::{VerifiedToken, claim_text};
use super::model::{Action, Condition, Pattern, Source, TokenKey};

/// What a request offers token conditions: an opaque connection has no
/// request; an HTTP request has its verified token, or none.
#[derive(Debug, Clone, Copy)]
pub enum Offered<'a> {
    Opaque,
    Http(Option<&'a VerifiedToken>),
}

/// The token conditions of a source.
pub fn token_source_matches(source: &Source, action: Action, offered: Offered<'_>) -> bool {
    if !source.has_token_conditions() {
        return true;
    }
    let Offered::Http(token) = offered else {
        return action == Action::Deny;
    };
    let principal = token.and_then(|t| t.principal.as_deref()).unwrap_or("");
    source
        .request_principals
        .check(|p: &Pattern| p.matches(principal))
}

/// Whether every `when` condition holds.
pub fn when_holds(conditions: &[Condition], action: Action, offered: Offered<'_>) -> bool {
    if conditions.is_empty() {
        return true;
    }
    let Offered::Http(token) = offered else {
        return action == Action::Deny;
    };
    conditions.iter().all(|condition| {
        let values = token_values(condition, token);
        condition
            .values
            .check(|p: &Pattern| values.iter().any(|v| p.matches(v)))
    })
}

/// The values under a condition's key: a string claim is one value, a
/// list of strings is each of them, a number or boolean is its JSON text;
/// objects and absent claims give none.
fn token_values(condition: &Condition, token: Option<&VerifiedToken>) -> Vec<String> {
    let Some(token) = token else {
        return Vec::new();
    };
    match &condition.key {
        TokenKey::Audiences => token.audiences.clone(),
        TokenKey::Claim(path) => {
            let Some((first, rest)) = path.split_first() else {
                return Vec::new();
            };
            let mut value = token.claims.get(first);
            for name in rest {
                value = value.and_then(|v| v.get(name));
            }
            match value {
                Some(Value::Array(items)) => items.iter().filter_map(claim_text).collect(),
                Some(v) => claim_text(v).into_iter().collect(),
                None => Vec::new(),
            }
        }
    }
}

#[cfg(test)]
mod tests;
