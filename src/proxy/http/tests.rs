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

#[test]
fn grpc_callers_get_a_trailers_only_status() {
    let r = synthetic_response(StatusCode::BAD_GATEWAY, "connect_refused", true, 14);
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.headers()["grpc-status"], "14");
    assert_eq!(r.headers()[&ERROR_HEADER], "connect_refused");
    let r = synthetic_response(StatusCode::BAD_GATEWAY, "connect_refused", false, 14);
    assert_eq!(r.status(), StatusCode::BAD_GATEWAY);
}

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
