//! The HTTP/1-over-HTTP/2 form between two proxies: an HTTP/1 request
//! rides the shared HTTP/2 mesh connection with its original version in
//! [`ORIG_PROTO_HEADER`], and the inbound proxy turns it back before the
//! application sees it. Pure; used by the forwarder and the pool.

use std::net::SocketAddr;

use http::Request;
use http::header::{self, HeaderName, HeaderValue};

/// Marks an HTTP/1 request that travels between proxies as HTTP/2, with
/// its original version, so the inbound proxy can turn it back.
pub static ORIG_PROTO_HEADER: HeaderName = HeaderName::from_static("x-outrider-orig-proto");

/// Puts an HTTP/1 request in HTTP/2 form for the hop to a peer proxy: the
/// authority moves from `Host` (or the destination address) into the URI,
/// and the original version travels in [`ORIG_PROTO_HEADER`].
pub fn http1_to_mesh_http2<B>(req: &mut Request<B>, dst: SocketAddr) {
    let original = if req.version() == http::Version::HTTP_10 {
        "HTTP/1.0"
    } else {
        "HTTP/1.1"
    };
    if req.uri().authority().is_none() {
        let host = req.headers_mut().remove(header::HOST);
        let authority = host
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.parse::<http::uri::Authority>().ok())
            .unwrap_or_else(|| {
                http::uri::Authority::try_from(dst.to_string().as_str())
                    .unwrap_or_else(|_| http::uri::Authority::from_static("localhost"))
            });
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(http::uri::Scheme::HTTP);
        parts.authority = Some(authority);
        parts.path_and_query = req
            .uri()
            .path_and_query()
            .cloned()
            .or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
        if let Ok(uri) = http::Uri::from_parts(parts) {
            *req.uri_mut() = uri;
        }
    } else {
        req.headers_mut().remove(header::HOST);
    }
    req.headers_mut().insert(
        ORIG_PROTO_HEADER.clone(),
        HeaderValue::from_static(original),
    );
    *req.version_mut() = http::Version::HTTP_2;
}

/// Turns a request that [`http1_to_mesh_http2`] converted back into HTTP/1
/// for the application. Returns false (and changes nothing) when the
/// request was not converted.
pub fn mesh_http2_to_http1<B>(req: &mut Request<B>) -> bool {
    if req.headers_mut().remove(&ORIG_PROTO_HEADER).is_none() {
        return false;
    }
    if !req.headers().contains_key(header::HOST)
        && let Some(host) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        req.headers_mut().insert(header::HOST, host);
    }
    let origin_form = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| http::uri::PathAndQuery::from_static("/"));
    *req.uri_mut() = http::Uri::from(origin_form);
    *req.version_mut() = http::Version::HTTP_11;
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        "10.0.0.7:8080".parse().unwrap()
    }

    #[test]
    fn an_http1_request_round_trips_through_the_mesh_http2_form() {
        let mut req = Request::get("/api/items?page=2")
            .version(http::Version::HTTP_11)
            .header("host", "shop.example:8080")
            .header("x-app", "1")
            .body(())
            .unwrap();
        http1_to_mesh_http2(&mut req, addr());
        assert_eq!(req.version(), http::Version::HTTP_2);
        assert_eq!(
            req.uri().to_string(),
            "http://shop.example:8080/api/items?page=2"
        );
        assert!(
            !req.headers().contains_key(header::HOST),
            "Host must not differ from :authority"
        );
        assert_eq!(req.headers()[&ORIG_PROTO_HEADER], "HTTP/1.1");

        assert!(mesh_http2_to_http1(&mut req));
        assert_eq!(req.version(), http::Version::HTTP_11);
        assert_eq!(req.uri().to_string(), "/api/items?page=2");
        assert_eq!(req.headers()[header::HOST], "shop.example:8080");
        assert_eq!(req.headers()["x-app"], "1");
        assert!(!req.headers().contains_key(&ORIG_PROTO_HEADER));
    }

    #[test]
    fn a_request_without_host_uses_the_destination_as_authority() {
        let mut req = Request::get("/")
            .version(http::Version::HTTP_10)
            .body(())
            .unwrap();
        http1_to_mesh_http2(&mut req, addr());
        assert_eq!(req.uri().authority().unwrap().as_str(), "10.0.0.7:8080");
        assert_eq!(req.headers()[&ORIG_PROTO_HEADER], "HTTP/1.0");
    }

    #[test]
    fn an_absolute_form_request_keeps_its_authority() {
        let mut req = Request::get("http://other.example/x")
            .header("host", "ignored")
            .body(())
            .unwrap();
        http1_to_mesh_http2(&mut req, addr());
        assert_eq!(req.uri().to_string(), "http://other.example/x");
        assert!(mesh_http2_to_http1(&mut req));
        assert_eq!(req.headers()[header::HOST], "other.example");
        assert_eq!(req.uri().to_string(), "/x");
    }

    #[test]
    fn a_native_http2_request_is_left_alone() {
        let mut req = Request::get("http://grpc.example/svc/Call")
            .version(http::Version::HTTP_2)
            .body(())
            .unwrap();
        assert!(!mesh_http2_to_http1(&mut req));
        assert_eq!(req.version(), http::Version::HTTP_2);
        assert_eq!(req.uri().to_string(), "http://grpc.example/svc/Call");
    }
}
