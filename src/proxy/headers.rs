//! Header hygiene between hops: hop-by-hop headers go, our reserved
//! headers (`x-outrider-*`, in every spelling a server may fold together)
//! never come from a caller, the caller-identity header carries only what
//! the proxy verified, and the request facts the forwarder branches on
//! (a WebSocket upgrade, gRPC, a duplicated Host). Pure functions over
//! header maps and requests.
//!
//! Upgrades: only WebSocket is tunnelled. Any other `Upgrade` (`h2c`
//! above all, which would turn an allowed request into a raw HTTP/2
//! tunnel past per-request policy) is removed with `HTTP2-Settings`, and
//! the request goes on as a plain one.

use http::Request;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Set on inbound requests to the caller's SPIFFE ID, after removing any
/// value the caller sent.
pub static CLIENT_ID_HEADER: HeaderName = HeaderName::from_static("x-outrider-client-id");

/// Set on inbound requests to the verified token's `<iss>/<sub>`, after
/// removing any value the caller sent.
pub static REQUEST_PRINCIPAL_HEADER: HeaderName =
    HeaderName::from_static("x-outrider-request-principal");

static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Whether `name` is one of ours in a spelling some server reads as ours:
/// `x-outrider-client-id`, `X_Outrider_Client_Id` (CGI and WSGI servers
/// turn `-` and `_` alike into `HTTP_X_OUTRIDER_CLIENT_ID`).
pub fn is_reserved(name: &HeaderName) -> bool {
    // Policies judge claim headers by the same rule, so it lives there.
    crate::policy::jwt::is_reserved_header(name)
}

/// Removes every reserved header, whoever set it.
pub fn strip_reserved(headers: &mut HeaderMap) {
    let reserved: Vec<HeaderName> = headers.keys().filter(|n| is_reserved(n)).cloned().collect();
    for name in reserved {
        headers.remove(name);
    }
}

/// More than one `Host`: RFC 9112 §3.2 requires a 400.
pub fn has_duplicate_host(headers: &HeaderMap) -> bool {
    headers.get_all(header::HOST).iter().nth(1).is_some()
}

/// Removes hop-by-hop headers (and those the `Connection` header names).
/// For a WebSocket upgrade, `Upgrade: websocket` and `Connection: upgrade`
/// are what remain of them. `TE: trailers` survives for gRPC over HTTP/2.
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
        &HTTP2_SETTINGS,
        &header::TRANSFER_ENCODING,
        &header::TRAILER,
    ] {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if upgrade {
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Sets the identity we verified (reserved headers are already gone:
/// without an identity, the caller gets none).
pub fn set_client_id(headers: &mut HeaderMap, client_id: Option<&HeaderValue>) {
    if let Some(value) = client_id {
        headers.insert(CLIENT_ID_HEADER.clone(), value.clone());
    }
}

/// A request to switch to WebSocket: `Connection: upgrade` and
/// `websocket` among the `Upgrade` tokens. Nothing else is an upgrade.
pub fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        req.headers()
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(header::CONNECTION, "upgrade") && has_token(header::UPGRADE, "websocket")
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
    fn every_spelling_of_our_headers_is_removed_and_nothing_else() {
        let mut h = HeaderMap::new();
        for name in [
            "x-outrider-client-id",
            "x_outrider_client_id",
            "X-Outrider_Client-Id",
            "x-outrider-request-principal",
            "x-outrider-anything-new",
        ] {
            h.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_static("spiffe://cluster.local/ns/a/sa/forged"),
            );
        }
        for kept in [
            "x-outriders",
            "x-outrider",
            "xx-outrider-client-id",
            "x-other",
        ] {
            h.insert(
                HeaderName::from_bytes(kept.as_bytes()).unwrap(),
                HeaderValue::from_static("1"),
            );
        }
        strip_reserved(&mut h);
        let left: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left.len(), 4, "{left:?}");
        assert!(
            left.iter().all(|n| !n.starts_with("x-outrider-")),
            "{left:?}"
        );
        set_client_id(&mut h, None);
        assert!(!h.contains_key(&CLIENT_ID_HEADER));
    }

    #[test]
    fn only_websocket_is_an_upgrade_and_h2c_is_stripped() {
        let request = |upgrade: &'static str| {
            Request::get("/")
                .header(header::CONNECTION, "Upgrade, HTTP2-Settings")
                .header(header::UPGRADE, upgrade)
                .header("http2-settings", "AAMAAABkAARAAAAAAAIAAAAA")
                .body(())
                .unwrap()
        };
        assert!(is_websocket_upgrade(&request("websocket")));
        assert!(is_websocket_upgrade(&request("WebSocket")));
        assert!(!is_websocket_upgrade(&request("h2c")));
        assert!(!is_websocket_upgrade(&request("TLS/1.0")));
        let mut h2c = request("h2c");
        strip_hop_by_hop(h2c.headers_mut(), false);
        assert!(h2c.headers().is_empty(), "{:?}", h2c.headers());
        let mut both = request("h2c, websocket");
        strip_hop_by_hop(both.headers_mut(), true);
        assert_eq!(both.headers()[header::UPGRADE], "websocket");
        assert!(!both.headers().contains_key("http2-settings"));
    }

    #[test]
    fn a_second_host_is_noticed() {
        let mut h = HeaderMap::new();
        h.append(header::HOST, HeaderValue::from_static("a"));
        assert!(!has_duplicate_host(&h));
        h.append(header::HOST, HeaderValue::from_static("b"));
        assert!(has_duplicate_host(&h));
    }
}
