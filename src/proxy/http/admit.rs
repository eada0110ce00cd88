//! What an inbound request passes before it is forwarded, in order:
//! request authentication (401, or 503 without the issuer's keys),
//! authorization with the verified token (403), a declared body length
//! over the limit (413; a body that only grows past it is cut as it
//! streams, in `body`), and the rate limits (429): a request refused
//! earlier spends no one's budget.

use http::{Request, Response, header};
use hyper::body::Incoming;

use super::super::authn::Authenticated;
use super::super::authz::ConnectionAuthz;
use super::super::respond::{
    ProxyBody, forbidden, payload_too_large, rate_limited, unauthenticated,
};

pub(super) async fn inbound(
    authz: &ConnectionAuthz,
    req: &mut Request<Incoming>,
    max_request_body: Option<u64>,
    grpc: bool,
) -> Result<Option<Authenticated>, Response<ProxyBody>> {
    let current = authz.current();
    let authenticated = authz
        .authenticate(&current, req.headers_mut())
        .await
        .map_err(|refusal| unauthenticated(refusal, grpc))?;
    let token = authenticated.as_ref().map(|a| &*a.token);
    if authz
        .check_http_in(&current, req.method().as_str(), req.uri().path(), token)
        .is_err()
    {
        return Err(forbidden(grpc));
    }
    if let Some(limit) = max_request_body
        && declared_length(req).is_some_and(|length| length > limit)
    {
        authz.body_too_large();
        return Err(payload_too_large(grpc));
    }
    authz
        .rate_limit(&current, req.method().as_str(), req.uri().path(), token)
        .map_err(|limited| rate_limited(limited.retry_after, grpc))?;
    Ok(authenticated)
}

/// The body length the request declares, if it declares one it can be
/// held to (hyper has already refused conflicting or malformed ones).
fn declared_length(req: &Request<Incoming>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}
