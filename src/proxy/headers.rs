//! Header hygiene between hops: hop-by-hop headers go, the
//! caller-identity header carries only what the proxy verified, and the
//! request facts the forwarder branches on (an upgrade, gRPC). Pure
//! functions over header maps and requests.

use http::Request;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Set on inbound requests to the caller's SPIFFE ID, after removing any
/// value the caller sent.
pub static CLIENT_ID_HEADER: HeaderName = HeaderName::from_static("x-outrider-client-id");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers (and those the `Connection` header names).
/// For an upgrade, `Upgrade` survives and `Connection: upgrade` is kept.
/// `TE: trailers` survives for gRPC over HTTP/2.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .collect();
        for name in named {
            if !(upgrade && name == header::UPGRADE) {
                headers.remove(name);
            }
        }
        headers.remove(header::CONNECTION);
    }
    let te_trailers = headers
        .remove(header::TE)
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for name in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::TRAILER,
    ] {
        headers.remove(name);
    }
    if !upgrade {
        headers.remove(header::UPGRADE);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Replaces whatever the caller claimed with the identity we verified
/// (`None` for a caller without one).
pub fn set_client_id(headers: &mut HeaderMap, client_id: Option<&HeaderValue>) {
    match client_id {
        Some(value) => {
            headers.insert(CLIENT_ID_HEADER.clone(), value.clone());
        }
        None => {
            headers.remove(&CLIENT_ID_HEADER);
        }
    }
}

pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
}

pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::SpiffeId;

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("backend"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::HOST));
    }

    #[test]
    fn an_upgrade_keeps_upgrade_and_connection_upgrade() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn te_trailers_survives_for_grpc() {
        let mut h = HeaderMap::new();
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h[header::TE], "trailers");
        h.insert(header::TE, HeaderValue::from_static("gzip"));
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key(header::TE));
    }

    #[test]
    fn a_forged_client_id_is_replaced_by_the_verified_one() {
        let id = SpiffeId::parse("spiffe://cluster.local/ns/a/sa/real").unwrap();
        let mut h = HeaderMap::new();
        h.insert(
            CLIENT_ID_HEADER.clone(),
            HeaderValue::from_static("spiffe://cluster.local/ns/a/sa/forged"),
        );
        set_client_id(&mut h, Some(&HeaderValue::from_str(id.as_str()).unwrap()));
        assert_eq!(h[&CLIENT_ID_HEADER], "spiffe://cluster.local/ns/a/sa/real");
    }

    #[test]
    fn a_forged_client_id_is_removed_from_plaintext_callers() {
        let mut h = HeaderMap::new();
        h.insert(
            CLIENT_ID_HEADER.clone(),
            HeaderValue::from_static("spiffe://cluster.local/ns/a/sa/forged"),
        );
        set_client_id(&mut h, None);
        assert!(!h.contains_key(&CLIENT_ID_HEADER));
    }
}
